"""Tests for anomaly.metrics: hand-computed values, edge cases, per-type protocol, and the
binned (streaming) pixel metrics against the exact reference on synthetic and real MTD maps."""

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest

from patchwatch.anomaly.metrics import (
    PixelCurves, aupro, aupro_exact, evaluate_detection, evaluate_detection_exact, f1_max, image_auroc,
    pixel_auroc, pixel_auroc_exact,
)

# the promised agreement of the binned pixel metrics with the exact ones (README, "Metrics")
TOLERANCE = 1e-3

# every hand case holds for the binned default and for the exact reference
PIXEL_AUROC = pytest.mark.parametrize("pixel_auroc", [pixel_auroc, pixel_auroc_exact], ids=["binned", "exact"])
AUPRO = pytest.mark.parametrize("aupro", [aupro, aupro_exact], ids=["binned", "exact"])


# --------------------------------------------------------------------------- AUROC


def test_image_auroc_hand_case():
    # Positives 0.35, 0.8 vs negatives 0.1, 0.4: 0.35 beats only 0.1, 0.8 beats
    # both -> 3 of 4 pairs ordered correctly -> 0.75.
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_image_auroc_ties_count_half_and_single_class_is_nan():
    assert image_auroc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert math.isnan(image_auroc([0, 0, 0], [0.1, 0.2, 0.3]))
    assert math.isnan(image_auroc(np.ones(3, bool), [0.1, 0.2, 0.3]))


