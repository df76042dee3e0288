"""Score flow: list -> batches on Dask -> anomaly maps (Zarr) + score table (Parquet)."""
from __future__ import annotations

import time

import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from patchwatch.anomaly.pictures import MapScale

from patchwatch.anomaly.tiling import TilingConfig, tile_grid
from patchwatch.storage.images import ImageRecord
from patchwatch.storage.locations import join
from patchwatch.storage.model_store import ModelRegistry
from patchwatch.storage.results_store import ResultStore, drop_parts_from, part_name
from patchwatch.tasks.listing import chunk, list_images_task
from patchwatch.tasks.scoring import SCORE_COLUMNS, ModelRef, error_table, score_batch_task, score_row
from patchwatch.tasks.tiles import remove_staged_copies, score_tiles_task, stage_large_images, stitch_map_task

from .html_report import scoring_report
from .pictures import PREVIEWS, Overlay, most_anomalous, overlay_table_markdown, render_overlays
from .report import markdown_rows, markdown_table
from .runner import gather, run_name


REPORT = "report.html"


class NothingScoredError(RuntimeError):
    """Images were listed but not one could be scored: the run failed, whatever its error rows say."""


def score_records(records: list[ImageRecord], model: ModelRef, manifest: dict, out: ResultStore, first_part: int,
                  batch_size: int, tiles_per_task: int) -> dict:
    """Score ``records`` into ``out``: score/error parts numbered from ``first_part``, one per
    batch (and one per tiled image). Returns {"parts": parts used, "errors": [...], "staged":
    {image_id: staged copy}}: the caller draws the previews from those copies, then removes them
    (:func:`remove_staged_copies`)."""
    tiling = TilingConfig(**manifest.get("tiling_config", {}))
    batches = chunk(records, batch_size)
    written = out.written_parts("scores")  # cached batches whose parts are gone run again
    futures = [score_batch_task.with_options(refresh_cache=part_name(first_part + i) not in written)
               .submit(model, out.root, first_part + i, batch, tiling) for i, batch in enumerate(batches)]
    scored = gather(futures, "scoring")
    # large images: tiles spread over the workers, then one stitch per image into a Zarr map
    large = [item for result in scored for item in result["large"]]
    errors = [e for result in scored for e in result["errors"]]
    # a PNG/JPEG is decoded once, into a scratch Zarr copy under the results root that its tile tasks read
    staged, unreadable = stage_large_images(large, out.root)
    failed = {e["image_id"]: e for e in unreadable}
    try:
        tile_futures = {record.image_id: [score_tiles_task.submit(model, record.uri, group,
                                                                  staged=staged.get(record.image_id))
                                          for group in chunk(tile_grid(*shape, tiling.tile, tiling.overlap),
                                                             tiles_per_task)]
                        for record, shape in large if record.image_id not in failed}
        stitched = {record.image_id: stitch_map_task.submit(
                        out.root, record.image_id, record.uri, model.version, shape,
                        [item for future in tile_futures[record.image_id] for item in future.result()],
                        manifest["detector_config"]["sigma"], tiling.overlap)
                    for record, shape in large if record.image_id not in failed}
        for part, (record, shape) in enumerate(large, start=first_part + len(batches)):
            # both parts, as a batch writes them: neither an earlier run's score nor its error row outlives this one
            rows = []
            if record.image_id not in failed:
                row = stitched[record.image_id].result()
                rows = [score_row(record, row["score"], shape, row["map"], model)]
            out.require()
            out.write_errors(part_name(part), error_table([failed[record.image_id]] if not rows else [], model))
            out.write_scores(part_name(part), pd.DataFrame(rows, columns=SCORE_COLUMNS))
    except BaseException:
        remove_staged_copies(staged)
        raise
    return {"parts": len(batches) + len(large), "errors": errors + unreadable, "staged": staged}


