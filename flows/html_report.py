"""report.html: the page to open first after ``evaluate`` and after each night's scoring.

Pure: numbers and PNG bytes in, one HTML string out. The pictures are embedded as data URIs, so
the page needs nothing beside it: it works from a local folder, from a copy downloaded from S3
or attached to a mail. Every name that comes from the data (file names, defect types) is escaped.
"""
from __future__ import annotations

import base64
import html
import math
import time

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f3f3f3; text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.curves img { width: 420px; margin-right: 1em; }
.gallery { display: flex; flex-wrap: wrap; gap: 1em; }
.gallery figure { margin: 0; width: 560px; } .gallery img { width: 100%; border: 1px solid #ccc; }
figcaption { font-size: 0.85em; color: #555; word-break: break-all; }
.note { color: #555; font-size: 0.9em; } .flag { color: #b03a2e; font-weight: bold; }
"""


def _number(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _image(png: bytes, alt: str, **attributes) -> str:
    extra = "".join(f' {k}="{html.escape(str(v))}"' for k, v in attributes.items())
    return (f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"{extra}>')


def _key_values(values: dict, labels: dict | None = None) -> str:
    rows = "".join(f"<tr><th>{html.escape((labels or {}).get(k, k))}</th><td class=n>{html.escape(_number(v))}</td></tr>"
                   for k, v in values.items() if not isinstance(v, (dict, list)))
    return f"<table>{rows}</table>"


def _rows(columns: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td class=n>{html.escape(_number(v, 3))}</td>" if not isinstance(v, str)
                                    else f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _gallery(heading: str, explanation: str, overlays: list) -> str:
    if not overlays:
        return f"<h2>{html.escape(heading)}</h2><p class=note>none</p>"
    figures = []
    for overlay in overlays:
        flag = ("" if overlay.flagged is None else
                " <span class=flag>flagged</span>" if overlay.flagged else " not flagged")
        figures.append(f"<figure>{_image(overlay.png, f'overlay of {overlay.image_id}', loading='eager')}"
                       f"<figcaption>{overlay.rank + 1}. {html.escape(overlay.image_id)}: score "
                       f"{_number(overlay.score)}{flag}<br>{html.escape(overlay.uri)}<br>"
                       f"overlays/{html.escape(overlay.name)}</figcaption></figure>")
    return (f"<h2>{html.escape(heading)}</h2><p class=note>{html.escape(explanation)}</p>"
            f"<div class=gallery>{''.join(figures)}</div>")


def _page(title: str, body: str) -> str:
    written = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class=note>written by patchwatch, {written}</p>{body}</body></html>")


SUMMARY_LABELS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO (pixel FPR <= 0.3)",
                  "f1_max": "best F1 (over all thresholds)", "f1_threshold": "threshold of the best F1",
                  "n_images": "test images", "n_anomalous": "of which defective"}


def evaluation_report(metrics: dict, roc_png: bytes, pro_png: bytes, picks: dict[str, list], scale_text: str,
                      title: str) -> str:
    """The evaluation page: summary figures, how the nominal threshold does, ROC and PRO curves,
    the per-defect-type table, and overlays of the most anomalous images, the highest-scored good
    images and the lowest-scored defective ones (``picks``: overlays by kind)."""
    summary = {k: metrics.get(k) for k in ("n_images", "n_anomalous", "image_auroc", "pixel_auroc", "aupro",
                                           "f1_max", "f1_threshold")}
    summary.update({"model version": metrics.get("model_version"), "detector": metrics.get("detector")})
    at = metrics.get("nominal_threshold") or {}
    threshold = ("<p class=note>The model has no threshold (too few nominal images to hold any out).</p>"
                 if at.get("threshold") is None else
                 "<h2>At the model's threshold</h2><p class=note>Set from held-out defect-free images only; "
                 "this is what score and score-new flag.</p>" + _key_values(
                     {"threshold": at.get("threshold"), "precision": at.get("precision"), "recall": at.get("recall"),
                      "F1": at.get("f1"), "good images flagged (rate)": at.get("nominal_flagged_rate")}))
    per_type = metrics.get("per_defect_type") or {}
    rows = [[name, values.get("n_anomalous"), values.get("image_auroc"), values.get("pixel_auroc"),
             values.get("aupro"), values.get("f1_max")] for name, values in per_type.items()]
    body = (f"<h2>Summary</h2>{_key_values(summary, SUMMARY_LABELS)}{threshold}"
            f"<h2>Curves</h2><div class=curves>{_image(roc_png, 'image-level ROC curve')}"
            f"{_image(pro_png, 'pixel-level PRO curve')}</div>"
            "<h2>Per defect type</h2><p class=note>Each type against all good test images.</p>"
            + (_rows(["defect type", "defective images", "image AUROC", "pixel AUROC", "AUPRO", "best F1"], rows)
               if rows else "<p class=note>no defect types</p>")
            + f"<p class=note>Overlays: {html.escape(scale_text)}. Cyan: the ground-truth defect outline.</p>"
            + _gallery("Most anomalous", "The highest-scored test images.", picks.get("most-anomalous", []))
            + _gallery("Highest-scored good images", "Defect-free images the model finds most unusual: "
                       "false alarms when above the threshold.", picks.get("false-alarm", []))
            + _gallery("Lowest-scored defective images", "Defects the model finds least unusual: "
                       "missed when below the threshold.", picks.get("missed", [])))
    return _page(title, body)


def scoring_report(summary: dict, overlays: list, scale_text: str, title: str, trend_png: bytes | None = None,
                   errors: list[dict] | None = None) -> str:
    """The page of a scoring run (``score``, or one night of ``score-new``): its counts, the
    flagged-per-night trend (nightly), the most anomalous images, and the files it skipped."""
    shown = {k: v for k, v in summary.items() if k not in ("results", "score_table", "errors")}
    body = f"<h2>Summary</h2>{_key_values(shown)}"
    if trend_png is not None:
        body += f"<h2>Trend</h2>{_image(trend_png, 'images flagged per night')}"
    body += f"<p class=note>Overlays: {html.escape(scale_text)}.</p>"
    body += _gallery("Most anomalous", "The highest-scored images of this run, highest first.", overlays)
    if errors:
        body += "<h2>Skipped files</h2>" + _rows(["file", "reason"], [[str(e.get("uri", "")), str(e.get("reason", ""))]
                                                                      for e in errors])
    return _page(title, body)
