#!/usr/bin/env python
"""Benchmark the pipeline (Prefect flows on Dask, Zarr bank).

1. feature-extraction throughput of the fit flow with 1 and 2 local Dask workers: each fit runs in
   a fresh process exactly as ``patchwatch fit --images CSV --split train --workers K`` does
   (``dask_cluster`` + ``run_on_dask(fit_flow, ...)``); the flow's own ``extract_s`` is the time
   from listing the images to the last bank batch written (backbone loads on the workers
   included), so images / extract_s is the extraction throughput;
2. the streamed coreset task (``select_coreset_task``) on 1x, 2x and 4x banks in Zarr: the bank the
   1-worker fit wrote (its training batches; held-out batches never enter a memory), followed by
   jittered copies, each written with ``FeatureBank.write_batch``; each bank's task runs in a fresh
   process with the same ``chunk_rows`` (the 1x bank's rows / 2 by default), so larger banks are
   selected composably in more groups; peak RSS, time, and the covering radius over the whole bank
   next to single-machine greedy's on the same bank.

    python bench/bench_pipeline.py                          # full MTD train split
    python bench/bench_pipeline.py --limit 40 --batch-size 8   # a quick check
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402


# ---- the fit, in its own process ----------------------------------------------------------------
def fit_child(spec_path: str) -> None:
    """Run the fit flow as the CLI does; write its summary next to the spec."""
    spec = json.loads(Path(spec_path).read_text())
    from patchwatch.anomaly.features import FeatureConfig
    from patchwatch.anomaly.patchcore import PatchCoreConfig
    from patchwatch.flows.fit import fit_flow
    from patchwatch.flows.runner import dask_cluster, run_on_dask

    started = time.perf_counter()
    with dask_cluster(None, spec["workers"]) as address:
        cluster_s = time.perf_counter() - started
        summary = run_on_dask(fit_flow, address, images=spec["images"], root=spec["root"], split="train",
                              feature_config=FeatureConfig().to_dict(),
                              detector_config=PatchCoreConfig(coreset_ratio=spec["coreset_ratio"]).to_dict(),
                              batch_size=spec["batch_size"])
    summary = {k: v for k, v in summary.items() if k != "errors"} | {"errors": len(summary["errors"])}
    summary |= {"cluster_start_s": cluster_s, "child_wall_s": time.perf_counter() - started}
    Path(spec["result"]).write_text(json.dumps(summary, indent=2))


def run_fit(work: Path, csv: Path, workers: int, run: int, batch_size: int, coreset_ratio: float) -> dict:
    tag = f"fit-w{workers}-r{run}"
    spec = {"images": str(csv), "root": str(work / tag), "workers": workers, "batch_size": batch_size,
            "coreset_ratio": coreset_ratio, "result": str(work / f"{tag}.json")}
    (work / f"{tag}.spec.json").write_text(json.dumps(spec))
    env = dict(os.environ)
    env.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # as the CLI sets them
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # task results go to a scratch folder: no cache hit from an earlier run, nothing left behind
    env["PREFECT_LOCAL_STORAGE_PATH"] = str(work / "prefect-results")
    log = work / f"{tag}.log"
    started = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run([sys.executable, __file__, "--fit-child", str(work / f"{tag}.spec.json")],
                              stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=common.REPO)
    if done.returncode != 0:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"fit with {workers} worker(s) failed (exit {done.returncode}); log {log}:\n{tail}")
    summary = json.loads(Path(spec["result"]).read_text())
    summary["process_wall_s"] = time.perf_counter() - started
    summary["workers"] = workers
    return summary


# ---- banks in Zarr --------------------------------------------------------------------------------
def model_root(root: str) -> str:
    """The version folder the coreset steps write their memory to (the bank roots hold no version)."""
    from patchwatch.storage.model_store import ModelRegistry

    return ModelRegistry(root).model("v0001").root


def write_scaled_stores(source_root: str, work: Path, scales: list[int], relative_jitter: float, seed: int) -> dict:
    """OUT/bank-Sx: the source bank's training batches, then S - 1 jittered copies of them, written
    with FeatureBank.write_batch in the same batch layout. Returns {scale: root} and the noise std."""
    from patchwatch.storage.model_store import TRAIN, FeatureBank

    source = FeatureBank(source_root)
    index = source.index(TRAIN)
    batches = source.batches(TRAIN)
    rows = sum(source.rows_per_batch(batches).values())
    dim = source.dim(batches[0])
    # noise std from the same rows of the 1x bank as the engine benchmark uses
    step = common.jitter_step(rows)
    sample, offset = [], 0
    for _, vectors in source.iter_batches(batches):
        sample.append(vectors[(-offset) % step::step])
        offset += len(vectors)
    sigma = common.sigma_of_sample(np.concatenate(sample), relative_jitter)
    del sample
    roots = {}
    for scale in scales:
        bank = FeatureBank(str(work / f"bank-{scale}x"))
        number = 0
        for copy in range(scale):
            offset = 0
            for batch in batches:
                vectors = source.read_batch(batch)
                vectors = vectors + common.jitter(copy, offset, offset + len(vectors), dim, sigma, seed) if copy else vectors
                parts = index[index.batch == batch].drop(columns="kind").to_dict("records")
                for part in parts:
                    part["batch"] = number
                    if copy:
                        part["image_id"] = f"{part['image_id']}#jitter{copy}"
                bank.write_batch(number, np.ascontiguousarray(vectors, dtype=np.float32), parts, 4096)
                offset += len(vectors)
                number += 1
        roots[scale] = bank.root
    batch_rows = [int(r.row_stop.max()) for _, r in index.groupby("batch", sort=True)]
    return {"roots": roots, "sigma": sigma, "rows": rows, "dim": dim, "batches": len(batches), "batch_rows": batch_rows}


def streaming_groups(batch_rows: list[int], chunk_rows: int) -> list[int]:
    """Rows of each group streaming_coreset selects separately (one group: exact in-memory greedy)."""
    if sum(batch_rows) <= chunk_rows:
        return [sum(batch_rows)]
    groups, pending = [], 0
    for rows in batch_rows:
        pending += rows
        if pending >= chunk_rows:
            groups.append(pending)
            pending = 0
    return groups + ([pending] if pending else [])


# ---- coreset steps, each in a fresh process --------------------------------------------------------
def streamed_coreset_step(root: str, chunk_rows: int) -> dict:
    """select_coreset_task's body on the bank under ``root`` (a full selection: no parent)."""
    from patchwatch.anomaly.patchcore import PatchCoreConfig
    from patchwatch.tasks.coreset import select_coreset_task

    baseline = common.mark_baseline()
    t0 = time.perf_counter()
    result = select_coreset_task.fn(root, model_root(root), PatchCoreConfig(), chunk_rows=chunk_rows)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "baseline_mib": baseline, "peak_mib": common.peak_rss_mib(), "task": result}


