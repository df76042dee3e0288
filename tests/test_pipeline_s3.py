"""End to end on a real S3 endpoint (moto_server on loopback): ``patchwatch fit`` and
``patchwatch score`` as subprocesses with s3:// roots, then everything read back with plain
s3fs + zarr + pandas/pyarrow + faiss (no patchwatch code), and the S3 model compared with the same
fit into a local folder (the storage backend must not change any number).

The endpoint and credentials reach patchwatch only through the AWS_* environment variables.
"""
from __future__ import annotations

import importlib
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

# the server fixtures (session-scoped) as a plugin: registered once however many modules ask, so
# the whole session shares one S3 endpoint and one Prefect server. Named, not imported here, so
# that pytest imports it itself (and rewrites its asserts).


def patchwatch_env(*args, **kwargs):
    return importlib.import_module("tests.servers").patchwatch_env(*args, **kwargs)


def run_patchwatch(*args, **kwargs):
    return importlib.import_module("tests.servers").run_patchwatch(*args, **kwargs)


zarr = pytest.importorskip("zarr")
s3fs = pytest.importorskip("s3fs")
faiss = pytest.importorskip("faiss")

# ROOT/bank/index/ and outcomes/ (Parquet, JSON) lie inside the bank's Zarr group: zarr warns when it lists
# the group's members; the arrays themselves are unaffected
pytestmark = pytest.mark.filterwarnings(r"ignore:Object at (index|outcomes) is not recognized:UserWarning")

# no shared s3fs instance and no listing cache: every read sees what the server holds now
FRESH = {"skip_instance_cache": True, "use_listings_cache": False}
CLI_TIMEOUT = 300  # generous: 2 shared cores


@pytest.fixture(scope="module")
def tiny_slice(mtd_slice, tmp_path_factory) -> Path:
    """4 nominal train images and 4 test images (2 defects, 2 good) of the MTD slice."""
    table = pd.read_csv(mtd_slice, dtype=str, keep_default_na=False)
    train = table[table.split == "train"].head(4)
    test = table[table.split == "test"].groupby("label").head(2)
    path = tmp_path_factory.mktemp("tiny") / "tiny.csv"
    pd.concat([train, test]).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def s3_run(s3_server, prefect_server, tiny_slice, tmp_path_factory) -> dict:
    """fit + score into the S3 bucket, once for the module's tests.

    The runs report to the session's loopback Prefect server: an ephemeral one would be started
    (and migrated) again by every CLI call, which costs more than the pipeline on 2 cores.
    """
    work = tmp_path_factory.mktemp("s3-run")
    env = patchwatch_env(work / "prefect-home", api_url=prefect_server.api_url, s3=s3_server)
    root, results = s3_server.url("model"), s3_server.url("results")
    timings = {}
    started = time.monotonic()
    fit = run_patchwatch(["fit", "--images", tiny_slice, "--split", "train", "--root", root, "--workers", "1"],
                         env, timeout=CLI_TIMEOUT)
    timings["fit_s"] = time.monotonic() - started
    started = time.monotonic()
    score = run_patchwatch(["score", "--images", tiny_slice, "--split", "test", "--root", root,
                            "--out", results, "--workers", "1"], env, timeout=CLI_TIMEOUT)
    timings["score_s"] = time.monotonic() - started
    print(f"S3 fit {timings['fit_s']:.1f}s, score {timings['score_s']:.1f}s\n{fit.stdout[-1500:]}\n{score.stdout[-1500:]}")
    return {"root": root, "results": results, "fit_output": fit.stdout, "score_output": score.stdout,
            "timings": timings, "slice": tiny_slice}


def _split(path: Path, split: str) -> pd.DataFrame:
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    return table[table.split == split].reset_index(drop=True)


def _open_group(url: str):
    return zarr.open_group(url, mode="r", storage_options=FRESH)


