"""Evaluation metrics for anomaly detection (image- and pixel-level).

Pure functions and one accumulator: arrays in, Python floats out. Conventions follow MVTec AD /
PatchCore: label/mask value 1 (True) means anomalous, higher score means more anomalous.
Undefined metrics (e.g. only one class present) are ``nan`` rather than exceptions, so a whole
evaluation run never dies on one degenerate split.

Pixel AUROC and AUPRO are computed by default from :class:`PixelCurves`: fixed-size score
histograms filled one (map, mask) at a time, so memory does not grow with the number of pixels.
They differ from the exact curves (``pixel_auroc_exact``, ``aupro_exact``,
``evaluate_detection_exact``: every pixel held and sorted at once) only through pixels that share a
bin. :meth:`PixelCurves.error_bounds` bounds that difference from the histograms alone. On MTD it
stays below 1e-5 (README, "Benchmarks").
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc, precision_recall_curve, roc_auc_score, roc_curve

__all__ = [
    "image_auroc", "pixel_auroc", "aupro", "f1_max", "evaluate_detection", "PixelCurves", "pixel_group",
    "pixel_auroc_exact", "aupro_exact", "evaluate_detection_exact", "DEFAULT_BINS",
]

# 8-connectivity, as in the MVTec AD reference implementation of PRO.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

NAN = float("nan")

# Histogram bins. The grid adapts to the scores' range, which leaves at least half of the bins
# across [min, max]. On MTD's PatchCore maps 2^16 bins keep |binned - exact| below 1e-5 for both
# pixel AUROC and AUPRO (bench/results/metrics.md); each group costs 3 x 2^16 float64 (1.5 MiB).
DEFAULT_BINS = 1 << 16

# Bins finer than this fraction of the largest |score| resolve nothing in float32 maps (24-bit
# mantissa); the floor also keeps bin indices far inside int64 and exactly representable.
_FINEST_RELATIVE_EXPONENT = -40

_MISSING = object()


def _image_inputs(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """Validate image-level inputs; return (bool labels, float64 scores)."""
    y = np.asarray(labels).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be boolean or 0/1")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return y.astype(bool), s


def _pixel_pair(mask, amap) -> tuple[np.ndarray, np.ndarray]:
    """One image's (2-D bool mask, map); a None mask (good images without a mask file) is all normal."""
    amap = np.asarray(amap)
    mask = np.zeros(amap.shape, bool) if mask is None else np.asarray(mask) != 0
    if amap.ndim != 2 or mask.shape != amap.shape:
        raise ValueError(f"mask {mask.shape} and map {amap.shape} must be equal 2-D shapes")
    return mask, amap


def _pairs(masks: Iterable, maps: Iterable):
    """(index, mask, map) of each image; masks and maps may be sequences or one-pass iterables."""
    if hasattr(masks, "__len__") and hasattr(maps, "__len__") and len(masks) != len(maps):
        raise ValueError(f"got {len(masks)} masks but {len(maps)} maps")
    for i, (mask, amap) in enumerate(itertools.zip_longest(masks, maps, fillvalue=_MISSING)):
        if mask is _MISSING or amap is _MISSING:
            raise ValueError("got different numbers of masks and maps")
        yield i, mask, amap


