"""Coreset selection as its own memory-intensive task, streaming the bank from Zarr."""
from __future__ import annotations

import time

import numpy as np
from prefect import task

from patchwatch.anomaly.coreset import (bank_covering_radius, coreset_size, greedy_coreset, project, projection_matrix,
                             streaming_coreset)
from patchwatch.anomaly.patchcore import PatchCoreConfig
from patchwatch.storage.model_store import FeatureBank, ModelStore
from .retries import retry_delay, transient


def gather_rows(bank: FeatureBank, rows: np.ndarray, batches: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full-width bank vectors of global ``rows`` (sorted), read one batch array at a time, with
    the (batch, row within batch) of each."""
    wanted = np.sort(rows)
    picked, where_batch, where_row, offset = [], [], [], 0
    for batch, vectors in bank.iter_batches(batches):
        inside = wanted[(wanted >= offset) & (wanted < offset + len(vectors))] - offset
        if len(inside):
            picked.append(vectors[inside])
            where_batch.append(np.full(len(inside), batch, np.int64))
            where_row.append(inside)
        offset += len(vectors)
    return np.concatenate(picked), np.concatenate(where_batch), np.concatenate(where_row)


def _full_selection(bank: FeatureBank, batches: list[int], config: PatchCoreConfig, chunk_rows: int):
    """Greedy k-center over every training row of the bank (exact up to ``chunk_rows`` rows)."""
    total_rows = sum(bank.rows_per_batch(batches).values())
    matrix = projection_matrix(bank.dim(batches[0]), config.projection_dim, config.seed)
    result = streaming_coreset((v for _, v in bank.iter_batches(batches)), total_rows,
                               coreset_size(total_rows, config.coreset_ratio), matrix, config.seed,
                               chunk_rows=chunk_rows)
    memory, where_batch, where_row = gather_rows(bank, result.indices, batches)
    radius = result.covering_radius
    if np.isnan(radius):  # selected composably: measure over the whole bank
        radius = bank_covering_radius((v for _, v in bank.iter_batches(batches)), memory, matrix)
    return memory, where_batch, where_row, radius, total_rows


def _extension(bank: FeatureBank, parent: ModelStore, parent_radius: float, new_batches: list[int],
               config: PatchCoreConfig):
    """The parent's coreset extended over newly appended rows: the greedy traversal goes on from
    the parent's centres, adding the configured ratio of the new rows."""
    old_memory = parent.read_memory()
    old_rows = parent.read_arrays("coreset")
    new_vectors = (np.concatenate([v for _, v in bank.iter_batches(new_batches)]) if new_batches
                   else np.zeros((0, old_memory.shape[1]), np.float32))
    matrix = projection_matrix(old_memory.shape[1], config.projection_dim, config.seed)
    size = coreset_size(len(new_vectors), config.coreset_ratio) if len(new_vectors) else 0
    result = greedy_coreset(project(new_vectors, matrix), size, covered_by=project(old_memory, matrix))
    picked, where_batch, where_row = (gather_rows(bank, result.indices, new_batches) if size else
                                      (new_vectors[:0], np.zeros(0, np.int64), np.zeros(0, np.int64)))
    # the parent's centres still cover the rows they covered: its radius bounds the old part
    radius = max(parent_radius, result.covering_radius) if len(new_vectors) else parent_radius
    return (np.concatenate([old_memory, picked]), np.concatenate([old_rows["batch"], where_batch]),
            np.concatenate([old_rows["row"], where_row]), radius, len(new_vectors))


@task(name="select-coreset", task_run_name="select-coreset", retries=2, retry_delay_seconds=retry_delay(15), retry_condition_fn=transient)
def select_coreset_task(root: str, model_root: str, config: PatchCoreConfig, chunk_rows: int = 1 << 20,
                        parent: dict | None = None) -> dict:
    """Greedy k-center coreset of the training rows of the bank under ``root`` -> the version's
    ``memory``. With ``parent`` ({"root", "bank_batches", "covering_radius"} of the previous
    version, same detector settings), only the batches appended since are selected from."""
    bank, model = FeatureBank(root), ModelStore(model_root)
    started = time.perf_counter()
    batches = bank.batches()  # listed once: every pass below reads the same batches
    if not batches:
        raise ValueError(f"the feature bank at {root} is empty: no usable nominal image")
    new_batches = [b for b in batches if parent is None or b not in set(parent["bank_batches"])]
    new_rows = sum(bank.rows_per_batch(new_batches).values())
    # an extension holds the new rows in memory at once; beyond chunk_rows select afresh, streamed
    incremental = parent is not None and new_rows <= chunk_rows
    if incremental:
        memory, where_batch, where_row, radius, selected_from = _extension(
            bank, ModelStore(parent["root"]), parent["covering_radius"], new_batches, config)
    else:
        memory, where_batch, where_row, radius, selected_from = _full_selection(bank, batches, config, chunk_rows)
    model.write_memory(memory, {"covering_radius": radius})
    model.write_arrays("coreset", {"batch": where_batch, "row": where_row})
    return {"bank_batches": batches, "memory_rows": int(len(memory)), "covering_radius": float(radius),
            "incremental": incremental, "rows_selected_from": int(selected_from),
            "seconds": time.perf_counter() - started}
