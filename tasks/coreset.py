"""Coreset selection as its own memory-intensive task, streaming the bank from Zarr."""
from __future__ import annotations

import time

import numpy as np
from prefect import task

from anomaly.coreset import bank_covering_radius, coreset_size, projection_matrix, streaming_coreset
from anomaly.patchcore import PatchCoreConfig
from storage.model_store import ModelStore
from .retries import retry_delays


def gather_rows(store: ModelStore, rows: np.ndarray, batches: list[int]) -> np.ndarray:
    """Full-width bank vectors of global ``rows``, read one batch array at a time."""
    wanted = np.sort(rows)
    picked, offset = [], 0
    for _, vectors in store.iter_bank(batches):
        inside = wanted[(wanted >= offset) & (wanted < offset + len(vectors))]
        if len(inside):
            picked.append(vectors[inside - offset])
        offset += len(vectors)
    return np.concatenate(picked)


@task(name="select-coreset", retries=2, retry_delay_seconds=retry_delays(5, 30))
def select_coreset_task(root: str, config: PatchCoreConfig, chunk_rows: int = 1 << 20) -> dict:
    """Greedy k-center coreset of the bank under ``root`` -> ``ROOT/memory``."""
    store = ModelStore(root)
    started = time.perf_counter()
    batches = store.bank_batches()  # listed once: every pass below reads the same batches
    total_rows, dim = store.bank_shape(batches)
    if total_rows == 0:
        raise ValueError(f"the feature bank at {root} is empty: no usable nominal image")
    matrix = projection_matrix(dim, config.projection_dim, config.seed)
    size = coreset_size(total_rows, config.coreset_ratio)
    result = streaming_coreset((v for _, v in store.iter_bank(batches)), total_rows, size, matrix, config.seed,
                               chunk_rows=chunk_rows)
    memory = gather_rows(store, result.indices, batches)
    if np.isnan(result.covering_radius):  # selected composably: measure over the whole bank
        result.covering_radius = bank_covering_radius((v for _, v in store.iter_bank(batches)), memory, matrix)
    store.write_memory(memory, {"bank_rows": int(total_rows), "covering_radius": result.covering_radius})
    return {"bank_rows": int(total_rows), "memory_rows": int(len(memory)),
            "covering_radius": result.covering_radius, "seconds": time.perf_counter() - started}
