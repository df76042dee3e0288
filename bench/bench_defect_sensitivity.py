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
- peak on defect: the share of defective images whose map maximum lies within 8 px of the defect.

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


def peak_on_defect(amap: np.ndarray, mask: np.ndarray) -> bool:
    from scipy.ndimage import binary_dilation

    near = binary_dilation(mask, iterations=PEAK_MARGIN)
    return bool(near.flat[int(np.argmax(amap))])


def measure(data, candidate, tiling) -> dict:
    import torch
    from sklearn.metrics import roc_auc_score

    from patchwatch.anomaly.engine import extract_views, fit_detector, score_features
    from patchwatch.anomaly.features import PatchFeatureExtractor

    torch.set_num_threads(1)
    recipe = eval_sets.SETS[data.name]
    extractor = PatchFeatureExtractor(candidate.features)
    started = time.perf_counter()
    detector = fit_detector(candidate.detector, candidate.settings,
                            [f for image in data.train for _, f in extract_views(extractor, image, tiling)])

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
    good = scores[~data.labels]
    rise = scores[defective] / clean - 1
    on_defect = [peak_on_defect(test[row].map, data.masks[row]) for row in defective]
    return {"set": data.name, "config": candidate.name, "test good / defective": f"{len(good)} / {len(defective)}",
            "image AUROC": roc_auc_score(data.labels, scores),
            "paired AUROC (defective vs own clean shot)": roc_auc_score(
                np.r_[np.ones(len(defective)), np.zeros(len(clean))], np.r_[scores[defective], clean]),
            "defective above own clean shot": float(np.mean(scores[defective] > clean)),
            "median score rise": float(np.median(rise)),
            "clean shots vs good test images AUROC": roc_auc_score(
                np.r_[np.ones(len(clean)), np.zeros(len(good))], np.r_[clean, good]),
            "peak on defect": float(np.mean(on_defect)),
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
    rows = []
    for data in quality.load_sets(args.sets.split(","), Path(args.work), 1.0, None):
        for name in args.configs.split(","):
            row = measure(data, quality.for_set(configs[name], data, tiling), tiling)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            rows.append(row)
    meta = {"command": common.command_line(), "date": common.utc_now(), "machine": machine, "measures_memory": False,
            "wall_s": time.perf_counter() - started, "parameters": {"sets": args.sets, "configs": args.configs}}
    notes = ["image AUROC: the set's test split, as in generalisation.md (same fit, same scores)",
             "paired AUROC: each defective test image against its own clean shot (the same render without the "
             "defect); median score rise: defective / clean - 1",
             "clean shots vs good test images: 0.5 when the pools of the set's defective and good test images are "
             "alike; below it, the defective images' surfaces score lower even without their defects",
             f"peak on defect: the map's maximum within {PEAK_MARGIN} px of the defect's mask"]
    common.report(args.out, args.name, "Defect sensitivity on the built sets: the defects, or the nominal images?",
                  meta, [{"title": "Per set and configuration", "rows": rows, "notes": notes}])


if __name__ == "__main__":
    main()
