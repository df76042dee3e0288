#!/usr/bin/env python
"""Issue 15's throughput targets, measured in one run and set side by side with their targets.

Each part calls the measuring function of the benchmark that owns it, at the sizes this run
states (smaller than that benchmark's own defaults unless ``--full``), and the summary table
gives every figure against its target:

- ``runtime`` (bench_runtime.measure, in a fresh process): the backbone with torch eager, ONNX
  Runtime and OpenVINO, one thread: MTD feature extraction end to end and one 512 x 512 forward
  pass; target: the CPU default runtime at least 2x torch eager. Torch on CUDA is measured only
  where ``torch.cuda.is_available()``; otherwise the table says it was not measured;
- ``score`` (bench_score_profile.py as a subprocess, its JSON read back): score time per image
  around the backbone on MTD test images and on one 8192 x 8192 mosaic, and the backbone's share
  of it; target: backbone >= 80 % of score time;
- ``metrics`` (bench_metrics.measure, the streamed metrics only, the median of METRICS_ROUNDS fresh
  processes, each with the evaluate flow imported as in ``patchwatch evaluate``): metrics time as a
  share of the time that scored the same test images (target <= 10 %), and the metrics' peak memory
  on the test set repeated 4x against 1x (target <= 1.2x);
- ``png`` (bench_large_png.measure): a 12000 x 12000 PNG scored against the same pixels as a
  tiled TIFF (target: PNG time <= 1.3x the TIFF's);
- ``noop`` (bench_noop.measure, this tree's code only): ``patchwatch fit`` with nothing new and
  ``patchwatch models`` as fresh processes (target: each under 5 s).

    python bench/bench_throughput.py                      # reduced sizes (stated in the table): ~20 min on 2 busy cores
    python bench/bench_throughput.py --full               # every part at its own benchmark's full size (hours)
    python bench/bench_throughput.py --parts runtime,noop --out /tmp/bench
"""
from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

sys.path.insert(0, str(common.REPO))

PARTS = ("runtime", "score", "metrics", "png", "noop")
# part sizes: this run's reduced ones, and (--full) each benchmark's own full run
REDUCED = {"runtime_rounds": 3, "runtime_images": 150, "runtime_train": 20, "runtime_passes": 3,
           "score_train": "all", "score_test": 100, "large_side": 8192,
           "metrics_train": 0, "metrics_test": 0, "metrics_scales": "1,4",
           "png_side": 12000, "png_repeats": 3, "noop_images": 6, "noop_repeats": 3}
FULL = {"runtime_rounds": 7, "runtime_images": 0, "runtime_train": 100, "runtime_passes": 2,
        "score_train": "30,all", "score_test": 200, "large_side": 8192,
        "metrics_train": 0, "metrics_test": 0, "metrics_scales": "1,4",
        "png_side": 12000, "png_repeats": 3, "noop_images": 6, "noop_repeats": 3}
NOOP_LIMIT_S = 5.0
# streamed-metrics runs (each a fresh process), the median kept: on a busy host one run of MTD's 581
# maps ranged 1.36-2.32 s over 6 such processes (1.61-3.24 s without the evaluate flow's imports)
METRICS_ROUNDS = 3


# ---- the parts ---------------------------------------------------------------------------------------
def runtime_part(split: str, sizes: dict) -> dict:
    import bench_runtime

    return common.run_fresh(bench_runtime.measure, split, sizes["runtime_rounds"], sizes["runtime_images"],
                            sizes["runtime_train"], sizes["runtime_passes"], batch=False)