def reference_step(root: str) -> dict:
    """Single-machine greedy on the same bank (what select_coreset does: greedy_coreset over the whole
    projected bank, same projection, size and start), then the streamed memory's covering radius over
    the whole bank."""
    from patchwatch.anomaly.coreset import coreset_size, greedy_coreset, project, projection_matrix, start_index
    from patchwatch.anomaly.patchcore import PatchCoreConfig
    from patchwatch.storage.model_store import FeatureBank, ModelStore

    config = PatchCoreConfig()
    bank = FeatureBank(root)
    batches = bank.batches()
    rows, dim = sum(bank.rows_per_batch(batches).values()), bank.dim(batches[0])
    matrix = projection_matrix(dim, config.projection_dim, config.seed)
    width = dim if matrix is None else matrix.shape[1]
    # greedy_coreset works on float32: the projection is stored as such, batch by batch
    projected = np.empty((rows, width), np.float32)
    offset = 0
    for _, vectors in bank.iter_batches(batches):
        projected[offset:offset + len(vectors)] = project(vectors, matrix)
        offset += len(vectors)
    size = coreset_size(rows, config.coreset_ratio)
    baseline = common.mark_baseline()
    t0 = time.perf_counter()
    result = greedy_coreset(projected, size, start=start_index(rows, config.seed))
    seconds = time.perf_counter() - t0
    peak = common.peak_rss_mib()
    t0 = time.perf_counter()
    streamed = project(ModelStore(model_root(root)).read_memory(), matrix)
    streamed_radius = common.covering_radius(projected, streamed)
    return {"rows": int(rows), "coreset": int(size), "seconds": seconds, "baseline_mib": baseline, "peak_mib": peak,
            "covering_radius": result.covering_radius, "streamed_memory_rows": int(len(streamed)),
            "streamed_covering_radius": streamed_radius, "radius_check_s": time.perf_counter() - t0}


# ---- tables ----------------------------------------------------------------------------------------
def throughput_rows(fits: list[dict]) -> list[dict]:
    best = {}
    for fit in fits:
        rate = fit["new_images"] / fit["extract_s"]
        best[fit["workers"]] = max(best.get(fit["workers"], 0), rate)
    base = best.get(1) or next(iter(best.values()))
    rows = []
    for fit in fits:
        rate = fit["new_images"] / fit["extract_s"]
        rows.append({"workers": fit["workers"], "images": fit["new_images"], "held out": fit["holdout_images"],
                     "bank rows (training)": fit["bank_rows"],
                     "extract_s": fit["extract_s"], "images / s": rate,
                     "speed-up vs 1 worker (best runs)": best[fit["workers"]] / base,
                     "coreset_s": fit["coreset_s"], "fit_s (flow)": fit["fit_s"],
                     "cluster start s": fit["cluster_start_s"], "process wall s": fit["process_wall_s"]})
    return rows


