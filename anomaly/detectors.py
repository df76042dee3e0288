"""The three detectors behind one small interface, for code that handles any of them."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from .features import FeatureConfig, PatchFeatures, native_shape
from .padim import Padim, PadimConfig
from .patchcore import PatchCore, PatchCoreConfig
from .spade import Spade, SpadeConfig
from .tiling import TilingConfig

CONFIGS = {"patchcore": PatchCoreConfig, "padim": PadimConfig, "spade": SpadeConfig}

# Feature defaults that differ by detector. PatchCore: a quarter-size context scale in each patch
# vector raises MTD image AUROC from 0.947 to 0.967 while its maps keep the primary scale
# (README, "Choosing defaults"). PaDiM: every channel and the same context scale (MTD 0.972 against
# 0.951 for 100 random channels, no context); its one input size for every image is the nominal
# images' own (with_input_size), not a fixed square: on the quality benchmark's seven sets a
# 320 x 320 square lost up to 0.12 image AUROC against the images' own size and aspect (README,
# "Quality on data it was not tuned on").
DEFAULT_FEATURES = {"patchcore": {"context_scales": (0.25,)}, "padim": {"context_scales": (0.25,)}, "spade": {}}


def needs_input_size(detector: str, features: FeatureConfig) -> bool:
    """Whether ``detector`` needs one input size for every image that ``features`` does not fix yet:
    PaDiM's per-position Gaussians, without square_side or fixed_shape."""
    return detector == "padim" and not features.square_side and not features.fixed_shape


def with_input_size(detector: str, features: FeatureConfig, image_shapes: list[tuple[int, int]],
                    tiling: TilingConfig | None = None) -> FeatureConfig:
    """``features`` with the input size ``detector`` needs set from the (height, width) of the
    nominal images, each counted as what the network sees of it (its tiles, where ``tiling`` tiles
    it): their median area, within 320 x 320 to 512 x 512, at their shared aspect, else square
    (:func:`anomaly.features.native_shape`); unchanged where nothing is needed."""
    if not needs_input_size(detector, features):
        return features
    views = [tiling.view_shape(*shape) for shape in image_shapes] if tiling else list(image_shapes)
    return replace(features, fixed_shape=native_shape(views))


def default_features(name: str, **overrides) -> FeatureConfig:
    """The feature settings ``name`` uses unless told otherwise; ``overrides`` that are not None win."""
    if name not in CONFIGS:
        raise ValueError(f"unknown detector {name!r}; choose one of {', '.join(CONFIGS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return FeatureConfig(**{**DEFAULT_FEATURES[name], **given})


# a new fit's detector settings where they differ from the dataclass defaults, which stay what
# models written before them were fitted with (a manifest without "shrinkage" was fitted without):
# PaDiM's OAS-shrunk covariances were within 0.02 image AUROC of the best configuration on 5 of
# the quality benchmark's 7 sets (best on MTD and brick), against 2 without (README, "Quality on
# data it was not tuned on")
NEW_FIT_SETTINGS = {"padim": {"shrinkage": "oas"}}


def detector_config(name: str, values: dict | None = None):
    """``values`` (a manifest's record) as the detector's config; a new fit's defaults without."""
    if name not in CONFIGS:
        raise ValueError(f"unknown detector {name!r}; choose one of {', '.join(CONFIGS)}")
    return CONFIGS[name].from_dict(values) if values else CONFIGS[name](**NEW_FIT_SETTINGS.get(name, {}))


def for_features(name: str, settings, features: FeatureConfig):
    """Detector settings that depend on the features: PatchCore draws its maps from the primary
    scale's dimensions when the vectors also carry context scales."""
    if name == "patchcore" and features.context_scales:
        return replace(settings, map_dims=features.primary_dims)
    return settings


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
