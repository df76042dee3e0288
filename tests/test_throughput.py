"""Throughput (issue 15): worker allocator settings, large non-TIFF images decoded once per run,
a fit with nothing new starting no Dask cluster. Timings live in bench/, not here."""
from __future__ import annotations

import os
from pathlib import Path


def _worker_environment() -> dict:
    """Runs on a worker: its os.environ, and the environment its process was started with (what
    glibc read its malloc settings from), where /proc tells."""
    started = Path("/proc/self/environ")
    at_start = dict(item.split("=", 1) for item in started.read_bytes().decode(errors="replace").split("\0")
                    if "=" in item) if started.exists() else None
    return {"environ": dict(os.environ), "at_start": at_start}


def test_local_cluster_workers_start_with_the_allocator_settings():
    from distributed import Client

    from flows.runner import WORKER_ALLOCATOR_ENV, dask_cluster

    with dask_cluster(None, 1) as address, Client(address) as client:
        seen = client.submit(_worker_environment, pure=False).result()
    for key, value in WORKER_ALLOCATOR_ENV.items():
        assert seen["environ"].get(key) == value
        if seen["at_start"] is not None:  # set before the process started, not by the worker later
            assert seen["at_start"].get(key) == value
