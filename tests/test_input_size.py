"""PaDiM's one input size comes from the nominal images: their median size and aspect, its area
kept between 320 x 320 and 512 x 512, fixed for the root at its first fit."""
import json

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

import patchwatch
from patchwatch.anomaly.detectors import default_features, needs_input_size, with_input_size
from patchwatch.anomaly.features import FeatureConfig, PatchFeatureExtractor, native_shape
from patchwatch.anomaly.tiling import TilingConfig
from patchwatch.flows.root_settings import nothing_to_fit


def test_the_input_size_is_the_median_size_and_aspect_with_its_area_bounded():
    assert native_shape([(320, 800)] * 3) == (320, 800)   # their own size and aspect
    height, width = native_shape([(256, 3072)])     # a wide strip: shrunk as a whole, aspect kept
    assert height * width <= 512 * 512 and width / height == pytest.approx(12, rel=0.03)
    assert native_shape([(128, 128)]) == (320, 320)  # a small image is scaled up
    assert native_shape([(331, 294)]) == (368, 320)  # one shape: its short side to 320, sides rounded to 16
    assert native_shape([(400, 360)]) == (400, 352)  # short side above 320: its own size, rounded
    # images that share no aspect (MTD's tiles: 0.6 to 1.8): a square of their median area, here
    # scaled up to the least area
    mixed = [(222, 580), (403, 355), (331, 294), (260, 390), (380, 240)]
    assert native_shape(mixed) == (320, 320)
    assert native_shape([(300, 600)] * 9 + [(300, 900)]) == native_shape([(300, 600)])  # one outlier
    with pytest.raises(ValueError):
        native_shape([])


def test_an_elongated_input_keeps_its_short_side_at_the_least_squares_side():
    """A wide tile of 256 x 512 (a fabric strip's) is taller at 320 x 640 than at its own size, as
    the 320 x 320 square had it, but keeps its aspect (wide-strip: 0.906 / 0.884 image AUROC at
    320 x 640 against 0.853 / 0.852 at 256 x 512 and 0.876 / 0.874 at 320 x 320; README); the
    area bound still wins for longer shapes, and shapes whose short side reaches 320 keep theirs."""
    assert native_shape([(256, 512)] * 4) == (320, 640)
    assert native_shape([(512, 256)] * 4) == (640, 320)           # tall ones alike
    assert native_shape([(300, 600)]) == (320, 640)
    height, width = native_shape([(128, 512)])                     # 1:4 at 320 would be 320 x 1280
    assert height * width <= 512 * 512 and (height, width) == (256, 1024)
    assert native_shape([(320, 800)]) == (320, 800)                # short side 320 already
    assert native_shape([(500, 1250)]) == (320, 816)               # shrunk to the area bound: 324 x 810


def test_a_large_image_counts_by_its_tiles():
    tiling = TilingConfig()
    assert tiling.view_shape(1536, 1536) == (512, 512)
    assert tiling.view_shape(256, 3072) == (256, 512)
    assert tiling.view_shape(600, 800) == (600, 800)   # below the tiling threshold: itself


def test_only_a_padim_without_a_size_gets_one():
    shapes = [(200, 480)]
    padim = default_features("padim")
    assert needs_input_size("padim", padim) and with_input_size("padim", padim, shapes).fixed_shape == (320, 768)
    square = default_features("padim", square_side=256)
    assert with_input_size("padim", square, shapes) == square          # the user's square stays
    patchcore = default_features("patchcore")
    assert with_input_size("patchcore", patchcore, shapes) == patchcore  # one size per image is fine there


def test_every_image_reaches_the_network_at_the_fixed_shape_and_keeps_its_own_map_size():
    extractor = PatchFeatureExtractor(FeatureConfig(fixed_shape=(160, 320), context_scales=(0.25,)))
    rng = np.random.default_rng(0)
    for shape in ((100, 500), (300, 300)):
        features = extractor.extract([rng.random(shape).astype(np.float32)])[0]
        assert features.input_shape == (160, 320) and features.grid == (10, 20) and features.image_shape == shape


def test_a_bank_recorded_before_fixed_shape_existed_still_takes_its_own_settings(tmp_path):
    """Banks and manifests written before fixed_shape existed lack the key: a configuration without
    a fixed shape must still be the same settings, or every older root would refuse its re-fit."""
    from patchwatch.storage.model_store import ModelRegistry

    bank = ModelRegistry(str(tmp_path / "root")).bank
    features = default_features("patchcore")
    older = {key: value for key, value in features.to_dict().items() if key != "fixed_shape"}
    bank.claim({"feature_config": older, "tiling_config": TilingConfig().to_dict()})
    bank.claim({"feature_config": features.to_dict(), "tiling_config": TilingConfig().to_dict()})
    assert FeatureConfig.from_dict(older) == features


def texture(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return (np.clip(0.5 + gaussian_filter(rng.normal(0, 0.6, shape), 2.0), 0, 1) * 255).astype(np.uint8)


def manifest(root, version: str) -> dict:
    return json.loads((root / "versions" / version / "manifest.json").read_text())


def test_a_padim_fit_takes_the_images_size_and_later_fits_keep_it(tmp_path):
    rng = np.random.default_rng(0)
    root, folder = tmp_path / "root", tmp_path / "images"
    shapes = [(200, 480)] * 14 + [(184, 520)] * 8
    first = patchwatch.fit([texture(rng, s) for s in shapes], root, detector="padim", workers=1,
                           image_folder=str(folder))
    fixed = native_shape(shapes)
    assert first["version"] == "v0001" and tuple(manifest(root, "v0001")["feature_config"]["fixed_shape"]) == fixed

    # more new nominal images of another size than old ones (their median is 300 x 300): the root
    # keeps its size, at which its bank's vectors were made
    second = patchwatch.fit([texture(rng, (300, 300)) for _ in range(30)], root, detector="padim", workers=1,
                            image_folder=str(folder))
    assert second["version"] == "v0002" and second["new_images"] == 30
    assert tuple(manifest(root, "v0002")["feature_config"]["fixed_shape"]) == fixed
    # and a fit with nothing new is known to be one before any cluster starts
    assert nothing_to_fit(images=str(folder), root=str(root), detector="padim")

    scored = patchwatch.load(root).score(texture(rng, (300, 300)))
    assert scored.map.shape == (300, 300) and np.isfinite(scored.score)


def test_a_root_made_with_the_former_square_default_keeps_it_on_a_refit(tmp_path):
    """PaDiM's default was a 320 x 320 square until 2026-11-30: a nightly re-fit of such a root
    with the plain --detector padim must go on with its bank, not refuse the root."""
    from patchwatch.storage.model_store import ModelRegistry

    rng = np.random.default_rng(1)
    root, folder = tmp_path / "root", tmp_path / "images"
    former = {key: value for key, value in default_features("padim", square_side=320).to_dict().items()
              if key != "fixed_shape"}   # the bank's settings as the former default recorded them
    ModelRegistry(str(root)).bank.claim({"feature_config": former, "tiling_config": TilingConfig().to_dict()})
    refit = patchwatch.fit([texture(rng, (200, 480)) for _ in range(4)], root, detector="padim", workers=1,
                           image_folder=str(folder))
    fitted = manifest(root, refit["version"])["feature_config"]
    assert refit["new_images"] == 4 and fitted["square_side"] == 320 and not fitted.get("fixed_shape")