def _pro_area(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Normalised area under a (FPR, PRO) curve that starts at FPR 0, up to ``fpr_limit``."""
    # Keep every point with fpr <= limit (including a vertical jump exactly at
    # the limit), then close the curve with the PRO interpolated at the limit.
    cut = int(np.searchsorted(fpr, fpr_limit, side="right"))
    fpr_c, pro_c = fpr[:cut], pro[:cut]
    if fpr_c[-1] < fpr_limit and cut < fpr.size:
        pro_at_limit = np.interp(fpr_limit, fpr[cut - 1 : cut + 1], pro[cut - 1 : cut + 1])
        fpr_c = np.append(fpr_c, fpr_limit)
        pro_c = np.append(pro_c, pro_at_limit)
    return float(auc(fpr_c, pro_c) / fpr_limit)


def _check_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")


def pixel_group(anomalous: bool, defect_type) -> str | None:
    """The :class:`PixelCurves` group of an image under the per-type protocol of
    :func:`evaluate_detection`: ``str(defect_type)`` for an anomalous image, None for a good one."""
    return str(defect_type) if anomalous else None


# --------------------------------------------------------------------------- streaming pixel curves


class PixelCurves:
    """Pixel AUROC and AUPRO from score histograms accumulated one image at a time.

    Every pixel's score falls in a bin ``[k * width, (k + 1) * width)`` of one grid shared by all
    histograms. ``width`` is a power of two, the smallest for which all scores seen so far fit in
    ``bins`` bins, so no range has to be known in advance (generators of maps work; every map is
    read once). When a map falls outside the grid, the width doubles as often as needed and the
    histograms are merged pairwise: a power-of-two grid aligned at 0 nests, so the merged
    histograms equal those that the coarser grid would have given directly, and the final grid
    depends only on the overall min and max, not on the order of the images. At least half of
    the bins span the scores' range.

    Per group (images added with the same ``group``) three histograms are kept: normal pixels,
    defect pixels, and defect pixels weighted by 1 / (size of their 8-connected mask region).
    Descending cumulative sums give, at every bin edge t, the normal pixels scoring >= t (FPR),
    the defect pixels scoring >= t (TPR) and the sum over regions of each region's fraction
    scoring >= t: the sum of the per-region overlap curves, which divided by the number of regions
    is PRO(t). (One weighted histogram is that sum exactly, at the memory of one histogram rather
    than one per region.) Metrics over several groups add their histograms, so per-defect-type
    figures cost no second pass.

    Within a bin the exact curve runs somewhere inside the box spanned by the bin's two edge
    points, and the binned curve is the box's diagonal: :meth:`error_bounds` sums those boxes,
    which bounds |binned - exact| (``pixel_auroc_exact``, ``aupro_exact``).
    """

    def __init__(self, bins: int = DEFAULT_BINS):
        if int(bins) < 2:
            raise ValueError(f"bins must be >= 2, got {bins}")
        self.bins = int(bins)
        self.width: float | None = None   # bin width (a power of two)
        self.first = 0                    # grid index of bin 0
        self.low = self.high = None       # min and max of every score added so far
        # group -> (3, bins) float64: normal count, defect count, defect weight 1/|region|
        self._histograms: dict = {}
        self._regions: Counter = Counter()
        self._images: Counter = Counter()

    # ---- filling
    def add(self, amap, mask=None, group=None) -> None:
        """Add one image: its anomaly map, its mask (None: all normal) and its group key."""
        if mask is None:  # all normal: no mask to build or label
            amap = np.asarray(amap)
            if amap.ndim != 2:
                raise ValueError(f"mask {amap.shape} and map {amap.shape} must be equal 2-D shapes")
        else:
            mask, amap = _pixel_pair(mask, amap)
            if not mask.any():
                mask = None
        # scores as float32, as maps are stored and as the exact reference takes them
        scores = amap.astype(np.float32, copy=False)
        low, high = (float(scores.min()), float(scores.max())) if scores.size else (0.0, 0.0)
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError("anomaly maps must be finite")
        self._images[group] += 1
        if group not in self._histograms:
            self._histograms[group] = np.zeros((3, self.bins))
        if not scores.size:
            return
        self._cover(low, high)
        histogram = self._histograms[group]  # _cover may have re-binned it
        # this map's bins are [start, stop): only that slice of the histograms is counted and added to
        start = math.floor(low / self.width) - self.first
        stop = math.floor(high / self.width) - self.first + 1
        index = self._bin_index(scores, low, high, self.first + start)  # 0 .. stop - start - 1
        del scores
        size, part = stop - start, np.s_[:, start:stop]
        counts = np.bincount(index, minlength=size)
        if mask is None:
            histogram[0, start:stop] += counts
            return
        # label the defects' bounding box only: the same regions, in the same (row-major) pixel order
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        labeled, regions = ndimage.label(mask[box], structure=_EIGHT_CONNECTED)
        defect = labeled > 0
        defect_index = index.reshape(mask.shape)[box][defect]
        defect_counts = np.bincount(defect_index, minlength=size)
        region_size = np.bincount(labeled.ravel(), minlength=regions + 1)
        histogram = histogram[part]
        histogram[0] += counts - defect_counts
        histogram[1] += defect_counts
        histogram[2] += np.bincount(defect_index, weights=1.0 / region_size[labeled[defect]], minlength=size)
        self._regions[group] += regions

    def _bin_index(self, scores: np.ndarray, low: float, high: float, offset: int) -> np.ndarray:
        """floor(score / width) - ``offset`` of each score (float32, within [``low``, ``high``]), flat.

        width is a power of two, 2^-k: for scores >= 0 and 2^k a normal float32, score * 2^k in float32
        is exact (a normal result; a subnormal one is below 1, its floor 0 either way) and truncation is
        its floor, so this is floor(float64(score) / width) without the float64 copy; in int32 where
        the bins fit (bincount reads half the bytes). Otherwise (negative scores, or a grid beyond
        float32's exponents) the division in float64, which is exact.
        """
        exponent = 1 - math.frexp(self.width)[1]  # width = 2^-exponent
        if low >= 0 and -126 <= exponent <= 127:
            scaled = np.multiply(scores, np.float32(math.ldexp(1.0, exponent)), dtype=np.float32)
            small = math.floor(high / self.width) < 2**31
            index = scaled.astype(np.int32 if small else np.intp).ravel()
        else:
            scaled = scores.astype(np.float64).ravel()
            np.divide(scaled, self.width, out=scaled)
            np.floor(scaled, out=scaled)
            index = scaled.astype(np.intp)
        del scaled
        index -= offset
        return index

    def _width_for(self, low: float, high: float) -> float:
        """The smallest power of two >= the current width for which [low, high] fits in the bins."""
        magnitude = max(abs(low), abs(high))
        width = math.ldexp(1.0, math.frexp(magnitude)[1] + _FINEST_RELATIVE_EXPONENT) if magnitude else 1.0
        if high > low:
            mantissa, exponent = math.frexp((high - low) / self.bins)
            width = max(width, math.ldexp(1.0, exponent - 1 if mantissa == 0.5 else exponent))
        if self.width is not None:
            width = max(width, self.width)
        while math.floor(high / width) - math.floor(low / width) >= self.bins:
            width *= 2.0
        return width

    def _cover(self, low: float, high: float) -> None:
        """Make the grid hold [low, high] as well as everything added so far."""
        if self.low is not None:
            low, high = min(low, self.low), max(high, self.high)
        width = self._width_for(low, high)
        first = math.floor(low / width)
        if width == self.width and first >= self.first and math.floor(high / width) < self.first + self.bins:
            self.low, self.high = low, high
            return
        if self.width is not None:
            factor = round(width / self.width)  # a power of two
            # old bin j -> new bin; empty old bins beyond the data may fall outside: clip them
            target = np.clip((self.first + np.arange(self.bins)) // factor - first, 0, self.bins - 1)
            for key, histogram in self._histograms.items():
                self._histograms[key] = np.stack(
                    [np.bincount(target, weights=row, minlength=self.bins) for row in histogram])
        self.width, self.first, self.low, self.high = width, first, low, high

    # ---- reading
    @property
    def groups(self) -> dict:
        """Images added per group."""
        return dict(self._images)

    def _sum(self, groups) -> tuple[np.ndarray, int]:
        """Summed histograms of ``groups`` (None: all), highest scores first, and their regions."""
        keys = list(self._histograms) if groups is None else [g for g in groups if g in self._histograms]
        total = np.zeros((3, self.bins))
        for key in keys:
            total += self._histograms[key]
        return total[:, ::-1], sum(self._regions[key] for key in keys)

    def pixel_auroc(self, groups: Iterable | None = None) -> float:
        """Pixel ROC AUC over the pixels of ``groups`` (None: every image); nan if one class only."""
        (normal, defect, _), _ = self._sum(groups)
        positives, negatives = defect.sum(), normal.sum()
        if not positives or not negatives:
            return NAN
        # Mann-Whitney: each normal pixel counts the defect pixels above it, half of those tied
        above = np.cumsum(defect) - defect
        return float(normal @ (above + 0.5 * defect) / (positives * negatives))

    def pro_curve(self, groups: Iterable | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(FPR, PRO) at every bin edge from the top, starting at (0, 0); empty arrays if undefined."""
        (normal, _, weight), regions = self._sum(groups)
        negatives = normal.sum()
        if not regions or not negatives:
            return np.zeros(0), np.zeros(0)
        fpr = np.concatenate([[0.0], np.cumsum(normal)]) / negatives
        pro = np.concatenate([[0.0], np.cumsum(weight)]) / regions
        return fpr, pro

    def aupro(self, fpr_limit: float = 0.3, groups: Iterable | None = None) -> float:
        """Normalised area under PRO up to ``fpr_limit``, as :func:`aupro_exact` defines it."""
        _check_limit(fpr_limit)
        fpr, pro = self.pro_curve(groups)
        return _pro_area(fpr, pro, fpr_limit) if fpr.size else NAN

    def error_bounds(self, fpr_limit: float = 0.3, groups: Iterable | None = None) -> dict:
        """Upper bounds of |binned - exact| for ``pixel_auroc`` and ``aupro`` (nan where undefined).

        In each bin the exact ROC / PRO curve is a monotone path between the bin's two edge points
        and the binned curve is the straight line, so each bin adds at most half its box
        (dFPR * dTPR / 2); the bin that the FPR limit cuts adds at most (limit - its FPR) * dPRO.
        """
        _check_limit(fpr_limit)
        (normal, defect, weight), regions = self._sum(groups)
        positives, negatives = defect.sum(), normal.sum()
        out = {"pixel_auroc": NAN, "aupro": NAN}
        if positives and negatives:
            out["pixel_auroc"] = float(normal @ defect / (2.0 * positives * negatives))
        if regions and negatives:
            d_fpr, d_pro = normal / negatives, weight / regions
            end = np.cumsum(d_fpr)
            start = end - d_fpr
            whole = end <= fpr_limit
            cut = ~whole & (start < fpr_limit)
            area = 0.5 * (d_fpr[whole] @ d_pro[whole]) + (fpr_limit - start[cut]) @ d_pro[cut]
            out["aupro"] = float(area / fpr_limit)
        return out


def _curves(masks: Iterable, maps: Iterable, bins: int, groups: Sequence | None = None) -> PixelCurves:
    curves = PixelCurves(bins)
    for i, mask, amap in _pairs(masks, maps):
        if groups is not None and i >= len(groups):
            raise ValueError("masks and maps need one entry per image")
        try:
            curves.add(amap, mask, None if groups is None else groups[i])
        except ValueError as error:
            raise ValueError(f"image {i}: {error}") from None
    if groups is not None and sum(curves.groups.values()) != len(groups):
        raise ValueError("masks and maps need one entry per image")
    return curves


# --------------------------------------------------------------------------- image level


def image_auroc(labels, scores) -> float:
    """Image-level ROC AUC; nan if labels contain only one class."""
    y, s = _image_inputs(labels, scores)
    if y.all() or not y.any():
        return NAN
    return float(roc_auc_score(y, s))


def f1_max(labels, scores) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold achieving it.

    Prediction rule: anomalous iff score >= threshold. Returns (nan, nan) when
    there are no anomalous labels (F1 undefined).
    """
    y, s = _image_inputs(labels, scores)
    if not y.any():
        return NAN, NAN
    precision, recall, thresholds = precision_recall_curve(y, s)
    # The last (precision=1, recall=0) point has no threshold; drop it.
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    # Where both are 0 define F1 = 0 instead of dividing 0/0 (no warning).
    f1 = np.divide(
        2.0 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0
    )
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


# --------------------------------------------------------------------------- pixel level (streaming)


def pixel_auroc(masks: Iterable, maps: Iterable, bins: int = DEFAULT_BINS) -> float:
    """Pixel-level ROC AUC over all pixels of all images pooled; nan if one class only.

    Images may have different sizes; each mask must match its own map. ``masks`` and ``maps`` may
    be one-pass iterables: each map is binned and dropped (:class:`PixelCurves`).
    """
    return _curves(masks, maps, bins).pixel_auroc()


def aupro(masks: Iterable, maps: Iterable, fpr_limit: float = 0.3, bins: int = DEFAULT_BINS) -> float:
    """Area under the per-region-overlap (PRO) curve up to ``fpr_limit``, divided by it.

    Defined as :func:`aupro_exact`; computed from histograms (:class:`PixelCurves`), so ``masks``
    and ``maps`` may be one-pass iterables.
    """
    _check_limit(fpr_limit)
    return _curves(masks, maps, bins).aupro(fpr_limit)


# --------------------------------------------------------------------------- pixel level (exact)


def _pixel_inputs(masks, maps) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Validate per-image masks/maps; return lists of 2-D bool masks and float32 maps."""
    if len(masks) != len(maps):
        raise ValueError(f"got {len(masks)} masks but {len(maps)} maps")
    out_masks, out_maps = [], []
    for i, (mask, amap) in enumerate(zip(masks, maps)):
        try:
            mask, amap = _pixel_pair(mask, amap)
        except ValueError as error:
            raise ValueError(f"image {i}: {error}") from None
        out_masks.append(mask)
        # float32 (no copy when already float32): maps can total ~60M pixels.
        out_maps.append(amap.astype(np.float32, copy=False))
    return out_masks, out_maps


def _concat_pixels(masks: list[np.ndarray], maps: list[np.ndarray]):
    """Flatten all images into one bool and one float32 vector (one copy each)."""
    y = np.concatenate([m.ravel() for m in masks]) if masks else np.zeros(0, bool)
    s = np.concatenate([a.ravel() for a in maps]) if maps else np.zeros(0, np.float32)
    if not np.isfinite(s).all():
        raise ValueError("anomaly maps must be finite")
    return y, s


def pixel_auroc_exact(masks: Sequence, maps: Sequence) -> float:
    """Pixel ROC AUC from every pixel at once (sorted): the reference :func:`pixel_auroc` is
    tested against. Memory grows with the pixels (about 20 bytes each at the peak)."""
    y, s = _concat_pixels(*_pixel_inputs(masks, maps))
    if y.all() or not y.any():
        return NAN
    return float(roc_auc_score(y, s))


def aupro_exact(masks: Sequence, maps: Sequence, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap (PRO) curve up to ``fpr_limit``, divided by it, from
    every pixel at once: the reference :func:`aupro` is tested against.

    Regions are the 8-connected components of each ground-truth mask.
    PRO(t) is the mean over all regions (all images) of the fraction of the
    region's pixels scoring >= t; FPR(t) is the fraction of all normal pixels
    scoring >= t. A perfect map scores 1.0; nan if there are no defect pixels
    (or no normal pixels).
    """
    _check_limit(fpr_limit)
    masks, maps = _pixel_inputs(masks, maps)

    # Per-pixel weight: 1 for normal pixels, 1/|region| for defect pixels; a
    # weighted ROC then has tpr == mean per-region recall == PRO exactly.
    # Filled image by image to avoid keeping per-image label arrays alive.
    sizes = [m.size for m in masks]
    weight = np.ones(sum(sizes), dtype=np.float64)
    n_regions = 0
    offset = 0
    for mask, n in zip(masks, sizes):
        labeled, k = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        if k:
            region_size = np.bincount(labeled.ravel(), minlength=k + 1)
            flat = labeled.ravel()
            defect = flat > 0
            weight[offset : offset + n][defect] = 1.0 / region_size[flat[defect]]
            n_regions += k
        offset += n
    if n_regions == 0:
        return NAN

    y, s = _concat_pixels(masks, maps)
    if y.all():
        return NAN  # no normal pixels: FPR undefined
    # Not strictly needed (roc_curve normalises tpr) but keeps weights meaningful.
    weight[y] /= n_regions

    fpr, pro, _ = roc_curve(y, s, sample_weight=weight)
    del weight, y, s
    return _pro_area(fpr, pro, fpr_limit)


# --------------------------------------------------------------------------- all metrics


def _image_metrics(y: np.ndarray, s: np.ndarray) -> dict:
    f1, thr = f1_max(y, s)
    return {
        "n_images": int(y.size),
        "n_anomalous": int(y.sum()),
        "image_auroc": image_auroc(y, s),
        "f1_max": f1,
        "f1_threshold": thr,
    }


def _check_inputs(y: np.ndarray, masks, maps, defect_types) -> np.ndarray | None:
    """Shared argument checks; returns the defect types as strings (None if not given)."""
    if (masks is None) != (maps is None):
        raise ValueError("give both masks and maps, or neither")
    for given in (masks, maps):
        if given is not None and hasattr(given, "__len__") and len(given) != y.size:
            raise ValueError("masks and maps need one entry per image")
    if defect_types is None:
        return None
    types = np.asarray([str(t) for t in defect_types], dtype=object)
    if types.size != y.size:
        raise ValueError("defect_types needs one entry per image")
    return types


def evaluate_detection(
    labels,
    scores,
    masks: Iterable | None = None,
    maps: Iterable | None = None,
    defect_types: Sequence | None = None,
    fpr_limit: float = 0.3,
    *,
    pixels: PixelCurves | None = None,
    bins: int = DEFAULT_BINS,
) -> dict:
    """Image (and, given masks+maps, pixel) metrics overall and per defect type.

    ``defect_types[i]`` names image i's defect; it is ignored for good images.
    Each type is scored on ALL good images plus that type's anomalous images,
    which is the usual MVTec per-category/per-defect protocol. Keys of
    ``per_defect_type`` are ``str(type)``. Every value is a Python int/float
    (json-serialisable); undefined metrics are nan.

    Pixel metrics are binned (:class:`PixelCurves`): ``masks`` and ``maps`` may be one-pass
    iterables (one entry per image, in order), each map read once. Instead of them, a caller that
    streams its own maps passes ``pixels``: a :class:`PixelCurves` it filled with each image's
    ``group=pixel_group(label, defect_type)``.
    """
    y, s = _image_inputs(labels, scores)
    types = _check_inputs(y, masks, maps, defect_types)
    _check_limit(fpr_limit)
    groups = [pixel_group(a, t) for a, t in zip(y, types)] if types is not None else [None] * y.size
    if masks is not None:
        if pixels is not None:
            raise ValueError("give masks and maps, or pixels, not both")
        pixels = _curves(masks, maps, bins, groups)
    elif pixels is not None and pixels.groups != dict(Counter(groups)):
        raise ValueError(f"pixels hold images per group {pixels.groups}, "
                         f"but the labels and defect types give {dict(Counter(groups))}")

    def metrics(subset: np.ndarray, pixel_groups) -> dict:
        out = _image_metrics(y[subset], s[subset])
        if pixels is not None:
            out["pixel_auroc"] = pixels.pixel_auroc(pixel_groups)
            out["aupro"] = pixels.aupro(fpr_limit, pixel_groups)
        return out

    result = metrics(np.ones(y.size, bool), None)
    result["per_defect_type"] = {}
    if types is None:
        return result
    for t in sorted(set(types[y])):
        result["per_defect_type"][t] = metrics(~y | (types == t), [None, t])
    return result


def evaluate_detection_exact(
    labels,
    scores,
    masks: Sequence | None = None,
    maps: Sequence | None = None,
    defect_types: Sequence | None = None,
    fpr_limit: float = 0.3,
) -> dict:
    """:func:`evaluate_detection` from every pixel at once (``pixel_auroc_exact``,
    ``aupro_exact``): the reference the binned metrics are tested and benchmarked against."""
    y, s = _image_inputs(labels, scores)
    types = _check_inputs(y, masks, maps, defect_types)

    def metrics(idx: np.ndarray) -> dict:
        out = _image_metrics(y[idx], s[idx])
        if masks is not None:
            sub_masks, sub_maps = [masks[i] for i in idx], [maps[i] for i in idx]
            out["pixel_auroc"] = pixel_auroc_exact(sub_masks, sub_maps)
            out["aupro"] = aupro_exact(sub_masks, sub_maps, fpr_limit=fpr_limit)
        return out

    result = metrics(np.arange(y.size))
    result["per_defect_type"] = {}
    if types is None:
        return result
    good = ~y
    for t in sorted(set(types[y])):
        result["per_defect_type"][t] = metrics(np.flatnonzero(good | (y & (types == t))))
    return result
