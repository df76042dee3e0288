#!/usr/bin/env python
"""Anomaly maps written to S3 one by one against together (issue 15, item 2): a score task's
whole maps, and a tiled image's stitched map block by block.

A loopback S3 endpoint (moto_server, started here as the tests start it and stopped by PID) and a
local folder for reference. Maps of MTD test images' own sizes (smooth random values, float32),
in tasks of 16 as the score-batch task writes them: ``ResultStore.write_map`` for each map in turn
(the code before) against ``ResultStore.write_maps`` for the task's maps (now: on an object store
their listings, chunks and metadata each sent at once). Rounds interleave the two, new names
first, then the same names again (each map replaces its earlier array). Per map: wall time and
this process's CPU time (the S3 client's signing and parsing); the endpoint's CPU is its own.
A stitched map (``--stitched-side`` pixels square, chunks of 512) is written by
``MapWriter.write_block`` per chunk (before) against ``MapWriter.write_blocks`` per 16 chunks, as the
stitch-map task writes them now.

Moto answers on loopback from one Python process on this machine's 2 cores: its CPU, not the
network, bounds the requests there. A second phase puts ``bench/latency_proxy.py`` between the
client and moto (``--delay-ms`` each way: 20 ms round trips by default, a figure chosen for a
networked store, not S3's measured here), as a store whose requests each wait for their round trip.

    python bench/bench_map_writes.py [--maps 64] [--stitched-side 4096] [--rounds 3]
"""
from __future__ import annotations

import contextlib
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


def timed_stitched(store, values: np.ndarray, name: str, together: bool) -> tuple[float, float]:
    """(wall s, CPU s) of writing ``values`` as a stitched map, block by block or 16 at a time."""
    from patchwatch.tasks.tiles import BLOCKS_TOGETHER

    wall, cpu = time.perf_counter(), time.process_time()
    writer = store.open_map(f"{name}.tif", f"/src/{name}.tif", "v0001", values.shape)
    blocks = writer.whole_map_blocks(values)  # the map's 512 px chunks
    if together:
        for first in range(0, len(blocks), BLOCKS_TOGETHER):
            writer.write_blocks(blocks[first:first + BLOCKS_TOGETHER])
    else:
        for block in blocks:
            writer.write_block(*block)
    return time.perf_counter() - wall, time.process_time() - cpu


