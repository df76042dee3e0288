"""The Python API: patchwatch.fit on arrays, patchwatch.load(...).score(...) in-process, and the
README's "Python API" example run verbatim."""
import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import patchwatch
from patchwatch.api import _pixels, write_images
from patchwatch.storage.images import read_image
from tests.synthetic import BLOB_CENTRE, BLOB_RADIUS, blob_mask, stripes

README = Path(__file__).resolve().parents[1] / "README.md"

# more intra-op threads than free cores makes each backbone pass ~40x slower on this machine
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A model root fitted by patchwatch.fit on 24 stripe images given as arrays (one real fit)."""
    folder = tmp_path_factory.mktemp("api")
    rng = np.random.default_rng(0)
    # features that see a 128 px image in an 8 x 8 grid (stages 2-3 at full scale, as test_auto's
    # "seeing" candidate): PatchCore's defaults (half scale, stages 3-4) give it a 2 x 2 grid, whose
    # smooth map peaks at the corner nearest a defect rather than on it
    summary = patchwatch.fit([stripes(rng) for _ in range(24)], folder / "root", workers=1, layers=(2, 3),
                             input_scale=1.0, context_scales=())
    return folder, summary


@pytest.fixture(scope="module")
def model(fitted):
    return patchwatch.load(fitted[0] / "root")


def peak(amap: np.ndarray) -> tuple[int, int]:
    return np.unravel_index(int(amap.argmax()), amap.shape)


def test_fit_on_arrays_writes_them_beside_the_root_and_makes_a_current_version(fitted):
    folder, summary = fitted
    assert summary["version"] == "v0001" and summary["refit"] and summary["images"] + summary["holdout_images"] == 24
    # the options reached the fit as the command's would
    features = patchwatch.load(folder / "root").manifest["feature_config"]
    assert features["layers"] == [2, 3] and features["input_scale"] == 1.0 and features["context_scales"] == []
    written = sorted((folder / "root-images").iterdir())
    assert len(written) == 24 and all(p.suffix == ".png" for p in written)
    assert (folder / "root" / "current.json").exists()


def test_the_readme_python_api_example_runs_verbatim(fitted, model, tmp_path):
    section = re.split(r"\n##+ ", README.read_text().split("\n### Python API\n", 1)[1])[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the README's Python API section holds one python example"
    image = tmp_path / "part.png"
    Image.fromarray(stripes(np.random.default_rng(5))).save(image)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(blocks[0], {"ROOT": str(fitted[0] / "root"), "IMAGE": str(image)})
    assert "v0001" in printed.getvalue() and "map (128, 128)" in printed.getvalue()


def test_an_array_a_pil_image_a_path_and_a_url_score_the_same(model, tmp_path):
    pixels = stripes(np.random.default_rng(11))
    path = tmp_path / "one.png"
    Image.fromarray(pixels).save(path)
    results = [model.score(pixels), model.score(Image.open(path)), model.score(str(path)), model.score(path),
               model.score(f"file://{path}"), model.score(np.stack([pixels] * 3, axis=2))]
    assert len({r.score for r in results}) == 1
    assert all(r.map.shape == (128, 128) and r.map.dtype == np.float32 for r in results)
    assert np.array_equal(results[0].map, results[2].map)
    # other depths of the same pixels: the same image up to float rounding
    for other in (pixels / 255.0, pixels.astype(np.uint16) * 257):
        assert model.score(other).score == pytest.approx(results[0].score, rel=1e-4)


def test_is_anomalous_is_the_score_against_the_versions_threshold(model):
    assert model.threshold is not None and model.threshold == model.manifest["threshold"]
    assert model.version == "v0001" and "v0001" in repr(model) and "patchcore" in repr(model)
    rng = np.random.default_rng(21)
    images = [stripes(rng) for _ in range(3)] + [np.clip(stripes(rng).astype(int) + 90, 0, 255).astype(np.uint8)]
    for image in images:
        result = model.score(image)
        assert result.is_anomalous == (result.score > model.threshold)
        assert result.threshold == model.threshold and result.version == "v0001"
    assert "score=" in repr(result) and "map 128x128" in repr(result)


def test_a_planted_blob_scores_above_clean_images_and_the_map_peaks_on_it(model):
    rng = np.random.default_rng(31)
    clean = [model.score(stripes(rng)).score for _ in range(4)]
    blob = stripes(rng)
    blob[blob_mask()] = 255
    result = model.score(blob)
    assert result.score > max(clean) and result.is_anomalous
    y, x = peak(result.map)
    assert np.hypot(y - BLOB_CENTRE[0], x - BLOB_CENTRE[1]) <= BLOB_RADIUS + 8
    # the map's own threshold: the whole blob crosses it, a clean image (almost) nowhere
    assert result.pixel_threshold == model.manifest["pixel_threshold"]
    assert result.anomalous_pixels[blob_mask()].all()
    assert model.score(stripes(rng)).anomalous_pixels.mean() < 0.05


def test_a_large_image_is_scored_tile_by_tile(model, monkeypatch):
    import patchwatch.anomaly.engine as engine_module

    views = []
    real = engine_module.extract_views
    monkeypatch.setattr(engine_module, "extract_views", lambda *a: views.append(real(*a)) or views[-1])
    large = np.tile(stripes(np.random.default_rng(41)), (9, 2))  # 1152 x 256: above the 1024 px threshold
    y, x = np.mgrid[:large.shape[0], :large.shape[1]]
    large[(y - 1000) ** 2 + (x - 100) ** 2 <= BLOB_RADIUS ** 2] = 255
    result = model.score(large)
    assert model.tiling.needs_tiling(*large.shape) and len(views[0]) > 1
    assert result.map.shape == large.shape
    py, px = peak(result.map)
    assert np.hypot(py - 1000, px - 100) <= BLOB_RADIUS + 8


def test_scoring_runs_on_the_models_threads_and_restores_the_callers(model, monkeypatch):
    seen = []
    real = model.extractor.extract
    monkeypatch.setattr(model.extractor, "extract", lambda images: seen.append(torch.get_num_threads()) or real(images))
    torch.set_num_threads(2)
    try:
        model.score(stripes(np.random.default_rng(51)))
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_load_of_a_root_without_a_complete_version_is_one_clear_error(fitted, tmp_path):
    (tmp_path / "empty").mkdir()
    for root in (tmp_path / "missing", tmp_path / "empty"):
        with pytest.raises(FileNotFoundError, match=re.escape(str(root))):
            patchwatch.load(root)
    unfinished = tmp_path / "killed" / "versions" / "v0001"
    unfinished.mkdir(parents=True)
    (unfinished / "plan.parquet").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="killed"):
        patchwatch.load(tmp_path / "killed")
    with pytest.raises(LookupError, match="no such version v0009 .*its versions: v0001"):
        patchwatch.load(fitted[0] / "root", version="v0009")


def test_bad_images_and_options_are_refused_with_their_reason(model):
    with pytest.raises(ValueError, match="too small"):
        model.score(np.zeros((8, 8), np.uint8))
    with pytest.raises(Exception, match="NaN"):
        model.score(np.full((64, 64), np.nan))
    with pytest.raises(TypeError, match="numpy array, a PIL image or a path"):
        model.score([[0, 1], [1, 0]])
    with pytest.raises(TypeError, match="unknown option.*colour"):
        patchwatch.fit("somewhere", "root", colour="red")


def test_arrays_are_written_losslessly_once_each_named_by_content(tmp_path):
    rng = np.random.default_rng(61)
    grey, wide = stripes(rng), rng.random((40, 50, 3)).astype(np.float32)
    write_images([grey, grey, wide, Image.fromarray(grey)], tmp_path / "images")
    files = sorted((tmp_path / "images").iterdir())
    assert [p.suffix for p in files].count(".png") == 1 and [p.suffix for p in files].count(".tif") == 1
    for path in files:
        back = read_image(str(path))
        assert np.array_equal(back, _pixels(grey if path.suffix == ".png" else wide))


def test_import_patchwatch_stays_light():
    # the command's --version and --help import the package: torch loads only when the API is used
    code = "import sys, patchwatch; print('torch' in sys.modules, callable(patchwatch.load))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]
