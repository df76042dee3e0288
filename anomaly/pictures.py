"""Pictures for people: anomaly-map overlays, ROC/PRO curves and the nightly trend, as PNG bytes.

Pure rendering (arrays and numbers in, PNG bytes out) with matplotlib's Agg canvas; writing the
files is the storage layer's job.

The colour scale of an overlay is fixed per model, never per image (:class:`MapScale`): it spans
half the threshold to one and a half times the threshold, so the threshold sits in the middle of
the colour bar and equal colours mean equal scores in every overlay of a run. The heat layer
fades to transparent towards the bottom of the scale, so a clean image (or a missed defect) shows
the photo itself with little colour rather than a plain blue sheet.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

# a heat ramp without cyan, so the ground-truth outline stays visible on any score
COLOUR_MAP = "inferno"
OUTLINE_COLOUR = "#00ffff"
THRESHOLD_COLOUR = "#ffffff"
# the longest side, in pixels, that an overlay's image and map are drawn at: enough to see a
# defect, small enough that a preview of a 20k x 20k image stays a small PNG
DRAW_SIDE = 768
DPI = 100


@dataclass(frozen=True)
class MapScale:
    """The colour scale of every overlay of one run: ``low`` maps to the bottom of the colour bar
    (transparent), ``high`` to the top; ``threshold`` (on the maps' scale, may be None) is marked
    on the bar; ``image_threshold`` (the model's image threshold) decides the flag in the title.
    Map values and image scores are on different scales (the image score is eq. 7's re-weighted
    maximum), so the bar marks the model's pixel threshold when it has one."""

    low: float
    high: float
    threshold: float | None
    image_threshold: float | None = None

    @property
    def flag_threshold(self) -> float | None:
        return self.image_threshold if self.image_threshold is not None else self.threshold

    @classmethod
    def around(cls, threshold: float | None, scores=(), pixel_threshold: float | None = None) -> "MapScale":
        """[0.5 T, 1.5 T] around the pixel threshold T (else the image threshold). Without a
        threshold (a model fitted on too few images to hold any out), the run's own image scores
        set the range: lowest to highest."""
        usable = [t for t in (pixel_threshold, threshold) if t is not None and math.isfinite(t) and t > 0]
        if usable:
            return cls(0.5 * usable[0], 1.5 * usable[0], usable[0], threshold)
        values = np.asarray(list(scores), dtype=np.float64)
        values = values[np.isfinite(values)]
        if not values.size:
            return cls(0.0, 1.0, None)
        low, high = float(values.min()), float(values.max())
        return cls(low, high if high > low else low + 1.0, None)

    @property
    def marks_pixel_threshold(self) -> bool:
        return self.threshold is not None and self.image_threshold is not None and self.threshold != self.image_threshold

    def describe(self) -> str:
        """The scale in words, for reports."""
        if self.marks_pixel_threshold:
            return (f"colour scale fixed for the run: {self.low:.4g} (transparent) to {self.high:.4g}, "
                    f"i.e. 0.5x to 1.5x the pixel threshold {self.threshold:.4g} (the maps' own; images "
                    f"are flagged by their score against the image threshold {self.image_threshold:.4g})")
        if self.threshold is not None:
            return (f"colour scale fixed for the run: {self.low:.4g} (transparent) to {self.high:.4g}, "
                    f"i.e. 0.5x to 1.5x the threshold {self.threshold:.4g}")
        return f"colour scale fixed for the run: {self.low:.4g} to {self.high:.4g} (the run's image scores; no threshold)"


def _figure(width_in: float, height_in: float, layout: str | None = None):
    # the object-oriented API with its own Agg canvas: no pyplot state, safe in worker threads
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), dpi=DPI, layout=layout)
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    """The figure as an RGB PNG (no alpha channel: a quarter smaller, and what viewers expect)."""
    from PIL import Image

    figure.canvas.draw()
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(figure.canvas.buffer_rgba())[..., :3]).save(buffer, format="PNG")
    return buffer.getvalue()


def _rgb(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) float in [0, 1] from grey/RGB(A) arrays of any integer depth."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    scaled = image.astype(np.float32) / np.float32(np.iinfo(image.dtype).max) \
        if np.issubdtype(image.dtype, np.integer) else image.astype(np.float32)
    if scaled.shape[2] in (2, 4):
        scaled = scaled[:, :, :-1]
    if scaled.shape[2] == 1:
        scaled = np.repeat(scaled, 3, axis=2)
    return np.clip(scaled, 0, 1)


def heat_rgba(amap: np.ndarray, scale: MapScale) -> np.ndarray:
    """(H, W, 4) float: the map through :data:`COLOUR_MAP` on ``scale``, its opacity rising from 0
    at ``scale.low`` to 0.8 from the middle of the scale up (the threshold, when there is one)."""
    from matplotlib import colormaps

    level = np.clip((np.asarray(amap, np.float64) - scale.low) / (scale.high - scale.low), 0, 1)
    rgba = colormaps[COLOUR_MAP](level)
    rgba[..., 3] = 0.8 * np.clip(2 * level, 0, 1) ** 2  # faint below the threshold, opaque above
    return rgba


