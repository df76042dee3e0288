"""Threshold from nominal data only: score the held-out nominal images with the new version."""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
from prefect import task

from patchwatch.anomaly.features import PatchFeatures
from patchwatch.storage.model_store import HOLDOUT, FeatureBank, ModelStore
from .retries import retry_delay, transient
from .scoring import open_detector, pixel_threshold


@task(name="calibrate-threshold", task_run_name="calibrate-threshold", retries=2, retry_delay_seconds=retry_delay(15), retry_condition_fn=transient)
def calibrate_threshold_task(root: str, model_root: str, detector: str, detector_config: dict,
                             quantile: float) -> dict:
    """Image scores and map maxima of the bank's held-out images (their features are in the bank
    already) -> the version's holdout.parquet; the threshold is the scores' ``quantile``, the
    pixel threshold the map maxima's (None without any held-out image)."""
    started = time.perf_counter()
    bank, model = FeatureBank(root), ModelStore(model_root)
    index = bank.index(HOLDOUT)
    scorer = open_detector(model, detector, detector_config)
    rows = []
    for batch, vectors in bank.iter_batches(bank.batches(HOLDOUT), HOLDOUT):
        for row in index[index.batch == batch].itertuples(index=False):
            features = PatchFeatures(vectors[row.row_start:row.row_stop], (int(row.grid_h), int(row.grid_w)),
                                     (int(row.height), int(row.width)), (int(row.input_h), int(row.input_w)))
            score, amap = scorer.score(features)
            rows.append({"image_id": row.image_id, "uri": row.uri, "score": float(score), "map_max": float(amap.max())})
    table = pd.DataFrame(rows, columns=["image_id", "uri", "score", "map_max"])
    model.write_table("holdout", table)
    threshold = float(np.quantile(table.score, quantile)) if len(table) else None
    return {"threshold": threshold, "pixel_threshold": pixel_threshold(table, quantile),
            "holdout_images": int(len(table)), "seconds": time.perf_counter() - started}
