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
    small = np.random.default_rng(0).random((200, 300)).astype(np.float32)
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
