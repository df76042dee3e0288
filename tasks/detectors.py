"""Fit PaDiM or SPADE from the Zarr bank, streaming it one batch array at a time."""
from __future__ import annotations

import time

from prefect import task

from anomaly.padim import PadimConfig, PadimFitter
from anomaly.spade import SpadeConfig, SpadeFitter
from storage.model_store import ModelStore
from .retries import retry_delays


@task(name="fit-detector", retries=2, retry_delay_seconds=retry_delays(5, 30))
def fit_detector_task(root: str, name: str, config: PadimConfig | SpadeConfig, manifest: dict) -> dict:
    """PaDiM's running per-position Gaussians or SPADE's per-image galleries -> ROOT/detector.npz,
    then the manifest (written last: a root without one is an unfinished fit)."""
    started = time.perf_counter()
    store = ModelStore(root)
    index = store.bank_index()
    fitter = SpadeFitter(config) if name == "spade" else None
    for batch, vectors in store.iter_bank():
        for row in index[index.batch == batch].itertuples(index=False):
            image_vectors = vectors[row.row_start:row.row_stop]
            grid = (int(row.grid_h), int(row.grid_w))
            if name == "padim":
                fitter = fitter or PadimFitter(grid, vectors.shape[1], config)
                fitter.update(image_vectors, grid)
            else:
                fitter.update(image_vectors)
    if fitter is None:
        raise ValueError(f"the feature bank at {root} is empty: no usable nominal image")
    model = fitter.finish()
    store.write_arrays("detector", model.to_arrays())
    store.write_manifest(manifest)
    return {"seconds": time.perf_counter() - started}
