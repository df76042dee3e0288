"""Fit PaDiM or SPADE from the Zarr bank, streaming it one batch array at a time."""
from __future__ import annotations

import time

import numpy as np
from prefect import task

from patchwatch.anomaly.padim import PadimConfig, PadimFitter
from patchwatch.anomaly.spade import SpadeConfig, SpadeFitter
from patchwatch.storage.model_store import TRAIN, FeatureBank, ModelStore
from .retries import retry_delay, transient


@task(name="fit-detector", task_run_name="fit-detector", retries=2, retry_delay_seconds=retry_delay(15), retry_condition_fn=transient)
def fit_detector_task(root: str, model_root: str, name: str, config: PadimConfig | SpadeConfig) -> dict:
    """PaDiM's running per-position Gaussians or SPADE's per-image galleries, from the bank's
    training batches -> the version's detector.npz."""
    started = time.perf_counter()
    bank = FeatureBank(root)
    index = bank.index(TRAIN)
    batches = bank.batches()
    fitter = SpadeFitter(config) if name == "spade" else None
    for batch, vectors in bank.iter_batches(batches):
        rows = index[index.batch == batch]
        if name != "padim":
            for row in rows.itertuples(index=False):
                fitter.update(vectors[row.row_start:row.row_stop])
            continue
        # a batch's images of one grid in one stacked update: ~3x faster than image by image
        for (grid_h, grid_w), same_grid in rows.groupby(["grid_h", "grid_w"], sort=False):
            grid = (int(grid_h), int(grid_w))
            fitter = fitter or PadimFitter(grid, vectors.shape[1], config)
            fitter.update(np.stack([vectors[r.row_start:r.row_stop] for r in same_grid.itertuples(index=False)]), grid)
    if fitter is None:
        raise ValueError(f"the feature bank at {root} is empty: no usable nominal image")
    ModelStore(model_root).write_arrays("detector", fitter.finish().to_arrays())
    return {"bank_batches": batches, "seconds": time.perf_counter() - started}
