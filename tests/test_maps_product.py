"""Maps as a product (issue 13, item 3): one Zarr group of maps per results root that xarray
opens, each map carrying its source, model version, thresholds and units, readable names, and a
pixel threshold on the maps' own scale that a flagged image's map crosses and a clean one's not."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
import zarr
from PIL import Image

import patchwatch
from patchwatch.storage.images import ImageRecord
from patchwatch.storage.model_store import ModelRegistry
from patchwatch.storage.results_store import MAPS_GROUP, ResultStore, map_key
from tests.synthetic import blob_mask, stripes

# more intra-op threads than free cores makes each backbone pass ~40x slower on this machine
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A model fitted on 24 stripe images (as tests/test_api.py), then one score batch of clean
    stripes, stripes with a planted blob, and two ``a.png`` in different folders."""
    from patchwatch.tasks.scoring import ModelRef, score_batch_task

    folder = tmp_path_factory.mktemp("maps")
    rng = np.random.default_rng(0)
    patchwatch.fit([stripes(rng) for _ in range(24)], folder / "root", workers=1, layers=(2, 3),
                   input_scale=1.0, context_scales=())
    images = {}
    for i in range(4):
        images[f"clean/clean{i}.png"] = stripes(rng)
        blob = stripes(rng)
        blob[blob_mask()] = 255
        images[f"defect/blob{i}.png"] = blob
    images["left/a.png"], images["right/a.png"] = stripes(rng), stripes(rng)
    records = []
    for image_id, pixels in images.items():
        path = folder / "images" / image_id
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        records.append(ImageRecord(image_id=image_id, uri=str(path)))
    model = ModelRef.of(ModelRegistry(str(folder / "root")).resolve())
    out = ResultStore(str(folder / "results"))
    out.prepare()
    result = score_batch_task.fn(model, out.root, 0, records)
    assert result["images"] == len(images), result["errors"]
    return {"model": model, "out": out, "table": out.scores().set_index("image_id")}


def open_maps(scored) -> xr.Dataset:
    return xr.open_zarr(scored["out"].maps_url(), group=scored["model"].version, consolidated=False)


def test_the_fit_records_a_pixel_threshold_from_the_held_out_maps(scored):
    model = scored["model"]
    assert model.threshold is not None and model.pixel_threshold is not None
    holdout = ModelRegistry(str(scored["out"].root).replace("results", "root")).resolve().read_table("holdout")
    assert holdout.map_max.notna().all()
    assert model.pixel_threshold == pytest.approx(float(np.quantile(holdout.map_max, model.threshold_quantile)))
    # the version's manifest records it beside the image threshold
    manifest = ModelRegistry(str(scored["out"].root).replace("results", "root")).resolve().read_manifest()
    assert manifest["pixel_threshold"] == pytest.approx(model.pixel_threshold)


def test_a_versions_maps_open_with_xarray_and_carry_source_version_thresholds_and_units(scored):
    maps, table, model = open_maps(scored), scored["table"], scored["model"]
    assert maps.attrs["model_version"] == model.version and maps.attrs["pixel_threshold"] == model.pixel_threshold
    assert len(maps.data_vars) == len(table)
    for image_id, row in table.iterrows():
        name = row["map"].rsplit("/", 1)[-1]
        amap = maps[name]
        assert amap.shape == (row.height, row.width) and amap.dims == (f"y_{row.height}", f"x_{row.width}")
        assert amap.attrs["source_uri"] == row.uri and amap.attrs["image_id"] == image_id
        assert amap.attrs["model_version"] == model.version
        assert amap.attrs["image_threshold"] == model.threshold
        assert amap.attrs["pixel_threshold"] == model.pixel_threshold
        assert "distance" in amap.attrs["units"] and "pixel_threshold" in amap.attrs["units"]
        np.testing.assert_array_equal(amap.values, scored["out"].read_map(row["map"]))


def test_a_flagged_images_map_crosses_the_pixel_threshold_and_a_clean_ones_mostly_not(scored):
    table, model = scored["table"], scored["model"]
    flagged = table[table.is_anomalous.astype(bool)]
    clean = table[table.score < model.threshold]
    assert {"defect/blob0.png", "defect/blob1.png"} <= set(flagged.index), table.score
    assert len(clean) >= 3, table.score
    for row in flagged.itertuples():
        amap = scored["out"].read_map(row.map)
        above = amap > model.pixel_threshold
        assert above.any(), f"{row.Index}: flagged, but no pixel above {model.pixel_threshold} (max {amap.max()})"
        if row.Index.startswith("defect/"):  # every pixel of the planted blob is above
            assert above[blob_mask()].all()
    fractions = [(scored["out"].read_map(row.map) > model.pixel_threshold).mean() for row in clean.itertuples()]
    assert np.mean(fractions) < 0.01, fractions


