"""Evaluate flow: fit on a split CSV's train rows, score its test rows, compute the metrics."""
from __future__ import annotations

import io
import json
import math
import time

import numpy as np
import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from sklearn.metrics import roc_curve
from tqdm.auto import tqdm

from patchwatch.anomaly.pictures import MapScale, pro_png, roc_png
from patchwatch.anomaly.metrics import PixelCurves, evaluate_detection, pixel_group
from patchwatch.storage.images import ImageReadError, read_mask
from patchwatch.storage.locations import join
from patchwatch.storage.model_store import ModelRegistry
from patchwatch.storage.results_store import ResultStore

from .defaults import HOLDOUT_FRACTION, THRESHOLD_QUANTILE
from .fit import fit_flow
from .html_report import evaluation_report
from .pictures import render_overlays
from .report import markdown_table
from .runner import dask_cluster, run_name, run_on_dask
from .score import REPORT, score_flow

OVERLAYS = 4  # of each kind: most anomalous, highest-scored good, lowest-scored defective


def _clean(value):
    """JSON has no NaN: undefined metrics are written as null."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


@flow(name="evaluate", flow_run_name=run_name("evaluate {split_csv}"), log_prints=True)
def evaluate_flow(split_csv: str, out: str, feature_config: dict | None = None,
                  detector: str = "patchcore", detector_config: dict | None = None, batch_size: int = 32, dask_address: str | None = None,
                  workers: int | None = None, auto: bool = False, holdout_fraction: float = HOLDOUT_FRACTION,
                  threshold_quantile: float = THRESHOLD_QUANTILE, settings: dict | None = None,
                  config_file: dict | None = None) -> dict:
    logger = get_run_logger()
    root, results = join(out, "model"), join(out, "results")
    with dask_cluster(dask_address, workers) as address:
        fit = run_on_dask(fit_flow, address, images=split_csv, root=root, split="train",
                          feature_config=feature_config, detector=detector, detector_config=detector_config,
                          batch_size=batch_size, auto=auto, holdout_fraction=holdout_fraction,
                          threshold_quantile=threshold_quantile, settings=settings, config_file=config_file)
        # no previews: evaluate draws its own overlays, with labels and masks, into the same folder
        scored = run_on_dask(score_flow, address, images=split_csv, root=root, results=results, split="test",
                             batch_size=batch_size, previews=0)
    started = time.perf_counter()
    store = ResultStore(results)
    table = store.scores().sort_values("image_id").reset_index(drop=True)
    # Each map is read once, binned into fixed-size histograms (PixelCurves) and dropped: memory
    # stays flat however many pixels the test split holds; the overlays read their few maps again.
    pixels, labels, types, kept = PixelCurves(), [], [], []
    for row in tqdm(table.itertuples(index=False), total=len(table), desc="metrics", unit="image"):
        amap = store.read_map(row.image_id)
        has_mask = isinstance(row.mask_uri, str) and row.mask_uri
        try:
            mask = read_mask(row.mask_uri, amap.shape) if has_mask else None
        except ImageReadError as error:
            logger.error("left out of the metrics: %s", error)
            continue
        label, kind = row.label == "defect", "" if pd.isna(row.defect_type) else str(row.defect_type)
        pixels.add(amap, mask, group=pixel_group(label, kind))
        labels.append(label)
        types.append(kind)
        kept.append(row)
    table = pd.DataFrame(kept)
    metrics = evaluate_detection(np.array(labels), table.score.to_numpy(), defect_types=types, pixels=pixels)
    # a fit with nothing new made no version and took no extraction time
    metrics["timings"] = {**{k: fit.get(k, 0.0) for k in ("fit_s", "extract_s", "coreset_s", "index_s")},
                          "score_s": scored["score_s"], "metrics_s": time.perf_counter() - started}
    metrics["detector"] = fit.get("detector", detector)  # --auto may have chosen another
    if fit.get("auto"):
        metrics["auto"] = {k: fit["auto"][k] for k in ("chosen", "reason", "seconds", "kept_from") if k in fit["auto"]}
    metrics["model_version"] = fit["version"]
    metrics["nominal_threshold"] = _at_threshold(np.array(labels), table.score.to_numpy(), scored["threshold"])
    metrics["counts"] = {"train_images": fit.get("images"), "holdout_images": fit.get("holdout_images"),
                         "test_images": int(len(table)), "skipped": fit["skipped"] + scored["skipped"]}
    metrics = _clean(metrics)
    store.write_file("metrics.json", json.dumps(metrics, indent=2).encode())
    ModelRegistry(root).model(fit["version"]).write_metrics({**metrics, "split_csv": split_csv})
    table.assign(anomalous_at_f1=table.score >= (metrics["f1_threshold"] or np.inf)).to_csv(
        buf := io.StringIO(), index=False)
    store.write_file("scores.csv", buf.getvalue().encode())
    report = _write_report(store, table, np.array(labels), metrics, pixels, scored["threshold"], split_csv, logger,
                           scored.get("pixel_threshold"))
    create_markdown_artifact(key="evaluation", markdown="# Evaluation\n\n" + markdown_table(
        {k: v for k, v in metrics.items() if not isinstance(v, dict)}), description=f"evaluation of {split_csv}")
    return {**metrics, "report": report}


def _number(value) -> float:
    """A metric as a float (null, i.e. undefined, as NaN)."""
    return math.nan if value is None else float(value)


def _at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float | None) -> dict:
    """How the threshold set from held-out nominal images alone does on the labelled test rows."""
    if threshold is None:
        return {"threshold": None}
    flagged = scores > threshold
    hits = int((flagged & labels).sum())
    precision = hits / flagged.sum() if flagged.sum() else float("nan")
    recall = hits / labels.sum() if labels.sum() else float("nan")
    return {"threshold": threshold, "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if hits else 0.0,
            "nominal_flagged_rate": float(flagged[~labels].mean()) if (~labels).any() else float("nan")}


def _write_report(store: ResultStore, table: pd.DataFrame, labels: np.ndarray, metrics: dict, pixels: PixelCurves,
                  threshold: float | None, split_csv: str, logger, pixel_threshold: float | None = None) -> str:
    """RESULTS/report.html: the metrics, ROC and PRO curves, per-defect figures, and overlays of
    the most anomalous images, the highest-scored good ones and the lowest-scored defective ones
    (OVERLAYS of each). Returns its URL."""
    scores = table.score.to_numpy() if len(table) else np.zeros(0)
    # the colour scale is the model's threshold's; without one (too few nominal images), the best-F1 threshold's
    scale = MapScale.around(threshold if threshold is not None else metrics.get("f1_threshold"), scores,
                            pixel_threshold)
    order = np.argsort(-scores, kind="stable")
    rows = list(table.itertuples(index=False))  # not iloc: a Series row has a .map method, not the map column
    picks = [("most-anomalous", rows[i]) for i in order[:OVERLAYS]]
    picks += [("false-alarm", rows[i]) for i in order if not labels[i]][:OVERLAYS]
    picks += [("missed", rows[i]) for i in order[::-1] if labels[i]][:OVERLAYS]
    overlays = render_overlays(store, picks, scale, logger)
    by_kind = {kind: [o for o in overlays if o.kind == kind] for kind in ("most-anomalous", "false-alarm", "missed")}
    if labels.any() and (~labels).any():
        false_positive_rate, true_positive_rate, _ = roc_curve(labels, scores)
    else:  # one class only: no curve
        false_positive_rate = true_positive_rate = np.zeros(0)
    fpr, pro = pixels.pro_curve()
    page = evaluation_report(metrics, roc_png(false_positive_rate, true_positive_rate, _number(metrics.get("image_auroc"))),
                             pro_png(fpr, pro, _number(metrics.get("aupro"))), by_kind, scale.describe(),
                             f"Evaluation of {split_csv}")
    url = store.write_file(REPORT, page.encode())
    create_link_artifact(key="report", link=store.link(url), link_text=REPORT,
                         description=f"evaluation of {split_csv}: metrics, curves, worst images")
    return url