def coreset_rows(results: list[dict], chunk_rows: int, batch_rows: list[int]) -> list[dict]:
    base = results[0]
    rows = []
    for r in results:
        s, ref = r["streamed"], r["reference"]
        step, base_step = s["peak_mib"] - s["baseline_mib"], base["streamed"]["peak_mib"] - base["streamed"]["baseline_mib"]
        rows.append({
            "bank": f"{r['scale']}x", "rows": ref["rows"], "coreset": s["task"]["memory_rows"],
            "groups": len(streaming_groups(batch_rows * r["scale"], chunk_rows)),
            "streamed s": s["seconds"], "time ÷ 1x": common.ratio(s["seconds"], base["streamed"]["seconds"]),
            "baseline MiB": s["baseline_mib"], "peak MiB": s["peak_mib"], "step MiB": step,
            "peak ÷ 1x": common.ratio(s["peak_mib"], base["streamed"]["peak_mib"]),
            "step ÷ 1x": common.ratio(step, base_step),
            "radius (task)": s["task"]["covering_radius"],
            "radius (whole bank)": ref["streamed_covering_radius"],
            "single-machine radius": ref["covering_radius"],
            "radius ÷ single-machine": common.ratio(ref["streamed_covering_radius"], ref["covering_radius"]),
        })
    return rows


