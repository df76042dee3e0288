"""Backbone and kNN time inside a Dask worker under different glibc allocator settings.

One local Dask cluster (one single-threaded worker process) per setting, all started before any
timing; the settings go into ``distributed.nanny.pre-spawn-environ`` as ``flows.runner.dask_cluster``
does (glibc reads them at process start). Rounds are interleaved: each round times every setting
once, in turn, so a change in the machine's load falls on all of them alike. Each timing is the
default patch feature extraction (``PatchFeatureExtractor.extract``, one image at a time, as the fit
and score tasks run it) over the same MTD images, decoded beforehand; then PatchCore's nearest-neighbour
scoring of MTD test images in tasks of 16 (``PatchCore.image_scores_and_grids``, as the score-batch
task runs it) against a memory fitted here, in this process, on the train images (its size is what the
kNN's transient blocks scale with). The worker's resident memory after the round is recorded too
(what trimming is for).
Usage: python bench/bench_workers.py [--images 12] [--score-images 32] [--train-limit all] [--rounds 6]
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import (base_parser, command_line, fit_default_patchcore, machine_info, report,  # noqa: E402
                     select_records, utc_now)

DASK_DEFAULT = "Dask default (MALLOC_TRIM_THRESHOLD_=65536)"
SETTINGS = {  # name -> allocator variables over Dask's pre-spawn-environ (None: unset)
    DASK_DEFAULT: {},
    "trim threshold unset (glibc defaults)": {"MALLOC_TRIM_THRESHOLD_": None},
    "trim 65536 + MALLOC_MMAP_THRESHOLD_=32 MiB (patchwatch before)": {"MALLOC_MMAP_THRESHOLD_": "33554432"},
    "MALLOC_TRIM_THRESHOLD_=128 MiB": {"MALLOC_TRIM_THRESHOLD_": "134217728"},
    "trim 64 MiB + MALLOC_MMAP_THRESHOLD_=32 MiB (patchwatch)": {"MALLOC_MMAP_THRESHOLD_": "33554432",
                                                                 "MALLOC_TRIM_THRESHOLD_": "67108864"},
}
SCORE_TASK = 16  # images per nearest-neighbour pass, as the score-batch task groups them


def time_worker(uris: list[str], score_uris: list[str], memory: np.ndarray) -> dict:
    """Runs on the worker: ms per image of the default feature extraction and of PatchCore's kNN
    scoring, and the worker's memory."""
    import os

    from patchwatch.anomaly.detectors import default_features, detector_config, for_features
    from patchwatch.anomaly.patchcore import PatchCore
    from patchwatch.storage.images import read_image
    from patchwatch.tasks.runtime import feature_extractor  # sets torch to 1 thread, as in every task

    extractor = feature_extractor(default_features("patchcore"))
    images = [read_image(uri) for uri in uris]
    extractor.extract(images[:1])  # warm-up: lazy initialisation is not the steady state
    times, cpu = [], []
    for image in images:
        started, started_cpu = time.perf_counter(), time.process_time()
        extractor.extract([image])
        times.append((time.perf_counter() - started) * 1000)
        cpu.append((time.process_time() - started_cpu) * 1000)
    model = PatchCore(memory, for_features("patchcore", detector_config("patchcore"), default_features("patchcore")))
    features = [extractor.extract([read_image(uri)])[0] for uri in score_uris]
    model.image_scores_and_grids(features[:SCORE_TASK])  # warm-up, as for the backbone
    started, started_cpu = time.perf_counter(), time.process_time()
    for first in range(0, len(features), SCORE_TASK):
        model.image_scores_and_grids(features[first:first + SCORE_TASK])
    knn_ms = (time.perf_counter() - started) * 1000 / len(features)
    knn_cpu_ms = (time.process_time() - started_cpu) * 1000 / len(features)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"ms": times, "cpu_ms": cpu, "knn_ms": knn_ms, "knn_cpu_ms": knn_cpu_ms,
            "rss_mib": int(status["VmRSS"].split()[0]) / 1024,
            "env": {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")}}


def fit_memory(uris: list[str]) -> np.ndarray:
    """PatchCore's default memory (coreset) of these train images, fitted in this process."""
    import torch

    from patchwatch.anomaly.detectors import default_features
    from patchwatch.anomaly.features import PatchFeatureExtractor
    from patchwatch.anomaly.runtime import resolve_runtime

    torch.set_num_threads(1)
    extractor = PatchFeatureExtractor(default_features("patchcore"), runtime=resolve_runtime(None), threads=1)
    return fit_default_patchcore(extractor, uris).memory


def main() -> None:
    parser = base_parser(__doc__, "workers")
    parser.add_argument("--images", type=int, default=12, help="train images timed per round (default %(default)s)")
    parser.add_argument("--score-images", type=int, default=32,
                        help="test images scored by PatchCore per round, in tasks of 16 (default %(default)s)")
    parser.add_argument("--train-limit", default="all",
                        help="train images of the fitted memory; 'all': every train row (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default %(default)s)")
    args = parser.parse_args()

    import dask
    from distributed import Client, LocalCluster

    from patchwatch.flows.runner import worker_spawn_environ

    started, machine = time.perf_counter(), machine_info()
    uris = [r.uri for r in select_records(args.split, "train", args.images)]
    score_uris = [r.uri for r in select_records(args.split, "test", args.score_images)]
    train_uris = [r.uri for r in select_records(args.split, "train", None if args.train_limit == "all"
                                                else int(args.train_limit))]
    memory = fit_memory(train_uris)
    print(f"memory: {len(memory)} rows from {len(train_uris)} train images", flush=True)
    clusters, clients = {}, {}
    try:
        for name, allocator in SETTINGS.items():
            # the nanny puts its pre-spawn variables into this process's os.environ before it spawns
            # the worker, and a spawned worker inherits them: clear the previous cluster's first
            for key in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"):
                os.environ.pop(key, None)
            with dask.config.set({"distributed.nanny.pre-spawn-environ": worker_spawn_environ(allocator)}):
                clusters[name] = LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                              dashboard_address=None)
            clients[name] = Client(clusters[name])
        runs = {name: [] for name in SETTINGS}
        for round_ in range(args.rounds):
            for name in SETTINGS:
                result = clients[name].submit(time_worker, uris, score_uris, memory, pure=False).result()
                runs[name].append(result)
                print(f"round {round_ + 1} {name}: median {np.median(result['ms']):.1f} ms/image "
                      f"(CPU {np.median(result['cpu_ms']):.1f}), kNN {result['knn_ms']:.2f} ms/image "
                      f"(CPU {result['knn_cpu_ms']:.2f}), "
                      f"RSS {result['rss_mib']:.0f} MiB, env {result['env']}", flush=True)
    finally:
        for client in clients.values():
            client.close()
        for cluster in clusters.values():
            cluster.close()
    rows = []
    for name, results in runs.items():
        medians = [float(np.median(r["ms"])) for r in results]
        rows.append({"worker allocator setting": name,
                     "CPU ms / image (median)": float(np.median([t for r in results for t in r["cpu_ms"]])),
                     "wall ms / image (median)": float(np.median([t for r in results for t in r["ms"]])),
                     "round medians wall ms": ", ".join(f"{m:.0f}" for m in medians),
                     "kNN CPU ms / image (median round)": float(np.median([r["knn_cpu_ms"] for r in results])),
                     "kNN wall ms / image (median round)": float(np.median([r["knn_ms"] for r in results])),
                     "worker RSS MiB (last round)": results[-1]["rss_mib"],
                     "env seen by the worker": ", ".join(f"{k}={v}" for k, v in results[-1]["env"].items() if v)})
    for key, label in (("CPU ms / image (median)", "CPU"), ("wall ms / image (median)", "wall"),
                       ("kNN CPU ms / image (median round)", "kNN CPU")):
        for row in rows:
            row[f"{label} ÷ Dask default"] = row[key] / rows[0][key]
    meta = {"command": command_line(), "date": utc_now(), "machine": machine, "measures_memory": False,
            "wall_s": time.perf_counter() - started,
            "parameters": {"split": args.split, "images": len(uris), "score_images": len(score_uris),
                           "memory_rows": len(memory), "train_images": len(train_uris), "rounds": args.rounds}}
    notes = ["one LocalCluster (1 worker process, 1 thread) per setting, all started first; rounds interleaved",
             "CPU: the worker process's CPU time (user + system: page faults count) per image; wall: elapsed "
             "time, which the other load on this machine inflates (see the round medians)",
             "timed: PatchFeatureExtractor.extract with default_features('patchcore'), one image at a time, "
             "images decoded beforehand, one untimed warm-up image per round",
             f"kNN: PatchCore.image_scores_and_grids (every patch's map distance, each image's score with "
             f"eq. 7) over {len(score_uris)} MTD test images in tasks of {SCORE_TASK}, one untimed warm-up task, "
             f"against a memory of {len(memory):,} rows (PatchCore's defaults on {len(train_uris)} train images)",
             "worker RSS: VmRSS of the worker process after its round (images, features and model loaded)",
             "patchwatch's local cluster uses the 'patchwatch' row (flows/runner.py WORKER_ALLOCATOR_ENV)"]
    report(args.out, args.name, "Backbone and kNN time in a Dask worker by allocator setting", meta,
           [{"title": "Backbone and kNN per image", "rows": rows, "notes": notes}])


if __name__ == "__main__":
    main()
