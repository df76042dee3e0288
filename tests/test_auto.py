"""``fit --auto``: synthetic defects, the probe's ranking, the choice, and the fit that records it."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from patchwatch.anomaly.detectors import needs_input_size
from patchwatch.anomaly.features import FeatureConfig, native_shape, to_float_rgb
from patchwatch.anomaly.selection import (DEFECT_KINDS, Candidate, ProbeResult, choose, default_candidates, make_probe_set,
                               paste_defect, probe_candidate)
from tests.synthetic import SIDE, stripes

# more intra-op threads than free cores makes each backbone pass ~40x slower on this machine
torch.set_num_threads(1)


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_a_pasted_defect_changes_the_image_where_its_mask_says_and_nowhere_else(kind):
    rng = np.random.default_rng(3)
    image, donor = stripes(rng), stripes(rng)
    broken, mask = paste_defect(image, donor, np.random.default_rng(7), kind)
    again, same_mask = paste_defect(image, donor, np.random.default_rng(7), kind)
    assert np.array_equal(broken, again) and np.array_equal(mask, same_mask)  # drawn from the seed alone
    change = np.abs(broken - to_float_rgb(image)).max(axis=2)
    assert 0 < mask.sum() < mask.size // 4
    assert change[mask].mean() > 5 * change[~mask].mean()


def test_defect_sizes_span_a_few_pixels_to_a_large_region():
    rng = np.random.default_rng(0)
    image = np.full((256, 256), 128, np.uint8) + rng.integers(0, 20, (256, 256), dtype=np.uint8)
    areas = [paste_defect(image, image, rng, "intensity")[1].sum() for _ in range(60)]
    assert min(areas) < 60 and max(areas) > 600


def result(name, auroc):
    return ProbeResult(name, auroc, 0.9, 1.0, {})


def test_the_choice_keeps_the_cheaper_candidate_when_the_probe_cannot_tell_them_apart():
    chosen, reason = choose([result("cheap", 0.90), result("costly", 0.905)])
    assert chosen.name == "cheap" and "within" in reason and "cheaper" in reason
    chosen, reason = choose([result("general", 0.70), result("special", 0.95)])
    assert chosen.name == "special" and "0.950" in reason and "general 0.700" in reason


def test_the_probe_measures_what_a_configuration_sees():
    rng = np.random.default_rng(1)
    images = [stripes(rng) for _ in range(24)]
    probe = make_probe_set(images, probe_images=8, seed=0)
    # at most a quarter of the images are probes: the rest are needed to fit on
    assert len(probe.clean) == len(probe.defective) == 6 and len(probe.train) == 18
    seeing = Candidate.make("seeing", "patchcore", {"layers": (2, 3), "input_scale": 1.0, "context_scales": ()})
    # an eighth-size input leaves a 128 px image one feature cell: a pasted defect is averaged away
    blind = Candidate.make("blind", "patchcore", {"layers": (2, 3), "input_scale": 0.125, "context_scales": ()})
    seen, missed = probe_candidate(seeing, probe), probe_candidate(blind, probe)
    assert seen.image_auroc >= 0.75 and seen.pixel_auroc > 0.85
    # one feature cell cannot say where a defect is (its map is flat)
    assert missed.pixel_auroc < seen.pixel_auroc - 0.25


def test_a_few_large_images_give_the_probe_many_tile_sized_crops_and_never_share_one_image():
    """16 images of 1536 x 1536 (the tiling threshold is 1024 px): before, 12 crops to fit on and 4
    probes to score, whose image AUROC is noise; now up to 80 and 32 crops of distinct tiles, and
    no probe comes from an image the candidates were fitted on."""
    from patchwatch.anomaly.tiling import TilingConfig

    rng = np.random.default_rng(2)
    # each image's pixels say which image it is (the mean of a crop gives it back)
    images = [np.full((1536, 1536), 8 * i + 4, np.uint8) + rng.integers(0, 3, (1536, 1536), dtype=np.uint8)
              for i in range(16)]
    probe = make_probe_set(images, seed=0, tiling=TilingConfig())
    assert len(probe.train) == 80 and len(probe.clean) == len(probe.defective) == 32
    assert {view.shape[:2] for view in probe.train + probe.clean} == {(512, 512)}

    def source(view):
        return int(round((float(np.mean(view)) * (255 if view.dtype != np.uint8 else 1) - 5) / 8))

    train_sources = {source(v) for v in probe.train}
    probe_sources = {source(v) for v in probe.clean}
    assert len(train_sources) == 12 and len(probe_sources) == 4 and not train_sources & probe_sources
    for index in probe_sources:  # distinct tiles of one image: no crop scored twice
        crops = [v for v in probe.clean if source(v) == index]
        assert len({v.tobytes() for v in crops}) == len(crops) == 8


def run_cli(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, "-m", "patchwatch.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def users_environment() -> dict:
    """The environment without the tests' PATCHWATCH_AUTO=0 (tests/conftest.py): what a user has."""
    return {k: v for k, v in os.environ.items() if k != "PATCHWATCH_AUTO"}


def options(*argv):
    from patchwatch.cli import build_parser
    return build_parser().parse_args(["fit", "--images", "i", "--root", "r", *argv])


def test_a_fit_without_model_options_chooses_with_auto_unless_told_otherwise(monkeypatch):
    from patchwatch.cli import auto_chosen

    monkeypatch.delenv("PATCHWATCH_AUTO", raising=False)
    assert auto_chosen(options()) and auto_chosen(options("--auto"))
    # any model option is the user's own choice; --no-auto asks for PatchCore's fixed defaults
    assert not auto_chosen(options("--detector", "padim")) and not auto_chosen(options("--input-scale", "1.0"))
    assert not auto_chosen(options("--no-auto"))
    monkeypatch.setenv("PATCHWATCH_AUTO", "0")
    assert not auto_chosen(options()) and auto_chosen(options("--auto"))
    with pytest.raises(ValueError, match="drop --detector"):
        auto_chosen(options("--auto", "--detector", "patchcore"))


