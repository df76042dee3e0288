"""Score flow: list -> batches on Dask -> anomaly maps (Zarr) + score table (Parquet)."""
from __future__ import annotations

import time

import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from anomaly.tiling import TilingConfig, tile_grid
from storage.model_store import ModelStore, manifest_fingerprint
from storage.results_store import ResultStore, drop_parts_from, part_name
from tasks.listing import chunk, list_images_task
from tasks.scoring import SCORE_COLUMNS, score_batch_task, score_row
from tasks.tiles import score_tiles_task, stitch_map_task

from .report import markdown_rows, markdown_table
from .runner import gather


@flow(name="score", log_prints=True)
def score_flow(images: str, root: str, results: str, split: str | None = None, batch_size: int = 16,
               tiles_per_task: int = 16) -> dict:
    logger = get_run_logger()
    started = time.perf_counter()
    model = ModelStore(root)
    manifest = model.read_manifest()  # fails early, and clearly, on a missing or incompatible model
    fingerprint = manifest_fingerprint(manifest)
    tiling = TilingConfig(**manifest.get("tiling_config", {}))
    records = list_images_task(images, split)
    batches = chunk(records, batch_size)
    out = ResultStore(results)
    written = out.written_parts("scores")  # cached batches whose parts are gone run again
    futures = [score_batch_task.with_options(refresh_cache=part_name(i) not in written)
               .submit(root, results, i, batch, fingerprint, tiling) for i, batch in enumerate(batches)]
    scored = gather(futures, "scoring")
    # large images: tiles spread over the workers, then one stitch per image into a Zarr map
    large = [item for result in scored for item in result["large"]]
    tile_futures = {record.image_id: [score_tiles_task.submit(root, record.uri, group, fingerprint)
                                      for group in chunk(tile_grid(*shape, tiling.tile, tiling.overlap), tiles_per_task)]
                    for record, shape in large}
    stitched = [stitch_map_task.submit(results, record.image_id, shape,
                                       [item for future in tile_futures[record.image_id] for item in future.result()],
                                       manifest["detector_config"]["sigma"], tiling.overlap)
                for record, shape in large]
    for part, ((record, shape), future) in enumerate(zip(large, stitched), start=len(batches)):
        row = future.result()
        out.write_scores(part_name(part), pd.DataFrame(
            [score_row(record, row["score"], shape, row["map"], fingerprint)], columns=SCORE_COLUMNS))
    drop_parts_from(out, len(batches) + len(large))  # leftovers of an earlier, larger run
    errors = [e for result in scored for e in result["errors"]]
    for error in errors:
        logger.error("skipped %s: %s", error["uri"], error["reason"])
    table = out.scores()
    if records and not len(table) and not errors:
        raise RuntimeError(f"{len(records)} images listed but none scored and no error recorded in {results}")
    table_url = out.write_table("scores", table)
    error_rows = out.errors()
    if len(error_rows):
        out.write_table("errors", error_rows)
    summary = {"results": results, "model": fingerprint, "images": int(len(table)), "skipped": len(errors),
               "score_s": time.perf_counter() - started, "score_table": table_url}
    if len(table):
        summary.update({"score_p50": float(table.score.quantile(0.5)), "score_p99": float(table.score.quantile(0.99)),
                        "score_max": float(table.score.max())})
        top = table.nlargest(10, "score")[["image_id", "score", "map"]].to_dict("records")
        create_table_artifact(key="most-anomalous", table=top, description="the night's most anomalous images")
    out.write_summary({**summary, "errors": errors})
    create_markdown_artifact(key="score-summary", markdown="# Scoring\n\n" + markdown_table(summary)
                             + ("\n\n## Skipped files\n\n" + markdown_rows(errors) if errors else ""),
                             description=f"scoring into {results}")
    return {**summary, "errors": errors}
