"""Score one batch of images with a fitted model; write maps (Zarr) and a score part (Parquet)."""
from __future__ import annotations

import functools

import pandas as pd
from prefect import task
from prefect.cache_policies import INPUTS

from anomaly.features import FeatureConfig
from anomaly.padim import Padim
from anomaly.patchcore import PatchCore, PatchCoreConfig
from anomaly.spade import Spade
from anomaly.tiling import TilingConfig
from storage.images import ImageRecord
from storage.model_store import ModelStore
from storage.results_store import ResultStore, part_name

from .features import drop_too_small, load_images
from .runtime import feature_extractor
from .retries import retry_delays

SCORE_COLUMNS = ["image_id", "uri", "score", "height", "width", "map", "label", "defect_type", "mask_uri",
                 "model"]


@functools.lru_cache(maxsize=2)
def load_model(root: str, fingerprint: str):
    """(feature extractor, detector) of the model at ``root``; cached per worker process."""
    store = ModelStore(root)
    manifest = store.read_manifest()
    extractor = feature_extractor(FeatureConfig.from_dict(manifest["feature_config"]))
    name = manifest.get("detector", "patchcore")
    if name == "patchcore":
        detector = PatchCore(store.read_memory(), PatchCoreConfig.from_dict(manifest["detector_config"]),
                             index=store.read_index())
    elif name == "padim":
        detector = Padim.from_arrays(store.read_arrays("detector"))
    elif name == "spade":
        detector = Spade.from_arrays(store.read_arrays("detector"))
    else:
        raise ValueError(f"model at {root} uses detector {name!r}, unknown to this patchwatch")
    return extractor, detector


def score_row(record: ImageRecord, score: float, shape: tuple[int, int], map_url: str, model: str) -> dict:
    """One row of the score table (the same for whole and for tiled images)."""
    return {"image_id": record.image_id, "uri": record.uri, "score": score, "height": shape[0],
            "width": shape[1], "map": map_url, "label": record.label, "defect_type": record.defect_type,
            "mask_uri": record.mask_uri, "model": model}


@task(name="score-batch", retries=3, retry_delay_seconds=retry_delays(2, 10, 30), cache_policy=INPUTS,
      persist_result=True)
def score_batch_task(root: str, results: str, batch: int, records: list[ImageRecord],
                     model_fingerprint: str, tiling: TilingConfig | None = None) -> dict:
    extractor, detector = load_model(root, model_fingerprint)
    out = ResultStore(results)
    good, images, errors, large = load_images(records, tiling)
    good, images = drop_too_small(extractor, good, images, errors)
    rows = []
    for record, image, features in zip(good, images, extractor.extract(images) if images else []):
        score, amap = detector.score(features)
        rows.append(score_row(record, score, amap.shape, out.write_map(record.image_id, amap), model_fingerprint))
    # the score part is written after every map of the batch: it marks the batch complete
    out.write_errors(part_name(batch), pd.DataFrame(errors, columns=["image_id", "uri", "reason"]))
    out.write_scores(part_name(batch), pd.DataFrame(rows, columns=SCORE_COLUMNS))
    return {"batch": batch, "images": len(rows), "errors": errors, "large": large}
