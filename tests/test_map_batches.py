"""A score task's maps written together on an object store (issue 15, item 2): on S3 each map was
its requests' round trips in turn (170 ms a new map at 20 ms round trips, 42 ms together:
bench/results/map_writes.md). Written together they must read back exactly as one by one: every chunk and
value, an earlier array of the same name replaced whole, and one map's own failure its own."""
from __future__ import annotations

import errno

import numpy as np
import pytest
import zarr

from patchwatch.storage import results_store
from patchwatch.storage.results_store import MapDescription, ResultStore


@pytest.fixture
def s3_store(s3_environment, request):
    store = ResultStore(s3_environment.url(f"map-batches-{request.node.name}"))
    store.prepare()
    store.describe_maps("v0001", MapDescription(image_threshold=2.0, pixel_threshold=1.0, units="u"))
    return store


def _maps(count: int, seed: int = 0) -> list[np.ndarray]:
    """Maps of values float16 holds exactly (k / 2048): stored as float16, read back as written."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(1, 2048, (40 + 7 * k, 30 + 3 * k)) / 2048).astype(np.float32) for k in range(count)]


def _objects(url: str) -> list[str]:
    fs, path = results_store.filesystem(url)
    return sorted(found[len(path) + 1:] for found in fs.find(path))


def test_maps_written_together_on_s3_read_back_as_written_one_by_one(s3_store):
    maps = _maps(5)
    together = s3_store.write_maps([(f"scans/t{k}.png", f"/src/scans/t{k}.png", "v0001", m) for k, m in enumerate(maps)])
    alone = [s3_store.write_map(f"scans/a{k}.png", f"/src/scans/a{k}.png", "v0001", m) for k, m in enumerate(maps)]
    for url, other, values in zip(together, alone, maps):
        np.testing.assert_array_equal(zarr.open_array(url, mode="r")[...], values)
        assert zarr.open_array(url, mode="r").attrs.asdict() | {"image_id": None, "source_uri": None} == \
            zarr.open_array(other, mode="r").attrs.asdict() | {"image_id": None, "source_uri": None}
        assert _objects(url) == _objects(other) == ["c.0.0", "zarr.json"]


def test_a_map_written_together_replaces_an_earlier_larger_array_whole(s3_store):
    large = np.arange(1100 * 1000, dtype=np.float32).reshape(1100, 1000)  # above WHOLE_MAP_PIXELS: 3 x 2 chunks
    url = s3_store.write_map("a.png", "/src/a.png", "v0001", large)
    assert len(_objects(url)) == 7
    small = _maps(1)[0]
    [again, other] = s3_store.write_maps([("a.png", "/src/a.png", "v0001", small),
                                          ("a.png.bak", "/src/a.png.bak", "v0001", small)])
    assert again == url and _objects(url) == ["c.0.0", "zarr.json"]
    np.testing.assert_array_equal(s3_store.read_map(url), small)
    np.testing.assert_array_equal(s3_store.read_map(other), small)


def test_when_the_batch_fails_each_map_gets_its_own_outcome(s3_store, monkeypatch, map_name_too_long):
    def failing_together(writers, maps):
        raise OSError(errno.EIO, "the batch failed")

    monkeypatch.setattr(results_store, "write_maps_together", failing_together)
    map_name_too_long("bad.png")
    maps = _maps(3)
    outcomes = s3_store.write_maps([(name, f"/src/{name}", "v0001", m) for name, m in zip(["a.png", "bad.png", "c.png"], maps)])
    assert isinstance(outcomes[1], OSError) and outcomes[1].errno == errno.ENAMETOOLONG
    for url, values in zip([outcomes[0], outcomes[2]], [maps[0], maps[2]]):
        np.testing.assert_array_equal(s3_store.read_map(url), values)


def test_an_empty_batch_has_no_outcomes(s3_store):
    assert s3_store.write_maps([]) == []


def test_a_stitched_maps_blocks_written_together_on_s3_read_back_and_an_unwritten_block_is_nan(s3_store):
    values = np.random.default_rng(3).random((1100, 1000)).astype(np.float32)  # 3 x 2 chunks of 512
    writer = s3_store.open_map("big.tif", "/src/big.tif", "v0001", values.shape)
    blocks = [(top, left, values[top:top + 512, left:left + 512]) for top in (0, 512, 1024) for left in (0, 512)]
    writer.write_blocks(blocks[:4])
    writer.write_blocks(blocks[5:])  # the block at (1024, 0) never comes
    found = s3_store.read_map(writer.url)
    expected = values.copy()
    expected[1024:, :512] = np.nan
    np.testing.assert_array_equal(found, expected)
    assert _objects(writer.url) == ["c.0.0", "c.0.1", "c.1.0", "c.1.1", "c.2.1", "zarr.json"]


def test_s3_takes_a_tasks_requests_together_and_a_local_folder_one_after_another(s3_store, tmp_path):
    """The batched path above is the one S3 gets (else these tests would pass on the one-by-one
    path alone); a local folder has no round trips to overlap."""
    assert results_store.sends_together(results_store.filesystem(s3_store.root)[0])
    assert not results_store.sends_together(results_store.filesystem(str(tmp_path))[0])
