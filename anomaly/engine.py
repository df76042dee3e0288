"""Fit and score in memory, whole images and tiled large ones alike (arrays in, arrays out).

The flows spread the same steps over Dask workers and storage; this module is what the label-free
configuration probe (:mod:`anomaly.selection`) and the quality benchmarks run in one process.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .detectors import score_grid
from .features import PatchFeatureExtractor, PatchFeatures
from .maps import StitchedMap, anomaly_map
from .padim import Padim
from .patchcore import PatchCore
from .settings import mirror_views
from .spade import Spade
from .tiling import Tile, TilingConfig, holding_the_largest, stitch_grids, tile_grid, tile_sigma


def image_views(image: np.ndarray, tiling: TilingConfig | None) -> list[tuple[Tile | None, np.ndarray]]:
    """The parts of ``image`` the network sees: the whole image, or its tiles when it is large."""
    height, width = image.shape[:2]
    if tiling is None or not tiling.needs_tiling(height, width):
        return [(None, image)]
    return [(tile, image[tile.top:tile.bottom, tile.left:tile.right])
            for tile in tile_grid(height, width, tiling.tile, tiling.overlap)]


def extract_views(extractor: PatchFeatureExtractor, image: np.ndarray,
                  tiling: TilingConfig | None) -> list[tuple[Tile | None, PatchFeatures]]:
    return [(tile, extractor.extract([view])[0]) for tile, view in image_views(image, tiling)]


def training_views(extractor: PatchFeatureExtractor, image: np.ndarray,
                   tiling: TilingConfig | None) -> list[tuple[Tile | None, PatchFeatures]]:
    """What a fit learns from one nominal image: its views (:func:`extract_views`) and those of the
    mirror images its feature settings add (FeatureConfig.mirrors)."""
    return [view for _, pixels in mirror_views(image, extractor.config.mirrors)
            for view in extract_views(extractor, pixels, tiling)]


def fit_detector(name: str, settings, features: list[PatchFeatures]):
    """A detector fitted on the patch features of nominal images (or tiles)."""
    if name == "patchcore":
        return PatchCore.fit(np.concatenate([f.vectors for f in features]), settings)
    if name == "padim":
        return Padim.fit([f.vectors for f in features], features[0].grid, settings)
    if name == "spade":
        return Spade.fit([f.vectors for f in features], settings)
    raise ValueError(f"unknown detector {name!r}")


@dataclass
class Scored:
    score: float
    map: np.ndarray   # (H, W) float32 at the image's own size


def score_features(detector, views: list[tuple[Tile | None, PatchFeatures]], image_shape: tuple[int, int],
                   tiling: TilingConfig | None) -> Scored:
    """Image score and anomaly map from the features of an image's views, as the score flow
    computes them: one view -> the detector's own map; tiles -> grids blended by
    :class:`GridStitcher`, the image score that of the tile holding the largest patch score."""
    sigma = detector.config.sigma
    if len(views) == 1 and views[0][0] is None:
        score, grid = score_grid(detector, views[0][1])
        features = views[0][1]
        return Scored(score, anomaly_map(grid, features.image_shape, sigma, features.input_shape).astype(np.float32))
    scored = (detector.tile_scores_and_grids([features for _, features in views]) if isinstance(detector, PatchCore)
              else [score_grid(detector, features) for _, features in views])
    grids = [grid for _, grid in scored]
    stitcher = stitch_grids(image_shape, [tile for tile, _ in views], grids, tiling.overlap)
    best_score = scored[holding_the_largest([float(grid.max()) for grid in grids])][0]  # as stitch-map picks it
    first = views[0][1]
    sigma_px = tile_sigma(sigma, first.image_shape, first.input_shape)
    return Scored(best_score, StitchedMap(stitcher.grid(), stitcher.stride, image_shape, sigma_px).whole())


def score_image(extractor: PatchFeatureExtractor, detector, image: np.ndarray,
                tiling: TilingConfig | None) -> Scored:
    return score_features(detector, extract_views(extractor, image, tiling), image.shape[:2], tiling)
