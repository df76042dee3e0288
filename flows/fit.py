"""Fit flow: list -> batches -> patch features on Dask workers -> Zarr bank -> coreset -> index."""
from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from anomaly.detectors import detector_config as detector_settings
from anomaly.features import FeatureConfig
from anomaly.tiling import TilingConfig, tile_grid
from storage.model_store import ModelStore
from tasks.coreset import select_coreset_task
from tasks.detectors import fit_detector_task
from tasks.features import extract_features_task
from tasks.index import build_index_task
from tasks.listing import chunk, list_images_task
from tasks.tiles import extract_tile_features_task

from .report import markdown_rows, markdown_table
from .runner import gather


@flow(name="fit", log_prints=True)
def fit_flow(images: str, root: str, split: str | None = None, feature_config: dict | None = None,
             detector: str = "patchcore", detector_config: dict | None = None, batch_size: int = 32,
             tiling_config: dict | None = None, coreset_chunk_rows: int = 1 << 20,
             tiles_per_task: int = 16) -> dict:
    logger = get_run_logger()
    features = FeatureConfig.from_dict(feature_config) if feature_config else FeatureConfig()
    settings = detector_settings(detector, detector_config)
    tiling = TilingConfig(**tiling_config) if tiling_config else TilingConfig()
    store = ModelStore(root)
    started = time.perf_counter()
    records = list_images_task(images, split)
    if not records:
        raise ValueError(f"no images found in {images}" + (f" (split {split!r})" if split else ""))
    batches = chunk(records, batch_size)
    logger.info("fitting on %d images in %d batches -> %s", len(records), len(batches), root)
    # Prefect's cache skips batches a killed run already finished; a batch whose files are gone
    # from storage must run again even when the cache remembers it
    written = store.written_bank_batches()
    futures = [extract_features_task.with_options(refresh_cache=i not in written).submit(root, i, batch, features, tiling)
               for i, batch in enumerate(batches)]
    extracted = gather(futures, "features")
    # large nominal images feed the bank tile by tile, spread over the workers
    large = [item for result in extracted for item in result["large"]]
    next_batch, tile_futures = len(batches), []
    for record, shape in large:
        for group in chunk(tile_grid(*shape, tiling.tile, tiling.overlap), tiles_per_task):
            task = extract_tile_features_task.with_options(refresh_cache=next_batch not in written)
            tile_futures.append(task.submit(root, next_batch, record.image_id, record.uri, group, features))
            next_batch += 1
    extracted += gather(tile_futures, "tile features")
    store.drop_bank_batches_from(next_batch)  # leftovers of an earlier, larger fit
    extract_s = time.perf_counter() - started
    errors = [e for result in extracted for e in result["errors"]]
    for error in errors:
        logger.error("skipped %s: %s", error["uri"], error["reason"])
    manifest = {"detector": detector, "backbone": features.backbone,
                "feature_config": features.to_dict(), "detector_config": settings.to_dict(),
                "tiling_config": tiling.to_dict(), "images": images, "split": split,
                "n_images": sum(r["images"] for r in extracted) + len(large),
                "bank_rows": sum(r["rows"] for r in extracted),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    summary = {"root": root, "detector": detector, "images": manifest["n_images"], "skipped": len(errors),
               "batches": len(batches), "bank_rows": manifest["bank_rows"], "extract_s": extract_s}
    if detector == "patchcore":
        coreset = select_coreset_task.submit(root, settings, coreset_chunk_rows).result()
        manifest["covering_radius"] = coreset["covering_radius"]
        index = build_index_task.submit(root, manifest).result()
        summary.update({"memory_rows": index["memory_rows"], "covering_radius": coreset["covering_radius"],
                        "coreset_s": coreset["seconds"], "index_s": index["seconds"]})
    else:
        fitted = fit_detector_task.submit(root, detector, settings, manifest).result()
        summary.update({"coreset_s": 0.0, "index_s": fitted["seconds"]})
    summary.update({"fit_s": time.perf_counter() - started, "errors": errors})
    create_markdown_artifact(
        key="fit-summary",
        markdown="# Fit\n\n" + markdown_table({k: v for k, v in summary.items() if k != "errors"})
        + ("\n\n## Skipped files\n\n" + markdown_rows(errors) if errors else ""),
        description=f"fit of {root}")
    return summary
