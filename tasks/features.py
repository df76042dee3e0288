"""Extract one batch of images' patch features into the model root's Zarr bank."""
from __future__ import annotations

import math

import numpy as np
from prefect import task

from patchwatch.anomaly.features import FeatureConfig, PatchFeatures
from patchwatch.anomaly.settings import mirror_views
from patchwatch.anomaly.tiling import TilingConfig
from patchwatch.storage.images import ImageReadError, ImageRecord, read_image_unless_large, read_mask
from patchwatch.storage.model_store import TRAIN, FeatureBank

from .runtime import feature_extractor
from .retries import retry_delay, transient


def view_id(image_id: str, mirror: str) -> str:
    """A bank row's id for one image (or tile) ``image_id`` as it is, or one of its mirror images."""
    return f"{image_id}#mirror-{mirror}" if mirror else image_id


def bank_index_row(image_id: str, uri: str, batch: int, start: int, patch: PatchFeatures) -> dict:
    """Where one image's (or tile's) patch vectors sit in its batch array, and its geometry."""
    return {"image_id": image_id, "uri": uri, "batch": batch, "row_start": start,
            "row_stop": start + len(patch.vectors), "grid_h": patch.grid[0], "grid_w": patch.grid[1],
            "height": patch.image_shape[0], "width": patch.image_shape[1],
            "input_h": patch.input_shape[0], "input_w": patch.input_shape[1]}


def load_images(records: list[ImageRecord], tiling: TilingConfig | None = None):
    """Decode the batch's images; a bad file becomes an error row, the rest go on.

    Images above the tiling threshold are not decoded here but returned as ``large``
    (record, shape) pairs, for the flow to hand out tile by tile.
    Returns (records, images, errors, large).
    """
    good, images, errors, large = [], [], [], []
    for record in records:
        try:
            # a large image's size comes from its header: it is decoded later, once, for its tiles
            image, shape = read_image_unless_large(record.uri, tiling.needs_tiling if tiling else lambda h, w: False)
            _check_mask(record, shape)
            if image is None:
                large.append((record, shape))
                continue
            images.append(image)
            good.append(record)
        except ImageReadError as error:
            errors.append({"image_id": record.image_id, "uri": error.uri, "reason": error.reason})
    return good, images, errors, large


def _check_mask(record: ImageRecord, shape: tuple[int, int]) -> None:
    """A split CSV's mask must be readable and the size of its image: if not, the row is
    inconsistent (a mask of another image?) and is skipped with the mask named, here, rather
    than dropped from the metrics later with only a log line."""
    if record.mask_uri:
        read_mask(record.mask_uri, tuple(shape))


def min_image_side(extractor) -> int:
    """Smallest image side the model can use: one cell of the backbone's coarsest feature map at
    the model's input scale (16 px for EfficientNet-Lite stages 2-3 at scale 1). Anything smaller
    reaches the network only as an up-scaled blur at a scale the model never saw."""
    config = extractor.config
    if config.square_side or config.fixed_shape:  # every image is resized to one size anyway
        return 2
    return max(2, math.ceil(extractor.min_side / config.input_scale))


def _too_small(record: ImageRecord, height: int, width: int, floor: int) -> dict | None:
    if min(height, width) >= floor:
        return None
    return {"image_id": record.image_id, "uri": record.uri,
            "reason": f"image too small ({width}x{height} px; the model needs {floor}x{floor})"}


def drop_too_small(extractor, records: list[ImageRecord], images: list[np.ndarray], errors: list[dict]):
    """(records, images) without those below :func:`min_image_side`; each of those becomes an error row."""
    floor = min_image_side(extractor)
    kept_records, kept_images = [], []
    for record, image in zip(records, images):
        error = _too_small(record, *image.shape[:2], floor)
        if error:
            errors.append(error)
            continue
        kept_records.append(record)
        kept_images.append(image)
    return kept_records, kept_images


def drop_too_small_large(extractor, large: list, errors: list[dict]) -> list:
    """The same floor for images left for tiling ((record, shape) pairs): a 100000 x 16 strip is
    above the tiling threshold, but each of its tiles is 16 px high: an error row, not tiles."""
    floor = min_image_side(extractor)
    kept = []
    for record, shape in large:
        error = _too_small(record, *shape, floor)
        if error:
            errors.append(error)
        else:
            kept.append((record, shape))
    return kept


# no result cache: a batch the bank holds is recalled from its stored outcome, never re-run
@task(name="extract-features", task_run_name="extract-features batch {batch:05d}", retries=3, retry_delay_seconds=retry_delay(10), retry_condition_fn=transient)
def extract_features_task(root: str, batch: int, records: list[ImageRecord], config: FeatureConfig,
                          tiling: TilingConfig | None = None, kind: str = TRAIN, rows_per_chunk: int = 4096) -> dict:
    """Patch features of ``records`` -> ``ROOT/bank/KIND-NNNNN``; returns counts, errors and
    the large images left for tiling."""
    extractor = feature_extractor(config)
    good, images, errors, large = load_images(records, tiling)
    usable, usable_images = drop_too_small(extractor, good, images, errors)
    large = drop_too_small_large(extractor, large, errors)
    # a training image's mirror images (FeatureConfig.mirrors) are rows of their own beside it,
    # under the same uri; held-out images calibrate the threshold as they are
    mirrors = config.mirrors if kind == TRAIN else ()
    views = [(view_id(record.image_id, mirror), record.uri, pixels)
             for record, image in zip(usable, usable_images) for mirror, pixels in mirror_views(image, mirrors)]
    features = extractor.extract([pixels for _, _, pixels in views]) if views else []
    rows, index_rows, start = [], [], 0
    for (row_id, uri, _), patch in zip(views, features):
        index_rows.append(bank_index_row(row_id, uri, batch, start, patch))
        rows.append(patch.vectors)
        start += len(patch.vectors)
    vectors = np.concatenate(rows) if rows else np.zeros((0, config.embed_dim), np.float32)
    result = {"batch": batch, "kind": kind, "images": len(usable), "rows": int(len(vectors)), "errors": errors,
              "large": large}
    FeatureBank(root).write_batch(batch, vectors, index_rows, rows_per_chunk, kind, outcome=to_outcome(result))
    return result


def to_outcome(result: dict) -> dict:
    """A batch result as JSON (records as dicts), stored beside the batch."""
    return {**result, "large": [[record.to_dict(), list(shape)] for record, shape in result["large"]]}


def from_outcome(outcome: dict) -> dict:
    """The result of a batch a killed run finished, read back instead of running it again."""
    return {**outcome, "large": [(ImageRecord(**record), tuple(shape)) for record, shape in outcome["large"]]}
