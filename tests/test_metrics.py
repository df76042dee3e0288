"""Tests for anomaly.metrics: hand-computed values, edge cases, per-type protocol."""

import json
import math
import warnings

import numpy as np
import pytest

from anomaly.metrics import aupro, evaluate_detection, f1_max, image_auroc, pixel_auroc


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


def test_pixel_auroc_images_of_different_sizes():
    masks = [np.array([[1, 0], [0, 0]], bool), np.array([[0, 1, 0]], bool)]
    maps = [np.array([[0.9, 0.1], [0.2, 0.3]]), np.array([[0.5, 0.4, 0.95]])]
    # Positives 0.9, 0.4; negatives 0.1, 0.2, 0.3, 0.5, 0.95.
    # 0.9 beats 4 negatives, 0.4 beats 3 -> 7 / (2*5) = 0.7.
    assert pixel_auroc(masks, maps) == pytest.approx(0.7)


def test_pixel_auroc_nan_without_defects_and_shape_mismatch_raises():
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


def test_aupro_hand_case_step_curve():
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


def test_aupro_hand_case_interpolates_at_limit():
    masks, maps = _pro_case(tie_low_defects_with_normals=True)
    # Now the two low C2 pixels tie with the 10 normals at 0.5, so the curve
    # goes straight from (0, 0.75) to (0.1, 1.0).
    # limit 0.3:  0.1*(0.75+1)/2 + 0.2*1 = 0.2875; / 0.3 = 23/24.
    # limit 0.05: PRO(0.05) = 0.875 by interpolation;
    #             0.05*(0.75+0.875)/2 = 0.040625; / 0.05 = 0.8125.
    assert aupro(masks, maps, fpr_limit=0.3) == pytest.approx(23 / 24)
    assert aupro(masks, maps, fpr_limit=0.05) == pytest.approx(0.8125)


def test_aupro_perfect_map_is_one():
    rng = np.random.default_rng(0)
    masks = [rng.random((20, 30)) > 0.8, np.zeros((10, 10), bool), rng.random((15, 15)) > 0.9]
    maps = [m.astype(np.float32) for m in masks]
    assert aupro(masks, maps) == pytest.approx(1.0)


def test_aupro_random_map_is_about_half_the_limit():
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


def test_aupro_nan_without_defects_and_bad_limit_raises():
    assert math.isnan(aupro([np.zeros((4, 4), bool)], [np.ones((4, 4))]))
    with pytest.raises(ValueError):
        aupro([np.ones((2, 2), bool)], [np.ones((2, 2))], fpr_limit=0.0)


def test_aupro_accepts_none_mask_for_good_images():
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
