"""Score flow: list -> batches on Dask -> anomaly maps (Zarr) + score table (Parquet)."""
from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from storage.model_store import ModelStore
from storage.results_store import ResultStore, drop_parts_from
from tasks.listing import chunk, list_images_task
from tasks.scoring import score_batch_task

from .report import markdown_rows, markdown_table
from .runner import gather


@flow(name="score", log_prints=True)
def score_flow(images: str, root: str, results: str, split: str | None = None, batch_size: int = 16) -> dict:
    logger = get_run_logger()
    started = time.perf_counter()
    model = ModelStore(root)
    model.read_manifest()  # fails early, and clearly, on a missing or incompatible model
    fingerprint = model.fingerprint()
    records = list_images_task(images, split)
    batches = chunk(records, batch_size)
    out = ResultStore(results)
    drop_parts_from(out, len(batches))
    futures = [score_batch_task.submit(root, results, i, batch, fingerprint) for i, batch in enumerate(batches)]
    scored = gather(futures, "scoring")
    errors = [e for result in scored for e in result["errors"]]
    for error in errors:
        logger.error("skipped %s: %s", error["uri"], error["reason"])
    table = out.scores()
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
