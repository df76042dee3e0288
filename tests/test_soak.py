"""Soak (issue 14's done criterion): fit / score-new / promote through the real CLI, some killed
outright (SIGKILL of the process group at a random moment), then one clean score-new.

Bounded: a fixed seed, CYCLES cycles of tiny synthetic images, one local Dask worker per command
(``--workers 1``: the cluster's processes are the command's and must die with it), and the
session's Prefect server. Afterwards: no process of any command is left, the night's tables hold
no duplicate (image, model_version) row, every archive image is scored or has an error row, the
night's history row counts its tables, and ``current.json`` names a complete version.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
from PIL import Image

from .servers import patchwatch_command, patchwatch_env
from .synthetic import stripes

SEED, CYCLES, NIGHT = 14, 12, "2026-01-14"
KILL_SHARE, KILL_WINDOW = 0.5, (2.0, 20.0)  # a killed cycle dies this many seconds after its start


def group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for process in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(process.pid) == pgid:
                members.append(process)
    return members


def run(args: list, env: dict, kill_after: float | None, timeout: float = 240) -> tuple[int | None, str]:
    """Run ``patchwatch ARGS`` in its own process group; SIGKILL the group after ``kill_after`` s."""
    process = subprocess.Popen(patchwatch_command() + [str(a) for a in args], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, text=True)
    try:
        output, _ = process.communicate(timeout=kill_after if kill_after is not None else timeout)
        code = process.returncode
    except subprocess.TimeoutExpired:
        if kill_after is None:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            pytest.fail(f"patchwatch {args[0]} timed out:\n{output[-4000:]}")
        os.killpg(process.pid, signal.SIGKILL)  # the whole group at once: the command and its cluster
        output, _ = process.communicate()
        code = None
    # whatever the command started must be gone with it (killed or finished)
    deadline = time.monotonic() + 15
    while (left := group_members(process.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes left by patchwatch {args[0]}: {[p.cmdline() for p in left]}"
    return code, output


def add_pngs(folder: Path, rng: np.random.Generator, count: int, prefix: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    start = len(list(folder.glob("*.png")))
    for i in range(start, start + count):
        Image.fromarray(stripes(rng)).save(folder / f"{prefix}{i:03d}.png")


def test_soak_fit_score_new_promote_with_random_kills(tmp_path, prefect_server):
    started = time.monotonic()
    choose, rng = random.Random(SEED), np.random.default_rng(SEED)
    env = patchwatch_env(tmp_path / "home", api_url=prefect_server.api_url)
    env["PATCHWATCH_RETRY_DELAY"] = "0.2"
    nominal, archive, root, results = tmp_path / "nominal", tmp_path / "archive", tmp_path / "model", tmp_path / "results"
    add_pngs(nominal, rng, 6, "n")
    add_pngs(archive, rng, 4, "a")
    (archive / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # always an error row
    common = ["--workers", "1"]
    code, output = run(["fit", "--images", nominal, "--root", root, *common], env, None)
    assert code == 0, output[-4000:]
    score_new = ["score-new", "--archive", archive, "--root", root, "--results", results, "--night", NIGHT, *common]

    log = []
    for cycle in range(CYCLES):
        action = choose.choice(["fit", "score-new", "score-new", "promote"])
        kill_after = choose.uniform(*KILL_WINDOW) if choose.random() < KILL_SHARE else None
        if action == "fit":
            add_pngs(nominal, rng, 2, "n")
            args = ["fit", "--images", nominal, "--root", root, *common]
        elif action == "score-new":
            add_pngs(archive, rng, 3, "a")
            args = score_new
        else:
            versions = sorted(p.name for p in (root / "versions").iterdir() if (p / "manifest.json").exists())
            args = ["promote", choose.choice(versions), "--root", root]
        code, output = run(args, env, kill_after)
        log.append((cycle, action, kill_after and round(kill_after, 1), code))
        # a run that was not killed ends cleanly (a fit refused for a killed fit's lease is not expected:
        # the lease of a process gone on this host is free at once)
        assert code in (0, None), (log, output[-4000:])

    code, output = run(score_new, env, None)
    assert code == 0, (log, output[-4000:])

    night = results / "nights" / NIGHT
    scores = pd.read_parquet(night / "scores.parquet")
    errors = pd.read_parquet(night / "errors.parquet") if (night / "errors.parquet").exists() else pd.DataFrame(
        columns=["uri"])
    assert not scores.duplicated(["uri", "model_version"]).any(), scores.sort_values("uri")
    listed = {str(p) for p in archive.glob("*.png")}
    assert listed <= set(scores.uri) | set(errors.uri), (log, sorted(listed - set(scores.uri) - set(errors.uri)))
    assert set(errors.uri) == {str(archive / "broken.png")}, errors
    assert not errors.duplicated(["uri", "model_version"]).any(), errors
    history = pd.read_parquet(results / "history" / f"{NIGHT}.parquet")   # the trend's row counts the tables
    assert (history.rows.item(), history.errors.item()) == (len(scores), len(errors)), (log, history)
    current = json.loads((root / "current.json").read_text())["version"]
    assert (root / "versions" / current / "manifest.json").exists(), current
    elapsed = time.monotonic() - started
    print(f"soak: {CYCLES} cycles in {elapsed:.0f} s: {log}")
