"""SPADE on synthetic patch features (no backbone), plus one small run on the real backbone."""
import io

import numpy as np
import pytest

from patchwatch.anomaly.features import FeatureConfig, PatchFeatureExtractor, PatchFeatures
from patchwatch.anomaly.spade import Spade, SpadeConfig, SpadeFitter, global_feature

from .synthetic import SIDE, blob_mask, stripe_scene

GRID = (6, 10)
IMAGE_SHAPE = (48, 80)          # non-square; 8 px per grid cell
DIM = 32
DEFECT = (slice(2, 5), slice(6, 9))          # grid cells of the planted defect
DEFECT_PIXELS = (slice(16, 40), slice(48, 72))


def nominal(rng: np.random.Generator, prototypes: np.ndarray, grid=GRID, noise: float = 0.1) -> np.ndarray:
    """A 'texture': every patch is one of a few prototypes plus noise, (grid_h * grid_w, DIM)."""
    count = grid[0] * grid[1]
    vectors = prototypes[rng.integers(len(prototypes), size=count)] + noise * rng.normal(size=(count, DIM))
    return vectors.astype(np.float32)


def with_block(vectors: np.ndarray, block: np.ndarray) -> np.ndarray:
    """``vectors`` (on GRID) with the DEFECT cells replaced by ``block`` (cells, DIM)."""
    out = vectors.reshape(*GRID, DIM).copy()
    out[DEFECT] = block.reshape(out[DEFECT].shape)
    return out.reshape(-1, DIM)


def as_features(vectors: np.ndarray, grid=GRID) -> PatchFeatures:
    return PatchFeatures(vectors, grid, IMAGE_SHAPE, IMAGE_SHAPE)


def argmax_in_defect(amap: np.ndarray) -> bool:
    row, col = np.unravel_index(np.argmax(amap), amap.shape)
    return (DEFECT_PIXELS[0].start <= row < DEFECT_PIXELS[0].stop
            and DEFECT_PIXELS[1].start <= col < DEFECT_PIXELS[1].stop)


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(0)
    prototypes = rng.normal(size=(3, DIM))
    # images of two sizes: the model must keep each image's patches apart (offsets)
    train = [nominal(rng, prototypes, grid=GRID if i % 2 else (5, 8)) for i in range(30)]
    clean = [nominal(rng, prototypes) for _ in range(8)]
    offset = rng.normal(size=DIM)
    offset *= 30 / np.linalg.norm(offset)
    cells = DEFECT[0].stop - DEFECT[0].start, DEFECT[1].stop - DEFECT[1].start
    block = offset + rng.normal(size=(cells[0] * cells[1], DIM))
    defect = with_block(nominal(rng, prototypes), block)
    return train, clean, defect


def test_fit_keeps_every_patch_with_offsets(scene):
    train, _, _ = scene
    model = Spade.fit(train)
    assert model.offsets[0] == 0 and model.offsets[-1] == sum(len(v) for v in train) == len(model.patches)
    for i, vectors in enumerate(train):
        np.testing.assert_array_equal(model.patches[model.offsets[i]:model.offsets[i + 1]], vectors)
        np.testing.assert_allclose(model.global_features[i], vectors.mean(axis=0), rtol=1e-6, atol=1e-6)


def test_a_training_image_matches_itself(scene):
    train, _, _ = scene
    model = Spade.fit(train, SpadeConfig(k_images=3))
    for i in (0, 1):  # both grids
        images, _ = model.nearest_images(train[i])
        assert images[0] == i
        assert np.all(model.patch_scores(train[i], images) < 1e-2)


def test_patch_scores_match_brute_force(scene):
    train, clean, defect = scene
    config = SpadeConfig(k_images=5, kappa=3)
    model = Spade.fit(train, config)
    globals_ = np.stack([global_feature(v) for v in train]).astype(np.float64)
    for vectors in (clean[0], defect):
        distances = np.linalg.norm(globals_ - global_feature(vectors), axis=1)
        nearest = np.argsort(distances)[: config.k_images]
        images, image_score = model.nearest_images(vectors)
        assert set(images) == set(nearest)
        assert image_score == pytest.approx(distances[nearest].mean(), rel=1e-4)
        gallery = np.concatenate([train[i] for i in nearest]).astype(np.float64)
        pairwise = np.linalg.norm(vectors[:, None, :] - gallery[None], axis=2)
        expected = np.sort(pairwise, axis=1)[:, : config.kappa].mean(axis=1)
        np.testing.assert_allclose(model.patch_scores(vectors, images), expected, rtol=1e-3, atol=1e-3)


