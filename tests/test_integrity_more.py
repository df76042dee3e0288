"""Inputs trusted too far (issue 14, the rest): a model root's stored settings and arrays, EXIF
orientation, multi-page TIFFs, and the minimum image size on the tiling path.

* a manifest with ``tile: 2`` kept one 289 x 240 image scoring past 300 s, and a memory array
  declaring 3e6 rows allocated 3.4 GB before any size check: stored settings are now checked
  against ranges, and arrays' shapes against the manifest from their metadata, before a read;
* a photo with EXIF orientation 6 was scored sideways;
* a multi-page TIFF was read as one (pages, H, W) "image";
* a 100000 x 16 strip went to the tiling path, where no minimum size was checked.

The soak test (kills during fit / score-new / promote) is tests/test_soak.py.
"""
from __future__ import annotations

import io
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from patchwatch.storage.images import ImageReadError, ImageRecord, decode_image, image_shape, read_image, read_mask
from patchwatch.storage.model_store import IncompatibleModelError, ModelRegistry, ModelStore

EMBED = 256  # FeatureConfig's default patch-vector length


def rgb(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (*shape, 3)).astype(np.uint8)


def encoded(pixels: np.ndarray, fmt: str, orientation: int | None = None) -> bytes:
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(buffer, format=fmt, exif=exif.tobytes(), **({"quality": 100} if fmt == "JPEG" else {}))
    return buffer.getvalue()


# --------------------------------------------------------------------------- stored settings and arrays


def model_root(tmp_path: Path, memory_rows: int = 64, declared_rows: int | None = None, **manifest) -> Path:
    """A PatchCore version written the way a fit writes one (memory, faiss index, manifest), with
    ``manifest`` overriding its fields and the memory array declaring ``declared_rows`` rows."""
    from patchwatch.anomaly.detectors import detector_config
    from patchwatch.anomaly.features import FeatureConfig
    from patchwatch.anomaly.patchcore import build_index
    from patchwatch.anomaly.tiling import TilingConfig

    root = tmp_path / "model"
    store = ModelStore(str(root / "versions" / "v0001"))
    memory = np.random.default_rng(1).normal(size=(memory_rows, EMBED)).astype(np.float32)
    store.write_memory(memory)
    store.write_index(build_index(memory))
    if declared_rows is not None:  # the array's metadata says more rows than were ever written
        zarr.create_array(str(root / "versions" / "v0001" / "memory"), shape=(declared_rows, EMBED),
                          dtype="float32", chunks=(65536, EMBED), overwrite=True, zarr_format=3)
    store.write_manifest({"version": "v0001", "detector": "patchcore", "feature_config": FeatureConfig().to_dict(),
                          "detector_config": detector_config("patchcore").to_dict(),
                          "tiling_config": TilingConfig().to_dict(), "memory_rows": memory_rows, "threshold": None,
                          **manifest})
    (root / "current.json").write_text(json.dumps({"version": "v0001"}))
    return root


def with_field(section: str, **values) -> dict:
    from patchwatch.anomaly.detectors import detector_config
    from patchwatch.anomaly.features import FeatureConfig
    from patchwatch.anomaly.tiling import TilingConfig

    base = {"tiling_config": TilingConfig().to_dict(), "feature_config": FeatureConfig().to_dict(),
            "detector_config": detector_config("patchcore").to_dict()}[section]
    return {section: {**base, **values}}


@pytest.mark.parametrize("manifest, field", [
    (with_field("tiling_config", tile=2, overlap=0, threshold=64), "tiling_config.tile"),
    (with_field("tiling_config", overlap=512), "tiling_config.overlap"),
    (with_field("tiling_config", threshold=-1), "tiling_config.threshold"),
    (with_field("feature_config", input_scale=-0.5), "feature_config.input_scale"),
    (with_field("feature_config", embed_dim="256"), "feature_config.embed_dim"),
    (with_field("feature_config", context_scales=[0.25, float("nan")]), "feature_config.context_scales"),
    (with_field("detector_config", num_neighbors=0), "detector_config.num_neighbors"),
    (with_field("detector_config", sigma=1e9), "detector_config.sigma"),
    (with_field("detector_config", coreset_ratio=2.0), "detector_config.coreset_ratio"),
    ({"bank_rows": -5}, "bank_rows"),
])
def test_stored_settings_out_of_range_refuse_the_version_naming_root_and_field(tmp_path, manifest, field):
    root = model_root(tmp_path, **manifest)
    with pytest.raises(IncompatibleModelError) as refused:
        ModelRegistry(str(root)).resolve()
    message = str(refused.value)
    assert "\n" not in message and str(root / "versions" / "v0001") in message and field in message, message


def test_sound_stored_settings_are_accepted(tmp_path):
    root = model_root(tmp_path)
    assert ModelRegistry(str(root)).resolve().version == "v0001"


