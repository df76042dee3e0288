"""Choose a configuration from nominal images alone (``patchwatch fit --auto``).

A user with a new production line has defect-free images and no labels. Each candidate
configuration (feature settings + detector) is fitted on part of those images and scored on the
rest twice: as they are, and with one synthetic defect pasted in. The candidate that best tells
the two apart (image AUROC) is kept. The synthetic defects are deliberately generic (a region of
another nominal image pasted in, a local intensity change, a thin line: in the spirit of CutPaste
and DRAEM) and drawn at many sizes and contrasts, so the probe measures how well a configuration
notices *any* local departure from the nominal appearance at the data's own scale.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.ndimage import gaussian_filter
from sklearn.metrics import roc_auc_score

from .detectors import default_features, detector_config, for_features, with_input_size
from .engine import extract_views, fit_detector, score_features, training_views
from .features import FeatureConfig, PatchFeatureExtractor, to_float_rgb
from .settings import MIRRORS, mirrored
from .tiling import TilingConfig, tile_grid

DEFECT_KINDS = ("paste", "intensity", "line")


@dataclass(frozen=True)
class Candidate:
    name: str
    detector: str
    features: FeatureConfig
    settings: object  # the detector's config dataclass

    @classmethod
    def make(cls, name: str, detector: str, features: dict | None = None, settings: dict | None = None):
        feature_config = default_features(detector, **(features or {}))
        base = detector_config(detector)
        config = type(base).from_dict({**base.to_dict(), **(settings or {})})
        return cls(name, detector, feature_config, for_features(detector, config, feature_config))

    def describe(self) -> dict:
        return {"name": self.name, "detector": self.detector, "feature_config": self.features.to_dict(),
                "detector_config": self.settings.to_dict()}

    def with_mirrors(self, mirrors: tuple[str, ...], name: str | None = None) -> "Candidate":
        """This candidate fitted on every nominal image's ``mirrors`` too (FeatureConfig.mirrors)."""
        return replace(self, name=name or self.name, features=replace(self.features, mirrors=tuple(mirrors)))

    def for_images(self, image_shapes: list[tuple[int, int]], tiling: TilingConfig | None = None) -> "Candidate":
        """This candidate as fitted on images of ``image_shapes``: with the input size its detector
        needs set from them (:func:`anomaly.settings.with_input_size`)."""
        features = with_input_size(self.detector, self.features, image_shapes, tiling)
        return self if features == self.features else replace(self, features=features)


def default_candidates() -> list[Candidate]:
    """The configurations ``--auto`` compares; the first is kept unless another clearly beats it
    on the probe (:func:`anomaly.probe_choice.choose_candidate`). They span what the quality
    benchmark found to matter on unseen data (bench/bench_generalisation.py): PaDiM as a new fit
    defaults (the images' own size and aspect, every channel, a context scale and OAS-shrunk
    covariances: the most robust across the benchmark's sets), a local PaDiM (100 channels, no
    context, no shrinkage: small defects on regular textures), PatchCore's default (coarse grid
    with context) and a fine stride-8 grid (best on aligned parts with thin cracks). The default's
    features at full size are no longer compared: never the best on any set beyond the benchmark's
    noise, at 15x PaDiM's scoring time on MTD (git show 2e5f13a:bench/results/generalisation.md)."""
    return [
        Candidate.make("padim", "padim"),
        Candidate.make("padim-local", "padim", {"square_side": 256, "context_scales": ()},
                       {"channels": 100, "shrinkage": "none"}),
        Candidate.make("coarse-context", "patchcore"),
        Candidate.make("fine", "patchcore", {"layers": (2, 3), "input_scale": 1.0, "context_scales": ()},
                       {"coreset_ratio": 0.02}),
    ]