def test_map_names_are_readable_distinct_and_bounded(scored):
    table, version = scored["table"], scored["model"].version
    left, right = (table.loc[f"{side}/a.png", "map"] for side in ("left", "right"))
    assert left != right
    prefix = f"{scored['out'].root}/{MAPS_GROUP}/{version}/"
    for location in table["map"]:
        assert location.startswith(prefix)
        name = location[len(prefix):]
        assert "/" not in name and ".png" not in name and len(name.encode()) < 100
    assert left[len(prefix):].startswith("a-") and table.loc["defect/blob0.png", "map"][len(prefix):].startswith("blob0-")


def test_maps_of_a_root_written_before_the_maps_group_still_read(tmp_path):
    """Older roots: bare arrays at maps/VERSION/<folders>/<name.ext>-HASH, named by the score table."""
    out = ResultStore(str(tmp_path / "old"))
    out.prepare()
    location = f"{out.root}/maps/{map_key('x/y.png', '/src/x/y.png', 'v0001')}"
    zarr.create_array(location, shape=(3, 4), dtype="float32", zarr_format=3)[...] = np.arange(12).reshape(3, 4)
    out.write_scores("part-00000", pd.DataFrame([{"image_id": "x/y.png", "uri": "/src/x/y.png", "map": location}]))
    np.testing.assert_array_equal(out.read_map(location), np.arange(12).reshape(3, 4))
    np.testing.assert_array_equal(out.read_map("x/y.png"), np.arange(12).reshape(3, 4))


def test_a_region_of_a_map_never_written_reads_as_missing_not_as_nominal(tmp_path):
    out = ResultStore(str(tmp_path / "results"))
    out.prepare()
    array = out.create_map("big.tif", "/src/big.tif", "v0001", (600, 600), chunk=300)
    array[:300, :] = 1.0  # the other half's blocks never arrive
    written = out.read_map(out.map_url("big.tif", "/src/big.tif", "v0001"))
    assert (written[:300] == 1.0).all() and np.isnan(written[300:]).all()


def test_a_stitched_tiled_map_carries_its_versions_thresholds_and_opens_with_xarray(tmp_path):
    """stitch-map sees no model: the thresholds reach it with the tiles' scores."""
    from patchwatch.anomaly.tiling import tile_grid
    from patchwatch.storage.results_store import MapDescription
    from patchwatch.tasks.tiles import stitch_map_task

    out = ResultStore(str(tmp_path / "results"))
    out.prepare()
    described = MapDescription(image_threshold=2.5, pixel_threshold=1.5, units="test units", threshold_quantile=0.95)
    tiles = tile_grid(1000, 1300, tile=512, overlap=128)
    tile_scores = [{"tile": t, "grid": np.full((32, 32), 3.0, np.float32), "max": 3.0, "weighted": 3.0,
                    "input_shape": (512, 512), "map_description": described} for t in tiles]
    stitched = stitch_map_task.fn(out.root, "scans/big.tif", "/src/scans/big.tif", "v0002", (1000, 1300),
                                  tile_scores, sigma=4.0, overlap=128)
    amap = xr.open_zarr(out.maps_url(), group="v0002", consolidated=False)[stitched["map"].rsplit("/", 1)[-1]]
    assert amap.dims == ("y_1000", "x_1300") and amap.attrs["source_uri"] == "/src/scans/big.tif"
    assert amap.attrs["pixel_threshold"] == 1.5 and amap.attrs["image_threshold"] == 2.5
    np.testing.assert_allclose(amap.values, 3.0, rtol=1e-5)  # every block written: no NaN left


def test_a_map_written_without_the_models_thresholds_takes_its_versions_from_the_group(tmp_path):
    """e.g. a tiled image's map stitched from tile scores cached before they carried them."""
    from patchwatch.storage.results_store import MapDescription

    root = str(tmp_path / "results")
    first = ResultStore(root)
    first.prepare()
    first.describe_maps("v0001", MapDescription(image_threshold=2.0, pixel_threshold=1.0, units="u"))
    first.write_map("a.png", "/s/a.png", "v0001", np.ones((4, 4), np.float32))
    later = ResultStore(root)  # another worker, told nothing
    later.write_map("b.png", "/s/b.png", "v0001", np.ones((4, 4), np.float32))
    maps = xr.open_zarr(later.maps_url(), group="v0001", consolidated=False)
    assert maps.attrs["pixel_threshold"] == 1.0
    assert [maps[name].attrs["pixel_threshold"] for name in maps.data_vars] == [1.0, 1.0]
