"""The pictures of a run: overlays of chosen images, written under the results root, and the
Prefect artifacts that point at them. Reading and writing go through the storage layer;
rendering is anomaly.pictures."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from patchwatch.anomaly.pictures import DRAW_SIDE, MapScale, overlay_png
from patchwatch.storage.images import ImageReadError, LargeImage, read_image, read_mask
from patchwatch.storage.results_store import ResultStore, picture_name

OVERLAY_FOLDER = "overlays"
# overlays of the most anomalous images that score and score-new write (a flow parameter too)
PREVIEWS = 12


@dataclass(frozen=True)
class Overlay:
    kind: str            # most-anomalous, false-alarm, missed
    rank: int
    image_id: str
    uri: str
    score: float
    flagged: bool | None
    label: str           # "defect", "good" or "" (unlabelled)
    defect_type: str
    name: str            # file name under OVERLAY_FOLDER
    url: str
    png: bytes


def _text(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def read_for_overlay(store: ResultStore, row, staged: str | None) -> tuple[np.ndarray, np.ndarray, int]:
    """(image, map, step): a large image and its map at the size the overlay is drawn (every
    step-th pixel), the image read from its staged copy or tiled TIFF (decoding a 12k x 12k PNG
    again cost as much as staging it); a small one whole."""
    step = max(1, math.ceil(max(int(row.height), int(row.width)) / DRAW_SIDE))
    amap = store.read_map(row.map, step)
    if step == 1:
        return read_image(row.uri), amap, step
    with LargeImage(row.uri, staged) as large:
        return large.strided(step), amap, step


def render_overlays(store: ResultStore, picks: list[tuple[str, object]], scale: MapScale,
                    logger: logging.Logger | logging.LoggerAdapter, staged: dict | None = None) -> list[Overlay]:
    """Render one overlay per (kind, score-table row) of ``picks`` (ranked within each kind) and
    write them all into RESULTS/overlays, replacing what an earlier run left there. ``staged``:
    {image_id: staged copy} of the run's large non-TIFF images. An image that cannot be read any
    more is logged and left out."""
    rendered, ranks = [], {}
    for kind, row in picks:
        rank = ranks[kind] = ranks.get(kind, -1) + 1
        label, defect_type = _text(getattr(row, "label", "")), _text(getattr(row, "defect_type", ""))
        mask_uri = _text(getattr(row, "mask_uri", ""))
        try:
            image, amap, step = read_for_overlay(store, row, (staged or {}).get(row.image_id))
            mask = read_mask(mask_uri, (int(row.height), int(row.width)))[::step, ::step] if mask_uri else None
        except (ImageReadError, OSError, KeyError) as error:
            logger.warning("no overlay for %s: %s", row.uri, error)
            continue
        flagged = None if scale.flag_threshold is None else bool(row.score > scale.flag_threshold)
        note = {"missed": f"defect ({defect_type or 'unnamed type'})",
                "false-alarm": "good image"}.get(kind, f"defect ({defect_type})" if label == "defect" else
                                                  "good image" if label == "good" else "")
        png = overlay_png(image, amap, scale, name=row.image_id, score=float(row.score), flagged=flagged,
                          mask=mask, note=note)
        rendered.append((kind, rank, row, flagged, label, defect_type,
                         picture_name(f"{kind}-{rank:02d}", row.image_id, row.uri), png))
    urls = store.write_pictures(OVERLAY_FOLDER, {name: png for *_, name, png in rendered})
    return [Overlay(kind, rank, row.image_id, row.uri, float(row.score), flagged, label, defect_type, name, urls[name],
                    png) for kind, rank, row, flagged, label, defect_type, name, png in rendered]


def most_anomalous(table: pd.DataFrame, count: int) -> list[tuple[str, object]]:
    """The ``count`` highest-scored rows of ``table`` as overlay picks."""
    if not len(table) or count <= 0:
        return []
    return [("most-anomalous", row) for row in table.nlargest(count, "score").itertuples(index=False)]


def overlay_table_markdown(store: ResultStore, overlays: list[Overlay]) -> str:
    """A Markdown table of ``overlays``: rank, image, score (4 significant digits), flag, a link
    to the picture."""
    if not overlays:
        return "(no overlays)"
    lines = ["| # | image | score | flagged | overlay |", "|---|---|---|---|---|"]
    for overlay in overlays:
        flag = "n/a" if overlay.flagged is None else ("**yes**" if overlay.flagged else "no")
        lines.append(f"| {overlay.rank + 1} | {overlay.image_id} | {overlay.score:.4g} | {flag} | "
                     f"[{overlay.name}]({store.link(overlay.url)}) |")
    return "\n".join(lines)
