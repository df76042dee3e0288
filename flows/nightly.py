"""Nightly operations: scoring what the current model has not scored yet into dated partitions,
and the two flows that the scheduled deployments run (re-fit, scoring), each on Dask."""
from __future__ import annotations

import contextlib
import hashlib
import os
import time

import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from patchwatch.anomaly.pictures import trend_png
from patchwatch.storage.model_store import ModelRegistry
from patchwatch.storage.results_store import NightlyResults, ResultStore
from patchwatch.tasks.listing import list_images_task
from patchwatch.tasks.scoring import ModelRef
from patchwatch.tasks.tiles import remove_staged_copies

from .defaults import HOLDOUT_FRACTION, THRESHOLD_QUANTILE
from .fit import fit_flow
from .report import markdown_table
from .runner import dask_cluster, run_name, run_on_dask
from .pictures import PREVIEWS
from .score import NothingScoredError, publish_scores, score_records, write_scoring_report

TREND_NIGHTS = 30


def today() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


@flow(name="score-new", flow_run_name=run_name("score-new {night} {results}", night=lambda: today()),
      log_prints=True)
def score_new_flow(archive: str, root: str, results: str, night: str | None = None, batch_size: int = 16,
                   tiles_per_task: int = 16, rescore: bool = False, previews: int = PREVIEWS) -> dict:
    """Score the images of ``archive`` that no model version has scored (or found unusable) on
    any night yet, into ``RESULTS/nights/NIGHT``; update the night's summary row in
    ``RESULTS/history``. Run twice in one night, the second run scores nothing.

    ``rescore``: also score again, with the current version, every image that only older
    versions scored (after a re-fit, to have the whole archive under the new model). Each row
    names its version and has its own map; the night's counts are per image (its newest row).

    The night's root gets overlays of its ``previews`` most anomalous images and report.html
    (summary, flagged-per-night trend, those overlays); RESULTS/trend.png the trend chart.
    """
    logger = get_run_logger()
    started = time.perf_counter()
    store = ModelRegistry(root).resolve()
    manifest = store.read_manifest()
    model = ModelRef.of(store, manifest)
    night = night or today()
    nightly = NightlyResults(results)
    out = nightly.night(night)
    out.prepare()  # a missing bucket fails here; a root deleted later fails the run, never re-created
    records = list_images_task(archive)
    done = nightly.done(model.version if rescore else None)
    todo = [r for r in records if r.uri not in done]
    summary = {"night": night, "results": out.root, "model_version": model.version, "threshold": model.threshold,
               "pixel_threshold": model.pixel_threshold,
               "listed": len(records), "already_scored": len(records) - len(todo), "rescore": rescore}
    if not todo and nightly.published(night):
        logger.info("nothing to score: all %d images of %s were scored already%s", len(records), archive,
                    f" by {model.version}" if rescore else "")
        summary.update(scored_now=0, skipped_now=0, score_s=time.perf_counter() - started)
        create_markdown_artifact(key="score-summary", markdown="# Nightly scoring: nothing new\n\n"
                                 + markdown_table(summary), description=f"scoring of {archive}")
        _publish_trend(nightly)
    else:
        if todo:
            logger.info("scoring %d of %d images of %s with %s into %s", len(todo), len(records), archive,
                        model.version, out.root)
            scored = score_records(todo, model, manifest, out, out.next_part(), batch_size, tiles_per_task)
        else:
            logger.warning("nothing to score, but a run of night %s was cut short after merging its tables: "
                           "writing its summary, history row and report now", night)
            scored = {"errors": [], "staged": {}}
        summary.update(scored_now=len(todo) - len(scored["errors"]), skipped_now=len(scored["errors"]),
                       score_s=time.perf_counter() - started)
        # publish_scores merged every run of the night: its counts and quantiles are the night's,
        # one per image (from its newest version's row)
        title = f"Nightly scoring {night}"
        try:
            summary, overlays = publish_scores(logger, out, summary, scored["errors"], title, previews=previews,
                                               staged=scored["staged"])
        finally:
            remove_staged_copies(scored["staged"])
        out.require()
        nightly.write_history(night, {
            "night": night, "model_version": model.version, "threshold": model.threshold,
            "images": summary["images"], "rows": summary["rows"], "flagged": summary.get("flagged", 0),
            "errors": summary["errors_total"],
            **{key: summary.get(key, float("nan")) for key in ("score_p50", "score_p90", "score_p99", "score_max")},
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        trend_chart = _publish_trend(nightly)
        if summary["images"]:
            write_scoring_report(out, summary, overlays, f"{title}: {out.root}", trend_chart)
        if todo and not summary["scored_now"]:
            raise NothingScoredError(f"none of the {len(todo)} images to score in {archive} could be scored "
                                     f"({len(scored['errors'])} error rows in {out.root})")
    return summary


def _publish_trend(nightly: NightlyResults) -> bytes | None:
    """Flagged images per night (the last TREND_NIGHTS): a table artifact, RESULTS/trend.png, and
    a Markdown artifact with the rounded figures and a link to the chart. Returns the chart."""
    history = nightly.history()
    if not len(history):
        return None
    history = history.sort_values("night").tail(TREND_NIGHTS)
    create_table_artifact(key="flagged-trend", description="images flagged per night",
                          table=[{"night": row.night, "model_version": row.model_version, "images": int(row.images),
                                  "flagged": int(row.flagged), "errors": int(row.errors),
                                  "score_p99": None if pd.isna(row.score_p99) else round(float(row.score_p99), 4)}
                                 for row in history.itertuples()])
    chart = trend_png(list(history.night), [int(n) for n in history.flagged], [int(n) for n in history.images])
    url = nightly.write_trend(chart)
    lines = [f"Chart: [trend.png]({ResultStore(nightly.root).link(url)})", "",
             "| night | version | flagged | of | flagged share |", "|---|---|---|---|---|"]
    lines += [f"| {row.night} | {row.model_version} | {int(row.flagged)} | {int(row.images)} | "
              f"{(100 * row.flagged / row.images if row.images else 0):.1f} % |" for row in history.itertuples()]
    create_markdown_artifact(key="flagged-trend-chart", markdown="# Flagged per night\n\n" + "\n".join(lines),
                             description="images flagged per night")
    return chart


@flow(name="nightly-refit", flow_run_name=run_name("nightly-refit {root}"), log_prints=True)
def nightly_refit_flow(images: str, root: str, split: str | None = None, feature_config: dict | None = None,
                       detector: str = "patchcore", detector_config: dict | None = None, batch_size: int = 32,
                       dask_address: str | None = None, workers: int | None = None, auto: bool = False,
                       holdout_fraction: float = HOLDOUT_FRACTION, threshold_quantile: float = THRESHOLD_QUANTILE,
                       full: bool = False, runtime: str | None = None, allow_sources: str | None = None,
                       device: str | None = None, settings: dict | None = None, config_file: dict | None = None) -> dict:
    """The scheduled re-fit: absorb the nominal images that arrived since the last fit, with the
    settings ``patchwatch deploy`` was given (``settings``, ``config_file``: recorded in the
    manifest as ``patchwatch fit`` records them)."""
    with one_nightly_run_per_root(root), workers_environment(runtime, allow_sources, device), \
            dask_cluster(dask_address, workers) as address:
        return run_on_dask(fit_flow, address, images=images, root=root, split=split, feature_config=feature_config,
                           detector=detector, detector_config=detector_config, batch_size=batch_size, auto=auto,
                           holdout_fraction=holdout_fraction, threshold_quantile=threshold_quantile, full=full,
                           settings=settings, config_file=config_file)


@flow(name="nightly-score", flow_run_name=run_name("nightly-score {results}"), log_prints=True)
def nightly_score_flow(archive: str, root: str, results: str, batch_size: int = 16,
                       dask_address: str | None = None, workers: int | None = None, rescore: bool = False,
                       runtime: str | None = None, allow_sources: str | None = None,
                       device: str | None = None) -> dict:
    """The scheduled scoring: what no model has scored yet (``rescore``: what the current model
    has not), into tonight's partition."""
    with one_nightly_run_per_root(root), workers_environment(runtime, allow_sources, device), \
            dask_cluster(dask_address, workers) as address:
        return run_on_dask(score_new_flow, address, archive=archive, root=root, results=results,
                           batch_size=batch_size, rescore=rescore)


@contextlib.contextmanager
def workers_environment(runtime: str | None, allow_sources: str | None, device: str | None = None):
    """What the command's --runtime, --device and --allow-sources set for its run (they are read where the
    backbone runs and where the images are listed): set in this flow run's process for the run,
    so that the local Dask workers it starts inherit them; the previous values restored after."""
    from patchwatch.anomaly.runtime import DEVICE_ENV, RUNTIME_ENV
    from patchwatch.storage.images import ALLOW_SOURCES_ENV

    wanted = {name: value for name, value in ((RUNTIME_ENV, runtime), (DEVICE_ENV, device),
                                              (ALLOW_SOURCES_ENV, allow_sources))
              if value is not None}
    previous = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def concurrency_limit_name(root: str) -> str:
    """The Prefect global concurrency limit (one slot) that the nightly flows of one model root share."""
    return f"patchwatch-root-{hashlib.sha256(str(root).rstrip('/').encode()).hexdigest()[:16]}"


@contextlib.contextmanager
def one_nightly_run_per_root(root: str):
    """Hold the root's one-slot global concurrency limit: a re-fit and a scoring run of the same
    root never overlap (the later one waits for the slot, whoever started it: schedule, UI, CLI).
    The limit is created on first use (``patchwatch deploy`` creates it too)."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    name = concurrency_limit_name(root)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, 1)
    with concurrency(name, occupy=1, strict=True):
        yield
