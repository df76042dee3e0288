"""The three detectors behind one small interface, for code that handles any of them."""
from __future__ import annotations

import numpy as np

from .features import PatchFeatures
from .padim import Padim
from .patchcore import PatchCore
# the settings and their rules live in a module without torch; imported from here as ever
from .settings import (CONFIGS, DEFAULT_FEATURES, default_features, detector_config, for_features,  # noqa: F401
                       needs_input_size, with_input_size)
from .spade import Spade


def score_grid(detector: PatchCore | Padim | Spade, features: PatchFeatures) -> tuple[float, np.ndarray]:
    """(image score, patch-score grid) of one image or tile, before upsampling and smoothing.

    Tiled scoring stitches the grids of many tiles; the image score of a tiled image is the
    score of the tile holding its largest patch score.
    """
    vectors = features.vectors
    if isinstance(detector, PatchCore):
        return detector.image_score_and_grid(features)
    if isinstance(detector, Padim):
        grid = detector.patch_scores(vectors).reshape(features.grid)
        return float(grid.max()), grid
    images, knn_score = detector.nearest_images(vectors)
    grid = detector.patch_scores(vectors, images).reshape(features.grid)
    return (float(grid.max()) if detector.config.image_score == "max_map" else knn_score), grid
