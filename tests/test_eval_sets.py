"""bench/eval_sets.py: the benchmark's evaluation sets are reproducible, complete and sound."""
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from patchwatch.storage.images import list_images
from tests.conftest import mtd_available

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import eval_sets  # noqa: E402

# small, non-square, every defect kind once (the test_defect index cycles through the specs)
TINY = eval_sets.Recipe(
    description="test recipe", source="texture", material="gravel.png", size=(96, 160),
    n_train=4, n_test_good=3, n_test_defect=5, material_zoom=(1.0, 1.2), material_contrast=0.6,
    nominal=eval_sets.Nominal(flips=True, rot90=False),
    defects=(
        eval_sets.DefectSpec("scratch", size=(20, 60), contrast=(0.3, 0.5), polarity="either"),
        eval_sets.DefectSpec("crack", size=(20, 60), contrast=(0.4, 0.8)),
        eval_sets.DefectSpec("stain", size=(12, 40), contrast=(0.3, 0.5), polarity="either"),
        eval_sets.DefectSpec("hole", size=(3, 10), contrast=(0.4, 0.8)),
        eval_sets.DefectSpec("texture", size=(16, 40), contrast=(0.4, 0.8), modes=("blur", "contrast")),
    ))


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(eval_sets.SETS, "tiny", TINY)
    return "tiny"


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file of a built set except build.json, which records the build's duration."""
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "build.json"}


def test_two_builds_are_byte_identical(tiny, tmp_path):
    first = eval_sets.build(tiny, tmp_path / "a")
    second = eval_sets.build(tiny, tmp_path / "b")
    a, b = files_of(first.parent), files_of(second.parent)
    assert len(a) == 1 + 4 + 3 + 5 + 5  # split.csv, images, masks
    assert a == b


def test_an_unchanged_recipe_is_reused_and_a_changed_one_rebuilt(tiny, tmp_path, monkeypatch):
    split_csv = eval_sets.build(tiny, tmp_path)
    stamp = (split_csv.parent / "build.json").stat().st_mtime_ns
    before = files_of(split_csv.parent)
    assert eval_sets.build(tiny, tmp_path) == split_csv
    assert (split_csv.parent / "build.json").stat().st_mtime_ns == stamp

    hole = dataclasses.replace(TINY.defects[3], contrast=(0.2, 0.3))
    changed = dataclasses.replace(TINY, defects=TINY.defects[:3] + (hole,) + TINY.defects[4:])
    monkeypatch.setitem(eval_sets.SETS, tiny, changed)
    assert eval_sets.build(tiny, tmp_path) == split_csv
    after = files_of(split_csv.parent)
    assert after.keys() == before.keys()
    differing = {name for name in after if after[name] != before[name]}
    assert differing == {"test/hole/0003.png"}  # only the hole image depends on the hole's contrast
    assert [p.name for p in tmp_path.iterdir()] == [tiny]  # no staging or retired folders left


def test_a_failed_build_leaves_the_previous_set_untouched(tiny, tmp_path, monkeypatch):
    split_csv = eval_sets.build(tiny, tmp_path)
    before = files_of(split_csv.parent)
    real_render = eval_sets.render_image
    calls = []

    def dies_on_the_sixth_image(*args):
        calls.append(args)
        if len(calls) == 6:
            raise OSError("disk full")
        return real_render(*args)

    monkeypatch.setattr(eval_sets, "render_image", dies_on_the_sixth_image)
    with pytest.raises(OSError):
        eval_sets.build(tiny, tmp_path, scale=2.0)
    assert files_of(split_csv.parent) == before
    assert [p.name for p in tmp_path.iterdir()] == [tiny]


def test_split_csv_lists_as_patchwatch_reads_it(tiny, tmp_path):
    split_csv = eval_sets.build(tiny, tmp_path, scale=2.0)
    train = list_images(str(split_csv), "train")
    test = list_images(str(split_csv), "test")
    assert len(train) == 8 and {r.label for r in train} == {"good"}
    assert sum(r.label == "good" for r in test) == 6 and sum(r.label == "defect" for r in test) == 10
    assert {r.defect_type for r in test if r.label == "defect"} == set(eval_sets.DEFECT_KINDS)
    for record in train + test:
        image = np.asarray(Image.open(record.uri))
        assert image.dtype == np.uint8 and image.shape == TINY.size
        if record.label == "good":
            assert record.mask_uri is None
            continue
        mask = np.asarray(Image.open(record.mask_uri))
        assert mask.shape == TINY.size and set(np.unique(mask)) == {0, 255}
        assert 0 < (mask == 255).sum() < mask.size


def test_scale_keeps_a_few_of_each_kind():
    assert eval_sets.scaled_counts(TINY, 0.01) == {"train_good": 3, "test_good": 3, "test_defect": 3}
    assert eval_sets.scaled_counts(eval_sets.SETS["brick"], 0.5) == {"train_good": 60, "test_good": 20,
                                                                      "test_defect": 30}


@pytest.mark.parametrize("kind_index", range(5))
def test_defect_changes_the_image_inside_its_mask(tiny, kind_index):
    for index in (kind_index, kind_index + 5):
        rendered = eval_sets.render_image(tiny, TINY, "test_defect", index)
        assert rendered.defect_type == TINY.defects[kind_index].kind
        mask = rendered.mask
        assert 0 < mask.sum() < mask.size
        change = np.abs(rendered.image.astype(np.int16) - rendered.clean.astype(np.int16))
        inside, outside = change[mask].mean(), change[~mask].mean()
        assert inside >= TINY.min_visible and inside > 10 * outside, (inside, outside)