def overlay_png(image: np.ndarray, amap: np.ndarray, scale: MapScale, *, name: str, score: float,
                flagged: bool | None = None, mask: np.ndarray | None = None, note: str = "") -> bytes:
    """One image with its anomaly map as a heat layer, the colour bar (threshold marked), the
    ground-truth outline (``mask``, when known) and a title: ``name``, score, threshold, flag.

    ``flagged``: whether the run flagged it (None: no threshold); ``note``: one more line for the
    title (e.g. "missed defect (crack)")."""
    image, amap = np.asarray(image), np.asarray(amap)
    if amap.shape != image.shape[:2]:
        raise ValueError(f"map {amap.shape} and image {image.shape[:2]} differ in size")
    step = max(1, math.ceil(max(amap.shape) / DRAW_SIDE))  # draw large images at a viewable size
    image, amap = image[::step, ::step], amap[::step, ::step]
    mask = None if mask is None else np.asarray(mask, bool)[::step, ::step]
    height, width = amap.shape
    # constrained layout places title, picture and colour bar; the picture keeps its aspect
    figure = _figure(7.2, min(max(5.6 * height / width, 1.6), 9.0) + 1.3, layout="constrained")
    axes = figure.add_subplot()
    axes.imshow(_rgb(image), interpolation="nearest")
    axes.imshow(heat_rgba(amap, scale), interpolation="nearest")
    if mask is not None and mask.any():
        axes.contour(mask.astype(np.float32), levels=[0.5], colors=[OUTLINE_COLOUR], linewidths=2)
    axes.set_xticks([])
    axes.set_yticks([])

    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    bar = figure.colorbar(ScalarMappable(Normalize(scale.low, scale.high), colormaps[COLOUR_MAP]), ax=axes,
                          fraction=0.05, pad=0.02, label="pixel anomaly score")
    if scale.threshold is not None:
        bar.ax.axhline(scale.threshold, color=THRESHOLD_COLOUR, linewidth=3)
        bar.ax.axhline(scale.threshold, color="black", linewidth=1, linestyle="--")
        bar.ax.text(-0.15, scale.threshold, "pixel threshold" if scale.marks_pixel_threshold else "threshold", ha="right", va="center", fontsize=8,
                    transform=bar.ax.get_yaxis_transform())
    figure.suptitle(title_lines(name, score, scale.flag_threshold, flagged, note, outlined=mask is not None),
                    x=0.01, ha="left", fontsize=9, linespacing=1.4)
    return _png(figure)


def title_lines(name: str, score: float, threshold: float | None, flagged: bool | None, note: str = "",
                outlined: bool = False) -> str:
    """The overlay's title: what it is, how it scored against the threshold, and what is drawn."""
    if threshold is None:
        verdict = "no threshold (model fitted without held-out images)"
    elif flagged if flagged is not None else score > threshold:
        verdict = f"FLAGGED: score above threshold {threshold:.4g}"
    else:
        verdict = f"below threshold {threshold:.4g}: not flagged"
    lines = [name, f"score {score:.4g} | {verdict}"]
    if note or outlined:
        lines.append("; ".join(filter(None, [note, "cyan line: ground-truth defect outline" if outlined else ""])))
    return "\n".join(lines)


def roc_png(false_positive_rate, true_positive_rate, auroc: float, title: str = "Image-level ROC") -> bytes:
    """A ROC curve with its area in the legend and the chance diagonal."""
    figure = _figure(4.8, 4.4)
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    axes.plot(false_positive_rate, true_positive_rate, color="#c0392b", linewidth=2,
              label=f"AUROC {auroc:.3f}" if math.isfinite(auroc) else "AUROC undefined")
    axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="false positive rate (good images flagged)",
             ylabel="true positive rate (defects found)", title=title)
    axes.legend(loc="lower right")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return _png(figure)


def pro_png(false_positive_rate, per_region_overlap, aupro: float, fpr_limit: float = 0.3) -> bytes:
    """The PRO curve (mean overlap with each defect region against pixel FPR) up to ``fpr_limit``,
    the region whose area is AUPRO shaded."""
    fpr, pro = np.asarray(false_positive_rate), np.asarray(per_region_overlap)
    figure = _figure(4.8, 4.4)
    axes = figure.add_subplot()
    if fpr.size:
        keep = fpr <= fpr_limit
        axes.plot(fpr[keep], pro[keep], color="#2471a3", linewidth=2,
                  label=f"AUPRO@{fpr_limit:g} {aupro:.3f}" if math.isfinite(aupro) else "AUPRO undefined")
        axes.fill_between(fpr[keep], pro[keep], color="#2471a3", alpha=0.15)
        axes.legend(loc="lower right")
    else:
        axes.text(0.5, 0.5, "no defect masks: PRO undefined", ha="center", va="center", transform=axes.transAxes)
    axes.set(xlim=(0, fpr_limit), ylim=(0, 1.02), xlabel="pixel false positive rate",
             ylabel="per-region overlap", title="Pixel-level PRO curve")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return _png(figure)


def trend_png(nights: list[str], flagged: list[int], images: list[int]) -> bytes:
    """Bars of flagged images per night, the night's image count as a line on a second axis."""
    figure = _figure(max(5.0, 0.28 * len(nights) + 2.5), 3.6)
    axes = figure.add_subplot()
    positions = np.arange(len(nights))
    axes.bar(positions, flagged, color="#c0392b", label="flagged")
    axes.set_ylabel("images flagged")
    axes.set_ylim(0, max(1, max(flagged, default=0)) * 1.15)
    counts = axes.twinx()
    counts.plot(positions, images, color="#555555", marker="o", markersize=3, label="images scored")
    counts.set_ylabel("images scored")
    counts.set_ylim(0, max(1, max(images, default=0)) * 1.15)
    axes.set_xticks(positions, nights, rotation=60, ha="right", fontsize=7)
    axes.set_title("Flagged images per night")
    figure.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    return _png(figure)
