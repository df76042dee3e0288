"""Result locations: every image gets its own map, whatever its name."""
from storage.results_store import map_key


def test_names_differing_only_in_unsafe_characters_get_different_maps():
    names = ["a b.png", "a_b.png", "a:b.png", "a?b.png", "dir/a b.png", "dir/a_b.png"]
    keys = [map_key(n) for n in names]
    assert len(set(keys)) == len(names)
    assert all(" " not in k and ":" not in k and "?" not in k for k in keys)


def test_safe_names_keep_their_folders_and_unicode_letters():
    assert map_key("MT_Free/Imgs/exp1_num_10181.jpg") == "MT_Free/Imgs/exp1_num_10181.jpg"
    assert map_key("défaut_画像.png") == "défaut_画像.png"
    assert ".." not in map_key("../outside/x.png").split("/")
