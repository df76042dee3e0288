"""Extract one batch of images' patch features into the model root's Zarr bank."""
from __future__ import annotations

import numpy as np
from prefect import task
from prefect.cache_policies import INPUTS

from anomaly.features import FeatureConfig
from storage.images import ImageReadError, ImageRecord, read_image
from storage.model_store import ModelStore

from .runtime import feature_extractor


def load_images(records: list[ImageRecord]) -> tuple[list[ImageRecord], list[np.ndarray], list[dict]]:
    """Decode the batch's images; a bad file becomes an error row, the rest go on."""
    good, images, errors = [], [], []
    for record in records:
        try:
            images.append(read_image(record.uri))
            good.append(record)
        except ImageReadError as error:
            errors.append({"image_id": record.image_id, "uri": error.uri, "reason": error.reason})
    return good, images, errors


@task(name="extract-features", retries=3, retry_delay_seconds=[2, 10, 30], cache_policy=INPUTS,
      persist_result=True)
def extract_features_task(root: str, batch: int, records: list[ImageRecord], config: FeatureConfig,
                          rows_per_chunk: int = 4096) -> dict:
    """Patch features of ``records`` -> ``ROOT/bank/batch-NNNNN``; returns counts and errors."""
    store = ModelStore(root)
    extractor = feature_extractor(config)
    good, images, errors = load_images(records)
    usable, usable_images = [], []
    for record, image in zip(good, images):
        if min(image.shape[:2]) < 2:
            errors.append({"image_id": record.image_id, "uri": record.uri,
                           "reason": f"image too small ({image.shape[1]}x{image.shape[0]} px)"})
            continue
        usable.append(record)
        usable_images.append(image)
    features = extractor.extract(usable_images) if usable_images else []
    rows, index_rows, start = [], [], 0
    for record, patch in zip(usable, features):
        index_rows.append({"image_id": record.image_id, "uri": record.uri, "batch": batch,
                           "row_start": start, "row_stop": start + len(patch.vectors),
                           "grid_h": patch.grid[0], "grid_w": patch.grid[1],
                           "height": patch.image_shape[0], "width": patch.image_shape[1],
                           "input_h": patch.input_shape[0], "input_w": patch.input_shape[1]})
        rows.append(patch.vectors)
        start += len(patch.vectors)
    vectors = np.concatenate(rows) if rows else np.zeros((0, config.embed_dim), np.float32)
    store.write_bank_batch(batch, vectors, index_rows, rows_per_chunk)
    return {"batch": batch, "images": len(usable), "rows": int(len(vectors)), "errors": errors}
