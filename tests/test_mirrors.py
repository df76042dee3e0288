"""Mirror images of the nominal images: added to a fit only where the images look the same mirrored."""
import numpy as np
import pytest
import torch
from PIL import Image

from patchwatch.anomaly.features import FeatureConfig, PatchFeatureExtractor
from patchwatch.anomaly.probe_choice import mirror_choice
from patchwatch.anomaly.selection import Candidate, ProbeResult, make_probe_set, probe_candidate
from patchwatch.anomaly.settings import MIRRORS, mirrored
from patchwatch.storage.images import ImageRecord
from patchwatch.storage.model_checks import StoredModelError, check_manifest
from patchwatch.storage.model_store import HOLDOUT, TRAIN, FeatureBank
from tests.synthetic import SIDE, stripes

torch.set_num_threads(1)


def part(rng: np.random.Generator) -> np.ndarray:
    """An aligned part: a bright block at the top left and a shading from left to right, a little
    noise and a shift of a few pixels: never the same mirrored."""
    y, x = np.mgrid[:SIDE, :SIDE]
    image = 0.25 + 0.4 * x / SIDE + 0.03 * rng.normal(size=(SIDE, SIDE))
    dy, dx = rng.integers(-3, 4, size=2)
    image[16 + dy:56 + dy, 12 + dx:44 + dx] = 0.9
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def test_mirrored_flips_the_named_axes():
    image = np.arange(12).reshape(3, 4)
    assert np.array_equal(mirrored(image, "h"), image[:, ::-1])
    assert np.array_equal(mirrored(image, "v"), image[::-1])
    assert np.array_equal(mirrored(image, "hv"), image[::-1, ::-1])
    with pytest.raises(ValueError, match="unknown mirror 'x'"):
        mirrored(image, "x")


def test_feature_settings_without_mirrors_read_and_write_as_before():
    """Banks and manifests compare feature settings: one written before mirrors existed is equal."""
    assert "mirrors" not in FeatureConfig().to_dict()
    settings = FeatureConfig(mirrors=("h", "hv"))
    assert FeatureConfig.from_dict(settings.to_dict()) == settings
    assert FeatureConfig.from_dict({**FeatureConfig().to_dict(), "mirrors": ["v"]}).mirrors == ("v",)
    with pytest.raises(ValueError, match="unknown mirror"):
        FeatureConfig(mirrors=("diagonal",))


def test_a_stored_manifest_with_mirrors_is_checked():
    check_manifest({"feature_config": {"mirrors": ["h", "v", "hv"]}}, "root")
    for bad in (["h", "h"], ["sideways"], "h"):
        with pytest.raises(StoredModelError, match="feature_config.mirrors"):
            check_manifest({"feature_config": {"mirrors": bad}}, "root")


def test_the_fit_adds_each_training_images_mirror_images_and_holds_out_images_as_they_are(tmp_path):
    from patchwatch.anomaly.tiling import TilingConfig
    from patchwatch.tasks.features import extract_features_task

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    records = []
    for name in ("a.png", "b.png"):
        Image.fromarray(part(rng)).save(folder / name)
        records.append(ImageRecord(name, str(folder / name)))
    settings = FeatureConfig(square_side=SIDE, mirrors=("h", "hv"))
    root = str(tmp_path / "root")
    trained = extract_features_task.fn(root, 0, records, settings, TilingConfig())
    held = extract_features_task.fn(root, 1, records[:1], settings, TilingConfig(), kind=HOLDOUT)
    bank = FeatureBank(root)
    index = bank.index(TRAIN)
    assert list(index.image_id) == ["a.png", "a.png#mirror-h", "a.png#mirror-hv",
                                    "b.png", "b.png#mirror-h", "b.png#mirror-hv"]
    assert set(index.uri) == {r.uri for r in records} and trained["images"] == 2
    assert list(bank.index(HOLDOUT).image_id) == ["a.png"] and held["images"] == 1
    # each mirrored row holds the features of the mirrored image
    vectors = bank.read_batch(0, TRAIN)
    extractor = PatchFeatureExtractor(settings)
    image = np.asarray(Image.open(folder / "b.png"))
    for row in index.itertuples(index=False):
        if row.image_id == "b.png#mirror-hv":
            expected = extractor.extract([mirrored(image, "hv")])[0].vectors
            assert np.allclose(vectors[row.row_start:row.row_stop], expected, atol=1e-5)