def test_defect_renderers_are_deterministic_and_local():
    surface = eval_sets.resize(eval_sets.load_material("gravel.png"), 128, 128)
    for spec in TINY.defects:
        first = eval_sets.render_defect(surface, spec, np.random.default_rng(7))
        second = eval_sets.render_defect(surface, spec, np.random.default_rng(7))
        assert all(np.array_equal(x, y) for x, y in zip(first, second))
        defective, alpha = first
        untouched = alpha == 0
        assert untouched.any() and np.array_equal(defective[untouched], surface[untouched])


def test_good_images_differ_between_train_and_test(tiny):
    images = [eval_sets.render_image(tiny, TINY, role, i).image
              for role in ("train_good", "test_good") for i in range(3)]
    assert all(not np.array_equal(a, b) for i, a in enumerate(images) for b in images[i + 1:])


def test_every_recipe_renders_each_of_its_defect_types_at_its_size():
    for name, recipe in eval_sets.SETS.items():
        if isinstance(recipe, eval_sets.ExternalSet) or (recipe.material == "MT_Free" and not mtd_available()):
            continue
        for index, spec in enumerate(recipe.defects):
            rendered = eval_sets.render_image(name, recipe, "test_defect", index)
            assert rendered.defect_type == spec.kind
            assert 0 < rendered.mask.sum() < rendered.mask.size // 4
            if recipe.size is not None:
                assert rendered.image.shape == recipe.size
    sizes = {name: r.size for name, r in eval_sets.SETS.items() if isinstance(r, eval_sets.Recipe)}
    assert sizes["aligned-part"][1] > 2 * sizes["aligned-part"][0]
    assert sizes["wide-strip"][1] >= 2048 and sizes["wide-strip"][0] <= 256
    assert min(sizes["large"]) > 1024


@pytest.mark.skipif(not mtd_available(), reason="MTD not available")
def test_mtd_tiles_keep_their_native_size_and_roles_never_share_a_tile():
    recipe = eval_sets.SETS["mtd-fine"]
    pools = eval_sets.mtd_tile_pools("mtd-fine", recipe)
    assert not set(pools["train_good"]) & set(pools["test_good"])
    assert not set(pools["train_good"]) & set(pools["test_defect"])
    rendered = eval_sets.render_image("mtd-fine", recipe, "test_good", 0)
    assert rendered.image.shape == eval_sets.load_mtd_tile(pools["test_good"][0]).shape


@pytest.mark.skipif(not mtd_available(), reason="MTD not available")
def test_mtd_is_not_built_but_returned(tmp_path):
    assert eval_sets.build("mtd", tmp_path) == eval_sets.MTD_SPLIT
    assert not any(tmp_path.iterdir())


def test_the_benchmark_says_when_a_test_set_cannot_tell_two_configurations_apart():
    """The quality table's bootstrap: its AUROC is sklearn's on the undrawn set; a configuration
    compared with itself has a zero gap; a gap of 0.05 on 100 noisy test images is 'within
    noise', the same gap measured on 4,000 is not."""
    from sklearn.metrics import roc_auc_score

    import bench_generalisation as bench

    def scored(n_good, n_bad, seed):
        rng = np.random.default_rng(seed)
        labels = np.r_[np.zeros(n_good, bool), np.ones(n_bad, bool)]
        strong = rng.normal(size=len(labels)) + 1.2 * labels
        return labels, strong, strong + rng.normal(size=len(labels)) * 0.6  # a weaker configuration

    labels, strong, weak = scored(40, 60, 0)
    assert bench.aurocs(labels, strong, np.arange(len(labels))[None])[0] == pytest.approx(roc_auc_score(labels, strong))
    draws = bench.bootstrap_rows(labels)
    low, high = bench.auroc_interval(labels, {"scores": strong}, draws)
    assert low < roc_auc_score(labels, strong) < high and high - low > 0.08
    assert bench.gap_interval(labels, {"scores": strong}, {"scores": strong}, draws) == [0.0, 0.0]
    assert bench.gap_interval(labels, {"scores": strong}, {}, draws) is None  # a row cached without scores

    for n_good, n_bad, expected in ((40, 60, "no, within noise"), (1600, 2400, "no")):
        labels, strong, weak = scored(n_good, n_bad, 1)
        gap = roc_auc_score(labels, strong) - roc_auc_score(labels, weak)
        assert gap > 0.03
        ci = bench.gap_interval(labels, {"scores": strong}, {"scores": weak}, bench.bootstrap_rows(labels, 500))
        assert bench.verdict(gap, ci) == expected, (gap, ci)


def test_a_set_rebuilt_from_a_changed_recipe_is_not_served_the_old_sets_cached_rows(tiny, tmp_path, monkeypatch):
    """The quality benchmark caches each row under the set's key: a rebuild that changes the pixels
    under the same file names (a recipe's defects redrawn) must change the key, an unchanged set
    must keep it (its rows stay valid)."""
    import bench_generalisation as bench

    csv = eval_sets.build("tiny", tmp_path)
    before = bench.DataSet("tiny", csv).key
    assert bench.DataSet("tiny", eval_sets.build("tiny", tmp_path)).key == before  # reused as it is

    louder = dataclasses.replace(TINY, defects=tuple(dataclasses.replace(d, contrast=(0.9, 1.0)) for d in TINY.defects))
    monkeypatch.setitem(eval_sets.SETS, "tiny", louder)
    rebuilt = eval_sets.build("tiny", tmp_path)
    assert rebuilt == csv and rebuilt.read_bytes() == csv.read_bytes()  # same names, same labels
    assert bench.DataSet("tiny", rebuilt).key != before
