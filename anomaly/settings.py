"""Every setting of the model as plain dataclasses, with the defaults and the rules that derive
one setting from another. Numpy only: the command decides from these (its options, a fit with
nothing new) without loading torch or faiss, which take seconds to import."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

DEFAULT_BACKBONE = "tf_efficientnet_lite0"

# the mirror images a fit can add to each nominal image (FeatureConfig.mirrors)
MIRRORS = ("h", "v", "hv")


def mirrored(image: np.ndarray, mirror: str) -> np.ndarray:
    """``image`` (height, width[, channels]) mirrored left-right ("h"), up-down ("v") or both ("hv")."""
    if mirror not in MIRRORS:
        raise ValueError(f"unknown mirror {mirror!r}; choose among {', '.join(MIRRORS)}")
    rows = slice(None, None, -1) if "v" in mirror else slice(None)
    columns = slice(None, None, -1) if "h" in mirror else slice(None)
    return np.ascontiguousarray(image[rows, columns])


def mirror_views(image: np.ndarray, mirrors: tuple[str, ...]) -> list[tuple[str, np.ndarray]]:
    """(mirror, pixels) of what a fit learns from one nominal image: ("", the image) first, then
    each of ``mirrors`` (FeatureConfig.mirrors)."""
    return [("", image)] + [(mirror, mirrored(image, mirror)) for mirror in mirrors]


@dataclass(frozen=True)
class FeatureConfig:
    backbone: str = DEFAULT_BACKBONE
    # timm feature stages. For WideResNet50, (2, 3) are the paper's layer2 + layer3. For the
    # small EfficientNet-Lite the last two stages (strides 16 and 32) are the ones that separate
    # MTD's defects: image AUROC 0.92 against 0.85 for (2, 3) (see README, "Choosing defaults")
    layers: tuple[int, ...] = (3, 4)
    # every image is resized by the same factor (aspect kept), so a texture has the same scale in
    # every image: resizing each to a fixed size would show the network different scales.
    # Half size gives each stride-16 patch more context: MTD image AUROC 0.952 at 0.5 (10 %
    # coreset) against 0.934 at 0.75 (1 % coreset); README, "Choosing defaults"
    input_scale: float = 0.5
    # more scales the backbone also sees each image at; their stage maps are resized to the
    # grid of ``input_scale`` and appended to each patch vector (half of it for one more scale),
    # so a patch also carries wider context (PatchCore's default: anomaly.settings.default_features)
    context_scales: tuple[float, ...] = ()
    # > 0: resize every image to this square side instead (aspect not kept)
    square_side: int = 0
    # (height, width): resize every image to this size instead (aspect not kept); wins over
    # square_side. What :func:`native_shape` gives for a set of nominal images
    fixed_shape: tuple[int, ...] = ()
    size_multiple: int = 16
    patch_size: int = 3
    layer_dim: int = 256
    embed_dim: int = 256
    # mirror images of every nominal training image that the fit adds to it ("h": left-right, "v":
    # up-down, "hv": both), for images that look the same mirrored (a texture, not a part): more
    # nominal samples of each position. ``fit --auto`` sets them from its probe
    # (anomaly.probe_choice.mirror_choice); scoring never mirrors
    mirrors: tuple[str, ...] = ()

    def __post_init__(self):
        unknown = [m for m in self.mirrors if m not in MIRRORS]
        if unknown:
            raise ValueError(f"unknown mirror {unknown[0]!r}; choose among {', '.join(MIRRORS)}")

    def to_dict(self) -> dict:
        data = asdict(self)
        for optional in ("fixed_shape", "mirrors"):  # as written before these existed: banks compare settings
            if not data[optional]:
                del data[optional]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "FeatureConfig":
        data = dict(data)
        data["layers"] = tuple(data["layers"])
        data["context_scales"] = tuple(data.get("context_scales", ()))
        data["fixed_shape"] = tuple(data.get("fixed_shape", ()))
        data["mirrors"] = tuple(data.get("mirrors", ()))
        return cls(**data)

    @property
    def block_dims(self) -> list[int]:
        """Patch-vector dimensions per scale, the primary scale's first: an even split."""
        scales = 1 + len(self.context_scales)
        share = self.embed_dim // scales
        return [self.embed_dim - share * (scales - 1)] + [share] * (scales - 1)

    @property
    def primary_dims(self) -> int:
        """The leading dimensions that describe a patch at the primary scale only."""
        return self.block_dims[0]


# the area of native_shape's input size: at most 512 x 512 (a per-position model grows with it:
# PaDiM's float64 inverse covariances take positions x 256 x 256 x 8 bytes, 537 MB at 32 x 32
# positions, 210 MB at 20 x 20), at least 320 x 320 for a square and a short side of 320 for any
# other shape, where the upper bound allows (a smaller or thinner image is scaled up: on
# tests/test_quality.py's 256 x 256 fine texture, PaDiM's maps peak on the 4-pixel defect in 8 of 8
# images at 320 x 320, 7 of 8 at the texture's own size; the default square until 2026-11-30)
NATIVE_AREA = (320 * 320, 512 * 512)


# (share, tolerance): images share an aspect when this share of them is within this relative
# tolerance of the median aspect
SHARED_ASPECT = (0.9, 0.1)