def write_stripes(folder, count, start=0, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for number in range(start, start + count):
        Image.fromarray(stripes(rng)).save(folder / f"{number:03d}.png")


def test_fit_auto_records_the_comparison_and_a_refit_keeps_the_choice(tmp_path):
    images, root = tmp_path / "nominal", tmp_path / "root"
    write_stripes(images, 24)
    # no option at all: --auto is the default
    first = run_cli("fit", "--images", str(images), "--root", str(root), "--workers", "1", env=users_environment())
    assert first.returncode == 0, first.stderr[-3000:]
    manifest = json.loads((root / "versions" / "v0001" / "manifest.json").read_text())
    auto = manifest["auto"]
    names = [c.name for c in default_candidates()]
    assert [row["candidate"] for row in auto["candidates"]] == names
    assert auto["chosen"] in names and auto["reason"] and auto["seconds"] > 0
    chosen = auto["configurations"][auto["chosen"]]
    # the version was fitted with what the probe chose, and says so
    assert manifest["detector"] == chosen["detector"]
    fitted = manifest["feature_config"]
    if needs_input_size(chosen["detector"], FeatureConfig.from_dict(chosen["feature_config"])):
        # PaDiM's one input size is set from the images themselves (all SIDE x SIDE here)
        assert tuple(fitted["fixed_shape"]) == native_shape([(SIDE, SIDE)])
        fitted = {key: value for key, value in fitted.items() if key != "fixed_shape"}
    # and with the mirror images the probe found the images to allow (stripes: every mirror)
    assert auto["mirrors"] == ["h", "v", "hv"] and "look the same mirrored" in auto["reason"]
    assert fitted == {**chosen["feature_config"], "mirrors": auto["mirrors"]}
    assert "--auto chose" in first.stderr + first.stdout

    write_stripes(images, 4, start=24, seed=1)
    second = run_cli("fit", "--images", str(images), "--root", str(root), "--auto", "--workers", "1")
    assert second.returncode == 0, second.stderr[-3000:]
    refit = json.loads((root / "versions" / "v0002" / "manifest.json").read_text())
    assert refit["auto"]["kept_from"] == "v0001" and refit["auto"]["chosen"] == auto["chosen"]
    assert refit["feature_config"] == manifest["feature_config"] and refit["new_images"] == 4


def test_auto_with_explicit_model_options_is_refused_in_one_line(tmp_path):
    run = run_cli("fit", "--images", str(tmp_path), "--root", str(tmp_path / "root"), "--auto",
                  "--input-scale", "1.0", timeout=120)
    assert run.returncode != 0
    assert run.stderr.strip().count("\n") == 0 and "--input-scale" in run.stderr and "--auto" in run.stderr


def test_a_candidate_that_cannot_model_the_images_is_left_out_of_the_choice():
    failed = ProbeResult("padim", float("nan"), float("nan"), 0.1, {}, "feature grid (8, 8) differs from (8, 16)")
    chosen, reason = choose([failed, result("general", 0.8)])
    assert chosen.name == "general" and "padim failed" in reason
    assert failed.row()["image_auroc"] is None and "differs" in failed.row()["failed"]  # JSON-safe
    with pytest.raises(ValueError, match="padim: feature grid"):
        choose([failed])


def test_the_preferred_candidate_is_kept_unless_another_beats_it_by_more_than_the_probes_noise():
    """The benchmark's brick wall: the probe put fine 0.12 ahead of PaDiM (noise at 32 probes),
    and fine was 0.12 behind on the real defects. A fine grid that sees what PaDiM is blind to
    (0.95 against 0.55) is evidence, and wins."""
    from patchwatch.anomaly.probe_choice import chance_auroc, choose_candidate, probe_noise

    # 32 + 32 probe images: about 0.646 is what chance reaches two times in a hundred
    assert 0.6 < chance_auroc(32) < 0.7 and probe_noise(4) > probe_noise(32) == pytest.approx(0.146, abs=0.001)
    brick = [result("padim", 0.70), result("padim-local", 0.73), result("coarse-context", 0.56), result("fine", 0.82)]
    chosen, reason = choose_candidate(brick, probes=32)
    assert chosen.name == "padim" and "noise" in reason and "fine 0.820" in reason
    assert "no better than chance" not in reason  # fine saw them: 0.82
    blind = [result("padim", 0.52), result("padim-local", 0.50), result("fine", 0.55)]
    chosen, reason = choose_candidate(blind, probes=32)
    # the benchmark's visible wide-strip defects (probe 0.50-0.56 for every candidate): the user is
    # told the probe could not see its own defects, so the choice rests on the benchmark alone
    assert chosen.name == "padim" and "no better than chance" in reason and "patchwatch evaluate" in reason
    seeing = [result("padim", 0.55), result("padim-local", 0.50), result("coarse-context", 0.71), result("fine", 0.95)]
    chosen, reason = choose_candidate(seeing, probes=32)
    assert chosen.name == "fine" and "better than padim" in reason
    # with few probes the bar is higher: 0.2 ahead over 4 probes is not enough
    assert choose_candidate([result("padim", 0.6), result("fine", 0.8)], probes=4)[0].name == "padim"
    # a preferred candidate that could not be fitted leaves the choice to the probe
    failed = ProbeResult("padim", float("nan"), float("nan"), 0.1, {}, "grid differs")
    assert choose_candidate([failed, result("fine", 0.6)], probes=32)[0].name == "fine"