def test_a_memory_array_declaring_more_rows_than_the_manifest_is_refused_before_it_is_read(tmp_path):
    from patchwatch.tasks.scoring import open_detector

    root = model_root(tmp_path, memory_rows=64, declared_rows=400_000)  # 400 MB if read
    with pytest.raises(IncompatibleModelError, match=r"memory .*400000"):
        ModelRegistry(str(root)).resolve()  # the flow process refuses it before any work
    store = ModelStore(str(root / "versions" / "v0001"))  # and a worker loading it, before reading it
    manifest = store.read_manifest()
    tracemalloc.start()
    try:
        with pytest.raises(IncompatibleModelError, match=r"memory .*400000.* manifest .*64"):
            open_detector(store, "patchcore", manifest["detector_config"], manifest)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20, f"{peak / 2**20:.0f} MiB allocated before the refusal"


def test_a_faiss_index_of_another_size_is_refused_before_it_is_read(tmp_path):
    from patchwatch.anomaly.patchcore import build_index
    from patchwatch.tasks.scoring import open_detector

    root = model_root(tmp_path, memory_rows=64)
    store = ModelStore(str(root / "versions" / "v0001"))
    store.write_index(build_index(np.zeros((65, EMBED), np.float32)))
    with pytest.raises(IncompatibleModelError, match=r"memory.faiss.* 65 .* 64"):
        open_detector(store, "patchcore", store.read_manifest()["detector_config"], store.read_manifest())


def test_detector_arrays_declaring_shapes_other_than_the_manifest_are_refused_before_they_are_read(tmp_path):
    """SPADE's gallery: a member's .npy header declares 400000 rows (a 400 MB allocation if read)."""
    from patchwatch.anomaly.features import FeatureConfig
    from patchwatch.anomaly.spade import SpadeConfig
    from patchwatch.tasks.scoring import open_detector

    root = tmp_path / "model"
    store = ModelStore(str(root / "versions" / "v0001"))
    patches = np.zeros((40, EMBED), np.float32)
    arrays = {"global_features": np.zeros((2, EMBED), np.float32), "offsets": np.array([0, 20, 40]),
              **{f"config_{k}": np.asarray(v) for k, v in SpadeConfig().to_dict().items()}}
    buffer = io.BytesIO()
    np.savez(buffer, patches=patches, **arrays)
    # rewrite the patches member's header: same bytes, a shape of 400000 rows
    import zipfile
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    target_buffer = io.BytesIO()
    with zipfile.ZipFile(target_buffer, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            if name == "patches.npy":
                data = data.replace(b"(40, 256)", b"(400000, 256)")
            target.writestr(name, data)
    (root / "versions" / "v0001").mkdir(parents=True, exist_ok=True)
    (root / "versions" / "v0001" / "detector.npz").write_bytes(target_buffer.getvalue())
    store.write_manifest({"version": "v0001", "detector": "spade", "feature_config": FeatureConfig().to_dict(),
                          "detector_config": SpadeConfig().to_dict(), "bank_rows": 40, "threshold": None})
    tracemalloc.start()
    try:
        with pytest.raises(IncompatibleModelError, match=r"detector.npz.*patches.*400000.*40"):
            open_detector(store, "spade", SpadeConfig().to_dict(), store.read_manifest())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20, f"{peak / 2**20:.0f} MiB allocated before the refusal"


def test_a_bad_stored_setting_is_one_line_from_the_cli(tmp_path):
    """The issue's case: ``tile: 2`` on one small image, refused before any work, in one line."""
    import subprocess

    from tests.servers import patchwatch_command, patchwatch_env

    root = model_root(tmp_path, **with_field("tiling_config", tile=2, overlap=0, threshold=64))
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(rgb((289, 240))).save(images / "a.png")
    env = patchwatch_env(tmp_path / "home", api_url="http://127.0.0.1:9/api")
    process = subprocess.run(patchwatch_command() + ["score", "--images", str(images), "--root", str(root),
                                                     "--out", str(tmp_path / "out"), "--workers", "1"],
                             env=env, capture_output=True, text=True, timeout=120, start_new_session=True)
    lines = (process.stdout + process.stderr).strip().splitlines()
    assert process.returncode == 1 and len(lines) == 1, lines
    assert lines[0].startswith("patchwatch score: StoredModelError: ") and "tiling_config.tile" in lines[0]


# --------------------------------------------------------------------------- EXIF orientation


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_when_decoding(tmp_path, fmt, orientation):
    from PIL import ImageOps

    pixels = rgb((60, 100))
    data = encoded(pixels, fmt, orientation)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    decoded = decode_image(data, f"photo.{fmt.lower()}")
    assert decoded.shape == expected.shape == ((100, 60, 3) if orientation in (6, 8) else (60, 100, 3))
    np.testing.assert_array_equal(decoded, expected)
    path = tmp_path / f"photo.{fmt.lower()}"
    path.write_bytes(data)
    assert image_shape(str(path)) == decoded.shape[:2]  # the header's size, as decoded


def test_a_mask_carrying_exif_orientation_is_turned_with_it(tmp_path):
    mask = np.zeros((60, 100), np.uint8)
    mask[:10, :] = 255  # the top band; orientation 6 (turn 90 degrees clockwise) makes it the right band
    path = tmp_path / "mask.png"
    path.write_bytes(encoded(mask, "PNG", 6))
    turned = read_mask(str(path), (100, 60))
    assert turned[:, -10:].all() and not turned[:, :-10].any()


def test_the_large_image_path_sees_the_oriented_size(tmp_path):
    from patchwatch.storage.images import read_image_unless_large

    path = tmp_path / "wide.png"
    path.write_bytes(encoded(rgb((40, 90)), "PNG", 6))
    _, shape = read_image_unless_large(str(path), lambda h, w: True)
    assert shape == (90, 40) == read_image(str(path)).shape[:2]


# --------------------------------------------------------------------------- multi-page TIFF


def test_a_multi_page_tiff_is_one_error_row_naming_the_page_count(tmp_path):
    import tifffile

    from patchwatch.tasks.features import load_images

    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.random.default_rng(0).integers(0, 255, (5, 269, 300)).astype(np.uint8))
    single = tmp_path / "single.tif"
    tifffile.imwrite(single, rgb((64, 80)))
    with pytest.raises(ImageReadError, match=r"multi-page TIFF \(5 pages\)"):
        read_image(str(stack))
    with pytest.raises(ImageReadError, match=r"multi-page TIFF \(5 pages\)"):
        image_shape(str(stack))  # the tiling path reads the header only
    records = [ImageRecord("stack.tif", str(stack)), ImageRecord("single.tif", str(single))]
    good, images, errors, large = load_images(records)
    assert [r.image_id for r in good] == ["single.tif"] and images[0].shape == (64, 80, 3) and not large
    assert len(errors) == 1 and errors[0]["image_id"] == "stack.tif", errors
    assert errors[0]["reason"].startswith("multi-page TIFF (5 pages)")


