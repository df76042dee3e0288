"""PaDiM on synthetic patch features (no backbone), plus one small run on the real backbone."""
import io

import numpy as np
import pytest

from patchwatch.anomaly.features import FeatureConfig, PatchFeatureExtractor, PatchFeatures
from patchwatch.anomaly.padim import Padim, PadimConfig, PadimFitter, channel_subset

from .synthetic import SIDE, blob_mask, stripe_scene

GRID = (6, 10)
IMAGE_SHAPE = (48, 80)          # non-square; 8 px per grid cell
DIM = 32
DEFECT = (slice(2, 5), slice(6, 9))          # grid cells of the planted defect
DEFECT_PIXELS = (slice(16, 40), slice(48, 72))
CONFIG = PadimConfig(channels=16, seed=3)


def nominal(rng: np.random.Generator, prototypes: np.ndarray, grid=GRID, noise: float = 0.1) -> np.ndarray:
    """A 'texture': every patch is one of a few prototypes plus noise, (grid_h * grid_w, DIM)."""
    count = grid[0] * grid[1]
    vectors = prototypes[rng.integers(len(prototypes), size=count)] + noise * rng.normal(size=(count, DIM))
    return vectors.astype(np.float32)


def planted(rng: np.random.Generator, prototypes: np.ndarray) -> np.ndarray:
    """A nominal image with a block of patches far from every prototype."""
    vectors = nominal(rng, prototypes).reshape(*GRID, DIM)
    offset = rng.normal(size=DIM)
    offset *= 30 / np.linalg.norm(offset)
    vectors[DEFECT] += offset + rng.normal(size=vectors[DEFECT].shape)
    return vectors.reshape(-1, DIM)


def as_features(vectors: np.ndarray, grid=GRID) -> PatchFeatures:
    return PatchFeatures(vectors, grid, IMAGE_SHAPE, IMAGE_SHAPE)


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(0)
    prototypes = rng.normal(size=(3, DIM))
    train = [nominal(rng, prototypes) for _ in range(40)]
    clean = [nominal(rng, prototypes) for _ in range(8)]
    return train, clean, planted(rng, prototypes)


def test_channel_subset_is_seeded_sorted_and_bounded():
    chosen = channel_subset(256, 100, seed=0)
    assert len(chosen) == 100 and len(set(chosen)) == 100
    assert np.all(np.diff(chosen) > 0) and chosen.max() < 256
    assert np.array_equal(chosen, channel_subset(256, 100, seed=0))
    assert not np.array_equal(chosen, channel_subset(256, 100, seed=1))
    assert np.array_equal(channel_subset(64, 100, seed=0), np.arange(64))
    assert np.array_equal(channel_subset(64, 0, seed=0), np.arange(64))