def reference_rows(results: list[dict]) -> list[dict]:
    base = results[0]["reference"]
    rows = []
    for r in results:
        ref, s = r["reference"], r["streamed"]
        step = ref["peak_mib"] - ref["baseline_mib"]
        rows.append({"bank": f"{r['scale']}x", "rows": ref["rows"], "coreset": ref["coreset"],
                     "greedy s": ref["seconds"], "time ÷ 1x": common.ratio(ref["seconds"], base["seconds"]),
                     "baseline MiB (projected bank loaded)": ref["baseline_mib"], "peak MiB": ref["peak_mib"],
                     "step MiB": step, "streamed s ÷ greedy s": common.ratio(s["seconds"], ref["seconds"]),
                     "covering radius": ref["covering_radius"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__, "pipeline")
    parser.add_argument("--workers", default="1,2", help="Dask worker counts to compare (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=1, help="fits per worker count (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per work batch, as the CLI's (default %(default)s)")
    parser.add_argument("--fit-coreset-ratio", type=float, default=1e-4,
                        help="coreset ratio of the throughput fits: only their extraction is measured, so a "
                             "tiny coreset keeps their coreset step short (default %(default)s)")
    parser.add_argument("--scales", default="1,2,4", help="bank sizes for the streamed coreset (default %(default)s)")
    parser.add_argument("--chunk-rows", type=int, default=None,
                        help="chunk_rows of select_coreset_task for every bank (default: the 1x bank's rows / 2)")
    parser.add_argument("--jitter", type=float, default=0.05,
                        help="noise std of the jittered copies, relative to the bank's per-coordinate std "
                             "(default %(default)s)")
    parser.add_argument("--tmp", default=None, help="folder for the temporary model roots (default: system temp)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temporary folder")
    parser.add_argument("--fit-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fit_child:
        fit_child(args.fit_child)
        return 0

    import pandas as pd

    from patchwatch.anomaly.patchcore import PatchCoreConfig

    worker_counts = [int(w) for w in args.workers.split(",")]
    scales = sorted({int(s) for s in args.scales.split(",")} | {1})
    started = time.perf_counter()
    meta = {"command": common.command_line(), "date": common.utc_now(), "machine": common.machine_info()}
    records = common.select_records(args.split, "train", args.limit)
    work = Path(tempfile.mkdtemp(prefix="patchwatch-bench-pipeline-", dir=args.tmp))
    print(f"pipeline benchmark: {len(records)} train images from {args.split}; scratch {work}", flush=True)
    try:
        csv = work / "train.csv"
        # the CSV lives in the scratch folder and names the dataset's images where they are
        os.environ.setdefault("PATCHWATCH_ALLOW_SOURCES", str(Path(args.split).resolve().parent))
        pd.DataFrame([{"image": r.uri, "mask": r.mask_uri or "", "label": r.label or "",
                       "defect_type": r.defect_type or "", "split": "train"} for r in records]).to_csv(csv, index=False)
        for record in records:  # warm the page cache: the first fit must not pay for the disk alone
            Path(record.uri).read_bytes()

        fits = []
        for run in range(args.repeats):
            for workers in worker_counts:
                print(f"fit flow with {workers} Dask worker(s), run {run + 1} ...", flush=True)
                fits.append(run_fit(work, csv, workers, run, args.batch_size, args.fit_coreset_ratio))
                print(f"  {fits[-1]['new_images']} images, extract_s {fits[-1]['extract_s']:.1f}", flush=True)
        source = next(f["root"] for f in fits if f["workers"] == min(worker_counts))

        print("writing the 1x/2x/4x banks to Zarr ...", flush=True)
        t0 = time.perf_counter()
        banks = write_scaled_stores(source, work, scales, args.jitter, PatchCoreConfig().seed)
        write_s = time.perf_counter() - t0
        chunk_rows = args.chunk_rows or max(1, banks["rows"] // 2)
        results = []
        for scale in scales:
            root = banks["roots"][scale]
            print(f"streamed coreset on the {scale}x bank (chunk_rows {chunk_rows:,}) ...", flush=True)
            streamed = common.run_fresh(streamed_coreset_step, root, chunk_rows)
            print(f"single-machine greedy on the {scale}x bank, and the streamed coreset's radius ...", flush=True)
            reference = common.run_fresh(reference_step, root)
            results.append({"scale": scale, "streamed": streamed, "reference": reference})
    finally:
        if not args.keep_tmp:
            shutil.rmtree(work, ignore_errors=True)

    meta["wall_s"] = time.perf_counter() - started
    meta["parameters"] = {
        "split": args.split, "train images": len(records), "batch size": args.batch_size,
        "throughput fits: coreset ratio": args.fit_coreset_ratio, "FeatureConfig": "defaults",
        "coreset runs: PatchCoreConfig": "defaults",
        "1x bank": f"{banks['rows']:,} x {banks['dim']} float32 in {banks['batches']} batch arrays "
                   f"({banks['rows'] * banks['dim'] * 4 / common.MIB:,.0f} MiB)",
        "chunk_rows": chunk_rows, "jitter (relative to per-coordinate std)": args.jitter,
        "noise std": banks["sigma"], "writing the banks to Zarr (s)": write_s,
    }
    sections = [
        {"title": "Fit flow feature extraction: 1 vs 2 Dask workers", "rows": throughput_rows(fits),
         "notes": ["each fit in a fresh process, as `patchwatch fit --images CSV --split train --workers K` runs it "
                   "(dask_cluster + run_on_dask(fit_flow)); a fresh local cluster of K single-threaded worker processes",
                   "extract_s (from the flow's summary) = listing the images .. the last bank batch written: decoding, "
                   "backbone loads on the workers, feature extraction, Zarr writes and task orchestration; "
                   "cluster start is not included",
                   "images: every image the fit featurised, the held-out ones (their own bank batches, for the "
                   "threshold) included; bank rows (training): the rows of the other images, which the coreset "
                   "selects from",
                   f"the image files were read once beforehand (page cache warm); fits ran in the order "
                   f"{worker_counts} x {args.repeats}",
                   f"the throughput fits use coreset ratio {args.fit_coreset_ratio} (their coreset is not measured)"]},
        {"title": "Streamed coreset (select_coreset_task) vs bank size; one fresh process per bank",
         "rows": coreset_rows(results, chunk_rows, banks["batch_rows"]),
         "notes": [f"every bank read from Zarr with the same chunk_rows = {chunk_rows:,}: the 1x bank in "
                   f"{len(streaming_groups(banks['batch_rows'], chunk_rows))} group(s) (groups are whole batch "
                   "arrays gathered until they reach chunk_rows), larger banks composably in more groups",
                   "2x / 4x banks: the 1x bank written by the 1-worker fit, followed by copies with gaussian noise, "
                   "written batch by batch with FeatureBank.write_batch (training batches only: held-out batches "
                   "never enter a memory)",
                   "baseline = after imports (prefect, torch, faiss); step = peak - baseline; the task's time "
                   "includes reading the bank, gathering the memory rows and writing the memory",
                   "radius (task): the covering_radius select_coreset_task returns (and the fit stores in the "
                   "manifest); with more than one group the task measures it over the whole bank itself (one more "
                   "streamed pass, included in its time)",
                   "radius (whole bank): the streamed memory's covering radius over every row of the bank (exact), in "
                   "the same projected space; single-machine radius: greedy over the whole projected bank "
                   "(next table)"]},
        {"title": "Single-machine greedy on the same banks (reference); one fresh process per bank",
         "rows": reference_rows(results),
         "notes": ["greedy_coreset over the whole projected bank with select_coreset's projection, size and start "
                   "(the bank is projected batch by batch into one float32 array before the baseline mark, so "
                   "this is the least memory an in-memory selection needs; select_coreset itself also holds the "
                   "full-width bank: see bench_engine)"]},
    ]
    common.report(args.out, args.name, "patchwatch pipeline benchmark", meta, sections)
    return 0


if __name__ == "__main__":
    sys.exit(main())