@contextlib.contextmanager
def latency_proxy(endpoint: str, delay_ms: float):
    """The URL of bench/latency_proxy.py in front of ``endpoint`` (a subprocess, stopped by PID)."""
    import socket
    import subprocess
    from urllib.parse import urlsplit

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    upstream = urlsplit(endpoint)
    process = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parent / "latency_proxy.py"),
                                "--listen", str(port), "--upstream", f"{upstream.hostname}:{upstream.port}",
                                "--delay-ms", str(delay_ms)])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the latency proxy did not start")
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def main() -> None:
    parser = common.base_parser(__doc__, "map_writes")
    parser.add_argument("--maps", type=int, default=64, help="maps per timing (default %(default)s)")
    parser.add_argument("--stitched-side", type=int, default=4096, help="side of the stitched map (default %(default)s)")
    parser.add_argument("--delay-ms", type=float, default=10.0,
                        help="one-way delay of the latency proxy's S3 (0: none; default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default %(default)s)")
    args = parser.parse_args()

    from tests.servers import running_s3_server

    import s3fs

    from patchwatch.storage.results_store import MapDescription, ResultStore

    started, machine = time.perf_counter(), common.machine_info()
    maps = smooth_maps(mtd_shapes(args.split, args.maps))
    stitched = np.tile(smooth_maps([(1024, 1024)], seed=1)[0], (args.stitched_side // 1024 + 1,) * 2)
    stitched = np.ascontiguousarray(stitched[:args.stitched_side, :args.stitched_side])
    stitched_timings: dict[tuple[str, str], list[tuple[float, float]]] = {}
    timings: dict[tuple[str, str, str], list[tuple[float, float]]] = {}

    def run_phase(roots: dict[str, str], endpoint: str) -> None:
        """Interleaved rounds over the stores at ``roots``, S3 reached at ``endpoint``."""
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        s3fs.S3FileSystem.clear_instance_cache()  # s3fs reads the endpoint when an instance is made
        stores = {where: ResultStore(root) for where, root in roots.items()}
        for store in stores.values():
            store.prepare()
            store.describe_maps("v0001", MapDescription(image_threshold=1.0, pixel_threshold=1.0, units="u"))
            store.write_maps([("warm.png", "/src/warm.png", "v0001", maps[0])])  # sessions, group metadata
        for round_ in range(args.rounds):
            order = (False, True) if round_ % 2 == 0 else (True, False)
            for where, store in stores.items():
                for names in ("new names", "same names again"):
                    for together in order:
                        # the same prefix in both passes: the second replaces the first's arrays
                        prefix = f"r{round_}-{'together' if together else 'one'}"
                        key = (where, names, "together" if together else "one by one")
                        timings.setdefault(key, []).append(timed_writes(store, maps, prefix, together))
                for together in order:
                    mode = "16 blocks together" if together else "block by block"
                    stitched_timings.setdefault((where, mode), []).append(
                        timed_stitched(store, stitched, f"r{round_}-{'together' if together else 'one'}", together))
                print(f"round {round_ + 1} {where}: " + ", ".join(
                    f"{n} {m} {timings[(where, n, m)][-1][0] / len(maps) * 1000:.1f} ms"
                    for n in ("new names", "same names again") for m in ("one by one", "together")), flush=True)

    with tempfile.TemporaryDirectory(prefix="map-writes-") as work, running_s3_server(Path(work) / "s3") as s3:
        os.environ.update(s3.env)
        run_phase({"S3 (moto, loopback)": s3.url("results"), "local folder": str(Path(work) / "local")}, s3.endpoint)
        if args.delay_ms > 0:
            with latency_proxy(s3.endpoint, args.delay_ms) as proxied:
                run_phase({f"S3 (moto) at {2 * args.delay_ms:g} ms round trips (bench/latency_proxy.py)":
                           s3.url("results-delayed")}, proxied)
    rows = []
    for (where, names, mode), values in timings.items():
        wall = float(np.median([w for w, _ in values])) / len(maps) * 1000
        cpu = float(np.median([c for _, c in values])) / len(maps) * 1000
        rows.append({"store": where, "maps": names, "written": mode, "wall ms / map (median round)": wall,
                     "client CPU ms / map": cpu, "rounds wall ms / map": ", ".join(f"{w / len(maps) * 1000:.1f}" for w, _ in values)})
    for row in rows:
        base = next(r for r in rows if r["store"] == row["store"] and r["maps"] == row["maps"] and r["written"] == "one by one")
        row["wall ÷ one by one"] = row["wall ms / map (median round)"] / base["wall ms / map (median round)"]
    stitched_rows = []
    for (where, mode), values in stitched_timings.items():
        stitched_rows.append({"store": where, "written": mode, "wall s / map (median round)": float(np.median([w for w, _ in values])),
                              "client CPU s / map": float(np.median([c for _, c in values])),
                              "rounds wall s": ", ".join(f"{w:.2f}" for w, _ in values)})
    for row in stitched_rows:
        base = next(r for r in stitched_rows if r["store"] == row["store"] and r["written"] == "block by block")
        row["wall ÷ block by block"] = row["wall s / map (median round)"] / base["wall s / map (median round)"]
    meta = {"command": common.command_line(), "date": common.utc_now(), "machine": machine, "measures_memory": False,
            "wall_s": time.perf_counter() - started,
            "parameters": {"split": args.split, "maps": len(maps), "task": TASK, "rounds": args.rounds,
                           "stitched map": f"{args.stitched_side} x {args.stitched_side} px, chunks of 512",
                           "map sizes": f"MTD test images' own: {min(m.size for m in maps):,} to {max(m.size for m in maps):,} pixels"}}
    notes = ["one by one: ResultStore.write_map per map (each map's listing, chunk and metadata requests in turn); "
             "together: ResultStore.write_maps per task of 16 (storage.results_store.write_maps_together on S3; "
             "a local folder writes one after another either way)",
             "same names again: each map replaces the array its name got in the new-names pass of the round",
             "client CPU: this process's CPU time (s3fs, aiobotocore); moto's own CPU is not in it",
             "moto runs on this machine's 2 cores: on loopback its CPU bounds the requests; behind the latency proxy "
             "(a phase of its own, after the others) each request also waits for its round trip, and requests sent "
             "together overlap theirs"]
    common.report(args.out, args.name, "Anomaly maps written to S3 one by one or together", meta,
                  [{"title": "Whole maps, per map, tasks of 16", "rows": rows, "notes": notes},
                   {"title": f"A stitched map of {args.stitched_side} x {args.stitched_side} px", "rows": stitched_rows,
                    "notes": ["block by block: MapWriter.write_block per 512 px chunk (before); 16 blocks together: "
                              "MapWriter.write_blocks per 16 chunks, as tasks.tiles.stitch_map_task writes them now; "
                              "the map's metadata first (MapWriter via ResultStore.open_map) in both"]}])


if __name__ == "__main__":
    main()