def native_shape(shapes: list[tuple[int, int]], area: tuple[int, int] = NATIVE_AREA,
                 multiple: int = 16) -> tuple[int, int]:
    """One network input size for images of ``shapes`` (height, width): their median area, scaled
    into the ``area`` range (low, high), so the network sees them at about their own resolution;
    at their shared aspect if they have one (a set of wide strips stays wide), else square (images
    of many aspects, such as MTD's tiles, have no typical one: each is resized anyway). A shape
    whose short side is below the least square's (320 px) is scaled up until it is not, where the
    area bound allows (for a square, the least area): a fabric strip's 256 x 512 tiles at 320 x 640
    found their defects better than at their own size or squashed into 320 x 320 (README, "Quality
    on data it was not tuned on"). Sides rounded to ``multiple``."""
    if not shapes:
        raise ValueError("native_shape needs at least one image shape")
    sizes = np.array(shapes, dtype=np.float64)
    aspects = sizes[:, 0] / sizes[:, 1]
    aspect = float(np.median(aspects))
    share, tolerance = SHARED_ASPECT
    if np.mean(np.abs(np.log(aspects / aspect)) <= np.log1p(tolerance)) < share:
        aspect = 1.0
    # the least area at this aspect: the short side's floor (for a square, the least area)
    pixels = min(max(float(np.median(sizes[:, 0] * sizes[:, 1])), area[0] * max(aspect, 1 / aspect)), area[1])
    height, width = (pixels * aspect) ** 0.5, (pixels / aspect) ** 0.5
    return (max(multiple, round(height / multiple) * multiple), max(multiple, round(width / multiple) * multiple))


@dataclass(frozen=True)
class PatchCoreConfig:
    # the paper's range is 1-25 %; at half-size inputs the bank is small (80k patches on MTD)
    # and 10 % covers rare nominal patches better (192 px squares: image AUROC 0.944 against
    # 0.924 at 1 %)
    coreset_ratio: float = 0.1
    projection_dim: int = 128
    num_neighbors: int = 9     # b of eq. 7
    sigma: float = 4.0
    seed: int = 0
    # > 0: the anomaly map's patch scores use only the first map_dims dimensions of each vector
    # (the primary scale's features): context scales sharpen the image score but blur the map
    # (MTD AUPRO 0.624 from whole vectors, 0.689 from the primary half: README, "Choosing defaults")
    map_dims: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PatchCoreConfig":
        return cls(**data)


FIXED_GRID_HINT = "PaDiM needs one input size for every image: set fixed_shape or square_side"


@dataclass(frozen=True)
class PadimConfig:
    # random subset of the feature channels (the paper's "Rd"): the covariance is C x C per
    # position, and the paper finds a random subset as good as PCA at a fraction of the cost.
    # The default keeps all 256 of the default patch vector: MTD image AUROC 0.962 against 0.951
    # with 100 (anomaly.settings.DEFAULT_FEATURES), at 400 positions x 256^2 floats of model
    channels: int = 256
    seed: int = 0
    sigma: float = 4.0
    # regulariser of each covariance (cov + epsilon * I): keeps it invertible when there are
    # fewer images than channels, as in the paper's reference code
    epsilon: float = 0.01
    # "oas": each position's covariance shrunk towards a multiple of the identity by the Oracle
    # Approximating Shrinkage amount (Chen et al. 2010, as sklearn.covariance.OAS), which is
    # large when there are few images per channel (a covariance of 256 channels from 100 images)
    # and vanishes with many; "none": the sample covariance (+ epsilon) as in the paper
    shrinkage: str = "none"

    def __post_init__(self):
        if self.shrinkage not in SHRINKAGES:
            raise ValueError(f"unknown PaDiM shrinkage {self.shrinkage!r}; choose one of {', '.join(SHRINKAGES)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PadimConfig":
        return cls(**data)


SHRINKAGES = ("none", "oas")


IMAGE_SCORES = ("knn", "max_map")


@dataclass(frozen=True)
class SpadeConfig:
    # K: nearest nominal images, by global feature (MTD: K = 10 ranks best and scores 5x faster
    # than the paper's 50)
    k_images: int = 10
    kappa: int = 1       # nearest patches averaged into a patch score
    sigma: float = 4.0
    # "knn": the paper's image score, the mean distance to the K nearest global features;
    # "max_map": the maximum of the anomaly map. A global average hardly moves for a small
    # defect, so "max_map" ranks images with small defects far better (MTD image AUROC 0.90
    # against 0.63 at K = 50, EfficientNet-Lite0 stages 3+4); the default for that reason
    image_score: str = "max_map"

    def __post_init__(self):
        if self.image_score not in IMAGE_SCORES:
            raise ValueError(f"image_score must be one of {IMAGE_SCORES}, got {self.image_score!r}")
        if self.k_images < 1 or self.kappa < 1:
            raise ValueError(f"k_images and kappa must be >= 1, got {self.k_images} and {self.kappa}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SpadeConfig":
        return cls(**data)


@dataclass(frozen=True)
class TilingConfig:
    tile: int = 512          # tile side in image pixels
    overlap: int = 128       # pixels shared by neighbouring tiles
    threshold: int = 1024    # images with a side above this are tiled

    def to_dict(self) -> dict:
        return asdict(self)

    def needs_tiling(self, height: int, width: int) -> bool:
        return max(height, width) > self.threshold

    def view_shape(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of what the network sees of such an image: itself, or its tiles (a
        side shorter than a tile is one tile of that side; the last tile ends at the border)."""
        if not self.needs_tiling(height, width):
            return (height, width)
        return (min(height, self.tile), min(width, self.tile))


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
    it): their median area, at most 512 x 512, with a short side of at least 320 where that allows,
    at their shared aspect, else square (:func:`anomaly.settings.native_shape`); unchanged where
    nothing is needed."""
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
