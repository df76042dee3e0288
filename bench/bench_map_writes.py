#!/usr/bin/env python
"""A score task's anomaly maps written to S3 one by one against together (issue 15, item 2).

A loopback S3 endpoint (moto_server, started here as the tests start it and stopped by PID) and a
local folder for reference. Maps of MTD test images' own sizes (smooth random values, float32),
in tasks of 16 as the score-batch task writes them: ``ResultStore.write_map`` for each map in turn
(the code before) against ``ResultStore.write_maps`` for the task's maps (now: on an object store
their listings, chunks and metadata each sent at once). Rounds interleave the two, new names
first, then the same names again (each map replaces its earlier array). Per map: wall time and
this process's CPU time (the S3 client's signing and parsing); the endpoint's CPU is its own.

Moto answers on loopback from one Python process on this machine's 2 cores: its CPU, not the
network, bounds the requests here, so the ratio understates what a store with real round trips
(S3 from a worker: ~10-30 ms each) gains from sending them together.

    python bench/bench_map_writes.py [--maps 64] [--rounds 3]
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

sys.path.insert(0, str(common.REPO))

TASK = 16  # maps per score-batch task


def mtd_shapes(split: str, count: int) -> list[tuple[int, int]]:
    from patchwatch.storage.images import image_shape

    return [tuple(image_shape(r.uri)) for r in common.select_records(split, "test", count)]


def smooth_maps(shapes: list[tuple[int, int]], seed: int = 0) -> list[np.ndarray]:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    return [gaussian_filter(rng.random(shape) * 20, 4).astype(np.float32) for shape in shapes]


def timed_writes(store, maps: list[np.ndarray], prefix: str, together: bool) -> tuple[float, float]:
    """(wall s, CPU s) of writing ``maps`` in tasks of TASK."""
    wall, cpu = time.perf_counter(), time.process_time()
    for first in range(0, len(maps), TASK):
        items = [(f"{prefix}/m{k}.png", f"/src/{prefix}/m{k}.png", "v0001", maps[k])
                 for k in range(first, min(first + TASK, len(maps)))]
        if together:
            outcomes = store.write_maps(items)
            assert not any(isinstance(outcome, Exception) for outcome in outcomes), outcomes
        else:
            for item in items:
                store.write_map(*item)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = common.base_parser(__doc__, "map_writes")
    parser.add_argument("--maps", type=int, default=64, help="maps per timing (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default %(default)s)")
    args = parser.parse_args()

    from tests.servers import running_s3_server

    from patchwatch.storage.results_store import MapDescription, ResultStore

    started, machine = time.perf_counter(), common.machine_info()
    maps = smooth_maps(mtd_shapes(args.split, args.maps))
    timings: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="map-writes-") as work, running_s3_server(Path(work) / "s3") as s3:
        os.environ.update(s3.env)
        stores = {"S3 (moto, loopback)": ResultStore(s3.url("results")), "local folder": ResultStore(str(Path(work) / "local"))}
        for store in stores.values():
            store.prepare()
            store.describe_maps("v0001", MapDescription(image_threshold=1.0, pixel_threshold=1.0, units="u"))
            store.write_maps([("warm.png", "/src/warm.png", "v0001", maps[0])])  # sessions, group metadata
        for round_ in range(args.rounds):
            for where, store in stores.items():
                for names in ("new names", "same names again"):
                    order = (False, True) if round_ % 2 == 0 else (True, False)
                    for together in order:
                        # the same prefix in both passes: the second replaces the first's arrays
                        prefix = f"r{round_}-{'together' if together else 'one'}"
                        key = (where, names, "together" if together else "one by one")
                        timings.setdefault(key, []).append(timed_writes(store, maps, prefix, together))
                print(f"round {round_ + 1} {where}: " + ", ".join(
                    f"{n} {m} {timings[(where, n, m)][-1][0] / len(maps) * 1000:.1f} ms"
                    for n in ("new names", "same names again") for m in ("one by one", "together")), flush=True)
    rows = []
    for (where, names, mode), values in timings.items():
        wall = float(np.median([w for w, _ in values])) / len(maps) * 1000
        cpu = float(np.median([c for _, c in values])) / len(maps) * 1000
        rows.append({"store": where, "maps": names, "written": mode, "wall ms / map (median round)": wall,
                     "client CPU ms / map": cpu, "rounds wall ms / map": ", ".join(f"{w / len(maps) * 1000:.1f}" for w, _ in values)})
    for row in rows:
        base = next(r for r in rows if r["store"] == row["store"] and r["maps"] == row["maps"] and r["written"] == "one by one")
        row["wall ÷ one by one"] = row["wall ms / map (median round)"] / base["wall ms / map (median round)"]
    meta = {"command": common.command_line(), "date": common.utc_now(), "machine": machine, "measures_memory": False,
            "wall_s": time.perf_counter() - started,
            "parameters": {"split": args.split, "maps": len(maps), "task": TASK, "rounds": args.rounds,
                           "map sizes": f"MTD test images' own: {min(m.size for m in maps):,} to {max(m.size for m in maps):,} pixels"}}
    notes = ["one by one: ResultStore.write_map per map (each map's listing, chunk and metadata requests in turn); "
             "together: ResultStore.write_maps per task of 16 (storage.results_store.write_maps_together on S3; "
             "a local folder writes one after another either way)",
             "same names again: each map replaces the array its name got in the new-names pass of the round",
             "client CPU: this process's CPU time (s3fs, aiobotocore); moto's own CPU is not in it",
             "moto runs on this machine's 2 cores: its CPU bounds the requests, so the ratio understates a "
             "networked store's gain (there each request's round trip waits, and together they overlap)"]
    common.report(args.out, args.name, "Anomaly maps written to S3 one by one or together", meta,
                  [{"title": "Per map, tasks of 16", "rows": rows, "notes": notes}])


if __name__ == "__main__":
    main()
