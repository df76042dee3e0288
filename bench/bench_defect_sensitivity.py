"""Why a built set's image AUROC is low: the defects, or the nominal images?

The quality benchmark's sets render each defective test image from a clean shot (the same surface,
exposure and sensor noise without the defect: ``eval_sets.render_image``). Scoring both separates
two causes of a low image AUROC:

- paired AUROC: each defective image against its own clean shot. Near 1: the model sees the
  defects; near 0.5: the defect hardly moves the image score, whatever the other images do;
- clean shots vs good test images: the same kind of images without defects, drawn from the pools
  the set gave its defective and its good test images. Near 0.5 unless those pools differ: below
  it, the defective images' surfaces are less unusual than the good ones (the set's image AUROC is
  pulled down by that alone);
- peak on defect: the share of defective images whose map maximum lies within 8 px of the defect;
- good maxima on the border: the share of good test images whose map maximum lies in a band along
  the image's border (as the quality benchmark's border/inner: 1/16 of the shorter side), against
  the band's share of the image: well above it, the border sets the good images' scores, and a
  small defect inside must beat it.

A second table splits the defective images by how visible their defect is: the mean absolute
change it makes inside its mask, in units of the clean shot's own local spread (the standard
deviation of the clean pixels in a ring around the mask). A defect below 1 changes its pixels by
less than the texture already varies around it. Per band and per defect kind: how many the
configuration finds at a 5 % false-alarm rate (image score above the 95th percentile of the good
test images' scores) and how many lift their image above its own clean shot.

Each (set, configuration) is fitted on the set's train images and scores its test images as the
quality benchmark does (``anomaly.engine``; the input size resolved per set as a fit resolves it).
MTD has no clean shots and is not measured here.
Usage: python bench/bench_defect_sensitivity.py [--sets fine-texture,...] [--configs padim,...]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _common as common  # noqa: E402
import bench_generalisation as quality  # noqa: E402
import eval_sets  # noqa: E402

PEAK_MARGIN = 8  # px around the defect's mask that count as "on the defect"
RING = (4, 20)   # px: the ring around a defect's mask whose clean pixels give its local spread
VISIBILITY_BANDS = (0.0, 0.5, 1.0, 2.0, np.inf)  # edges, in local standard deviations
FALSE_ALARMS = 0.05  # "found": scored above this share of the good test images at most


def visibility(image: np.ndarray, clean: np.ndarray, mask: np.ndarray) -> float:
    """Mean |image - clean| inside ``mask`` over the standard deviation of the clean shot in a ring
    RING px around it: how far the defect stands out of the texture it sits on."""
    from scipy.ndimage import binary_dilation

    image, clean = np.squeeze(image).astype(np.float64), np.squeeze(clean).astype(np.float64)
    if image.ndim == 3:  # colour: the grey level's change
        image, clean = image.mean(2), clean.mean(2)
    inner = binary_dilation(mask, iterations=RING[0])
    ring = binary_dilation(mask, iterations=RING[1]) & ~inner
    spread = float(clean[ring].std()) if ring.any() else 0.0
    change = float(np.abs(image - clean)[mask].mean())
    return change / spread if spread > 0 else np.inf


def band_label(low: float, high: float) -> str:
    return f">= {low:g}" if np.isinf(high) else f"{low:g} - {high:g}"


def by_visibility(per_defect: list[dict]) -> list[dict]:
    """Rows per (set, config, band) and per (set, config, kind): counts, found, above own clean shot."""
    rows = []
    for key in dict.fromkeys((d["set"], d["config"]) for d in per_defect):  # first-seen order
        mine = [d for d in per_defect if (d["set"], d["config"]) == key]
        groups = [(f"visibility {band_label(low, high)}", [d for d in mine if low <= d["visibility"] < high])
                  for low, high in zip(VISIBILITY_BANDS[:-1], VISIBILITY_BANDS[1:])]
        groups += [(f"kind {kind}", [d for d in mine if d["kind"] == kind]) for kind in sorted({d["kind"] for d in mine})]
        for label, group in groups:
            rows.append({"set": key[0], "config": key[1], "defects": label, "count": len(group),
                         "median visibility": float(np.median([d["visibility"] for d in group])) if group else None,
                         "found at 5 % false alarms": float(np.mean([d["found"] for d in group])) if group else None,
                         "above own clean shot": float(np.mean([d["above clean"] for d in group])) if group else None,
                         "peak on defect": float(np.mean([d["peak"] for d in group])) if group else None})
    return rows


def peak_on_defect(amap: np.ndarray, mask: np.ndarray) -> bool:
    from scipy.ndimage import binary_dilation

    near = binary_dilation(mask, iterations=PEAK_MARGIN)
    return bool(near.flat[int(np.argmax(amap))])



def measure(data, candidate, tiling) -> dict:
    import torch
    from sklearn.metrics import roc_auc_score

    from patchwatch.anomaly.engine import extract_views, fit_detector, score_features, training_views
    from patchwatch.anomaly.features import PatchFeatureExtractor

    torch.set_num_threads(1)
    recipe = eval_sets.SETS[data.name]
    extractor = PatchFeatureExtractor(candidate.features)
    started = time.perf_counter()
    detector = fit_detector(candidate.detector, candidate.settings,
                            [f for image in data.train for _, f in training_views(extractor, image, tiling)])

    def scored(image: np.ndarray):
        return score_features(detector, extract_views(extractor, image, tiling), image.shape[:2], tiling)

    test = [scored(image) for image in data.test]
    scores = np.array([s.score for s in test])
    defective = np.flatnonzero(data.labels)
    # the built set's defective images are its test_defect renders in order (eval_sets.build)
    renders = [eval_sets.render_image(data.name, recipe, "test_defect", i) for i in range(len(defective))]
    for render, row in zip(renders, defective):
        if not np.array_equal(render.image, np.squeeze(data.test[row])):
            raise RuntimeError(f"{data.name}: test image {row} is not the render of test_defect {row}: rebuild the set")
    clean = np.array([scored(render.clean).score for render in renders])
    good_rows = np.flatnonzero(~data.labels)
    good = scores[good_rows]
    rise = scores[defective] / clean - 1
    on_defect = [peak_on_defect(test[row].map, data.masks[row]) for row in defective]
    alarm = np.quantile(good, 1 - FALSE_ALARMS)
    bands = [quality.border_mask(test[row].map.shape) for row in good_rows]  # border/inner's band
    per_defect = [{"set": data.name, "config": candidate.name, "kind": render.defect_type,
                   "visibility": visibility(render.image, render.clean, render.mask),
                   "found": bool(scores[row] > alarm), "above clean": bool(scores[row] > clean[k]),
                   "peak": bool(on_defect[k])}
                  for k, (render, row) in enumerate(zip(renders, defective))]
    return per_defect, {"set": data.name, "config": candidate.name, "test good / defective": f"{len(good)} / {len(defective)}",
            "image AUROC": roc_auc_score(data.labels, scores),
            "paired AUROC (defective vs own clean shot)": roc_auc_score(
                np.r_[np.ones(len(defective)), np.zeros(len(clean))], np.r_[scores[defective], clean]),
            "defective above own clean shot": float(np.mean(scores[defective] > clean)),
            "median score rise": float(np.median(rise)),
            "clean shots vs good test images AUROC": roc_auc_score(
                np.r_[np.ones(len(clean)), np.zeros(len(good))], np.r_[clean, good]),
            "peak on defect": float(np.mean(on_defect)),
            "good maxima on the border": float(np.mean([band.flat[int(np.argmax(test[row].map))]
                                                        for band, row in zip(bands, good_rows)])),
            "border band's share": float(np.mean([band.mean() for band in bands])),
            "s": time.perf_counter() - started}


def main() -> None:
    from patchwatch.anomaly.settings import TilingConfig

    parser = common.base_parser(__doc__, "defect_sensitivity")
    built = [name for name, entry in eval_sets.SETS.items() if not isinstance(entry, eval_sets.ExternalSet)]
    parser.add_argument("--work", default="/tmp/evalsets", help="where the sets are built (default %(default)s)")
    parser.add_argument("--sets", default=",".join(built), help="comma-separated (default: every built set)")
    parser.add_argument("--configs", default="padim", help="comma-separated configuration names (default %(default)s: "
                                                           "the default, --auto's pick on every set)")
    args = parser.parse_args()
    started, machine = time.perf_counter(), common.machine_info()
    tiling = TilingConfig()
    configs = quality.configurations()
    rows, defects = [], []
    for data in quality.load_sets(args.sets.split(","), Path(args.work), 1.0, None):
        for name in args.configs.split(","):
            per_defect, row = measure(data, quality.for_set(configs[name], data, tiling), tiling)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            rows.append(row)
            defects.extend(per_defect)
    meta = {"command": common.command_line(), "date": common.utc_now(), "machine": machine, "measures_memory": False,
            "defects": defects,  # every defective test image (JSON only)
            "wall_s": time.perf_counter() - started, "parameters": {"sets": args.sets, "configs": args.configs}}
    notes = ["image AUROC: the set's test split, as in generalisation.md (same fit, same scores)",
             "paired AUROC: each defective test image against its own clean shot (the same render without the "
             "defect); median score rise: defective / clean - 1",
             "clean shots vs good test images: 0.5 when the pools of the set's defective and good test images are "
             "alike; below it, the defective images' surfaces score lower even without their defects",
             f"peak on defect: the map's maximum within {PEAK_MARGIN} px of the defect's mask",
             "good maxima on the border: good test images whose map maximum lies in a band along the image's "
             "border (1/16 of the shorter side, as border/inner in generalisation.md); border band's share: "
             "that band's share of the image's pixels (what the maxima would give if they fell anywhere)"]
    common.report(args.out, args.name, "Defect sensitivity on the built sets: the defects, or the nominal images?",
                  meta, [{"title": "Per set and configuration", "rows": rows, "notes": notes},
                         {"title": "Which defects it finds: by visibility and by kind", "rows": by_visibility(defects),
                          "notes": [f"visibility: mean |defective - clean| inside the mask over the clean shot's standard "
                                    f"deviation in a ring {RING[0]}-{RING[1]} px around the mask",
                                    f"found: image score above the {1 - FALSE_ALARMS:.0%} quantile of the good test "
                                    f"images' scores (a {FALSE_ALARMS:.0%} false-alarm rate)",
                                    "above own clean shot: the image scores above the same render without its defect"]}])


if __name__ == "__main__":
    main()
