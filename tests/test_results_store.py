"""Result locations: every image gets its own map, whatever its name, per model version."""
from patchwatch.storage.results_store import map_key


def test_names_differing_only_in_unsafe_characters_get_different_maps():
    names = ["a b.png", "a_b.png", "a:b.png", "a?b.png", "dir/a b.png", "dir/a_b.png"]
    keys = [map_key(n, f"/src/{n}", "v0001") for n in names]
    assert len(set(keys)) == len(names)
    assert all(" " not in k and ":" not in k and "?" not in k for k in keys)


def test_safe_names_keep_their_folders_and_unicode_letters():
    key = map_key("MT_Free/Imgs/exp1_num_10181.jpg", "/m/MT_Free/Imgs/exp1_num_10181.jpg", "v0001")
    assert key.startswith("v0001/MT_Free/Imgs/exp1_num_10181.jpg-")
    assert map_key("défaut_画像.png", "/d/défaut_画像.png", "v0001").startswith("v0001/défaut_画像.png-")
    assert ".." not in map_key("../outside/x.png", "/outside/x.png", "v0001").split("/")


def test_one_name_in_two_folders_long_names_and_versions_never_share_a_map():
    assert map_key("y.jpg", "/a/csv/y.jpg", "v0001") != map_key("../y.jpg", "/a/y.jpg", "v0001")
    long_a, long_b = "n" * 250 + "a.jpg", "n" * 250 + "b.jpg"
    key_a, key_b = map_key(long_a, f"/s/{long_a}", "v0001"), map_key(long_b, f"/s/{long_b}", "v0001")
    assert key_a != key_b and all(len(p.encode()) < 100 for k in (key_a, key_b) for p in k.split("/"))
    assert map_key("x.png", "/s/x.png", "v0001") != map_key("x.png", "/s/x.png", "v0002")


def test_a_local_map_is_one_folder_of_files_that_zarr_reads(tmp_path):
    """A map's chunks sit beside its metadata (zarr v3 keys 'c.0.0'): one folder a map, where the
    default keys ('c/0/0') made three (0.73 against 0.64 ms an MTD-like map written, see
    storage.results_store.MAP_KEY_SEPARATOR). Whole maps and a stitched map's blocks alike; zarr
    and read_map agree."""
    import numpy as np
    import zarr

    from patchwatch.storage.results_store import ResultStore

    store = ResultStore(str(tmp_path / "results"))
    small = (np.random.default_rng(0).integers(0, 2048, (200, 300)) / 2048).astype(np.float32)  # float16's own values
    large = np.random.default_rng(1).random((1100, 700)).astype(np.float32)
    whole = store.write_map("a.png", "/src/a.png", "v0001", small)
    writer = store.open_map("big.tif", "/src/big.tif", "v0001", large.shape)
    writer.write_blocks(writer.whole_map_blocks(large))
    for url, values, chunks in ((whole, small, ["c.0.0"]), (writer.url, large, [f"c.{r}.{c}" for r in range(3) for c in range(2)])):
        folder = tmp_path / "results" / url.split("/results/", 1)[1]
        assert sorted(p.name for p in folder.iterdir()) == sorted(chunks + ["zarr.json"])
        assert not [p for p in folder.iterdir() if p.is_dir()]
        np.testing.assert_array_equal(zarr.open_array(url, mode="r")[...], values)
        np.testing.assert_array_equal(store.read_map(url), values)