# ---- synthetic defects ----------------------------------------------------------------------------
def irregular_region(shape: tuple[int, int], diameter: float, rng: np.random.Generator) -> np.ndarray:
    """(H, W) float32 alpha in [0, 1]: a soft-edged irregular blob of about ``diameter`` pixels at a
    random place (smoothed noise inside an ellipse, so outlines differ every time)."""
    height, width = shape
    radius_y = max(1.5, diameter / 2 * rng.uniform(0.5, 1.5))
    radius_x = max(1.5, diameter / 2 * rng.uniform(0.5, 1.5))
    cy, cx = rng.uniform(radius_y, max(radius_y + 1, height - radius_y)), rng.uniform(radius_x, max(radius_x + 1, width - radius_x))
    angle = rng.uniform(0, np.pi)
    top, bottom = int(max(0, cy - 2 * max(radius_y, radius_x))), int(min(height, cy + 2 * max(radius_y, radius_x) + 1))
    left, right = int(max(0, cx - 2 * max(radius_y, radius_x))), int(min(width, cx + 2 * max(radius_y, radius_x) + 1))
    yy, xx = np.mgrid[top:bottom, left:right].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / radius_x
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / radius_y
    noise = gaussian_filter(rng.standard_normal(u.shape).astype(np.float32), max(1.0, diameter / 6))
    noise /= max(float(np.abs(noise).max()), 1e-6)
    inside = 1.0 - np.sqrt(u ** 2 + v ** 2) + 0.35 * noise
    alpha = np.zeros(shape, np.float32)
    alpha[top:bottom, left:right] = np.clip(inside / 0.25, 0, 1)
    return gaussian_filter(alpha, 0.7)


def thin_line(shape: tuple[int, int], length: float, rng: np.random.Generator) -> np.ndarray:
    """(H, W) float32 alpha of a gently curving, anti-aliased line 1-3 px wide."""
    height, width = shape
    steps = max(8, int(length))
    y, x = rng.uniform(0, height), rng.uniform(0, width)
    heading, turn = rng.uniform(0, 2 * np.pi), rng.normal(0, 0.03)
    points = []
    for _ in range(steps):
        points.append((y, x))
        heading += turn + rng.normal(0, 0.05)
        y, x = y + np.sin(heading), x + np.cos(heading)
    points = np.array(points)
    alpha = np.zeros(shape, np.float32)
    rows, cols = np.round(points[:, 0]).astype(int), np.round(points[:, 1]).astype(int)
    keep = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    alpha[rows[keep], cols[keep]] = 1.0
    width_px = rng.uniform(0.5, 1.2)
    alpha = gaussian_filter(alpha, width_px)
    return np.clip(alpha / max(float(alpha.max()), 1e-6), 0, 1)


