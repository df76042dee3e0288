#!/usr/bin/env python
"""Benchmark the incremental re-fit against a full re-fit (MTD).

The train rows of the split, sorted by image path, are cut into an "initial" 80 % and an
"arriving" 20 % (every ``--arrive-every``-th row arrives). Two split CSVs are written to a work
folder (absolute paths): the initial train rows and the initial + arriving train rows, each with
every test row. Then, each step in a fresh process exactly as ``patchwatch fit --images CSV
--split train --workers K [--full]`` runs it (``dask_cluster`` + ``run_on_dask(fit_flow)``):

  (a) fit ROOT_A on the initial train rows                       -> A v0001
  (b) re-fit ROOT_A on all train rows: incremental, only the
      arriving images are featurised, the coreset is extended     -> A v0002
  (c) fit ROOT_B from scratch on all train rows                   -> B v0001
  (d) ``fit --full`` on ROOT_A: re-selects the coreset from the
      same bank, nothing is featurised                             -> A v0003

After each fit, the same process scores the test rows with the version it made (as ``patchwatch
score --split test --version vNNNN``). The metrics are computed from the score table and the
maps as ``flows/evaluate.py`` does (``anomaly.metrics.evaluate_detection``).

    python bench/bench_refit.py                                   # full MTD train + test split
    python bench/bench_refit.py --limit 100 --test-limit 60       # a quick check
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

STEPS = [  # (key, label, root, images csv, full)
    ("a", "(a) initial", "A", "initial", False),
    ("b", "(b) incremental", "A", "all", False),
    ("c", "(c) from scratch", "B", "all", False),
    ("d", "(d) --full on A", "A", "all", True),
]


# ---- one step, in its own process -------------------------------------------------------------------
def step_child(spec_path: str) -> None:
    """Fit as the CLI does, then score the test rows with the version the fit made; write the
    summaries next to the spec."""
    spec = json.loads(Path(spec_path).read_text())
    from patchwatch.flows.fit import fit_flow
    from patchwatch.flows.runner import dask_cluster, run_on_dask
    from patchwatch.flows.score import score_flow

    started = time.perf_counter()
    with dask_cluster(None, spec["workers"]) as address:
        cluster_s = time.perf_counter() - started
        t0 = time.perf_counter()
        fit = run_on_dask(fit_flow, address, images=spec["images"], root=spec["root"], split="train",
                          batch_size=spec["batch_size"], full=spec["full"])
        fit_call_s = time.perf_counter() - t0
        if not fit.get("refit"):
            raise SystemExit(f"the fit made no new version: {fit.get('message')}")
        t0 = time.perf_counter()
        scored = run_on_dask(score_flow, address, images=spec["images"], root=spec["root"],
                             results=spec["results"], split="test", batch_size=spec["batch_size"],
                             version=fit["version"])
        score_call_s = time.perf_counter() - t0
    fit = {k: v for k, v in fit.items() if k != "errors"} | {"errors": len(fit["errors"])}
    scored = {k: v for k, v in scored.items() if k != "errors"} | {"errors": len(scored["errors"])}
    Path(spec["result"]).write_text(json.dumps(
        {"fit": fit, "score": scored, "cluster_start_s": cluster_s, "fit_call_s": fit_call_s,
         "score_call_s": score_call_s}, indent=2))


def run_step(work: Path, key: str, images: Path, root: Path, full: bool, workers: int, batch_size: int,
             env: dict) -> dict:
    spec = {"images": str(images), "root": str(root), "full": full, "workers": workers, "batch_size": batch_size,
            "results": str(work / f"results-{key}"), "result": str(work / f"step-{key}.json")}
    spec_path = work / f"step-{key}.spec.json"
    spec_path.write_text(json.dumps(spec))
    log = work / f"step-{key}.log"
    started = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run([sys.executable, __file__, "--step-child", str(spec_path)],
                              stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=common.REPO)
    if done.returncode != 0:
        raise SystemExit(f"step ({key}) failed (exit {done.returncode}); log {log}:\n{log.read_text()[-4000:]}")
    result = json.loads(Path(spec["result"]).read_text())
    result["process_wall_s"] = time.perf_counter() - started
    result["results"] = spec["results"]
    return result


# ---- split CSVs -------------------------------------------------------------------------------------
def write_splits(split_csv: str, work: Path, limit: int | None, test_limit: int | None, every: int) -> dict:
    """initial.csv (initial train rows + test rows) and all.csv (all train rows + test rows), with
    absolute paths; which train rows arrive: every ``every``-th of the rows sorted by image path."""
    import pandas as pd

    table = pd.read_csv(split_csv, dtype=str, keep_default_na=False)
    base = Path(split_csv).resolve().parent
    # these CSVs live in the scratch folder and name the dataset's images where they are
    os.environ.setdefault("PATCHWATCH_ALLOW_SOURCES", str(base))
    for column in ("image", "mask"):
        table[column] = [str(base / p) if p else "" for p in table[column]]
    train = table[table.split == "train"].sort_values("image", kind="stable").reset_index(drop=True)
    test = table[table.split == "test"].sort_values("image", kind="stable").reset_index(drop=True)
    train = train.iloc[_spread_index(len(train), limit)].reset_index(drop=True)
    test = test.iloc[_spread_index(len(test), test_limit)]
    arriving = np.arange(len(train)) % every == every - 1
    initial = train[~arriving]
    paths = {"initial": work / "initial.csv", "all": work / "all.csv"}
    pd.concat([initial, test]).to_csv(paths["initial"], index=False)
    pd.concat([train, test]).to_csv(paths["all"], index=False)
    return {"paths": paths, "train": len(train), "initial": len(initial), "arriving": int(arriving.sum()),
            "test": len(test), "test_good": int((test.label == "good").sum()),
            "test_defect": int((test.label == "defect").sum())}


def _spread_index(count: int, limit: int | None) -> list[int]:
    return common.spread(list(range(count)), limit)


# ---- measurements on the fitted versions ----------------------------------------------------------------
def test_metrics(results: str, threshold: float | None) -> dict:
    """Image AUROC, pixel AUROC and AUPRO of the scored test rows (as flows/evaluate.py computes
    them), and the share of nominal / defect test images flagged at the version's threshold."""
    from patchwatch.anomaly.metrics import evaluate_detection
    from patchwatch.storage.images import read_mask
    from patchwatch.storage.results_store import ResultStore

    store = ResultStore(results)
    table = store.scores().sort_values("image_id").reset_index(drop=True)
    labels, masks, maps = [], [], []
    for row in table.itertuples(index=False):
        amap = store.read_map(row.image_id)
        has_mask = isinstance(row.mask_uri, str) and row.mask_uri
        masks.append(read_mask(row.mask_uri, amap.shape) if has_mask else np.zeros(amap.shape, bool))
        maps.append(amap)
        labels.append(row.label == "defect")
    labels = np.array(labels)
    scores = table.score.to_numpy()
    metrics = evaluate_detection(labels, scores, masks, maps, table.defect_type.fillna("").to_numpy())
    flagged = scores > threshold if threshold is not None else np.zeros(len(scores), bool)
    return {"test_images": int(len(table)), "image_auroc": metrics["image_auroc"],
            "pixel_auroc": metrics["pixel_auroc"], "aupro": metrics["aupro"], "f1_max": metrics["f1_max"],
            "nominal_flagged": float(flagged[~labels].mean()) if (~labels).any() else None,
            "defect_flagged": float(flagged[labels].mean()) if labels.any() else None,
            "per_defect_type": {k: v["image_auroc"] for k, v in metrics["per_defect_type"].items()}}