def score_part(split: str, sizes: dict, tmp: Path) -> dict:
    """bench_score_profile.py in a subprocess (its own command line), its JSON read back."""
    out = tmp / "score_profile"
    command = [sys.executable, str(Path(__file__).resolve().parent / "bench_score_profile.py"), "--split", split,
               "--train-limits", str(sizes["score_train"]), "--test-limit", str(sizes["score_test"]),
               "--large-side", str(sizes["large_side"]), "--out", str(out), "--name", "score_profile"]
    log = tmp / "score_profile.log"
    with open(log, "w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=common.REPO)
    if done.returncode != 0:
        raise RuntimeError(f"bench_score_profile.py exited {done.returncode}: {log.read_text()[-1500:]}")
    data = json.loads((out / "score_profile.json").read_text())
    data["argv"] = ["python", *command[1:]]
    return data


def metrics_part(split: str, sizes: dict, tmp: Path) -> dict:
    import bench_metrics

    return bench_metrics.measure(split, sizes["metrics_train"] or None, sizes["metrics_test"] or None,
                                 sizes["metrics_scales"], tmp / "metrics", threads=1, exact=False, sweep=False,
                                 rounds=METRICS_ROUNDS)


def png_part(split: str, sizes: dict) -> dict:
    import bench_large_png

    return bench_large_png.measure(split, sizes["png_side"], sizes["png_repeats"])


def noop_part(split: str, sizes: dict) -> dict:
    import bench_noop

    return bench_noop.measure(split, sizes["noop_images"], sizes["noop_repeats"], old=None)


# ---- summary rows ------------------------------------------------------------------------------------
def target_row(measurement: str, value: float | None, op: str | None, target: float | None, unit: str,
               measured_on: str, text: str | None = None) -> dict:
    """One summary row. ``op``: ">=", "<=" or "<" (None: a figure reported without a target)."""
    shown = {"x": "{:.2f}x", "%": "{:.1%}", "s": "{:.2f} s"}
    met = None
    if value is not None and op is not None:
        met = value >= target if op == ">=" else value <= target if op == "<=" else value < target
    return {"measurement": measurement,
            "figure": text if value is None else shown.get(unit, "{:.3g} " + unit).format(value),
            "target": "-" if op is None else f"{op} {({**shown, '%': '{:.0%}'}).get(unit, '{} ' + unit).format(target)}",
            "met?": "-" if met is None else ("yes" if met else "NO"),
            "figure ÷ target": None if value is None or op is None else round(value / target, 3),
            "measured on": measured_on, "value": value, "op": op, "target value": target}


def not_measured(part: str, measurements: list[str], why: str) -> list[dict]:
    return [target_row(name, None, None, None, "", "-", f"not measured: {why}") for name in measurements]


def runtime_rows(result: dict, sizes: dict) -> list[dict]:
    from patchwatch.anomaly.features import PatchFeatureExtractor
    from patchwatch.anomaly.runtime import CPU_DEFAULT_RUNTIME

    policy = inspect.signature(PatchFeatureExtractor).parameters["shapes"].default
    default = f"{CPU_DEFAULT_RUNTIME} {policy}"
    mtd = {row["runtime"]: row for row in result["mtd"]}
    forward = {row["input (h x w)"]: row for row in result["forward"]}
    images = result["facts"]["test images"]
    on = f"{images} MTD test images x {sizes['runtime_passes']} passes, 1 thread, compiles included"
    rows = [target_row(f"backbone, CPU default ({default}) vs torch eager: MTD extraction end to end",
                       mtd[default]["torch ÷ runtime (all passes)"], ">=", 2.0, "x", on),
            target_row(f"backbone, CPU default ({default}) vs torch eager: one 512 x 512 forward pass",
                       forward["512 x 512"][f"torch ÷ {default}"], ">=", 2.0, "x",
                       f"median of {sizes['runtime_rounds']} rounds, 1 thread")]
    for name, row in mtd.items():
        if name not in ("torch", default, "torch cuda") and name.endswith(policy):
            rows.append(target_row(f"backbone, {name} vs torch eager: MTD extraction (not the default)",
                                   row["torch ÷ runtime (all passes)"], None, None, "x", on))
    if "torch cuda" in mtd:
        rows.append(target_row(f"backbone, torch on CUDA ({result['facts']['GPU']}) vs torch eager on the CPU: "
                               "MTD extraction", mtd["torch cuda"]["torch ÷ runtime (all passes)"], None, None, "x", on))
    else:
        rows.append(target_row("backbone, torch on CUDA", None, None, None, "", "-",
                               "not measured in this run: no GPU here (torch.cuda.is_available() is False)"))
        rows += recorded_gpu_rows()
    return rows


def recorded_gpu_rows(path: Path = common.DEFAULT_OUT / "gpu.json") -> list[dict]:
    """Where this machine has no GPU: bench_gpu.py's last recorded run on one (bench/results/gpu.*),
    labelled as such: its 8192 px tiles and 256 px images, batch 32, against CPU torch there."""
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not recorded.get("gpu"):
        return []
    wanted = {("patchcore", "256 x 256"), ("patchcore", "8192 x 8192 in 441 tiles of 512")}
    rows = []
    for row in recorded["sections"][0]["rows"]:
        if (row["features"], row["input"]) in wanted and row["variant"] == "cuda b32":
            rows.append(target_row(f"backbone, torch on CUDA batch 32 vs torch on one CPU thread: {row['input']} "
                                   f"(recorded, not this run)", row["÷ cpu torch (1 thread)"], None, None, "x",
                                   f"{recorded['gpu']}, {recorded['date']}, {path.name}: {row['images/s']} images/s, "
                                   f"{row['Mpx/s']} Mpx/s"))
    return rows


def _count(value) -> int | None:
    """A row count as bench_score_profile writes it (8021, "8,021"; "-" or None: none)."""
    text = str(value).replace(",", "").strip() if value is not None else ""
    return int(text) if text.isdigit() else None


def _memory_rows(section: dict) -> int | None:
    if section.get("memory_rows") is not None:
        return _count(section["memory_rows"])
    found = re.search(r"memory of ([\d,]+) rows", section["title"])
    return _count(found.group(1)) if found else None


def _score_figures(data: dict) -> list[dict]:
    """From bench_score_profile's JSON, one entry per row of its backbone-share table (detector,
    memory rows, image set): the current path's backbone share and score ms per image (its 'after'
    columns where it also shows a 'before' path)."""
    shares = next(s for s in data["sections"] if any("backbone share" in key for key in s["rows"][0]))
    figures = []
    for row in shares["rows"]:
        key = "backbone share after" if "backbone share after" in row else next(k for k in row if "backbone share" in k)
        figures.append({"detector": row.get("detector", "PatchCore"), "memory": _count(row.get("memory rows")),
                        "images": str(row["images"]), "share": row[key], "ms": None})
    for section in data["sections"]:
        total = next((r for r in section["rows"] if str(r.get("stage", "")).startswith("score time")), None)
        if total is None:
            continue
        memory = _memory_rows(section)
        columns = {}
        for key, value in total.items():
            found = re.fullmatch(r"(.+?) (?:after )?ms/image", key)
            if found and not key.endswith("before ms/image"):
                columns[found.group(1)] = value
        for entry in figures:
            if entry["memory"] != memory:
                continue
            for name in (f"{entry['detector'].split()[0]} {entry['images']}", entry["images"]):
                if columns.get(name) is not None:
                    entry["ms"] = columns[name]
                    break
    return figures


def score_rows(data: dict, sizes: dict) -> list[dict]:
    rows = []
    for entry in _score_figures(data):
        side = re.fullmatch(r"(\d+)px", entry["images"])
        what = (f"one {side.group(1)} x {side.group(1)} mosaic (512 px tiles)" if side
                else f"{entry['images']} test images, whole")
        on = ((f"memory of {entry['memory']:,} rows; " if entry["memory"] is not None else "")
              + (f"1 image of {side.group(1)}^2 px" if side else f"{sizes['score_test']} test images"))
        label = f"{entry['detector']}, {what}"
        ms = entry["ms"]
        if ms is not None and side:
            pixels = int(side.group(1)) ** 2
            rows.append(target_row(f"score throughput, {label}", pixels / 1e6 / (ms / 1000), None, None, "Mpx/s",
                                   on + f"; {ms / 1000:.1f} s per image"))
        elif ms is not None:
            rows.append(target_row(f"score throughput, {label}", 1000 / ms, None, None, "images/s",
                                   on + f"; {ms:.1f} ms per image"))
        rows.append(target_row(f"backbone share of score time, {label}", entry["share"], ">=", 0.80, "%", on))
    return rows


def metrics_rows(result: dict, sizes: dict) -> list[dict]:
    info, runs = result["info"], result["runs"]
    scales = sorted(scale for variant, scale in runs if variant == "new")
    low, high = runs[("new", scales[0])], runs[("new", scales[-1])]
    on = f"{info['test_images']} MTD test images, memory of {info['train_images']} train images"
    return [target_row("metrics time ÷ scoring time (streamed pixel + image metrics, same test images)",
                       low["total_s"] / info["score_s"], "<=", 0.10, "%",
                       on + f"; {low['total_s']:.1f} s vs {info['score_s']:.1f} s"),
            target_row(f"metrics peak memory, test set {scales[-1]}x ÷ {scales[0]}x",
                       high["peak_mib"] / low["peak_mib"], "<=", 1.2, "x",
                       on + f"; {high['peak_mib']:.0f} vs {low['peak_mib']:.0f} MiB peak (the whole process, the evaluate "
                       f"flow imported); the metrics' own step {high['peak_mib'] - high['baseline_mib']:.0f} vs "
                       f"{low['peak_mib'] - low['baseline_mib']:.0f} MiB")]


def png_rows(result: dict, sizes: dict) -> list[dict]:
    side = sizes["png_side"]
    same = "maps equal" if result["maps equal"] else "maps DIFFER"
    return [target_row(f"PNG ÷ TIFF scoring time, the same {side} x {side} pixels", result["png ÷ tiff"], "<=", 1.3,
                       "x", f"1 image, {sizes['png_repeats']} repeat(s); {same}")]


def noop_rows(result: dict, sizes: dict) -> list[dict]:
    on = f"median of {sizes['noop_repeats']} fresh processes; root of {sizes['noop_images']} images"
    medians = result["median new s"]
    return [target_row("`patchwatch fit` with nothing new", medians["fit, nothing new"], "<", NOOP_LIMIT_S, "s", on),
            target_row("`patchwatch models`", medians["models"], "<", NOOP_LIMIT_S, "s", on)]


PLANNED = {"runtime": ["backbone, CPU default vs torch eager", "backbone, torch on CUDA"],
           "score": ["score throughput and backbone share of score time"],
           "metrics": ["metrics time ÷ scoring time", "metrics peak memory 4x ÷ 1x"],
           "png": ["PNG ÷ TIFF scoring time"], "noop": ["`patchwatch fit` with nothing new", "`patchwatch models`"]}


# ---- the run -----------------------------------------------------------------------------------------
def main() -> None:
    parser = common.base_parser(__doc__.split("\n\n")[0], "throughput")
    for action in parser._actions:  # base_parser's --limit: each part has its own size options here
        if action.dest == "limit":
            action.help = argparse.SUPPRESS
    parser.add_argument("--parts", default=",".join(PARTS), help="parts to run (default %(default)s)")
    parser.add_argument("--full", action="store_true", help="each part at its own benchmark's full size")
    for key, value in REDUCED.items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=None,
                            help=f"(default {value}; --full: {FULL[key]}; images 0: every row of the split)")
    parser.add_argument("--tmp", default=None, help="parent folder of the run's scratch folder")
    args = parser.parse_args()
    if args.limit is not None:
        parser.error("--limit does not apply here: use the parts' own size options")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))} (choose from {', '.join(PARTS)})")
    sizes = {key: getattr(args, key) if getattr(args, key) is not None else (FULL if args.full else REDUCED)[key]
             for key in REDUCED}

    import torch

    torch.set_num_threads(1)  # as on the Dask workers (and before machine_info, which records it)
    started, machine = time.perf_counter(), common.machine_info()
    summary, sections, timings, failures = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-throughput-", dir=args.tmp) as tmp:
        tmp = Path(tmp)
        for part in PARTS:
            if part not in parts:
                summary += not_measured(part, PLANNED[part], f"part {part!r} not run (--parts)")
                continue
            print(f"\n== {part} ==", flush=True)
            load, part_started = os.getloadavg()[0], time.perf_counter()
            try:
                if part == "runtime":
                    result = runtime_part(args.split, sizes)
                    import bench_runtime

                    summary += runtime_rows(result, sizes)
                    sections += [{**s, "title": f"runtime: {s['title']}"} for s in bench_runtime.sections(result)]
                elif part == "score":
                    data = score_part(args.split, sizes, tmp)
                    summary += score_rows(data, sizes)
                    sections += [{**s, "title": f"score: {s['title']}",
                                  "notes": [*s.get("notes", []), f"from `{' '.join(data['argv'])}`"]}
                                 for s in data["sections"]]
                elif part == "metrics":
                    result = metrics_part(args.split, sizes, tmp)
                    import bench_metrics

                    summary += metrics_rows(result, sizes)
                    sections += [{**s, "title": f"metrics: {s['title']}"} for s in bench_metrics.sections(result)]
                elif part == "png":
                    result = png_part(args.split, sizes)
                    summary += png_rows(result, sizes)
                    sections.append({"title": "png: scoring one large image", "rows": result["rows"],
                                     "notes": result["notes"]})
                else:
                    result = noop_part(args.split, sizes)
                    summary += noop_rows(result, sizes)
                    sections.append({"title": "noop: wall time per command", "rows": result["rows"],
                                     "notes": result["notes"]})
                outcome = "done"
            except Exception as error:  # one part's failure must not cost the others' figures
                traceback.print_exc()
                failures.append(part)
                outcome = f"failed: {type(error).__name__}: {' '.join(str(error).split())[:300]}"
                summary += not_measured(part, PLANNED[part], f"part {part!r} failed ({type(error).__name__})")
            timings.append({"part": part, "wall s": time.perf_counter() - part_started,
                            "load average (1 min) at its start": round(load, 2), "outcome": outcome})
            print(f"== {part}: {outcome} ({timings[-1]['wall s']:.0f} s) ==", flush=True)

    met = [row["met?"] for row in summary if row["met?"] != "-"]
    notes = [f"{met.count('yes')} of {len(met)} targets met",
             "figure ÷ target: >= targets are met at 1 or more, <= and < targets at 1 or less",
             "measured on: the sizes this run used (smaller than each benchmark's own defaults unless --full; "
             "the size options below scale each part up)",
             "every part ran in this one command, one after the other, on the same machine and load "
             "(its wall time and load average in the 'parts' table)"]
    shown = [{key: row[key] for key in ("measurement", "figure", "target", "met?", "figure ÷ target", "measured on")}
             for row in summary]
    meta = {"command": common.command_line(), "date": common.utc_now(), "machine": machine,
            "wall_s": time.perf_counter() - started,
            "parameters": {"parts": ",".join(parts), "sizes": "full" if args.full else "reduced", **sizes}}
    common.report(args.out, args.name, "Issue 15's throughput targets in one run", meta, [
        {"title": "Summary: every target of issue 15, side by side", "rows": shown, "notes": notes,
         "values": summary},
        {"title": "Parts of this run", "rows": timings},
        *sections,
    ])
    if failures:
        sys.exit(f"parts failed: {', '.join(failures)}")


if __name__ == "__main__":
    main()