def test_image_inputs_validated():
    with pytest.raises(ValueError):
        image_auroc([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        image_auroc([0, 1], [0.1, 0.2, 0.3])


@PIXEL_AUROC
def test_pixel_auroc_images_of_different_sizes(pixel_auroc):
    masks = [np.array([[1, 0], [0, 0]], bool), np.array([[0, 1, 0]], bool)]
    maps = [np.array([[0.9, 0.1], [0.2, 0.3]]), np.array([[0.5, 0.4, 0.95]])]
    # Positives 0.9, 0.4; negatives 0.1, 0.2, 0.3, 0.5, 0.95.
    # 0.9 beats 4 negatives, 0.4 beats 3 -> 7 / (2*5) = 0.7.
    assert pixel_auroc(masks, maps) == pytest.approx(0.7)


@PIXEL_AUROC
def test_pixel_auroc_nan_without_defects_and_shape_mismatch_raises(pixel_auroc):
    assert math.isnan(pixel_auroc([np.zeros((2, 2))], [np.random.rand(2, 2)]))
    with pytest.raises(ValueError):
        pixel_auroc([np.zeros((2, 3))], [np.zeros((3, 2))])


# --------------------------------------------------------------------------- AUPRO


def _pro_case(tie_low_defects_with_normals: bool):
    """Three images of different sizes with 100 normal pixels in total.

    Image A (6x6): region C1 = diagonal pair (1,1),(2,2) -> ONE region under
        8-connectivity (two under 4-connectivity). Scores 0.9.
    Image B (6x6): region C2 = 2x2 block; two pixels score 0.8, two score
        0.2 (or 0.5 when tied with the normals, see below).
    Image G (2x17, good): 10 normal pixels score 0.5, the rest 0.
    Normal pixels: (36-2) + (36-4) + 34 = 100.
    """
    mask_a = np.zeros((6, 6), bool)
    mask_a[1, 1] = mask_a[2, 2] = True
    map_a = np.where(mask_a, 0.9, 0.0)

    mask_b = np.zeros((6, 6), bool)
    mask_b[3:5, 3:5] = True
    map_b = np.zeros((6, 6))
    map_b[3, 3:5] = 0.8
    map_b[4, 3:5] = 0.5 if tie_low_defects_with_normals else 0.2

    mask_g = np.zeros((2, 17), bool)
    map_g = np.zeros((2, 17))
    map_g[0, :10] = 0.5
    return [mask_a, mask_b, mask_g], [map_a, map_b, map_g]


@AUPRO
def test_aupro_hand_case_step_curve(aupro):
    masks, maps = _pro_case(tie_low_defects_with_normals=False)
    # Curve (FPR, PRO), PRO = mean of the 2 regions' recall:
    #   t=0.9: C1 fully found              -> (0,   0.5)
    #   t=0.8: C2 half found               -> (0,   0.75)
    #   t=0.5: 10 of 100 normals           -> (0.1, 0.75)
    #   t=0.2: C2 complete                 -> (0.1, 1.0)
    # Area to 0.3 = 0.1*0.75 + 0.2*1.0 = 0.275; / 0.3 = 11/12.
    # (4-connectivity would give 0.2833/0.3 = 0.944; pixel-pooled recall 0.889.)
    assert aupro(masks, maps, fpr_limit=0.3) == pytest.approx(11 / 12)
    # Limit inside the flat 0.75 segment: area 0.05*0.75, normalised 0.75.
    assert aupro(masks, maps, fpr_limit=0.05) == pytest.approx(0.75)
    # Whole curve: 0.1*0.75 + 0.9*1.0 = 0.975.
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.975)


@AUPRO
def test_aupro_hand_case_interpolates_at_limit(aupro):
    masks, maps = _pro_case(tie_low_defects_with_normals=True)
    # Now the two low C2 pixels tie with the 10 normals at 0.5, so the curve
    # goes straight from (0, 0.75) to (0.1, 1.0).
    # limit 0.3:  0.1*(0.75+1)/2 + 0.2*1 = 0.2875; / 0.3 = 23/24.
    # limit 0.05: PRO(0.05) = 0.875 by interpolation;
    #             0.05*(0.75+0.875)/2 = 0.040625; / 0.05 = 0.8125.
    assert aupro(masks, maps, fpr_limit=0.3) == pytest.approx(23 / 24)
    assert aupro(masks, maps, fpr_limit=0.05) == pytest.approx(0.8125)


@AUPRO
def test_aupro_perfect_map_is_one(aupro):
    rng = np.random.default_rng(0)
    masks = [rng.random((20, 30)) > 0.8, np.zeros((10, 10), bool), rng.random((15, 15)) > 0.9]
    maps = [m.astype(np.float32) for m in masks]
    assert aupro(masks, maps) == pytest.approx(1.0)


@AUPRO
def test_aupro_random_map_is_about_half_the_limit(aupro):
    # Random scores: PRO(t) ~= FPR(t), so area ~= limit^2/2 -> normalised limit/2.
    rng = np.random.default_rng(123)
    masks, maps = [], []
    for _ in range(8):
        m = np.zeros((64, 64), bool)
        r, c = rng.integers(0, 48, size=2)
        m[r : r + rng.integers(4, 16), c : c + rng.integers(4, 16)] = True
        masks.append(m)
        maps.append(rng.random((64, 64), dtype=np.float32))
    assert aupro(masks, maps, fpr_limit=0.3) == pytest.approx(0.15, abs=0.03)


@AUPRO
def test_aupro_nan_without_defects_and_bad_limit_raises(aupro):
    assert math.isnan(aupro([np.zeros((4, 4), bool)], [np.ones((4, 4))]))
    with pytest.raises(ValueError):
        aupro([np.ones((2, 2), bool)], [np.ones((2, 2))], fpr_limit=0.0)


@AUPRO
def test_aupro_accepts_none_mask_for_good_images(aupro):
    masks, maps = _pro_case(tie_low_defects_with_normals=False)
    masks[2] = None
    assert aupro(masks, maps) == pytest.approx(11 / 12)


# --------------------------------------------------------------------------- F1


def test_f1_max_hand_case():
    labels = [0, 0, 1, 1, 0, 1]
    scores = [0.1, 0.2, 0.3, 0.6, 0.5, 0.9]
    # Threshold -> (TP, FP, FN) -> F1:
    #   0.9 (1,0,2) 0.5 | 0.6 (2,0,1) 0.8 | 0.5 (2,1,1) 0.667
    #   0.3 (3,1,0) 6/7 | 0.2 (3,2,0) 0.75 | 0.1 (3,3,0) 0.667
    f1, thr = f1_max(labels, scores)
    assert f1 == pytest.approx(6 / 7)
    assert thr == pytest.approx(0.3)
    # The rule "anomalous iff score >= threshold" reproduces that F1.
    pred = np.asarray(scores) >= thr
    y = np.asarray(labels, bool)
    tp, fp, fn = (pred & y).sum(), (pred & ~y).sum(), (~pred & y).sum()
    assert 2 * tp / (2 * tp + fp + fn) == pytest.approx(f1)


def test_f1_max_zero_precision_recall_no_warning():
    # At t=0.9 there are no true positives (P = R = 0): must not warn.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f1, thr = f1_max([1, 0], [0.1, 0.9])
    # Best: t=0.1 -> P=0.5, R=1 -> 2/3.
    assert f1 == pytest.approx(2 / 3)
    assert thr == pytest.approx(0.1)


def test_f1_max_no_positives_is_nan():
    f1, thr = f1_max([0, 0], [0.1, 0.2])
    assert math.isnan(f1) and math.isnan(thr)


# --------------------------------------------------------------------------- evaluate


def _dataset():
    # 3 good images (one scoring high), 2 of type "a", 2 of type "b".
    labels = [0, 0, 0, 1, 1, 1, 1]
    scores = [0.1, 0.2, 0.9, 0.5, 0.6, 0.95, 0.99]
    types = ["good", "good", "good", "a", "a", "b", "b"]
    return labels, scores, types


def test_evaluate_detection_per_type_uses_all_good_images():
    labels, scores, types = _dataset()
    res = evaluate_detection(labels, scores, defect_types=types)
    assert set(res["per_defect_type"]) == {"a", "b"}
    # Overall: a beats 2 of 3 goods each (4), b beats all (6) -> 10/12.
    assert res["image_auroc"] == pytest.approx(10 / 12)
    a = res["per_defect_type"]["a"]
    # "a" vs ALL 3 goods (not vs good+b, which would give 4/10 = 0.4):
    # 4 of 6 pairs -> 2/3.
    assert a["image_auroc"] == pytest.approx(2 / 3)
    assert (a["n_images"], a["n_anomalous"]) == (5, 2)
    assert res["per_defect_type"]["b"]["image_auroc"] == pytest.approx(1.0)
    assert (res["n_images"], res["n_anomalous"]) == (7, 4)
    for key in ("image_auroc", "f1_max", "f1_threshold"):
        assert key in a
    assert "pixel_auroc" not in res and "aupro" not in res


def test_evaluate_detection_with_pixels_is_json_and_plain_floats():
    labels, scores, types = _dataset()
    rng = np.random.default_rng(1)
    shapes = [(8, 8), (8, 10), (6, 9), (8, 8), (7, 7), (10, 8), (8, 8)]
    masks, maps = [], []
    for lab, shp in zip(labels, shapes):
        m = np.zeros(shp, bool)
        if lab:
            m[2:5, 2:5] = True
        masks.append(m)
        maps.append((m + 0.5 * rng.random(shp)).astype(np.float32))
    res = evaluate_detection(labels, scores, masks=masks, maps=maps, defect_types=types)
    json.dumps(res)  # must serialise
    for d in [res, *res["per_defect_type"].values()]:
        for key in ("image_auroc", "f1_max", "f1_threshold", "pixel_auroc", "aupro"):
            assert type(d[key]) is float, key
        # Defects score >= 1, normals < 0.5 -> perfect at pixel level.
        assert d["pixel_auroc"] == pytest.approx(1.0)
        assert d["aupro"] == pytest.approx(1.0)


def test_evaluate_detection_nan_where_undefined_and_input_checks():
    res = evaluate_detection([0, 0], [0.1, 0.2], defect_types=["good", "good"])
    assert math.isnan(res["image_auroc"]) and math.isnan(res["f1_max"])
    assert res["per_defect_type"] == {}
    with pytest.raises(ValueError):
        evaluate_detection([0, 1], [0.1, 0.2], masks=[np.zeros((2, 2))] * 2)
    with pytest.raises(ValueError):
        evaluate_detection([0, 1], [0.1, 0.2], defect_types=["good"])


# --------------------------------------------------------------------------- binned vs exact


def _synthetic_set(seed: int = 0, images: int = 36):
    """Images of different sizes, a third good; defects are 1-3 rectangles, each raised by its own
    amount over gamma-distributed background scores (continuous: hardly two pixels tie)."""
    rng = np.random.default_rng(seed)
    labels, scores, types, masks, maps = [], [], [], [], []
    for i in range(images):
        h, w = (int(v) for v in rng.integers(40, 160, size=2))
        amap = rng.gamma(2.0, 1.0, size=(h, w))
        mask = np.zeros((h, w), bool)
        anomalous = i % 3 != 0
        if anomalous:
            for _ in range(rng.integers(1, 4)):
                r, c = rng.integers(0, h - 8), rng.integers(0, w - 8)
                box = (slice(r, r + rng.integers(2, 30)), slice(c, c + rng.integers(2, 30)))
                mask[box] = True
                amap[box] += rng.uniform(0.0, 4.0)
        labels.append(int(anomalous))
        scores.append(float(amap.max()))
        types.append(["scratch", "dent", "stain"][(i // 3) % 3] if anomalous else "good")
        masks.append(mask if anomalous or i % 2 else None)
        maps.append(amap.astype(np.float32))
    return labels, scores, types, masks, maps


def _assert_close_to_exact(binned: dict, exact: dict, bounds: dict | None = None) -> None:
    for key in ("pixel_auroc", "aupro"):
        delta = abs(binned[key] - exact[key])
        assert delta <= TOLERANCE, (key, binned[key], exact[key])
        if bounds is not None:
            assert delta <= bounds[key] + 1e-12, (key, delta, bounds[key])
    for key in ("image_auroc", "f1_max", "f1_threshold", "n_images", "n_anomalous"):
        assert binned[key] == exact[key], key  # image level stays exact


def test_binned_evaluation_matches_exact_on_synthetic_maps_overall_and_per_type():
    labels, scores, types, masks, maps = _synthetic_set()
    binned = evaluate_detection(labels, scores, masks, maps, types)
    exact = evaluate_detection_exact(labels, scores, masks, maps, types)
    curves = PixelCurves()
    for mask, amap, label, kind in zip(masks, maps, labels, types):
        curves.add(amap, mask, group=kind if label else None)
    _assert_close_to_exact(binned, exact, curves.error_bounds())
    assert set(binned["per_defect_type"]) == set(exact["per_defect_type"]) == {"scratch", "dent", "stain"}
    for kind, result in binned["per_defect_type"].items():
        _assert_close_to_exact(result, exact["per_defect_type"][kind],
                               curves.error_bounds(groups=[None, kind]))
    # the default bins leave the error far inside the tolerance, not just inside it
    assert max(curves.error_bounds().values()) < TOLERANCE / 10


@pytest.mark.parametrize("bins", [8, 64, 512])
def test_error_bounds_hold_for_coarse_bins(bins):
    _, _, _, masks, maps = _synthetic_set(seed=1)
    curves = PixelCurves(bins)
    for mask, amap in zip(masks, maps):
        curves.add(amap, mask)
    for fpr_limit in (0.05, 0.3, 1.0):
        bounds = curves.error_bounds(fpr_limit)
        assert abs(curves.aupro(fpr_limit) - aupro_exact(masks, maps, fpr_limit)) <= bounds["aupro"]
    delta = abs(curves.pixel_auroc() - pixel_auroc_exact(masks, maps))
    assert delta <= curves.error_bounds()["pixel_auroc"]
    if bins == 8:
        assert delta > 1e-4  # the bins do matter here, so the comparisons above can fail


def test_pro_curve_is_the_mean_region_overlap_at_every_bin_edge():
    from scipy import ndimage

    _, _, _, masks, maps = _synthetic_set(seed=2, images=9)
    curves = PixelCurves(bins=32)
    for mask, amap in zip(masks, maps):
        curves.add(amap, mask)
    fpr, pro = curves.pro_curve()
    # point i: scores >= the i-th bin edge from the top
    edges = (curves.first + curves.bins - np.arange(curves.bins + 1)) * curves.width
    normals = np.concatenate([a[~(m if m is not None else np.zeros(a.shape, bool))] for m, a in zip(masks, maps)])
    regions = []
    for mask, amap in zip(masks, maps):
        if mask is not None:
            labeled, count = ndimage.label(mask, structure=np.ones((3, 3)))
            regions += [amap[labeled == k] for k in range(1, count + 1)]
    for i, edge in enumerate(edges):
        assert fpr[i] == pytest.approx((normals >= edge).mean(), abs=1e-12)
        assert pro[i] == pytest.approx(np.mean([(r >= edge).mean() for r in regions]), abs=1e-12)


def test_grid_and_metrics_do_not_depend_on_the_order_of_the_images():
    labels, _, types, masks, maps = _synthetic_set(seed=3, images=12)
    # a first map with a tiny range makes a fine grid that later maps must coarsen (re-bin)
    tiny = np.full((20, 20), 0.5, np.float32)
    tiny[0, :5] = 0.5001
    masks, maps, labels, types = [None, *masks], [tiny, *maps], [0, *labels], ["good", *types]
    forward, backward = PixelCurves(), PixelCurves()
    for mask, amap, label, kind in zip(masks, maps, labels, types):
        forward.add(amap, mask, group=kind if label else None)
    for mask, amap, label, kind in list(zip(masks, maps, labels, types))[::-1]:
        backward.add(amap, mask, group=kind if label else None)
    assert (forward.width, forward.first) == (backward.width, backward.first)
    for groups in (None, [None, "dent"]):
        assert forward.pixel_auroc(groups) == pytest.approx(backward.pixel_auroc(groups), abs=1e-12)
        assert forward.aupro(groups=groups) == pytest.approx(backward.aupro(groups=groups), abs=1e-12)
    assert abs(forward.aupro() - aupro_exact(masks, maps)) <= forward.error_bounds()["aupro"]


def test_maps_may_be_one_pass_generators():
    labels, scores, types, masks, maps = _synthetic_set(seed=4, images=9)
    from_lists = evaluate_detection(labels, scores, masks, maps, types)
    from_generators = evaluate_detection(labels, scores, (m for m in masks), (a for a in maps), types)
    assert json.dumps(from_lists) == json.dumps(from_generators)
    with pytest.raises(ValueError, match="one entry per image"):
        evaluate_detection(labels, scores, (m for m in masks[:-1]), (a for a in maps[:-1]), types)
    with pytest.raises(ValueError, match="different numbers"):
        evaluate_detection(labels, scores, (m for m in masks), (a for a in maps[:-1]), types)


def test_a_prefilled_accumulator_must_match_the_labels_groups():
    labels, scores, types, masks, maps = _synthetic_set(seed=5, images=9)
    curves = PixelCurves()
    for mask, amap, label, kind in zip(masks, maps, labels, types):
        curves.add(amap, mask, group=kind if label else None)
    result = evaluate_detection(labels, scores, defect_types=types, pixels=curves)
    assert json.dumps(result) == json.dumps(evaluate_detection(labels, scores, masks, maps, types))
    wrong = PixelCurves()
    for mask, amap in zip(masks, maps):
        wrong.add(amap, mask)  # every image in one group: the per-type figures would be wrong
    with pytest.raises(ValueError, match="per group"):
        evaluate_detection(labels, scores, defect_types=types, pixels=wrong)


def test_non_finite_map_raises_and_is_not_counted():
    curves = PixelCurves()
    with pytest.raises(ValueError, match="finite"):
        curves.add(np.array([[0.1, np.nan]]))
    assert curves.groups == {}
    with pytest.raises(ValueError, match="image 1"):
        pixel_auroc([None, np.zeros((2, 2))], [np.zeros((2, 2)), np.zeros((3, 2))])


@pytest.fixture(scope="module")
def mtd_maps(mtd_slice):
    """Real PatchCore maps: fitted on the MTD slice's train rows (defaults), its test rows scored."""
    from patchwatch.anomaly.detectors import default_features, detector_config, for_features
    from patchwatch.anomaly.features import PatchFeatureExtractor
    from patchwatch.anomaly.patchcore import PatchCore
    from patchwatch.storage.images import read_image, read_mask

    table = pd.read_csv(mtd_slice, dtype=str, keep_default_na=False)
    features = default_features("patchcore")
    extractor = PatchFeatureExtractor(features)
    # every other train row of the slice: real maps, at half the backbone time
    train = [extractor.extract([read_image(uri)])[0].vectors for uri in table[table.split == "train"].image[::2]]
    model = PatchCore.fit(np.concatenate(train), for_features("patchcore", detector_config("patchcore"), features))
    labels, scores, types, masks, maps = [], [], [], [], []
    for row in table[table.split == "test"].itertuples():
        image = read_image(row.image)
        score, amap = model.score(extractor.extract([image])[0])
        labels.append(int(row.label == "defect"))
        scores.append(score)
        types.append(row.defect_type)
        masks.append(read_mask(row.mask, image.shape[:2]) if row.mask else None)
        maps.append(amap)
    return labels, scores, types, masks, maps


def test_binned_evaluation_matches_exact_on_real_mtd_maps(mtd_maps):
    labels, scores, types, masks, maps = mtd_maps
    binned = evaluate_detection(labels, scores, masks, maps, types)
    exact = evaluate_detection_exact(labels, scores, masks, maps, types)
    curves = PixelCurves()
    for mask, amap, label, kind in zip(masks, maps, labels, types):
        curves.add(amap, mask, group=kind if label else None)
    _assert_close_to_exact(binned, exact, curves.error_bounds())
    assert set(binned["per_defect_type"]) == set(exact["per_defect_type"]) and len(exact["per_defect_type"]) == 5
    for kind, result in binned["per_defect_type"].items():
        _assert_close_to_exact(result, exact["per_defect_type"][kind], curves.error_bounds(groups=[None, kind]))


@pytest.mark.parametrize("offset", [-5.0, -1000.0])
def test_negative_and_offset_scores_bin_like_any_others(offset):
    labels, scores, types, masks, maps = _synthetic_set(seed=6, images=12)
    shifted = [(a + np.float32(offset)).astype(np.float32) for a in maps]
    curves = PixelCurves()
    for mask, amap in zip(masks, shifted):
        curves.add(amap, mask)
    bounds = curves.error_bounds()
    assert abs(curves.pixel_auroc() - pixel_auroc_exact(masks, shifted)) <= bounds["pixel_auroc"] < TOLERANCE
    assert abs(curves.aupro() - aupro_exact(masks, shifted)) <= bounds["aupro"] < TOLERANCE


@pytest.mark.parametrize("width_exponent", [-20, -14, -3, 0, 4])
def test_every_score_falls_in_the_bin_of_its_exact_quotient(width_exponent):
    """A score's bin is floor(score / width) taken exactly, on and next to bin edges, near 0 and
    where the quotient nears 2^23 and 2^31 (float32's integers, int32's range)."""
    width = math.ldexp(1.0, width_exponent)
    rng = np.random.default_rng(width_exponent + 40)
    quotients = np.concatenate([np.arange(0, 64), rng.integers(0, 1 << 16, 500),
                                [2**22 - 1, 2**22, 2**23 - 2, 2**23 - 1, 2**23, 2**23 + 2, 2**24, 2**30, 2**31 - 256]])
    on_edges = quotients.astype(np.float64) * width
    scores = np.concatenate([on_edges, np.nextafter(on_edges.astype(np.float32), np.float32(np.inf)),
                             np.nextafter(on_edges.astype(np.float32), np.float32(0)),
                             rng.uniform(0, 2**16 * width, 2000)]).astype(np.float32)
    for part in (scores[scores < 2**16 * width], scores[scores < 2**23 * width], scores):  # below 2^16, 2^23, all
        curves = PixelCurves()
        curves.width = width
        low, high = float(part.min()), float(part.max())
        offset = math.floor(low / width)
        index = curves._bin_index(part, low, high, offset)
        expected = np.floor(part.astype(np.float64) / width).astype(np.int64) - offset
        np.testing.assert_array_equal(index, expected)