def publish_scores(logger, out: ResultStore, summary: dict, errors: list[dict], title: str, key_prefix: str = "",
                   previews: int = PREVIEWS, staged: dict | None = None) -> tuple[dict, list[Overlay]]:
    """Merge the parts into one table, log the skipped files, write the summary, overlays of the
    ``previews`` most anomalous images (RESULTS/overlays) and the artifacts (those images with
    links to their overlays, the summary). Returns (summary, overlays)."""
    for error in errors:
        logger.error("skipped %s: %s", error["uri"], error["reason"])
    out.require()
    # one row per (image, model version), the newest part's if a re-run wrote one again; the
    # counts are per image, from its newest version's row (a root scored again by a new version
    # holds both rows, each with its own map)
    table = out.scores()
    if len(table):
        table = table.drop_duplicates(["uri", "model_version"], keep="last").reset_index(drop=True)
    summary["score_table"] = out.write_table("scores", table) if len(table) else None
    error_rows = out.errors()
    if len(error_rows):
        # a run killed before its merge left error parts its re-run writes again
        error_rows = error_rows.drop_duplicates(["uri", "model_version"], keep="last").reset_index(drop=True)
        out.write_table("errors", error_rows)
    latest = table.drop_duplicates("uri", keep="last") if len(table) else table
    summary.update(images=int(len(latest)), rows=int(len(table)), errors_total=int(len(error_rows)))
    overlays = []
    if len(latest):
        summary.update({"flagged": int(latest.is_anomalous.eq(True).sum()),
                        **{f"score_p{q}": float(latest.score.quantile(q / 100)) for q in (50, 90, 99)},
                        "score_max": float(latest.score.max())})
        scale = MapScale.around(summary.get("threshold"), latest.score, summary.get("pixel_threshold"))
        overlays = render_overlays(out, most_anomalous(latest, previews), scale, logger, staged) if previews else []
        summary["report"] = join(out.root, REPORT)
        pictures = {o.image_id: out.link(o.url) for o in overlays}
        top = latest.nlargest(10, "score")
        create_table_artifact(key=f"{key_prefix}most-anomalous", description=f"the most anomalous images in {out.root}",
                              table=[{"image_id": row.image_id, "score": round(float(row.score), 4),
                                      "flagged": None if pd.isna(row.is_anomalous) else bool(row.is_anomalous),
                                      "overlay": pictures.get(row.image_id, ""), "model_version": row.model_version,
                                      "map": row.map} for row in top.itertuples()])
        if overlays:
            create_markdown_artifact(key=f"{key_prefix}most-anomalous-pictures",
                                     markdown=f"# Most anomalous images\n\nOpen [report.html]"
                                              f"({out.link(summary['report'])}) first.\n\n"
                                              + overlay_table_markdown(out, overlays),
                                     description=f"overlays of the most anomalous images in {out.root}")
    out.write_summary({**summary, "errors": errors})
    create_markdown_artifact(key=f"{key_prefix}score-summary", markdown=f"# {title}\n\n" + markdown_table(summary)
                             + ("\n\n## Skipped files\n\n" + markdown_rows(errors) if errors else ""),
                             description=f"scoring into {out.root}")
    return {**summary, "errors": errors}, overlays


def write_scoring_report(out: ResultStore, summary: dict, overlays: list[Overlay], title: str,
                         trend_png: bytes | None = None) -> str:
    """RESULTS/report.html of a scoring run, and a link artifact to it. Returns its URL."""
    scale = MapScale.around(summary.get("threshold"), [o.score for o in overlays], summary.get("pixel_threshold"))
    page = scoring_report(summary, overlays, scale.describe(), title, trend_png, summary.get("errors"))
    url = out.write_file(REPORT, page.encode())
    create_link_artifact(key="report", link=out.link(url), link_text=REPORT,
                         description=f"{title}: summary and the most anomalous images")
    return url


@flow(name="score", flow_run_name=run_name("score {results}"), log_prints=True)
def score_flow(images: str, root: str, results: str, split: str | None = None, batch_size: int = 16,
               tiles_per_task: int = 16, version: str | None = None, previews: int = PREVIEWS) -> dict:
    """Score every image of ``images`` with ``version`` (default: the current one) into ``results``;
    overlays of the ``previews`` most anomalous ones and report.html beside them."""
    logger = get_run_logger()
    started = time.perf_counter()
    store = ModelRegistry(root).resolve(version)  # fails early, and clearly, on a missing or incompatible model
    manifest = store.read_manifest()
    model = ModelRef.of(store, manifest)
    records = list_images_task(images, split)
    out = ResultStore(results)
    out.prepare()  # a missing bucket fails here, before any work
    done = score_records(records, model, manifest, out, 0, batch_size, tiles_per_task)
    try:
        drop_parts_from(out, done["parts"])  # leftovers of an earlier, larger run
        summary = {"results": results, "model_version": model.version, "model": model.fingerprint,
                   "threshold": model.threshold, "pixel_threshold": model.pixel_threshold,
                   "skipped": len(done["errors"]), "score_s": time.perf_counter() - started}
        title = f"Scoring with {model.version}"
        summary, overlays = publish_scores(logger, out, summary, done["errors"], title, previews=previews,
                                           staged=done["staged"])
    finally:
        remove_staged_copies(done["staged"])
    if summary["images"] and previews:  # evaluate (previews=0) writes a report of its own
        write_scoring_report(out, summary, overlays, f"{title}: {results}")
    if records and not summary["images"]:
        raise NothingScoredError(f"none of the {len(records)} images of {images} could be scored "
                                 f"({len(done['errors'])} error rows in {results})")
    return summary
