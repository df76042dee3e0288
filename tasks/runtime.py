"""Per-worker state shared by the tasks: loaded backbones and fitted models."""
from __future__ import annotations

import functools

import torch

from patchwatch.anomaly.features import FeatureConfig, PatchFeatureExtractor
from patchwatch.anomaly.runtime import configured_device, configured_runtime

# each Dask worker process runs one task at a time with one thread: intra-op threads would
# only fight the other workers for the same cores
torch.set_num_threads(1)


def feature_extractor(config: FeatureConfig) -> PatchFeatureExtractor:
    """The extractor for ``config``, its backbone run by this process's configured runtime and
    device (PATCHWATCH_RUNTIME, PATCHWATCH_DEVICE: set by the command's --runtime and --device
    before the workers start)."""
    runtime, threads = configured_runtime()
    return _feature_extractor(config, runtime, threads, str(configured_device()))


@functools.lru_cache(maxsize=4)
def _feature_extractor(config: FeatureConfig, runtime: str, threads: int, device: str) -> PatchFeatureExtractor:
    return PatchFeatureExtractor(config, device=device, runtime=runtime, threads=threads)