def test_a_tiff_with_more_than_four_samples_per_pixel_is_refused_not_sliced(tmp_path):
    import tifffile

    path = tmp_path / "bands.tif"
    tifffile.imwrite(path, np.zeros((269, 300, 5), np.uint8), planarconfig="contig", photometric="minisblack")
    with pytest.raises(ImageReadError, match="5 channels"):
        read_image(str(path))


# --------------------------------------------------------------------------- minimum size on the tiling path


def test_a_strip_too_narrow_for_the_model_is_one_error_row_on_the_tiling_path(tmp_path):
    """100000 x 16: above the tiling threshold, so it went to the tiles, where no minimum was checked."""
    from patchwatch.anomaly.features import FeatureConfig
    from patchwatch.anomaly.tiling import TilingConfig
    from patchwatch.tasks.features import extract_features_task

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.full((16, 100_000), 128, np.uint8)).save(folder / "strip.png")
    Image.fromarray(rgb((128, 128))).save(folder / "fine.png")
    records = [ImageRecord("strip.png", str(folder / "strip.png")), ImageRecord("fine.png", str(folder / "fine.png"))]
    result = extract_features_task.fn(str(tmp_path / "root"), 0, records, FeatureConfig(), TilingConfig())
    assert result["large"] == [] and result["images"] == 1, result
    assert [(e["image_id"], e["reason"].split(" (")[0]) for e in result["errors"]] == [("strip.png", "image too small")]
    assert "100000x16" in result["errors"][0]["reason"]


def test_a_strip_is_one_error_row_when_scoring_too(tmp_path):
    from patchwatch.anomaly.tiling import TilingConfig
    from patchwatch.storage.results_store import ResultStore
    from patchwatch.tasks.scoring import ModelRef, score_batch_task

    root = model_root(tmp_path)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.full((100_000, 16), 128, np.uint8)).save(folder / "strip.png")
    Image.fromarray(rgb((128, 128))).save(folder / "fine.png")
    records = [ImageRecord("strip.png", str(folder / "strip.png")), ImageRecord("fine.png", str(folder / "fine.png"))]
    model = ModelRef.of(ModelRegistry(str(root)).resolve())
    out = ResultStore(str(tmp_path / "results"))
    out.prepare()
    result = score_batch_task.fn(model, out.root, 0, records, TilingConfig())
    assert result["large"] == [] and result["images"] == 1, result
    assert [e["image_id"] for e in result["errors"]] == ["strip.png"]
    assert result["errors"][0]["reason"].startswith("image too small (16x100000 px")
