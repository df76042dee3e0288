"""Per-worker state shared by the tasks: loaded backbones and fitted models."""
from __future__ import annotations

import functools

import torch

from anomaly.features import FeatureConfig, PatchFeatureExtractor

# each Dask worker process runs one task at a time with one thread: intra-op threads would
# only fight the other workers for the same cores
torch.set_num_threads(1)


@functools.lru_cache(maxsize=4)
def feature_extractor(config: FeatureConfig) -> PatchFeatureExtractor:
    return PatchFeatureExtractor(config)
