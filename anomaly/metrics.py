"""Evaluation metrics for anomaly detection (image- and pixel-level).

Pure functions: arrays in, Python floats out. Conventions follow MVTec AD /
PatchCore: label/mask value 1 (True) means anomalous, higher score means more
anomalous. Undefined metrics (e.g. only one class present) are ``nan`` rather
than exceptions, so a whole evaluation run never dies on one degenerate split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc, precision_recall_curve, roc_auc_score, roc_curve

__all__ = ["image_auroc", "pixel_auroc", "aupro", "f1_max", "evaluate_detection"]

# 8-connectivity, as in the MVTec AD reference implementation of PRO.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

NAN = float("nan")


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


def _pixel_inputs(masks, maps) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Validate per-image masks/maps; return lists of 2-D bool masks and float32 maps.

    A mask may be None (e.g. good images that ship without a mask file): it is
    taken as all-normal with the shape of its map.
    """
    if len(masks) != len(maps):
        raise ValueError(f"got {len(masks)} masks but {len(maps)} maps")
    out_masks, out_maps = [], []
    for i, (mask, amap) in enumerate(zip(masks, maps)):
        # float32 (no copy when already float32): maps can total ~60M pixels.
        amap = np.asarray(amap, dtype=np.float32)
        mask = np.zeros(amap.shape, bool) if mask is None else np.asarray(mask) != 0
        if amap.ndim != 2 or mask.shape != amap.shape:
            raise ValueError(
                f"image {i}: mask {mask.shape} and map {amap.shape} must be equal 2-D shapes"
            )
        out_masks.append(mask)
        out_maps.append(amap)
    return out_masks, out_maps


def _concat_pixels(masks: list[np.ndarray], maps: list[np.ndarray]):
    """Flatten all images into one bool and one float32 vector (one copy each)."""
    y = np.concatenate([m.ravel() for m in masks]) if masks else np.zeros(0, bool)
    s = np.concatenate([a.ravel() for a in maps]) if maps else np.zeros(0, np.float32)
    if not np.isfinite(s).all():
        raise ValueError("anomaly maps must be finite")
    return y, s


def image_auroc(labels, scores) -> float:
    """Image-level ROC AUC; nan if labels contain only one class."""
    y, s = _image_inputs(labels, scores)
    if y.all() or not y.any():
        return NAN
    return float(roc_auc_score(y, s))


def pixel_auroc(masks: Sequence, maps: Sequence) -> float:
    """Pixel-level ROC AUC over all pixels of all images pooled; nan if one class only.

    Images may have different sizes; each mask must match its own map.
    """
    y, s = _concat_pixels(*_pixel_inputs(masks, maps))
    if y.all() or not y.any():
        return NAN
    return float(roc_auc_score(y, s))


def aupro(masks: Sequence, maps: Sequence, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap (PRO) curve up to ``fpr_limit``, divided by it.

    Regions are the 8-connected components of each ground-truth mask.
    PRO(t) is the mean over all regions (all images) of the fraction of the
    region's pixels scoring >= t; FPR(t) is the fraction of all normal pixels
    scoring >= t. A perfect map scores 1.0; nan if there are no defect pixels
    (or no normal pixels).
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
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

    # Keep every point with fpr <= limit (including a vertical jump exactly at
    # the limit), then close the curve with the PRO interpolated at the limit.
    cut = int(np.searchsorted(fpr, fpr_limit, side="right"))
    fpr_c, pro_c = fpr[:cut], pro[:cut]
    if fpr_c[-1] < fpr_limit and cut < fpr.size:
        pro_at_limit = np.interp(fpr_limit, fpr[cut - 1 : cut + 1], pro[cut - 1 : cut + 1])
        fpr_c = np.append(fpr_c, fpr_limit)
        pro_c = np.append(pro_c, pro_at_limit)
    return float(auc(fpr_c, pro_c) / fpr_limit)


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


def _metrics(labels, scores, masks, maps, fpr_limit: float) -> dict:
    """All metrics for one subset of images."""
    y, s = _image_inputs(labels, scores)
    f1, thr = f1_max(y, s)
    out = {
        "n_images": int(y.size),
        "n_anomalous": int(y.sum()),
        "image_auroc": image_auroc(y, s),
        "f1_max": f1,
        "f1_threshold": thr,
    }
    if masks is not None:
        out["pixel_auroc"] = pixel_auroc(masks, maps)
        out["aupro"] = aupro(masks, maps, fpr_limit=fpr_limit)
    return out


def evaluate_detection(
    labels,
    scores,
    masks: Sequence | None = None,
    maps: Sequence | None = None,
    defect_types: Sequence | None = None,
    fpr_limit: float = 0.3,
) -> dict:
    """Image (and, given masks+maps, pixel) metrics overall and per defect type.

    ``defect_types[i]`` names image i's defect; it is ignored for good images.
    Each type is scored on ALL good images plus that type's anomalous images,
    which is the usual MVTec per-category/per-defect protocol. Keys of
    ``per_defect_type`` are ``str(type)``. Every value is a Python int/float
    (json-serialisable); undefined metrics are nan.
    """
    y, s = _image_inputs(labels, scores)
    if (masks is None) != (maps is None):
        raise ValueError("give both masks and maps, or neither")
    if masks is not None and not (len(masks) == len(maps) == y.size):
        raise ValueError("masks and maps need one entry per image")
    if defect_types is not None and len(defect_types) != y.size:
        raise ValueError("defect_types needs one entry per image")

    result = _metrics(y, s, masks, maps, fpr_limit)
    result["per_defect_type"] = {}
    if defect_types is None:
        return result

    types = np.asarray([str(t) for t in defect_types], dtype=object)
    good = ~y
    for t in sorted(set(types[y])):
        idx = np.flatnonzero(good | (y & (types == t)))
        sub_masks = sub_maps = None
        if masks is not None:
            sub_masks = [masks[i] for i in idx]
            sub_maps = [maps[i] for i in idx]
        result["per_defect_type"][t] = _metrics(y[idx], s[idx], sub_masks, sub_maps, fpr_limit)
    return result