@pytest.mark.parametrize("kind, expected", [("texture", MIRRORS), ("part", ())])
def test_mirror_images_are_kept_only_where_the_nominal_images_look_the_same_mirrored(kind, expected):
    """The probe's model scores the probe images mirrored (no defect) against as they are: vertical
    stripes of random phase look the same mirrored every way; a part with a block at its top left
    never does (mirrored, it scores as a defect)."""
    rng = np.random.default_rng(3)
    images = [(stripes if kind == "texture" else part)(rng) for _ in range(32)]
    probe = make_probe_set(images, probe_images=8, seed=0)
    result = probe_candidate(Candidate.make("padim", "padim"), probe)
    mirrors, reason = mirror_choice(result, len(probe.clean))
    assert mirrors == expected, (result.mirror_aurocs, reason)
    assert set(result.mirror_aurocs) == set(MIRRORS) and set(result.row()) >= {"mirror_h", "mirror_v", "mirror_hv"}
    if kind == "part":
        assert min(result.mirror_aurocs.values()) > 0.9 and "look different" in reason
    else:
        assert "look the same mirrored" in reason


def test_a_probe_without_mirror_measurements_adds_none():
    assert mirror_choice(ProbeResult("padim", 0.8, 0.9, 1.0, {}), 32)[0] == ()


def test_mirrors_can_be_set_on_the_command_line_in_a_config_file_or_in_python(tmp_path):
    """A user who knows the line's images are a texture fixes the mirrors (no --auto then)."""
    from patchwatch.cli import fit_parameters, parse_arguments

    fit = ["fit", "--images", "in", "--root", "model"]
    given = fit_parameters(parse_arguments([*fit, "--detector", "padim", "--mirrors", "h, v"]))
    assert given["feature_config"]["mirrors"] == ("h", "v") and given["auto"] is False
    assert "mirrors" not in fit_parameters(parse_arguments([*fit, "--no-auto"]))["feature_config"]
    assert "mirrors" not in fit_parameters(parse_arguments([*fit, "--mirrors", ""]))["feature_config"]
    with pytest.raises(ValueError, match="--mirrors or --auto"):
        fit_parameters(parse_arguments([*fit, "--auto", "--mirrors", "h"]))
    with pytest.raises(ValueError, match="unknown mirror 'sideways'"):
        fit_parameters(parse_arguments([*fit, "--mirrors", "sideways"]))
    config = tmp_path / "line.toml"
    config.write_text('detector = "padim"\nmirrors = ["h", "hv"]\n')
    from_file = fit_parameters(parse_arguments([*fit, "--config", str(config)]))
    assert from_file["feature_config"]["mirrors"] == ("h", "hv")
    config.write_text("mirrors = [1]\n")
    with pytest.raises(ValueError, match="mirrors.*a list of names"):
        parse_arguments([*fit, "--config", str(config)])


def test_the_python_api_takes_mirrors_as_a_list(tmp_path):
    from patchwatch.api import _fit_arguments
    from patchwatch.cli import build_parser, fit_parameters

    args = _fit_arguments(build_parser(), "in", str(tmp_path / "root"), {"detector": "padim", "mirrors": ["v"]})
    assert fit_parameters(args)["feature_config"]["mirrors"] == ("v",)


def test_a_large_images_tiles_are_learnt_mirrored_too(tmp_path):
    from patchwatch.anomaly.tiling import Tile
    from patchwatch.tasks.tiles import extract_tile_features_task

    rng = np.random.default_rng(5)
    image = np.concatenate([part(rng), stripes(rng)], axis=1)  # 128 x 256: two tiles of 128 x 128
    Image.fromarray(image).save(tmp_path / "wide.png")
    tiles = [Tile(0, 0, SIDE, SIDE), Tile(0, SIDE, SIDE, 2 * SIDE)]
    settings = FeatureConfig(square_side=SIDE, mirrors=("v",))
    root = str(tmp_path / "root")
    result = extract_tile_features_task.fn(root, 0, "wide.png", str(tmp_path / "wide.png"), tiles, settings)
    index = FeatureBank(root).index(TRAIN)
    assert list(index.image_id) == ["wide.png#0,0", "wide.png#0,0#mirror-v", f"wide.png#0,{SIDE}",
                                    f"wide.png#0,{SIDE}#mirror-v"]
    assert result["tiles"] == 2 and result["rows"] == index.row_stop.max()
    vectors = FeatureBank(root).read_batch(0, TRAIN)
    expected = PatchFeatureExtractor(settings).extract([mirrored(image[:, :SIDE], "v")])[0].vectors
    row = index.iloc[1]
    assert np.allclose(vectors[row.row_start:row.row_stop], expected, atol=1e-5)


def test_a_mirror_is_kept_only_within_one_standard_error_of_chance():
    """MTD's case: its probes mirrored left-right scored 0.624 against themselves at 28 probes, within
    two standard errors of chance, and learning them lost image AUROC on MTD's test split."""
    result = ProbeResult("padim", 0.74, 0.9, 1.0, {}, mirror_aurocs={"h": 0.624, "v": 0.55, "hv": 0.69})
    mirrors, reason = mirror_choice(result, 28)
    assert mirrors == ("v",) and "0.578" in reason and "h 0.624" in reason
    assert mirror_choice(ProbeResult("padim", 0.74, 0.9, 1.0, {}, mirror_aurocs={"h": 0.4, "v": 0.45, "hv": 0.5}),
                         32)[0] == MIRRORS