def paste_defect(image: np.ndarray, donor: np.ndarray, rng: np.random.Generator,
                 kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``image`` with one synthetic defect, as (H, W, 3) float32 in [0, 1], and its boolean mask.

    Sizes run from a few pixels to a sixth of the shorter side; contrasts are set relative to the
    image's own intensity spread, from faint to plain.
    """
    rgb = to_float_rgb(image)
    height, width = rgb.shape[:2]
    kind = kind or DEFECT_KINDS[rng.integers(len(DEFECT_KINDS))]
    short = min(height, width)
    diameter = float(np.exp(rng.uniform(np.log(max(4.0, short * 0.02)), np.log(max(6.0, short / 6)))))
    spread = max(float(rgb.std()), 0.02)
    if kind == "paste":
        alpha = irregular_region((height, width), diameter, rng)
        source = to_float_rgb(donor)
        source = np.rot90(source, rng.integers(4)) if rng.random() < 0.5 else source
        dy, dx = rng.integers(0, max(1, source.shape[0] - height + 1)), rng.integers(0, max(1, source.shape[1] - width + 1))
        source = source[dy:dy + height, dx:dx + width]
        # a donor smaller than the image is mirrored out to its size
        source = np.pad(source, ((0, height - source.shape[0]), (0, width - source.shape[1]), (0, 0)), mode="symmetric")
        shift = (rng.integers(height), rng.integers(width))
        fill = np.roll(source, shift, axis=(0, 1))
    elif kind == "intensity":
        alpha = irregular_region((height, width), diameter, rng)
        fill = rgb + rng.choice([-1, 1]) * rng.uniform(0.5, 2.0) * spread
    elif kind == "line":
        alpha = thin_line((height, width), rng.uniform(0.1, 0.4) * max(height, width), rng)
        fill = rgb + rng.choice([-1, 1]) * rng.uniform(1.0, 3.0) * spread
    else:
        raise ValueError(f"unknown defect kind {kind!r}; choose one of {DEFECT_KINDS}")
    out = (1 - alpha[..., None]) * rgb + alpha[..., None] * fill
    # the defect region keeps the sensor noise of its surroundings
    out += (alpha[..., None] > 0.05) * rng.normal(0, 0.01, rgb.shape).astype(np.float32)
    changed = np.abs(out - rgb).max(axis=2) > 0.25 * spread
    mask = (alpha > 0.25) & changed
    if not mask.any():  # a defect that did not change the image is no defect: mark its core
        mask = alpha >= alpha.max() * 0.5
    return np.clip(out, 0, 1).astype(np.float32), mask


def probe_views(image: np.ndarray, tiling: TilingConfig | None, rng: np.random.Generator,
                most: int = 1) -> list[np.ndarray]:
    """A large image is probed on up to ``most`` tile-sized crops at distinct, non-overlapping
    tile positions (the model sees it tile by tile anyway); a small one as it is."""
    height, width = image.shape[:2]
    if tiling is None or not tiling.needs_tiling(height, width):
        return [image]
    tiles = tile_grid(height, width, tiling.tile, 0)
    picked = rng.permutation(len(tiles))[:max(1, most)]
    return [image[tiles[i].top:tiles[i].bottom, tiles[i].left:tiles[i].right] for i in sorted(picked)]


# ---- the probe ---------------------------------------------------------------------------------------
@dataclass
class ProbeSet:
    """Nominal images to fit on, and nominal probe images each with a defective twin."""

    train: list[np.ndarray]
    clean: list[np.ndarray]
    defective: list[np.ndarray]
    masks: list[np.ndarray]
    kinds: list[str] = field(default_factory=list)


# how many nominal images the probe fits on and scores: enough for a stable ranking, few enough
# that comparing the candidates costs minutes, not a full fit each
PROBE_IMAGES = 32
PROBE_TRAIN_IMAGES = 80


def make_probe_set(images: list[np.ndarray], probe_images: int = PROBE_IMAGES, seed: int = 0,
                   tiling: TilingConfig | None = None, train_images: int | None = PROBE_TRAIN_IMAGES) -> ProbeSet:
    """Split nominal ``images`` into a fitting part and ``probe_images`` probes (evenly spread),
    and paste one synthetic defect (kinds in turn) into a copy of each probe.

    Images above the tiling threshold give several tile-sized crops each, the fitting part's and
    the probes' from different images: 16 images of 1536 x 1536 gave a probe of 12 crops to fit
    on and 4 to score (an image AUROC over 4 + 4 is noise); now up to 80 and 32."""
    rng = np.random.default_rng(seed)
    count = len(images)
    if count < 4:
        raise ValueError(f"--auto needs at least 4 nominal images to compare configurations, got {count}")
    probes = min(probe_images, max(2, count // 4))
    probe_rows = set(np.linspace(0, count - 1, probes).round().astype(int).tolist())
    train = [images[i] for i in range(count) if i not in probe_rows]
    if train_images is not None and len(train) > train_images:
        train = [train[i] for i in np.linspace(0, len(train) - 1, train_images).round().astype(int)]
    per_train = math.ceil(train_images / len(train)) if train_images else 1
    train = [view for image in train for view in probe_views(image, tiling, rng, per_train)][:train_images]
    per_probe = math.ceil(probe_images / len(probe_rows))
    probe_crops = [view for row in sorted(probe_rows) for view in probe_views(images[row], tiling, rng, per_probe)]
    clean, defective, masks, kinds = [], [], [], []
    for number, view in enumerate(probe_crops[:probe_images]):
        view = to_float_rgb(view)
        donor = train[number % len(train)]
        kind = DEFECT_KINDS[number % len(DEFECT_KINDS)]
        broken, mask = paste_defect(view, donor, rng, kind)
        clean.append(view)
        defective.append(broken)
        masks.append(mask)
        kinds.append(kind)
    return ProbeSet(train, clean, defective, masks, kinds)


@dataclass
class ProbeResult:
    name: str
    image_auroc: float
    pixel_auroc: float
    seconds: float
    per_kind: dict
    failed: str | None = None   # why the candidate cannot model these images (e.g. PaDiM, mixed sizes)
    # mirror -> image AUROC of the probe images mirrored against as they are (defect-free both):
    # near 0.5 where the nominal images look the same mirrored (anomaly.probe_choice.mirror_choice)
    mirror_aurocs: dict = field(default_factory=dict)

    def row(self) -> dict:
        def rounded(value: float):  # JSON has no NaN: a failed candidate's AUROCs are null
            return round(value, 4) if np.isfinite(value) else None

        return {"candidate": self.name, "image_auroc": rounded(self.image_auroc),
                "pixel_auroc": rounded(self.pixel_auroc), "seconds": round(self.seconds, 1),
                **{f"auroc_{k}": round(v, 4) for k, v in self.per_kind.items()},
                **{f"mirror_{k}": round(v, 4) for k, v in self.mirror_aurocs.items()},
                **({"failed": self.failed} if self.failed else {})}


def probe_candidate(candidate: Candidate, probe: ProbeSet, make_extractor=PatchFeatureExtractor) -> ProbeResult:
    """Fit ``candidate`` on the probe set's nominal part; how well it separates each probe image
    from its defective twin (image AUROC), and how well its maps find the pasted defects."""
    started = time.perf_counter()
    try:
        candidate = candidate.for_images([image.shape[:2] for image in probe.train])  # as a fit sizes it
        return _probe(candidate, probe, make_extractor(candidate.features), started)
    except ValueError as error:  # a configuration that cannot take these images is out of the running
        return ProbeResult(candidate.name, float("nan"), float("nan"), time.perf_counter() - started, {}, str(error))


def _probe(candidate: Candidate, probe: ProbeSet, extractor: PatchFeatureExtractor, started: float) -> ProbeResult:
    features = [f for image in probe.train for _, f in training_views(extractor, image, None)]
    detector = fit_detector(candidate.detector, candidate.settings, features)

    def score(image):
        return score_features(detector, extract_views(extractor, image, None), image.shape[:2], None)

    clean = [score(image) for image in probe.clean]
    broken = [score(image) for image in probe.defective]
    labels = np.r_[np.zeros(len(clean)), np.ones(len(broken))]
    scores = np.r_[[s.score for s in clean], [s.score for s in broken]]
    # do the nominal images look the same mirrored? Their mirror images, defect-free, against them
    mirror_aurocs = {mirror: float(roc_auc_score(labels, np.r_[scores[:len(clean)],
                                                               [score(mirrored(image, mirror)).score for image in probe.clean]]))
                     for mirror in MIRRORS}
    per_kind = {}
    for kind in sorted(set(probe.kinds)):
        rows = [i for i, k in enumerate(probe.kinds) if k == kind]
        per_kind[kind] = float(roc_auc_score(np.r_[np.zeros(len(clean)), np.ones(len(rows))],
                                             np.r_[scores[:len(clean)], scores[len(clean) + np.array(rows)]]))
    # pixel AUROC over the defective twins (every 2nd pixel: plenty for a ranking)
    pixels = np.concatenate([s.map[::2, ::2].ravel() for s in broken])
    truth = np.concatenate([m[::2, ::2].ravel() for m in probe.masks])
    pixel_auroc = float(roc_auc_score(truth, pixels)) if 0 < truth.sum() < len(truth) else float("nan")
    return ProbeResult(candidate.name, float(roc_auc_score(labels, scores)), pixel_auroc,
                       time.perf_counter() - started, per_kind, mirror_aurocs=mirror_aurocs)


# Probe AUROCs closer than this cannot be told apart: the earlier (cheaper) candidate is kept
TIE_TOLERANCE = 0.01


def choose(results: list[ProbeResult], tolerance: float = TIE_TOLERANCE) -> tuple[ProbeResult, str]:
    """The first candidate (in the given order: cheapest first) whose probe image AUROC is within
    ``tolerance`` of the best, and a sentence saying why."""
    usable = [r for r in results if np.isfinite(r.image_auroc)]
    if not usable:
        raise ValueError("no candidate configuration could be fitted on these images: "
                         + "; ".join(f"{r.name}: {r.failed}" for r in results))
    best = max(usable, key=lambda r: r.image_auroc)
    chosen = next(r for r in usable if r.image_auroc >= best.image_auroc - tolerance)
    others = ", ".join(f"{r.name} {r.image_auroc:.3f}" if not r.failed else f"{r.name} failed"
                       for r in results if r is not chosen)
    if chosen is best:
        reason = (f"{chosen.name} separated nominal images from their synthetic-defect twins best "
                  f"(image AUROC {chosen.image_auroc:.3f}; {others})")
    else:
        reason = (f"{chosen.name} came within {tolerance} of the best ({best.name} {best.image_auroc:.3f}: "
                  f"{chosen.image_auroc:.3f}) and is cheaper to fit ({others})")
    return chosen, reason
