"""Large images: tiles cover the image, blocks join without seams, defects are found in mosaics."""
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr
from PIL import Image

import patchwatch
from patchwatch.anomaly.tiling import GridStitcher, Tile, blocks, render_block, tile_grid

from .conftest import MTD, MTD_SPLIT, mtd_available


def test_tiles_cover_every_pixel_and_stay_inside_the_image():
    tiles = tile_grid(1000, 1300, tile=512, overlap=128)
    covered = np.zeros((1000, 1300), int)
    for t in tiles:
        assert 0 <= t.top < t.bottom <= 1000 and 0 <= t.left < t.right <= 1300
        covered[t.top:t.bottom, t.left:t.right] += 1
    assert covered.min() >= 1
    assert tile_grid(300, 200, tile=512, overlap=64) == [Tile(0, 0, 300, 200)]
    with pytest.raises(ValueError):
        tile_grid(100, 100, tile=64, overlap=64)


def test_constant_tiles_stitch_to_a_constant_grid():
    stitcher = GridStitcher(1000, 1300, stride=16, ramp_patches=4)
    for t in tile_grid(1000, 1300, tile=512, overlap=128):
        stitcher.add(t, np.full((32, 32), 3.0, np.float32))
    np.testing.assert_allclose(stitcher.grid(), 3.0, rtol=1e-6)


def test_blocks_rendered_separately_join_without_seams():
    rng = np.random.default_rng(0)
    grid = rng.random((40, 50)).astype(np.float32)
    shape = (640, 800)
    whole = render_block(grid, 16, shape, Tile(0, 0, *shape), sigma=4.0)
    pieced = np.zeros(shape, np.float32)
    for b in blocks(*shape, 128):
        pieced[b.top:b.bottom, b.left:b.right] = render_block(grid, 16, shape, b, sigma=4.0)
    np.testing.assert_allclose(pieced, whole, atol=1e-5)


@pytest.fixture(scope="module")
def fitted_on_mtd(tmp_path_factory):
    """A model fitted, through tiles, on large nominal images made of real MTD texture."""
    if not mtd_available():
        pytest.skip("MTD not available")
    table = pd.read_csv(MTD_SPLIT, dtype=str, keep_default_na=False)
    folder = tmp_path_factory.mktemp("tiling")
    nominal = folder / "nominal"
    nominal.mkdir()
    texture = seamless_texture(table)
    Image.fromarray(np.tile(texture, (3, 3))).save(nominal / "large-nominal.png")  # 1536 x 1536
    root = folder / "model"
    run = subprocess.run([sys.executable, "-m", "patchwatch.cli", "fit", "--images", str(nominal),
                          "--root", str(root), "--workers", "1"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = (root / "versions" / "v0001" / "manifest.json").read_text()
    assert '"n_images": 1' in manifest  # the large image fed the bank tile by tile
    return folder, root, table


def seamless_texture(table, cell=256):
    """A free MTD tile mirrored into a 2x2 block: tiled, it repeats without hard seams."""
    free = table[(table.split == "test") & (table.label == "good")].image.iloc[0]
    with Image.open(MTD / free) as image:
        tile = np.asarray(image.convert("L").resize((cell, cell)))
    return np.block([[tile, tile[:, ::-1]], [tile[::-1], tile[::-1, ::-1]]])


def paste_defect(canvas, table, top, left):
    """Copy the pixels of a real MTD defect (its dilated mask) onto the canvas; return its box."""
    from scipy.ndimage import binary_dilation

    row = table[table.defect_type == "break"].iloc[0]
    with Image.open(MTD / row.image) as image, Image.open(MTD / row["mask"]) as mask_image:
        pixels, mask = np.asarray(image.convert("L")), np.asarray(mask_image) > 127
    mask = binary_dilation(mask, iterations=3)
    rows, cols = np.nonzero(mask)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    region = canvas[top:top + r1 - r0, left:left + c1 - c0]
    region[mask[r0:r1, c0:c1]] = pixels[r0:r1, c0:c1][mask[r0:r1, c0:c1]]
    return top, left, top + r1 - r0, left + c1 - c0


def test_defect_pasted_into_a_mosaic_is_where_the_full_resolution_map_peaks(fitted_on_mtd):
    folder, root, table = fitted_on_mtd
    images = folder / "large"
    images.mkdir()
    canvas = np.tile(seamless_texture(table), (3, 3))  # 1536 x 1536
    top, left, bottom, right = paste_defect(canvas, table, 700, 600)
    tifffile.imwrite(images / "mosaic.tif", canvas, tile=(256, 256))
    out = folder / "results"
    run = subprocess.run([sys.executable, "-m", "patchwatch.cli", "score", "--images", str(images),
                          "--root", str(root), "--out", str(out), "--workers", "1"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    scores = pd.read_parquet(out / "scores.parquet")
    assert scores.image_id.tolist() == ["mosaic.tif"]
    amap = zarr.open_array(scores.set_index("image_id")["map"]["mosaic.tif"], mode="r")  # maps/VERSION/NAME-HASH
    assert amap.shape == canvas.shape
    assert amap.dtype == np.float16  # the stitch task knows the map's range from its grid
    full = amap[...]
    row, col = np.unravel_index(np.argmax(full), full.shape)
    margin = 32
    assert top - margin <= row < bottom + margin and left - margin <= col < right + margin
    assert len(list((out / "previews").rglob("*.png"))) == 1
    # eq. 7 ran only in the tile that can give the image's score: the score the API gives in one pass
    assert scores.set_index("image_id")["score"]["mosaic.tif"] == pytest.approx(
        patchwatch.load(root).score(canvas).score, rel=1e-5)


def test_uniform_nominal_image_shows_no_seams_along_tile_borders(fitted_on_mtd):
    folder, root, table = fitted_on_mtd
    images = folder / "uniform"
    images.mkdir()
    # one nominal texture repeated: every tile sees the same content, so any rise at tile
    # borders could only come from the tiling itself
    canvas = np.tile(seamless_texture(table), (3, 3))
    Image.fromarray(canvas).save(images / "uniform.png")
    out = folder / "uniform-results"
    run = subprocess.run([sys.executable, "-m", "patchwatch.cli", "score", "--images", str(images),
                          "--root", str(root), "--out", str(out), "--workers", "1"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    scores = pd.read_parquet(out / "scores.parquet").set_index("image_id")
    full = zarr.open_array(scores["map"]["uniform.png"], mode="r")[...]
    tiles = tile_grid(*canvas.shape, tile=512, overlap=128)
    borders = sorted({t.top for t in tiles} | {t.bottom for t in tiles} - {0, canvas.shape[0]})
    near_border = np.zeros(canvas.shape[0], bool)
    for b in borders:
        near_border[max(b - 8, 0):b + 8] = True
    row_profile = full.mean(axis=1)
    inner = row_profile[64:-64]
    at_borders = row_profile[near_border][(np.flatnonzero(near_border) >= 64) & (np.flatnonzero(near_border) < canvas.shape[0] - 64)]
    # rows along tile borders are no hotter than the image's own texture variation
    assert at_borders.max() <= np.percentile(inner, 99) + 1e-6
