"""The three detectors behind one small interface, for code that handles any of them."""
from __future__ import annotations

import numpy as np

from .features import PatchFeatures
from .padim import Padim, PadimConfig
from .patchcore import PatchCore, PatchCoreConfig, reweight_image_score
from .spade import Spade, SpadeConfig

CONFIGS = {"patchcore": PatchCoreConfig, "padim": PadimConfig, "spade": SpadeConfig}


def detector_config(name: str, values: dict | None = None):
    if name not in CONFIGS:
        raise ValueError(f"unknown detector {name!r}; choose one of {', '.join(CONFIGS)}")
    return CONFIGS[name].from_dict(values) if values else CONFIGS[name]()


def score_grid(detector: PatchCore | Padim | Spade, features: PatchFeatures) -> tuple[float, np.ndarray]:
    """(image score, patch-score grid) of one image or tile, before upsampling and smoothing.

    Tiled scoring stitches the grids of many tiles; the image score of a tiled image is the
    score of the tile holding its largest patch score.
    """
    vectors = features.vectors
    if isinstance(detector, PatchCore):
        scores, nearest = detector.patch_scores(vectors)
        weighted = reweight_image_score(vectors, scores, nearest, detector.memory, detector.index,
                                        detector.config.num_neighbors)
        return weighted, scores.reshape(features.grid)
    if isinstance(detector, Padim):
        grid = detector.patch_scores(vectors).reshape(features.grid)
        return float(grid.max()), grid
    images, knn_score = detector.nearest_images(vectors)
    grid = detector.patch_scores(vectors, images).reshape(features.grid)
    return (float(grid.max()) if detector.config.image_score == "max_map" else knn_score), grid