def _map_like(shape, low, high, seed=0):
    """An anomaly map's kind of values: a smooth field from ``low`` to ``high`` (float32)."""
    import numpy as np

    from patchwatch.anomaly.maps import anomaly_map

    grid = np.random.default_rng(seed).random((max(2, shape[0] // 32), max(2, shape[1] // 32)))
    field = anomaly_map(grid, shape, 4.0)
    field = (field - field.min()) / (field.max() - field.min())
    return (low + (high - low) * field).astype(np.float32)


def _float16_maps(tmp_path):
    """A store with a whole map and a stitched one (edge chunks, its largest value given) of values
    float16 holds: (store, [(url, values), (url, values)])."""
    from patchwatch.storage.results_store import ResultStore

    store = ResultStore(str(tmp_path / "results"))
    small = _map_like((240, 320), 0.5, 30.0)
    large = _map_like((1100, 700), 2.0, 900.0, seed=1)
    whole = store.write_map("a.png", "/src/a.png", "v0001", small)
    writer = store.open_map("big.tif", "/src/big.tif", "v0001", large.shape, largest=float(large.max()))
    writer.write_blocks(writer.whole_map_blocks(large))
    return store, [(whole, small), (writer.url, large)]


def test_maps_are_stored_in_float16_where_their_values_fit_and_read_back_as_float32(tmp_path):
    """A map's values within float16's normal range are stored in float16: each within 2^-11 of
    itself, in well under half the bytes of float32 (MTD's maps: 0.40x, compressed either way),
    and every reader of the store gets float32 back. A stitched map's blocks too, when the map's
    largest value is known before its blocks (it is at most its grid's)."""
    import numpy as np
    import zarr

    store, written = _float16_maps(tmp_path)
    (whole, small), _ = written
    for url, values in written:
        assert zarr.open_array(url, mode="r").dtype == np.float16
        found = store.read_map(url)
        assert found.dtype == np.float32
        np.testing.assert_array_equal(found, values.astype(np.float16).astype(np.float32))
        assert np.abs(found - values).max() <= 2.0 ** -11 * np.abs(values).max()
        assert np.all(np.abs(found - values) <= 2.0 ** -11 * np.abs(values))
    folder = tmp_path / "results" / whole.split("/results/", 1)[1]
    assert (folder / "c.0.0").stat().st_size < small.nbytes / 2.5


def test_maps_beyond_float16s_range_are_stored_in_float32_exactly(tmp_path):
    """Values float16 would overflow (above 65,504) or hold coarsely (all below its smallest normal
    number, 2^-14) stay float32, bit for bit; so does a stitched map whose largest value was not
    given."""
    import numpy as np
    import zarr

    from patchwatch.storage.results_store import ResultStore

    store = ResultStore(str(tmp_path / "results"))
    huge = _map_like((120, 160), 10.0, 2.0e5)
    tiny = _map_like((120, 160), 0.0, 3.0e-5, seed=2)
    negative = _map_like((120, 160), -7.0e4, 5.0, seed=3)
    urls = [store.write_map(name, f"/src/{name}", "v0001", values)
            for name, values in (("huge.png", huge), ("tiny.png", tiny), ("negative.png", negative))]
    stitched = _map_like((600, 520), 1.0, 20.0, seed=4)
    writer = store.open_map("big.tif", "/src/big.tif", "v0001", stitched.shape)
    writer.write_blocks(writer.whole_map_blocks(stitched))
    for url, values in zip(urls + [writer.url], (huge, tiny, negative, stitched)):
        assert zarr.open_array(url, mode="r").dtype == np.float32
        np.testing.assert_array_equal(store.read_map(url), values)


def test_a_process_that_only_reads_maps_never_imports_torch_and_reads_the_same_values(tmp_path):
    """Widening float16 maps needs no torch (~1 s and ~180 MiB to import) where the process has
    not loaded it: a user's script, a report. Written here (torch loaded: its conversion), read
    there (numpy's): the same float32 values, whole maps and a stitched map's edge chunks alike."""
    import subprocess
    import sys

    import numpy as np

    _, [(whole, small), (stitched, large)] = _float16_maps(tmp_path)
    for name, values in (("small", small), ("large", large)):
        np.save(tmp_path / f"{name}.npy", values.astype(np.float16).astype(np.float32))  # numpy's rounding
    script = f"""
import sys
import numpy as np
from patchwatch.storage.results_store import ResultStore, read_map_array
store = ResultStore({str(tmp_path / "results")!r})
for url, name in (({whole!r}, "small"), ({stitched!r}, "large")):
    expected = np.load({str(tmp_path)!r} + "/" + name + ".npy")
    for found in (store.read_map(url), read_map_array(url, step=1), read_map_array(url, step=2)):
        assert found.dtype == np.float32, found.dtype
    assert np.array_equal(store.read_map(url), expected), name
    assert np.array_equal(read_map_array(url, step=2), expected[::2, ::2]), name
assert "torch" not in sys.modules, "reading maps imported torch"
print("read without torch")
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "read without torch" in run.stdout
