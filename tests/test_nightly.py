"""Nightly operations through the command line: incremental re-fit into new versions, the
atomic ``current`` pointer (promote, roll back, a fit killed half way), nominal-only threshold,
and nightly scoring into dated partitions that never scores an image twice with one version."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import numpy as np
import pandas as pd
import pytest
import zarr

from .conftest import copy_mtd_images, mtd_available
from .servers import patchwatch_command, patchwatch_env, run_patchwatch

N_NOMINAL, N_ARRIVING, N_ARCHIVE = 22, 4, 6


@pytest.fixture(scope="module")
def work(tmp_path_factory, prefect_server):
    if not mtd_available():
        pytest.skip("MTD not available")
    folder = tmp_path_factory.mktemp("nightly")
    copy_mtd_images(folder / "nominal", "train", N_NOMINAL, start=0)
    copy_mtd_images(folder / "archive", "test", N_ARCHIVE // 2, label="good")
    copy_mtd_images(folder / "archive", "test", N_ARCHIVE // 2, label="defect", start=100)
    env = patchwatch_env(folder / "prefect-home", api_url=prefect_server.api_url)
    return {"folder": folder, "env": env, "root": folder / "model", "results": folder / "results"}


def patchwatch(work, *args, timeout=300):
    return run_patchwatch([str(a) for a in args] + ["--workers", "1"], work["env"], timeout=timeout).stdout


def admin(work, *args):
    """Commands without a Dask cluster (models, promote)."""
    return run_patchwatch([str(a) for a in args], work["env"], timeout=120).stdout


def current(root) -> str:
    return json.loads((root / "current.json").read_text())["version"]


def manifest(root, version) -> dict:
    return json.loads((root / "versions" / version / "manifest.json").read_text())


def bank_parts(root) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (root / "bank" / "index").glob("*.parquet")}


def bank_uris(root, parts=None) -> list[str]:
    paths = [root / "bank" / "index" / name for name in (parts or bank_parts(root))]
    return [uri for path in paths for uri in pd.read_parquet(path).uri]


def memory(root, version) -> np.ndarray:
    return zarr.open_array(str(root / "versions" / version / "memory"), mode="r")[...]


@pytest.fixture(scope="module")
def fitted(work):
    """v0001 on the first nominal images; then new images arrive and a re-fit makes v0002."""
    root, nominal = work["root"], work["folder"] / "nominal"
    patchwatch(work, "fit", "--images", nominal, "--root", root, "--batch-size", "8")
    first_parts = bank_parts(root)
    again = patchwatch(work, "fit", "--images", nominal, "--root", root)
    arrived = copy_mtd_images(nominal, "train", N_ARRIVING, start=N_NOMINAL)
    patchwatch(work, "fit", "--images", nominal, "--root", root, "--batch-size", "8")
    return {"first_parts": first_parts, "again": again, "arrived": arrived}


def test_first_fit_makes_version_one_with_a_nominal_threshold(work, fitted):
    root = work["root"]
    first = manifest(root, "v0001")
    assert first["parent"] is None and first["new_images"] == N_NOMINAL
    # some nominal images were held out of the memory; their scores set the threshold
    assert first["holdout_images"] >= 1 and first["n_images"] + first["holdout_images"] == N_NOMINAL
    holdout = pd.read_parquet(root / "versions" / "v0001" / "holdout.parquet")
    assert len(holdout) == first["holdout_images"]
    assert first["threshold"] == pytest.approx(np.quantile(holdout.score, first["threshold_quantile"]))
    assert not set(holdout.uri) & set(pd.read_parquet(root / "bank" / "index" / "batch-00000.parquet").uri)


def test_a_fit_with_nothing_new_does_nothing_and_says_so(work, fitted):
    assert "nothing new" in fitted["again"]
    assert "version v0001 stays current" in fitted["again"]


def test_refit_featurises_only_the_new_images_into_a_new_version(work, fitted):
    root = work["root"]
    parts = bank_parts(root)
    # the first fit's bank parts are untouched; the new parts hold exactly the arrived images
    assert {name: parts[name] for name in fitted["first_parts"]} == fitted["first_parts"]
    added = sorted(set(parts) - set(fitted["first_parts"]))
    assert sorted(bank_uris(root, added)) == sorted(str(p) for p in fitted["arrived"])
    assert len(bank_uris(root)) == N_NOMINAL + N_ARRIVING

    second = manifest(root, "v0002")
    assert current(root) == "v0002"
    assert second["parent"] == "v0001" and second["new_images"] == N_ARRIVING and second["incremental"]
    assert second["source_listing"]["images"] == N_NOMINAL + N_ARRIVING
    # the coreset was extended, not re-selected: v0001's memory is where it was, plus new rows
    old, new = memory(root, "v0001"), memory(root, "v0002")
    assert len(new) > len(old)
    np.testing.assert_array_equal(new[:len(old)], old)


def test_models_lists_the_versions_and_promote_rolls_back_and_forward(work, fitted):
    root = work["root"]
    listing = admin(work, "models", "--root", root)
    lines = {line.split("│")[1].strip(): line for line in listing.splitlines() if line.count("│") > 3}
    assert "complete" in lines["v0001"] and "current" in lines["v0002"]

    assert "current: v0001 (was v0002)" in admin(work, "promote", "v0001", "--root", root)
    assert current(root) == "v0001"
    results = work["folder"] / "rolled-back"
    patchwatch(work, "score", "--images", work["folder"] / "archive", "--root", root, "--out", results)
    assert set(pd.read_parquet(results / "scores.parquet").model_version) == {"v0001"}

    admin(work, "promote", "v0002", "--root", root)
    assert current(root) == "v0002"
    with pytest.raises(pytest.fail.Exception, match="no such version v0009 at .*; its versions: v0001, v0002"):
        admin(work, "promote", "v0009", "--root", root)
    assert current(root) == "v0002"


def test_a_promotion_cut_short_leaves_the_old_pointer(work, fitted, monkeypatch, writes_die_half_way):
    from patchwatch.storage.model_store import ModelRegistry

    registry = ModelRegistry(str(work["root"]))
    before = (work["root"] / "current.json").read_bytes()
    writes_die_half_way()
    with pytest.raises(OSError):
        registry.promote("v0001")
    monkeypatch.undo()
    assert (work["root"] / "current.json").read_bytes() == before
    assert registry.resolve().version == "v0002"


def test_a_fit_killed_mid_write_never_exposes_a_half_version(work, fitted):
    root, nominal = work["root"], work["folder"] / "nominal"
    copy_mtd_images(nominal, "train", 6, start=N_NOMINAL + N_ARRIVING)
    command = patchwatch_command() + ["fit", "--images", str(nominal), "--root", str(root), "--workers", "1",
                                      "--batch-size", "1"]
    process = subprocess.Popen(command, env=work["env"], start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    parts_before = len(bank_parts(root))
    deadline = time.time() + 240
    while len(bank_parts(root)) < parts_before + 2 and time.time() < deadline and process.poll() is None:
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)  # flow process and Dask workers, mid-write
    process.wait()
    assert len(bank_parts(root)) >= parts_before + 2, "the kill must land while the fit writes"

    # readers see the previous complete version, and only complete versions
    from patchwatch.storage.model_store import ModelRegistry
    from patchwatch.tasks.scoring import load_model

    registry = ModelRegistry(str(root))
    assert current(root) == "v0002"
    assert not (root / "versions" / "v0003" / "manifest.json").exists()
    assert registry.complete_versions() == ["v0001", "v0002"]
    model = registry.resolve()
    load_model(model.root, model.fingerprint())  # what a worker does before scoring

    # the re-run resumes the unfinished version and only then makes it current
    patchwatch(work, "fit", "--images", nominal, "--root", root, "--batch-size", "1")
    assert current(root) == "v0003" and registry.versions() == ["v0001", "v0002", "v0003"]
    third = manifest(root, "v0003")
    assert third["new_images"] == 6 and third["parent"] == "v0002"
    assert len(bank_uris(root)) == len(set(bank_uris(root))) == N_NOMINAL + N_ARRIVING + 6


def night_parts(results, night) -> dict[str, int]:
    folder = results / "nights" / night / "scores"
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.parquet")}


def test_nightly_scoring_scores_each_image_once_per_version(work, fitted):
    root, results, archive = work["root"], work["results"], work["folder"] / "archive"
    night = "2026-11-24"
    admin(work, "promote", "v0002", "--root", root)
    patchwatch(work, "score-new", "--archive", archive, "--root", root, "--results", results, "--night", night)
    table = pd.read_parquet(results / "nights" / night / "scores.parquet")
    assert len(table) == N_ARCHIVE and set(table.model_version) == {"v0002"}
    threshold = manifest(root, "v0002")["threshold"]
    assert (table.is_anomalous == (table.score > threshold)).all()
    for amap in table["map"]:
        assert zarr.open_array(amap, mode="r").ndim == 2
    history = pd.read_parquet(results / "history" / f"{night}.parquet")
    assert history.images.item() == N_ARCHIVE and history.flagged.item() == int(table.is_anomalous.sum())

    # the same night again: nothing to score, nothing rewritten
    parts, summary = night_parts(results, night), (results / "history" / f"{night}.parquet").read_bytes()
    output = patchwatch(work, "score-new", "--archive", archive, "--root", root, "--results", results,
                        "--night", night)
    assert re.search(r"scored_now\s*│\s*0\s*│", output), output
    assert night_parts(results, night) == parts
    assert (results / "history" / f"{night}.parquet").read_bytes() == summary

    # a new archive image the next night: only it is scored, into that night's partition
    copy_mtd_images(archive, "test", 1, label="good", start=50)
    patchwatch(work, "score-new", "--archive", archive, "--root", root, "--results", results,
               "--night", "2026-11-25")
    assert len(pd.read_parquet(results / "nights" / "2026-11-25" / "scores.parquet")) == 1

    # another version is current: by default it scores only what no version has scored (nothing
    # here); asked to rescore, it scores everything again, each row with its version and map
    admin(work, "promote", "v0001", "--root", root)
    patchwatch(work, "score-new", "--archive", archive, "--root", root, "--results", results,
               "--night", "2026-11-25")
    assert len(pd.read_parquet(results / "nights" / "2026-11-25" / "scores.parquet")) == 1
    patchwatch(work, "score-new", "--archive", archive, "--root", root, "--results", results,
               "--night", "2026-11-25", "--rescore")
    later = pd.read_parquet(results / "nights" / "2026-11-25" / "scores.parquet")
    assert len(later) == 1 + N_ARCHIVE + 1
    assert (later.model_version == "v0001").sum() == N_ARCHIVE + 1
    assert later["map"].nunique() == len(later)
    admin(work, "promote", "v0002", "--root", root)


def test_images_of_a_score_new_killed_before_it_merged_its_night_are_scored_again(work, fitted):
    """A run killed after its tasks wrote their parts and maps, before it merged the night's
    tables: those images are in no table a user reads, so the next run must score them (the
    soak test met it: it found them 'scored already' and merged nothing)."""
    root, results, archive = work["root"], work["results"], work["folder"] / "archive"
    night = "2026-11-26"
    arrived = copy_mtd_images(archive, "test", 2, label="defect", start=110)
    broken = archive / "arrived-broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    patchwatch(work, "score-new", "--archive", archive, "--root", root, "--results", results, "--night", night)
    # what a kill before the merge leaves: the run's parts and maps, no merged table, no history row
    for merged in ("scores.parquet", "errors.parquet", "summary.json"):
        (results / "nights" / night / merged).unlink()
    (results / "history" / f"{night}.parquet").unlink()
    assert night_parts(results, night)

    patchwatch(work, "score-new", "--archive", archive, "--root", root, "--results", results, "--night", night)
    table = pd.read_parquet(results / "nights" / night / "scores.parquet")
    assert sorted(table.uri) == sorted(str(path) for path in arrived)
    assert not table.duplicated(["uri", "model_version"]).any()
    assert list(pd.read_parquet(results / "nights" / night / "errors.parquet").uri) == [str(broken)]
    assert pd.read_parquet(results / "history" / f"{night}.parquet").images.item() == len(arrived)


def test_a_score_new_killed_after_its_merge_before_its_history_row_is_published_by_the_next_run(work, fitted):
    """Killed after it merged the night's tables, before it wrote the night's history row (the
    trend's source): its images count as scored, and the next run, with nothing to score, still
    writes the row for the merged tables, or the trend would miss the night for good."""
    root, results, archive = work["root"], work["results"], work["folder"] / "archive"
    night = "2026-11-27"
    copy_mtd_images(archive, "test", 1, label="good", start=60)
    patchwatch(work, "score-new", "--archive", archive, "--root", root, "--results", results, "--night", night)
    history = results / "history" / f"{night}.parquet"
    written = pd.read_parquet(history)
    history.unlink()

    output = patchwatch(work, "score-new", "--archive", archive, "--root", root, "--results", results,
                        "--night", night)
    assert re.search(r"scored_now\s*│\s*0\s*│", output), output
    again = pd.read_parquet(history)
    assert (again.images.item(), again.rows.item(), again.errors.item()) == (
        written.images.item(), written.rows.item(), written.errors.item()) == (1, 1, 0)