def test_planted_defect_scores_highest_and_map_peaks_inside(scene):
    train, clean, defect = scene
    model = Spade.fit(train, SpadeConfig(k_images=10))
    clean_scores = []
    for vectors in clean:
        score, amap = model.score(as_features(vectors))
        assert amap.shape == IMAGE_SHAPE
        clean_scores.append(score)
    defect_score, amap = model.score(as_features(defect))
    assert amap.shape == IMAGE_SHAPE
    assert defect_score > max(clean_scores)
    assert argmax_in_defect(amap)


def test_max_map_image_score(scene):
    train, clean, defect = scene
    knn = Spade.fit(train, SpadeConfig(k_images=10, image_score="knn"))
    peak = Spade.fit(train, SpadeConfig(k_images=10, image_score="max_map"))
    for vectors in (clean[0], defect):
        knn_score, knn_map = knn.score(as_features(vectors))
        peak_score, peak_map = peak.score(as_features(vectors))
        assert np.array_equal(knn_map, peak_map)
        assert peak_score == pytest.approx(float(peak_map.max()))
        assert knn_score == pytest.approx(knn.nearest_images(vectors)[1])
    assert peak.score(as_features(defect))[0] > max(peak.score(as_features(v))[0] for v in clean)


def test_config_is_validated():
    with pytest.raises(ValueError, match="image_score"):
        SpadeConfig(image_score="mean")
    with pytest.raises(ValueError, match="k_images"):
        SpadeConfig(k_images=0)


def test_patches_are_compared_only_with_the_nearest_images():
    """A patch that is nominal in another kind of image is anomalous in this one."""
    rng = np.random.default_rng(5)
    family_a, family_b = rng.normal(size=(3, DIM)), rng.normal(size=(3, DIM))
    train = [nominal(rng, family_a) for _ in range(20)] + [nominal(rng, family_b) for _ in range(20)]
    cells = (DEFECT[0].stop - DEFECT[0].start) * (DEFECT[1].stop - DEFECT[1].start)
    mixed = with_block(nominal(rng, family_a), nominal(rng, family_b, grid=(1, cells)))

    near = Spade.fit(train, SpadeConfig(k_images=10))
    images, _ = near.nearest_images(mixed)
    assert np.all(images < 20)  # the nearest images are all of family A
    _, amap = near.score(as_features(mixed))
    assert argmax_in_defect(amap)
    # with every image as a neighbour the B patches find their like: the block is no longer flagged
    everything = Spade.fit(train, SpadeConfig(k_images=len(train)))
    block_near = near.patch_scores(mixed, images).reshape(*GRID)[DEFECT].mean()
    block_all = everything.patch_scores(mixed, everything.nearest_images(mixed)[0]).reshape(*GRID)[DEFECT].mean()
    assert block_near > 5 * block_all


def test_arrays_round_trip_gives_identical_scores(scene):
    train, clean, defect = scene
    model = Spade.fit(train, SpadeConfig(k_images=7, kappa=2))
    assert Spade.from_arrays(Spade.fit(train, SpadeConfig(image_score="max_map")).to_arrays()).config.image_score == "max_map"
    buffer = io.BytesIO()
    np.savez(buffer, **model.to_arrays())
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as data:
        restored = Spade.from_arrays({k: data[k] for k in data.files})
    assert restored.config == model.config
    # arrays written before a config field existed still load, with that field's default
    older = {k: v for k, v in model.to_arrays().items() if k != "config_image_score"}
    assert Spade.from_arrays(older).config == model.config
    for vectors in (clean[0], defect):
        score, amap = model.score(as_features(vectors))
        restored_score, restored_map = restored.score(as_features(vectors))
        assert restored_score == score
        assert np.array_equal(restored_map, amap)


def test_fitter_rejects_bad_input():
    fitter = SpadeFitter()
    with pytest.raises(ValueError, match="at least 1"):
        fitter.finish()
    fitter.update(np.zeros((4, DIM), np.float32))
    with pytest.raises(ValueError, match="dimension"):
        fitter.update(np.zeros((4, DIM + 1), np.float32))
    assert SpadeConfig.from_dict(SpadeConfig(k_images=3).to_dict()) == SpadeConfig(k_images=3)


# ---- real backbone ------------------------------------------------------------------------------
def test_real_backbone_finds_a_bright_blob():
    extractor = PatchFeatureExtractor(FeatureConfig(square_side=SIDE, layers=(3, 4)))
    train, clean, blob_features = stripe_scene(extractor)

    fitter = SpadeFitter(SpadeConfig(k_images=5))
    for features in train:
        fitter.update(features.vectors)
    model = fitter.finish()
    clean_scores = [model.score(f)[0] for f in clean]
    blob_score, amap = model.score(blob_features)
    assert amap.shape == (SIDE, SIDE)
    assert blob_score > max(clean_scores)
    assert blob_mask()[np.unravel_index(np.argmax(amap), amap.shape)]
