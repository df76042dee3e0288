"""PatchCore scoring: eq. 7 re-weighting, maps at the input's own size, defects found."""
from dataclasses import replace

import numpy as np
import pytest

from patchwatch.anomaly.features import PatchFeatures
from patchwatch.anomaly.maps import anomaly_map
from patchwatch.anomaly.patchcore import PatchCore, PatchCoreConfig, build_index, reweight_image_score


def test_eq7_weight_is_one_minus_softmax_over_the_neighbourhood_of_the_nearest_memory_vector():
    # memory on a line; the test patch sits at 0.5 next to m* = 0; m*'s 3 nearest are 0, 1, 2
    memory = np.array([[0.0], [1.0], [2.0], [10.0]], np.float32)
    index = build_index(memory)
    patches = np.array([[0.1], [0.5]], np.float32)
    scores = np.array([0.1, 0.5])
    nearest = np.array([0, 0])
    weighted = reweight_image_score(patches, scores, nearest, memory, index, num_neighbors=3)
    distances = np.array([0.5, 0.5, 1.5])  # |0.5 - 0|, |0.5 - 1|, |0.5 - 2|
    expected = (1 - np.exp(distances[0]) / np.exp(distances).sum()) * 0.5
    assert weighted == pytest.approx(expected, rel=1e-6)


def test_eq7_downweights_a_patch_near_a_crowded_memory_region_less_than_an_isolated_one():
    # the same raw distance counts for more when m* has no close neighbours (rare nominal look)
    crowded = np.array([[0.0], [0.1], [0.2], [0.3]], np.float32)
    isolated = np.array([[0.0], [5.0], [6.0], [7.0]], np.float32)
    patch, score = np.array([[-1.0]], np.float32), np.array([1.0])
    weight_crowded = reweight_image_score(patch, score, np.array([0]), crowded, build_index(crowded), 4)
    weight_isolated = reweight_image_score(patch, score, np.array([0]), isolated, build_index(isolated), 4)
    assert weight_isolated > weight_crowded


def test_map_has_the_input_images_own_non_square_size():
    scores = np.zeros((6, 10), np.float32)
    scores[2, 7] = 1.0
    amap = anomaly_map(scores, (301, 517), sigma=4.0, input_shape=(96, 160))
    assert amap.shape == (301, 517)
    row, col = np.unravel_index(np.argmax(amap), amap.shape)
    assert abs(row / 301 - 2.5 / 6) < 0.1 and abs(col / 517 - 7.5 / 10) < 0.1


def test_patchcore_ranks_a_planted_defect_first_and_its_map_peaks_there():
    rng = np.random.default_rng(0)
    prototypes = rng.standard_normal((5, 16)).astype(np.float32)
    grid, shape = (8, 12), (64, 96)

    def image(defect=False):
        vectors = prototypes[rng.integers(0, 5, grid[0] * grid[1])] + 0.05 * rng.standard_normal((96, 16))
        if defect:
            block = np.zeros(grid, bool)
            block[5:7, 2:4] = True
            vectors[block.ravel()] += 3.0
        return PatchFeatures(vectors.astype(np.float32), grid, shape, shape)

    bank = np.concatenate([image().vectors for _ in range(20)])
    model = PatchCore.fit(bank, PatchCoreConfig(coreset_ratio=0.1, projection_dim=8, sigma=1.0))
    clean_scores = [model.score(image())[0] for _ in range(5)]
    defect_score, defect_map = model.score(image(defect=True))
    assert defect_score > max(clean_scores)
    row, col = np.unravel_index(np.argmax(defect_map), defect_map.shape)
    assert 5 * 8 <= row < 7 * 8 and 2 * 8 <= col < 4 * 8


def test_with_context_dimensions_the_map_stays_on_the_defect_and_the_image_score_uses_both():
    """Vectors = [primary 8 | context 8]. A defect changes the primary dims on its own patches;
    the context dims (wider receptive field) change over a wide ring around it. The map must
    show the defect, not the ring; the image score still ranks the defect first."""
    rng = np.random.default_rng(1)
    grid, shape = (10, 10), (80, 80)
    prototypes = rng.standard_normal((4, 16)).astype(np.float32)

    def image(defect=False):
        vectors = prototypes[rng.integers(0, 4, 100)] + 0.05 * rng.standard_normal((100, 16))
        if defect:
            ring = np.zeros(grid, bool)
            ring[2:8, 2:8] = True
            vectors[ring.ravel(), 8:] += 2.0
            core = np.zeros(grid, bool)
            core[4:6, 4:6] = True
            vectors[core.ravel(), :8] += 3.0
        return PatchFeatures(vectors.astype(np.float32), grid, shape, shape)

    bank = np.concatenate([image().vectors for _ in range(20)])
    config = PatchCoreConfig(coreset_ratio=0.2, projection_dim=8, sigma=1.0)
    whole = PatchCore.fit(bank, config)
    primary = PatchCore(whole.memory, replace(config, map_dims=8))
    defect = image(defect=True)
    ring_only = np.zeros(shape, bool)
    ring_only[16:64, 16:64] = True
    ring_only[28:52, 28:52] = False  # leave out the defect and the smoothing around it
    _, blurred = whole.score(defect)
    score, sharp = primary.score(defect)
    nominal_level = np.median(primary.score(image())[1])
    assert sharp[ring_only].mean() < nominal_level + 0.25 * (blurred[ring_only].mean() - nominal_level)
    row, col = np.unravel_index(np.argmax(sharp), shape)
    assert 32 <= row < 48 and 32 <= col < 48
    assert score > max(primary.score(image())[0] for _ in range(5))