def _open_array(url: str):
    return zarr.open_array(url, mode="r", storage_options=FRESH)


def _read_parquet(fs, path: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(fs.cat_file(path)))


def _bank(group) -> dict[str, np.ndarray]:
    """The bank's batch arrays by name (batch-NNNNN), read with zarr only."""
    names = sorted(name for name in group.array_keys() if name.startswith("batch-"))
    return {name: group[name][...] for name in names}


def test_model_on_s3(s3_environment, s3_run):
    fs = s3_environment.filesystem()
    bucket = s3_environment.bucket
    train = _split(s3_run["slice"], "train")

    # the first fit made version v0001 and pointed current at it; the version's manifest is
    # written last: its presence means a finished fit
    assert json.loads(fs.cat_file(f"{bucket}/model/current.json"))["version"] == "v0001"
    manifest = json.loads(fs.cat_file(f"{bucket}/model/versions/v0001/manifest.json"))
    assert manifest["detector"] == "patchcore"
    assert manifest["n_images"] == len(train)
    assert isinstance(manifest["format_version"], int)

    # bank: one Zarr v3 float32 array per work batch + Parquet index parts
    group = _open_group(s3_run["root"] + "/bank")
    assert group.metadata.zarr_format == 3
    bank = _bank(group)
    assert bank, f"no batch arrays under {s3_run['root']}/bank: {fs.find(f'{bucket}/model/bank')}"
    for name, vectors in bank.items():
        assert vectors.dtype == np.float32 and vectors.ndim == 2 and len(vectors) > 0, name
        assert np.isfinite(vectors).all(), name
    dims = {v.shape[1] for v in bank.values()}
    assert dims == {manifest["feature_config"]["embed_dim"]}
    bank_rows = sum(len(v) for v in bank.values())
    assert bank_rows == manifest["bank_rows"]

    parts = sorted(p for p in fs.ls(f"{bucket}/model/bank/index", detail=False) if p.endswith(".parquet"))
    assert [Path(p).stem for p in parts] == sorted(bank), "one index part per bank batch array"
    index = pd.concat([_read_parquet(fs, p) for p in parts], ignore_index=True)
    assert sorted(index.image_id) == sorted(train.image)
    assert int((index.row_stop - index.row_start).sum()) == bank_rows
    assert (index.grid_h * index.grid_w == index.row_stop - index.row_start).all()

    # memory (the coreset): a subset of the bank's rows
    memory = _open_array(s3_run["root"] + "/versions/v0001/memory")[...]
    assert memory.dtype == np.float32 and memory.ndim == 2
    assert len(memory) == manifest["memory_rows"] and 0 < len(memory) <= bank_rows
    assert memory.shape[1] in dims
    all_rows = np.concatenate(list(bank.values()))
    picked = {row.tobytes() for row in all_rows}
    assert all(row.tobytes() in picked for row in memory), "every memory row is a bank row"

    # the faiss index over the memory
    assert fs.exists(f"{bucket}/model/versions/v0001/memory.faiss")
    index = faiss.deserialize_index(np.frombuffer(fs.cat_file(f"{bucket}/model/versions/v0001/memory.faiss"),
                                                  dtype=np.uint8))
    assert index.ntotal == len(memory) and index.d == memory.shape[1]


def test_results_on_s3(s3_environment, s3_run):
    fs = s3_environment.filesystem()
    bucket = s3_environment.bucket
    test = _split(s3_run["slice"], "test")

    table = _read_parquet(fs, f"{bucket}/results/scores.parquet")
    assert len(table) == len(test), table
    assert sorted(table.image_id) == sorted(test.image)
    assert table.image_id.is_unique
    assert np.isfinite(table.score.to_numpy(dtype=float)).all(), table.score

    for row in table.itertuples(index=False):
        assert row.map.startswith(s3_run["results"] + "/maps/"), row.map
        amap = _open_array(row.map)
        with Image.open(row.image_id) as image:
            width, height = image.size
        assert amap.shape == (height, width), (row.image_id, amap.shape)
        assert (row.height, row.width) == (height, width)
        assert amap.dtype == np.float16  # map values within float16's range (storage.results_store.map_dtype)
        values = amap[...]
        assert np.isfinite(values).all() and values.max() > 0
        assert math.isfinite(row.score) and row.score >= 0

    summary = json.loads(fs.cat_file(f"{bucket}/results/summary.json"))
    assert summary["images"] == len(test) and summary["skipped"] == 0


