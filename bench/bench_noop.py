"""Commands that have little or nothing to do: a fit with nothing new, ``models``, ``promote``.

A model root is fitted once (``patchwatch fit --workers 1`` on ``--images`` MTD train images
copied into a folder). Then each command runs as a user runs it, a fresh ``patchwatch`` process,
timed from start to exit, with this tree's code ("new") and with the code of ``--old`` (a
``git archive`` of that commit, "old", the same virtualenv), alternating old/new for ``--repeats``
rounds. Runs go to a Prefect server started once for the benchmark (a user's server: no
temporary server per command), as ``PREFECT_API_URL``. :func:`measure` does it all (bench_throughput.py calls it
without the old code).
Usage: python bench/bench_noop.py [--old COMMIT] [--images 6] [--repeats 3] [--out bench/results]
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import REPO, base_parser, command_line, machine_info, report, select_records, utc_now  # noqa: E402

OLD_DEFAULT = "219a37c"  # before issue 15's no-op fit and lazy imports


def run(tree: Path, args: list[str], env: dict) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "patchwatch.cli", *args], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{tree}: patchwatch {' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}")
    return seconds


def measure(split: str, images: int = 6, repeats: int = 3, old: str | None = OLD_DEFAULT) -> dict:
    """Fit a root once, then time each command ``repeats`` times with this tree's code and (unless
    ``old`` is None) with commit ``old``'s. Returns the table's rows and notes and the raw times."""
    from tests.servers import running_prefect_server

    codes = ("old", "new") if old else ("new",)
    with tempfile.TemporaryDirectory(prefix="bench-noop-") as tmp:
        tmp = Path(tmp)
        trees = {"new": REPO}
        if old:
            trees["old"] = tmp / "old"
            trees["old"].mkdir()
            archive = subprocess.run(["git", "archive", old], cwd=REPO, capture_output=True, check=True).stdout
            tarfile.open(fileobj=io.BytesIO(archive)).extractall(trees["old"])
        folder = tmp / "nominal"
        folder.mkdir()
        for i, record in enumerate(select_records(split, "train", images)):
            shutil.copy(record.uri, folder / f"{i}-{Path(record.uri).name}")
        root = tmp / "model"
        with running_prefect_server(tmp / "prefect") as server:
            # PatchCore's fixed defaults (no --auto probe): the old code has no --auto, and the root's
            # configuration is then the same whatever --auto would choose for these few images
            env = {**os.environ, "PREFECT_API_URL": server.api_url, "PREFECT_HOME": str(tmp / "home"),
                   "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PATCHWATCH_AUTO": "0"}
            run(REPO, ["fit", "--images", str(folder), "--root", str(root), "--workers", "1"], env)
            commands = {"fit, nothing new": ["fit", "--images", str(folder), "--root", str(root), "--workers", "1"],
                        "models": ["models", "--root", str(root)],
                        "promote v0001": ["promote", "v0001", "--root", str(root)]}
            times = {(name, code): [] for name in commands for code in codes}
            for _ in range(repeats):
                for name, command in commands.items():
                    for code in codes:
                        times[(name, code)].append(run(trees[code], command, env))
                        print(f"{name} {code}: {times[(name, code)][-1]:.1f} s", flush=True)
    rows = []
    for name in commands:
        median = {code: float(np.median(times[(name, code)])) for code in codes}
        row = {"command": name, "old s (median)": median.get("old"), "new s (median)": median["new"],
               "new ÷ old": median["new"] / median["old"] if old else None,
               "old runs s": ", ".join(f"{t:.1f}" for t in times[(name, "old")]) if old else None,
               "new runs s": ", ".join(f"{t:.1f}" for t in times[(name, "new")])}
        rows.append({key: value for key, value in row.items() if old or "old" not in key})
    notes = ([f"old: the code of commit {old} (git archive), new: this tree; same virtualenv, same root"] if old else
             ["this tree's code only (no old commit)"])
    notes += ["each time: a fresh `python -m patchwatch.cli ...` process from start to exit (imports included)",
              "PATCHWATCH_AUTO=0: the root is fitted with PatchCore's fixed defaults, without the --auto probe",
              "runs reported to one Prefect server started for the benchmark (PREFECT_API_URL), as with a user's server",
              "fit, nothing new: this tree decides it in the command's own process (the listing against the bank, "
              "the settings against the current version), importing neither torch nor Prefect, and ends without a "
              "flow run or a cluster"
              + (f"; the old code as at {old} (219a37c: a local Dask cluster first; 3a1e987: the same decision, "
                 "after importing torch and Prefect)" if old else "")]
    return {"rows": rows, "notes": notes, "times": {f"{name} {code}": t for (name, code), t in times.items()},
            "median new s": {name: float(np.median(times[(name, "new")])) for name in commands}}


def main() -> None:
    parser = base_parser(__doc__, "noop")
    parser.add_argument("--old", default=OLD_DEFAULT, help="commit of the old code (default %(default)s)")
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    started, machine = time.perf_counter(), machine_info()
    result = measure(args.split, args.images, args.repeats, args.old)
    meta = {"command": command_line(), "date": utc_now(), "machine": machine, "measures_memory": False,
            "wall_s": time.perf_counter() - started,
            "parameters": {"old": args.old, "images": args.images, "repeats": args.repeats}}
    report(args.out, args.name, "Commands with nothing (or little) to do: old against new", meta,
           [{"title": "Wall time per command", "rows": result["rows"], "notes": result["notes"]}])

if __name__ == "__main__":
    main()