def exact_radius(root: str, version: str) -> float:
    """The version's memory's covering radius over every training row of the bank it was built from,
    in the projected space the coreset is selected in (exact)."""
    from patchwatch.anomaly.coreset import project, projection_matrix
    from patchwatch.anomaly.patchcore import PatchCoreConfig
    from patchwatch.storage.model_store import FeatureBank, ModelRegistry

    store = ModelRegistry(root).model(version)
    manifest = store.read_manifest()
    config = PatchCoreConfig.from_dict(manifest["detector_config"])
    bank = FeatureBank(root)
    batches = manifest["bank_batches"]
    memory = store.read_memory()
    matrix = projection_matrix(memory.shape[1], config.projection_dim, config.seed)
    points = np.concatenate([project(v, matrix) for _, v in bank.iter_batches(batches)]).astype(np.float32)
    return common.covering_radius(points, project(memory, matrix).astype(np.float32))


def row_of(label: str, root_name: str, result: dict, manifest: dict, metrics: dict, radius: float) -> dict:
    fit = result["fit"]
    return {"step": label, "model": f"{root_name} {fit['version']}", "parent": fit.get("parent") or "-",
            "incremental": bool(fit["incremental"]), "train images": manifest["source_listing"]["images"],
            "images featurised": fit["new_images"], "held out": fit["holdout_images"],
            "bank rows": fit["bank_rows"], "memory rows": fit["memory_rows"],
            "fit s": fit["fit_s"], "extract s": fit["extract_s"], "coreset s": fit["coreset_s"],
            "rest s": fit["fit_s"] - fit["extract_s"] - fit["coreset_s"], "fit call s": result["fit_call_s"],
            "radius (manifest)": manifest.get("covering_radius"), "radius (exact)": radius,
            "image AUROC": metrics["image_auroc"], "pixel AUROC": metrics["pixel_auroc"], "AUPRO": metrics["aupro"],
            "threshold": fit["threshold"], "nominal flagged": metrics["nominal_flagged"],
            "defect flagged": metrics["defect_flagged"]}


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__, "refit")
    parser.add_argument("--test-limit", type=int, default=None,
                        help="score only N test rows, evenly spread over them (default: all)")
    parser.add_argument("--arrive-every", type=int, default=5,
                        help="every N-th train row (sorted by path) arrives later (default %(default)s: 20 %%)")
    parser.add_argument("--workers", type=int, default=2, help="local Dask workers (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per work batch, as the CLI's (default %(default)s)")
    parser.add_argument("--tmp", default=None, help="folder for the work folder (default: system temp)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the work folder (roots, results, logs)")
    parser.add_argument("--step-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step_child:
        step_child(args.step_child)
        return 0

    import pandas as pd

    from patchwatch.storage.model_store import ModelRegistry

    started = time.perf_counter()
    meta = {"command": common.command_line(), "date": common.utc_now(), "machine": common.machine_info()}
    work = Path(tempfile.mkdtemp(prefix="patchwatch-bench-refit-", dir=args.tmp))
    env = dict(os.environ)
    env.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # as the CLI sets them
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # task results and the ephemeral Prefect database in the work folder: no cache hit from an
    # earlier run, no contention with other Prefect users of this machine, nothing left behind
    env["PREFECT_LOCAL_STORAGE_PATH"] = str(work / "prefect-results")
    env["PREFECT_HOME"] = str(work / "prefect-home")
    roots = {"A": work / "root-A", "B": work / "root-B"}
    try:
        split = write_splits(args.split, work, args.limit, args.test_limit, args.arrive_every)
        print(f"refit benchmark: {split['train']} train images ({split['initial']} initial, {split['arriving']} "
              f"arriving), {split['test']} test images; work folder {work}", flush=True)
        # warm the page cache: the first fit must not pay for cold disk reads alone
        for uri in pd.read_csv(split["paths"]["all"], dtype=str).image:
            Path(uri).read_bytes()
        rows, details, checks = [], {}, []
        for key, label, root_name, listing, full in STEPS:
            print(f"{label}: fit {'--full ' if full else ''}root {root_name} on {listing} train rows, "
                  f"then score the test rows ...", flush=True)
            result = run_step(work, key, split["paths"][listing], roots[root_name], full, args.workers,
                              args.batch_size, env)
            fit = result["fit"]
            manifest = ModelRegistry(str(roots[root_name])).model(fit["version"]).read_manifest()
            print(f"  {fit['version']}: {fit['new_images']} images featurised, fit_s {fit['fit_s']:.1f}, "
                  f"memory {fit['memory_rows']:,} of {fit['bank_rows']:,} rows; computing the metrics ...", flush=True)
            metrics = test_metrics(result["results"], fit["threshold"])
            radius = exact_radius(str(roots[root_name]), fit["version"])
            rows.append(row_of(label, root_name, result, manifest, metrics, radius))
            details[key] = {**result, "metrics": metrics, "exact_covering_radius": radius}
            print(f"  image AUROC {metrics['image_auroc']:.4f}, pixel AUROC {metrics['pixel_auroc']:.4f}, "
                  f"AUPRO {metrics['aupro']:.4f}", flush=True)
        expected = {"a": split["initial"], "b": split["arriving"], "c": split["train"], "d": 0}
        for key, count in expected.items():
            got = details[key]["fit"]["new_images"]
            checks.append(f"({key}) featurised {got} images, expected {count}: {'ok' if got == count else 'MISMATCH'}")
        checks.append(f"(b) incremental: {details['b']['fit']['incremental']} (expected True); "
                      f"(d) incremental: {details['d']['fit']['incremental']} (expected False)")
        bad = [c for c in checks if "MISMATCH" in c] + (
            ["(b) was not incremental"] if not details["b"]["fit"]["incremental"] else [])
    finally:
        if not args.keep_tmp:
            shutil.rmtree(work, ignore_errors=True)

    full_fit = next(r for r in rows if r["step"].startswith("(c)"))
    for row in rows:
        row["fit s ÷ (c)"] = common.ratio(row["fit s"], full_fit["fit s"])
    meta["wall_s"] = time.perf_counter() - started
    meta["parameters"] = {
        "split": args.split, "train images": split["train"], "initial train images": split["initial"],
        "arriving train images": f"{split['arriving']} (every {args.arrive_every}th train row, sorted by image path)",
        "test images": f"{split['test']} ({split['test_good']} good, {split['test_defect']} defect)",
        "Dask workers": args.workers, "batch size": args.batch_size,
        "FeatureConfig / PatchCoreConfig": "defaults", "holdout fraction / threshold quantile": "defaults (0.1 / 0.99)",
    }
    notes = [
        "each step in a fresh process, as `patchwatch fit --images CSV --split train --workers K [--full]` runs it "
        "(a fresh local Dask cluster of K single-threaded workers + run_on_dask(fit_flow)); the same process then "
        "scores the test rows with the new version (score_flow, as `patchwatch score --split test --version vNNNN`)",
        "fit s: the flow's own fit_s (listing the images .. version written and promoted: extraction, coreset, "
        "index, threshold); extract s / coreset s: its parts; rest s: the remainder (faiss index, threshold "
        "calibration on the held-out images' bank rows, writing the version, task orchestration); fit call s: "
        "wall time of the whole flow call (Prefect flow-run set-up included, cluster start not)",
        "images featurised: the fit's new_images (every image it featurised, held-out ones included); held out: "
        "the held-out nominal images the version's threshold is calibrated on (never in a memory); bank rows: the "
        "training rows the version was built from",
        "radius (manifest): the covering radius the fit records: for a full selection greedy's radius over the bank, for "
        "an incremental re-fit max(parent's radius, the extension's radius over the new rows), an upper bound; "
        "radius (exact): the memory's covering radius over every training row of the version's bank, "
        "measured here, in the same projected space",
        "metrics on the test rows: anomaly.metrics.evaluate_detection on the score table and the maps, as "
        "flows/evaluate.py computes them; nominal / defect flagged: share of the good / defect test images "
        "whose score exceeds the version's threshold (from held-out nominal train images only)",
        *checks,
    ]
    sections = [{"title": "Incremental re-fit vs full re-fit (MTD)", "rows": rows, "notes": notes},
                {"title": "Image AUROC per defect type", "rows": [
                    {"step": r["step"], **details[key]["metrics"]["per_defect_type"]}
                    for r, (key, *_) in zip(rows, STEPS)]}]
    meta["steps"] = details
    common.report(args.out, args.name, "patchwatch incremental re-fit benchmark", meta, sections)
    if bad:
        print("CHECK FAILED: " + "; ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
