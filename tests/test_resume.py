"""A fit killed half way and run again finishes without recomputing the batches already written."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import zarr

from .conftest import MTD, MTD_SPLIT, mtd_available
from .servers import patchwatch_env


def fit_command(csv, root):
    return [sys.executable, "-m", "patchwatch.cli", "fit", "--images", str(csv), "--root", str(root),
            "--workers", "1", "--batch-size", "2"]


@pytest.fixture(scope="module")
def train_csv(tmp_path_factory):
    if not mtd_available():
        pytest.skip("MTD not available")
    table = pd.read_csv(MTD_SPLIT, dtype=str, keep_default_na=False)
    train = table[table.split == "train"].iloc[::60].copy()
    train["image"] = [str(MTD / p) for p in train.image]
    path = tmp_path_factory.mktemp("resume") / "train.csv"
    train.to_csv(path, index=False)
    return path


def index_parts(root):
    folder = root / "bank" / "index"
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.parquet")} if folder.exists() else {}


def test_killed_fit_resumes_without_recomputing_and_gives_the_same_memory_bank(train_csv, tmp_path, prefect_server):
    env = patchwatch_env(tmp_path / "prefect", prefect_server.api_url)  # a cache that starts empty
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(fit_command(train_csv, interrupted), env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(index_parts(interrupted)) < 2 and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the whole run: flow process and Dask workers
    process.wait()
    done_before = index_parts(interrupted)
    assert 2 <= len(done_before) < 7, "the kill must land half way through the 7 batches"
    assert not (interrupted / "current.json").exists(), "an unfinished fit must not be current"

    rerun = subprocess.run(fit_command(train_csv, interrupted), env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = index_parts(interrupted)
    assert len(after) == 7
    # batches finished before the kill were not written again
    assert {name: after[name] for name in done_before} == done_before

    clean = tmp_path / "clean"
    run = subprocess.run(fit_command(train_csv, clean), env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    # the killed fit's unfinished version was resumed, not abandoned for a new one
    assert sorted(p.name for p in (interrupted / "versions").iterdir()) == ["v0001"]
    resumed_memory = zarr.open_array(str(interrupted / "versions" / "v0001" / "memory"), mode="r")[...]
    clean_memory = zarr.open_array(str(clean / "versions" / "v0001" / "memory"), mode="r")[...]
    np.testing.assert_array_equal(resumed_memory, clean_memory)
