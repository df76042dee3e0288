"""Build the nearest-neighbour index over a version's coreset."""
from __future__ import annotations

import time

from prefect import task

from patchwatch.anomaly.patchcore import build_index
from patchwatch.storage.model_store import ModelStore
from .retries import retry_delay, transient


@task(name="build-index", task_run_name="build-index", retries=3, retry_delay_seconds=retry_delay(10), retry_condition_fn=transient)
def build_index_task(model_root: str) -> dict:
    store = ModelStore(model_root)
    started = time.perf_counter()
    memory = store.read_memory()
    store.write_index(build_index(memory))
    return {"memory_rows": int(len(memory)), "seconds": time.perf_counter() - started}