def test_streaming_fit_equals_batch_fit():
    rng = np.random.default_rng(1)
    # a large common offset: the streaming sums must not lose the covariance to cancellation
    images = [1000 + rng.normal(size=(GRID[0] * GRID[1], DIM)).astype(np.float32) * rng.uniform(0.5, 2, DIM)
              for _ in range(25)]
    fitter = PadimFitter(GRID, DIM, CONFIG)
    for vectors in images:
        fitter.update(vectors)
    mean, cov = fitter.mean_and_covariance()

    data = np.stack(images)[:, :, fitter.channel_index].astype(np.float64)  # (N, P, C)
    batch_mean = data.mean(axis=0)
    batch_cov = np.stack([np.cov(data[:, p, :], rowvar=False) for p in range(data.shape[1])])
    np.testing.assert_allclose(mean, batch_mean, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(cov, batch_cov, rtol=1e-7, atol=1e-8)

    model = fitter.finish()
    regularised = batch_cov + CONFIG.epsilon * np.eye(len(fitter.channel_index))
    np.testing.assert_allclose(model.inv_cov, np.linalg.inv(regularised), rtol=1e-6, atol=1e-8)
    assert model.mean.shape == (GRID[0] * GRID[1], CONFIG.channels)


def test_a_stacked_update_equals_one_image_at_a_time(scene):
    train, _, _ = scene
    one, stacked = PadimFitter(GRID, DIM, CONFIG), PadimFitter(GRID, DIM, CONFIG)
    for vectors in train:
        one.update(vectors)
    stacked.update(np.stack(train[:7]))
    stacked.update(np.stack(train[7:]), grid=GRID)
    assert stacked.count == one.count == len(train)
    for a, b in zip(one.mean_and_covariance(), stacked.mean_and_covariance()):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_mahalanobis_matches_a_loop_over_positions(scene):
    train, clean, _ = scene
    model = Padim.fit(train, GRID, CONFIG)
    vectors = clean[0]
    expected = []
    for p in range(len(vectors)):
        diff = vectors[p, model.channel_index].astype(np.float64) - model.mean[p]
        expected.append(np.sqrt(diff @ model.inv_cov[p] @ diff))
    np.testing.assert_allclose(model.patch_scores(vectors), expected, rtol=1e-9)


def test_planted_defect_scores_highest_and_map_peaks_inside(scene):
    train, clean, defect = scene
    model = Padim.fit(train, GRID, CONFIG)
    clean_scores = []
    for vectors in clean:
        score, amap = model.score(as_features(vectors))
        assert amap.shape == IMAGE_SHAPE
        assert score == pytest.approx(float(amap.max()))
        clean_scores.append(score)
    defect_score, amap = model.score(as_features(defect))
    assert amap.shape == IMAGE_SHAPE
    assert defect_score > max(clean_scores)
    row, col = np.unravel_index(np.argmax(amap), amap.shape)
    assert DEFECT_PIXELS[0].start <= row < DEFECT_PIXELS[0].stop
    assert DEFECT_PIXELS[1].start <= col < DEFECT_PIXELS[1].stop


def test_grid_mismatch_raises_clearly(scene):
    train, clean, _ = scene
    model = Padim.fit(train, GRID, CONFIG)
    other = (5, 12)
    with pytest.raises(ValueError, match="one input size for every image"):
        model.score(as_features(clean[0], grid=other))
    fitter = PadimFitter(GRID, DIM, CONFIG)
    with pytest.raises(ValueError, match="one input size for every image"):
        fitter.update(np.zeros((5 * 8, DIM), np.float32))
    # (5, 12) has as many positions as (6, 10): only the grid tells them apart
    with pytest.raises(ValueError, match="one input size for every image"):
        fitter.update(clean[0], grid=other)
    with pytest.raises(ValueError, match="at least 2"):
        fitter.finish()


def test_arrays_round_trip_gives_identical_scores(scene):
    train, clean, defect = scene
    model = Padim.fit(train, GRID, CONFIG)
    buffer = io.BytesIO()
    np.savez(buffer, **model.to_arrays())
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as data:
        restored = Padim.from_arrays({k: data[k] for k in data.files})
    assert restored.config == model.config and restored.grid == model.grid
    for vectors in (clean[0], defect):
        score, amap = model.score(as_features(vectors))
        restored_score, restored_map = restored.score(as_features(vectors))
        assert restored_score == score
        assert np.array_equal(restored_map, amap)


def test_config_dict_round_trip():
    assert PadimConfig.from_dict(CONFIG.to_dict()) == CONFIG
    old_manifest = {k: v for k, v in CONFIG.to_dict().items() if k != "shrinkage"}  # written before shrinkage
    assert PadimConfig.from_dict(old_manifest).shrinkage == "none"
    with pytest.raises(ValueError, match="unknown PaDiM shrinkage 'ledoit'"):
        PadimConfig(shrinkage="ledoit")


@pytest.mark.parametrize("images, channels", [(30, 40), (300, 16)])
def test_oas_shrinks_each_position_as_sklearn_does(images, channels):
    """Few images per channel: strong shrinkage; many: little. Each position's estimate is
    sklearn.covariance.OAS's on that position's vectors."""
    from sklearn.covariance import OAS

    rng = np.random.default_rng(images)
    grid = (1, 3)
    mixing = rng.normal(size=(3, channels, channels))
    stack = np.einsum("npc,pcd->npd", rng.normal(size=(images, 3, channels)), mixing).astype(np.float32)
    fitter = PadimFitter(grid, channels, PadimConfig(channels=0, shrinkage="oas", epsilon=0.0))
    fitter.update(stack, grid)
    model = fitter.finish()
    for position in range(3):
        reference = OAS().fit(stack[:, position].astype(np.float64))
        unbiased = reference.covariance_ * images / (images - 1)
        np.testing.assert_allclose(np.linalg.inv(model.inv_cov[position]), unbiased, rtol=1e-6, atol=1e-8)
    assert (reference.shrinkage_ > 0.3) if images < channels else (reference.shrinkage_ < 0.1)


# ---- real backbone ------------------------------------------------------------------------------
def test_real_backbone_finds_a_bright_blob():
    extractor = PatchFeatureExtractor(FeatureConfig(square_side=SIDE, layers=(3, 4)))
    train, clean, blob_features = stripe_scene(extractor)

    fitter = PadimFitter(train[0].grid, train[0].vectors.shape[1], PadimConfig())
    for features in train:
        fitter.update(features.vectors, features.grid)
    model = fitter.finish()
    clean_scores = [model.score(f)[0] for f in clean]
    blob_score, amap = model.score(blob_features)
    assert amap.shape == (SIDE, SIDE)
    assert blob_score > max(clean_scores)
    assert blob_mask()[np.unravel_index(np.argmax(amap), amap.shape)]


def test_a_new_fit_shrinks_and_a_model_or_manifest_from_before_shrinkage_keeps_fitting_as_it_was(scene):
    """New fits use OAS; a version written before the setting existed loads (its detector.npz has
    no config_shrinkage) and its root's re-fits go on without shrinkage (its manifest's record)."""
    from patchwatch.anomaly.detectors import detector_config

    assert detector_config("padim").shrinkage == "oas"
    old_record = {k: v for k, v in PadimConfig().to_dict().items() if k != "shrinkage"}
    assert detector_config("padim", old_record).shrinkage == "none"
    train, clean, _ = scene
    model = Padim.fit(train, GRID, CONFIG)
    arrays = {k: v for k, v in model.to_arrays().items() if k != "config_shrinkage"}
    loaded = Padim.from_arrays(arrays)
    assert loaded.config.shrinkage == "none"
    np.testing.assert_array_equal(loaded.patch_scores(clean[0]), model.patch_scores(clean[0]))


def test_every_setting_a_fit_records_is_one_the_stored_model_checks_know():
    """A new setting must be known to storage.model_checks, or every model fitted with it is
    refused on load ('detector_config.shrinkage is not a setting this patchwatch knows')."""
    from dataclasses import fields as dataclass_fields

    from patchwatch.anomaly.detectors import CONFIGS, default_features, detector_config
    from patchwatch.anomaly.tiling import TilingConfig
    from patchwatch.storage.model_checks import (DETECTOR_FIELDS, FEATURE_FIELDS, TILING_FIELDS,
                                                 check_manifest)

    assert {f.name for f in dataclass_fields(FeatureConfig)} <= set(FEATURE_FIELDS)
    assert {f.name for f in dataclass_fields(TilingConfig)} <= set(TILING_FIELDS)
    for name, config in CONFIGS.items():
        assert {f.name for f in dataclass_fields(config)} <= set(DETECTOR_FIELDS[name]), name
        check_manifest({"detector": name, "feature_config": default_features(name).to_dict(),
                        "detector_config": detector_config(name).to_dict(),
                        "tiling_config": TilingConfig().to_dict()}, f"/models/{name}")