def test_local_fit_matches_s3(s3_environment, s3_run, prefect_server, tmp_path):
    """The same fit into a local folder gives bit-identical bank and memory arrays."""
    root = tmp_path / "model"
    env = patchwatch_env(tmp_path / "prefect-home", api_url=prefect_server.api_url)  # no S3 variables
    started = time.monotonic()
    run_patchwatch(["fit", "--images", s3_run["slice"], "--split", "train", "--root", root, "--workers", "1"],
                   env, timeout=CLI_TIMEOUT)
    print(f"local fit {time.monotonic() - started:.1f}s")

    local_memory = zarr.open_array(str(root / "versions" / "v0001" / "memory"), mode="r")[...]
    s3_memory = _open_array(s3_run["root"] + "/versions/v0001/memory")[...]
    assert np.array_equal(local_memory, s3_memory), "the memory bank depends on the storage backend"

    local_bank = _bank(zarr.open_group(str(root / "bank"), mode="r"))
    s3_bank = _bank(_open_group(s3_run["root"] + "/bank"))
    assert local_bank.keys() == s3_bank.keys()
    for name in local_bank:
        assert np.array_equal(local_bank[name], s3_bank[name]), name

    local_manifest = json.loads((root / "versions" / "v0001" / "manifest.json").read_text())
    s3_manifest = json.loads(s3_environment.filesystem().cat_file(
        f"{s3_environment.bucket}/model/versions/v0001/manifest.json"))
    for key in ("bank_rows", "memory_rows", "n_images", "covering_radius", "feature_config", "detector_config"):
        assert local_manifest[key] == s3_manifest[key], key


def test_stores_see_parts_written_by_other_processes(s3_environment):
    """A long-lived process (flow runner, Dask worker) must see parts that other processes wrote
    after it listed a folder: s3fs caches listings per process with no expiry."""
    from patchwatch.storage.model_store import FeatureBank
    from patchwatch.storage.results_store import ResultStore, drop_parts_from

    bucket = s3_environment.bucket
    other = s3_environment.filesystem()  # stands for another process: its own s3fs instance

    def part(i: int) -> bytes:
        buffer = io.BytesIO()
        pd.DataFrame({"image_id": [f"image-{i}"], "score": [float(i)]}).to_parquet(buffer, index=False)
        return buffer.getvalue()

    out = ResultStore(s3_environment.url("stale", "results"))
    other.pipe_file(f"{bucket}/stale/results/scores/part-00000.parquet", part(0))
    drop_parts_from(out, 1)           # this process lists scores/ (and s3fs caches the listing)
    assert len(out.scores()) == 1
    drop_parts_from(out, 2)           # the next run has two batches, written by the workers
    other.pipe_file(f"{bucket}/stale/results/scores/part-00001.parquet", part(1))
    assert out.has_part("scores", "part-00001")
    assert sorted(out.scores().image_id) == ["image-0", "image-1"]

    bank = FeatureBank(s3_environment.url("stale", "model"))
    other.pipe_file(f"{bucket}/stale/model/bank/index/batch-00000.parquet", part(0))
    assert len(bank.index()) == 1
    other.pipe_file(f"{bucket}/stale/model/bank/index/batch-00001.parquet", part(1))
    assert bank.batches() == [0, 1] and bank.next_batch() == 2
    assert len(bank.index()) == 2
