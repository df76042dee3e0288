#!/usr/bin/env python
"""Detection quality on MTD: single-scale PatchCore on EfficientNet-Lite0 at scale 0.5 against a
few variants (backbone, input scale, smoothing, image score).

Every row fits PatchCore on the split's train rows and scores its test rows with the pure engine
(``PatchFeatureExtractor``, ``PatchCore``, ``anomaly_map``, ``anomaly.metrics``): image AUROC,
pooled pixel AUROC, AUPRO, pixel AUROC per defect type (good images + that type), pixel AUROC
pooled over the test images without the ``uneven`` ones, fit and score time. A second table takes
row 1 apart: which defect types hold the defect pixels, how the pooled pixel
AUROC changes without ``uneven``, and how the maps' overall level differs between good and
defective test images.

Features and fitted memories are cached per configuration in --work, so a rerun only recomputes
the maps and the metrics (the times it reports are those measured when the cache was filled).

    python bench/bench_quality.py                       # all rows, full MTD split (15-30 min on 2 cores)
    python bench/bench_quality.py --rows 1,8            # row 1 and its mean-score variant
    python bench/bench_quality.py --limit 40 --out /tmp/bench   # a quick check
"""
from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

LITE = "tf_efficientnet_lite{}"
# number -> (label, backbone, input scale, sigma, image score). Every row is single-scale
# (no context scales, maps from the whole vectors); all else is FeatureConfig() / PatchCoreConfig()
# as they are. patchwatch's PatchCore default adds a context scale: bench_detectors.py measures it.
ROWS = {
    1: ("Lite0, scale 0.5", LITE.format(0), 0.5, 4.0, "eq7"),
    2: ("Lite1, scale 0.5", LITE.format(1), 0.5, 4.0, "eq7"),
    3: ("Lite2, scale 0.5", LITE.format(2), 0.5, 4.0, "eq7"),
    4: ("Lite0, scale 0.375", LITE.format(0), 0.375, 4.0, "eq7"),
    5: ("Lite0, scale 0.25", LITE.format(0), 0.25, 4.0, "eq7"),
    6: ("Lite2, scale 0.375, sigma 8", LITE.format(2), 0.375, 8.0, "eq7"),
    7: ("Lite0, scale 1.0 (finer grid)", LITE.format(0), 1.0, 4.0, "eq7"),
    8: ("row 1, image score = mean patch score", LITE.format(0), 0.5, 4.0, "mean"),
}
AUPRO_ROWS = (1, 7)
TYPE_COLUMNS = ("crack", "uneven")
HELD_OUT_TYPE = "uneven"   # the type the "without" column leaves out
GOOD_TYPE = "free"
CACHE_VERSION = 1          # bump when what the cache files hold changes


# ---- data ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TestSet:
    uris: list[str]
    masks: list[np.ndarray]      # bool, the image's shape
    labels: np.ndarray           # 1 = defect
    types: np.ndarray            # defect_type ("free" for good images)


def load_test(records) -> TestSet:
    from patchwatch.storage.images import read_image, read_mask

    masks = []
    for record in records:
        shape = read_image(record.uri).shape[:2]
        masks.append(read_mask(record.mask_uri, shape) if record.mask_uri else np.zeros(shape, bool))
    labels = np.array([int(record.label == "defect") for record in records])
    types = np.array([record.defect_type or (GOOD_TYPE if record.label == "good" else "?") for record in records])
    return TestSet([record.uri for record in records], masks, labels, types)


# ---- cached steps ------------------------------------------------------------------------------------
def source_digest(*modules: str) -> str:
    """Hash of the engine's source files a cache entry depends on, so a code change invalidates it."""
    digest = hashlib.sha1()
    for module in modules:
        digest.update((common.REPO / "anomaly" / f"{module}.py").read_bytes())
    return digest.hexdigest()


def cache_key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_npz(path: Path, arrays: dict) -> None:
    """Write ``arrays`` to ``path`` whole or not at all (an interrupted run leaves no broken entry)."""
    partial = path.with_name(path.stem + ".partial.npz")
    np.savez(partial, **arrays)
    os.replace(partial, path)


def extract_all(extractor, uris: list[str]) -> tuple[dict, float]:
    """Patch features of each image (one at a time, as the fit and score flows do); the seconds
    exclude reading and decoding."""
    from patchwatch.storage.images import read_image

    vectors, grids, image_shapes, input_shapes, seconds = [], [], [], [], 0.0
    for uri in uris:
        image = read_image(uri)
        t0 = time.perf_counter()
        features = extractor.extract([image])[0]
        seconds += time.perf_counter() - t0
        vectors.append(features.vectors)
        grids.append(features.grid)
        image_shapes.append(features.image_shape)
        input_shapes.append(features.input_shape)
    return {"vectors": np.concatenate(vectors), "offsets": np.cumsum([0] + [len(v) for v in vectors]),
            "grids": np.array(grids), "image_shapes": np.array(image_shapes),
            "input_shapes": np.array(input_shapes)}, seconds


def features(config, train_uris: list[str], test_uris: list[str], work: Path) -> dict:
    """Train and test patch features of ``config`` (cached in ``work``)."""
    from patchwatch.anomaly.features import PatchFeatureExtractor

    key = cache_key(CACHE_VERSION, config.to_dict(), train_uris, test_uris, source_digest("features", "backbone"))
    path = work / f"features-{key}.npz"
    if path.exists():
        with np.load(path) as cached:
            return {**{k: cached[k] for k in cached.files}, "key": key, "cached": True}
    extractor = PatchFeatureExtractor(config)
    train, train_s = extract_all(extractor, train_uris)
    test, test_s = extract_all(extractor, test_uris)
    out = {"train_vectors": train["vectors"], "train_s": np.float64(train_s), "test_s": np.float64(test_s),
           **{f"test_{k}": v for k, v in test.items()}}
    save_npz(path, out)
    return {**out, "key": key, "cached": False}


def fit_and_score(feats: dict, config, work: Path) -> dict:
    """Fit PatchCore on the train bank, then patch scores and eq. 7 image scores of the test images
    (cached in ``work``): the memory's size, the test patch scores, eq. 7 and the mean patch score
    per image, the fit and kNN + eq. 7 seconds, and whether that staged scoring is PatchCore.score's."""
    from patchwatch.anomaly.patchcore import PatchCore, reweight_image_score, select_coreset

    key = cache_key(CACHE_VERSION, feats["key"], config.to_dict(), source_digest("coreset", "patchcore"))
    path = work / f"model-{key}.npz"
    if path.exists():
        with np.load(path) as cached:
            return {**{k: cached[k] for k in cached.files}, "cached": True}
    bank = feats["train_vectors"]
    t0 = time.perf_counter()
    model = PatchCore(bank[np.sort(select_coreset(bank, config))], config)  # = PatchCore.fit
    fit_s = time.perf_counter() - t0
    offsets, vectors = feats["test_offsets"], feats["test_vectors"]
    scores, eq7, mean = [], [], []
    t0 = time.perf_counter()
    for lo, hi in zip(offsets[:-1], offsets[1:]):
        patch, nearest = model.patch_scores(vectors[lo:hi])
        eq7.append(reweight_image_score(vectors[lo:hi], patch, nearest, model.memory, model.index,
                                        config.num_neighbors))
        scores.append(patch)
        mean.append(float(patch.mean()))
    knn_s = time.perf_counter() - t0
    out = {"memory_rows": np.int64(len(model.memory)), "patch_scores": np.concatenate(scores),
           "eq7": np.array(eq7), "mean": np.array(mean), "fit_s": np.float64(fit_s), "knn_s": np.float64(knn_s),
           "matches_score": np.bool_(matches_patchcore_score(model, feats, out_first=(eq7[0], scores[0])))}
    save_npz(path, out)
    return {**out, "cached": False}


def matches_patchcore_score(model, feats: dict, out_first: tuple[float, np.ndarray]) -> bool:
    """Whether the staged scoring here (eq. 7 and the map from the patch scores) is exactly
    ``PatchCore.score`` on the first test image."""
    from patchwatch.anomaly.features import PatchFeatures
    from patchwatch.anomaly.maps import anomaly_map

    lo, hi = feats["test_offsets"][:2]
    first = PatchFeatures(feats["test_vectors"][lo:hi], tuple(feats["test_grids"][0]),
                          tuple(feats["test_image_shapes"][0]), tuple(feats["test_input_shapes"][0]))
    reference_score, reference_map = model.score(first)
    image_score, patch = out_first
    amap = anomaly_map(patch.reshape(first.grid), first.image_shape, model.config.sigma, first.input_shape)
    return bool(np.isclose(image_score, reference_score, rtol=1e-5)
                and np.allclose(amap, reference_map, rtol=1e-5, atol=1e-6))


def maps_of(feats: dict, patch_scores: np.ndarray, sigma: float) -> tuple[list[np.ndarray], float]:
    """Full-resolution anomaly maps (as ``PatchCore.score`` makes them) and the seconds taken."""
    from patchwatch.anomaly.maps import anomaly_map

    t0 = time.perf_counter()
    offsets = feats["test_offsets"]
    maps = [anomaly_map(patch_scores[lo:hi].reshape(tuple(grid)), tuple(shape), sigma, tuple(inp))
            for lo, hi, grid, shape, inp in zip(offsets[:-1], offsets[1:], feats["test_grids"],
                                                feats["test_image_shapes"], feats["test_input_shapes"])]
    return maps, time.perf_counter() - t0


# ---- metrics -------------------------------------------------------------------------------------------
def pixel_auroc_of(test: TestSet, maps: list[np.ndarray], keep: np.ndarray) -> float:
    from patchwatch.anomaly.metrics import pixel_auroc

    chosen = np.flatnonzero(keep)
    return pixel_auroc([test.masks[i] for i in chosen], [maps[i] for i in chosen])


def type_auroc(test: TestSet, maps: list[np.ndarray], defect_type: str) -> float:
    """Pixel AUROC on the good images plus one defect type's images (the per-type protocol of
    ``evaluate_detection``)."""
    return pixel_auroc_of(test, maps, (test.labels == 0) | (test.types == defect_type))


def map_metrics(test: TestSet, maps: list[np.ndarray], with_aupro: bool) -> dict:
    from patchwatch.anomaly.metrics import aupro

    out = {"pixel": pixel_auroc_of(test, maps, np.ones(len(maps), bool)),
           "aupro": aupro(test.masks, maps) if with_aupro else None,
           "without": pixel_auroc_of(test, maps, test.types != HELD_OUT_TYPE)}
    for defect_type in TYPE_COLUMNS:
        out[defect_type] = type_auroc(test, maps, defect_type)
    return out


def breakdown(test: TestSet, maps: list[np.ndarray], metrics: dict, image_scores: dict) -> tuple[list[dict], list[str]]:
    """Where row 1's pooled pixel AUROC is lost: defect pixels and pixel AUROC per type, the
    pooled AUROC with and without the held-out type, and the maps' level on good vs defect images."""
    from patchwatch.anomaly.metrics import image_auroc

    defect_pixels = np.array([int(mask.sum()) for mask in test.masks])
    medians = np.array([float(np.median(amap)) for amap in maps])
    total = int(defect_pixels.sum())
    rows = []

    def row(label, keep, auroc=None):
        count = int(defect_pixels[keep].sum())
        rows.append({"test images": label, "images": int(keep.sum()), "defect pixels": count,
                     "share of all defect pixels": f"{100 * count / total:.1f} %" if total and count else "-",
                     "pixel AUROC": auroc,
                     "median of per-image median map value": float(np.median(medians[keep])) if keep.any() else None})

    row(f"good ({GOOD_TYPE})", test.labels == 0)
    for defect_type in sorted(set(test.types[test.labels == 1])):
        auroc = metrics[defect_type] if defect_type in metrics else type_auroc(test, maps, defect_type)
        row(defect_type, test.types == defect_type, auroc)
    row("all defect images", test.labels == 1)
    row("all test images (pooled)", np.ones(len(maps), bool), metrics["pixel"])
    row(f"all test images without {HELD_OUT_TYPE} (pooled)", test.types != HELD_OUT_TYPE, metrics["without"])
    good, bad = medians[test.labels == 0], medians[test.labels == 1]
    if not (good.size and bad.size):
        return rows, []
    notes = [
        "pixel AUROC of a defect type: its images plus all good test images; pooled rows: every pixel of "
        "the images named",
        "median map value: median over the images of each image's own median anomaly-map value (the map's "
        "background level, as nearly all pixels are normal)",
        f"good test images: per-image median map value {np.percentile(good, 10):.3g} / {np.percentile(good, 50):.3g} "
        f"/ {np.percentile(good, 90):.3g} (10th / 50th / 90th percentile); defect test images "
        f"{np.percentile(bad, 10):.3g} / {np.percentile(bad, 50):.3g} / {np.percentile(bad, 90):.3g}",
        f"{100 * np.mean(bad > np.percentile(good, 90)):.0f} % of the defect test images have a median map value "
        "above the 90th percentile of the good ones (10 % if the two had the same background level)",
        f"image AUROC of row 1's maps with different image scores: eq. 7 {image_scores['eq7']:.4f}, mean patch "
        f"score {image_scores['mean']:.4f}, per-image median map value {image_auroc(test.labels, medians):.4f}; the "
        "last two ignore where the defect is, so where they match or beat eq. 7 they measure a global difference "
        "between MTD's good and defective images (a data-set artefact) rather than the defects",
    ]
    return rows, notes


# ---- main -----------------------------------------------------------------------------------------------
def parse_rows(text: str) -> list[int]:
    rows = sorted({int(part) for part in text.split(",") if part.strip()})
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown row(s) {unknown}; rows are {sorted(ROWS)}")
    return rows


def configs_of(number: int):
    from patchwatch.anomaly.features import FeatureConfig
    from patchwatch.anomaly.patchcore import PatchCoreConfig

    _, backbone, scale, sigma, _ = ROWS[number]
    return (dataclasses.replace(FeatureConfig(), backbone=backbone, input_scale=scale, context_scales=()),
            dataclasses.replace(PatchCoreConfig(), sigma=sigma))


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__, "quality")
    parser.add_argument("--test-limit", type=int, default=None,
                        help="use only N test images, evenly spread (default: all, or --limit / 2 when --limit is given)")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)),
                        help="rows to measure, e.g. 1,8 (default: all, %(default)s)")
    parser.add_argument("--aupro-all", action="store_true",
                        help=f"AUPRO for every row (default: rows {', '.join(map(str, AUPRO_ROWS))} only; it is slow)")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "patchwatch-bench-quality"),
                        help="cache of features and fitted memories, kept between runs (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch and faiss threads (default %(default)s)")
    args = parser.parse_args(argv)

    import faiss
    import torch
    from patchwatch.anomaly.metrics import image_auroc

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    numbers = parse_rows(args.rows)
    test_limit = args.test_limit if args.test_limit is not None else (max(1, args.limit // 2) if args.limit else None)
    started = time.perf_counter()
    meta = {"command": common.command_line(), "date": common.utc_now(), "machine": common.machine_info(),
            "measures_memory": False}
    train_uris = [r.uri for r in common.select_records(args.split, "train", args.limit)]
    test = load_test(common.select_records(args.split, "test", test_limit))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"quality benchmark: rows {numbers}, {len(train_uris)} train / {len(test.uris)} test images; "
          f"cache {work}", flush=True)

    rows, runs, first = [], {}, None
    for number in numbers:
        feature, patchcore = configs_of(number)
        label, image_score = ROWS[number][0], ROWS[number][4]
        with_aupro = args.aupro_all or number in AUPRO_ROWS
        t0 = time.perf_counter()
        run_key = cache_key(feature.to_dict(), patchcore.to_dict())
        run = runs.get(run_key)  # rows 1 and 8 share one model and one set of maps
        if run is None or (with_aupro and run["metrics"]["aupro"] is None):
            feats = features(feature, train_uris, test.uris, work)
            model = fit_and_score(feats, patchcore, work)
            maps, maps_s = maps_of(feats, model["patch_scores"], patchcore.sigma)
            run = {"model": model, "bank rows": len(feats["train_vectors"]),
                   "memory rows": int(model["memory_rows"]),
                   "fit s": float(feats["train_s"] + model["fit_s"]),
                   "score s": float(feats["test_s"] + model["knn_s"] + maps_s),
                   "cached": bool(feats["cached"] and model["cached"]) if run is None else run["cached"],
                   "= PatchCore.score": bool(model["matches_score"]),
                   "metrics": map_metrics(test, maps, with_aupro)}
            runs[run_key] = run
            if (feature, patchcore) == configs_of(1):
                first = (maps, run)
            del feats, maps
        metrics = run["metrics"]
        rows.append({
            "row": number, "configuration": label, "backbone": feature.backbone.replace("tf_efficientnet_", ""),
            "scale": feature.input_scale, "sigma": patchcore.sigma,
            "image score": "eq. 7" if image_score == "eq7" else "mean patch score",
            "image AUROC": image_auroc(test.labels, run["model"][image_score]),
            "pixel AUROC": metrics["pixel"], "AUPRO": metrics["aupro"] if with_aupro else None,
            **{f"pixel AUROC {t}": metrics[t] for t in TYPE_COLUMNS},
            f"pixel AUROC without {HELD_OUT_TYPE}": metrics["without"],
            **{name: run[name] for name in ("bank rows", "memory rows", "fit s", "score s", "cached",
                                            "= PatchCore.score")},
        })
        if not run["= PatchCore.score"]:
            print(f"  WARNING row {number}: the staged scoring differs from PatchCore.score", flush=True)
        print(f"  row {number} ({label}): image {rows[-1]['image AUROC']:.4f}, pixel {metrics['pixel']:.4f} "
              f"[{time.perf_counter() - t0:.0f} s]", flush=True)

    layers = sorted({tuple(configs_of(n)[0].layers) for n in numbers})
    sections = [{
        "title": "PatchCore variants on MTD (test rows)", "rows": rows,
        "notes": [
            "each row: PatchCore fitted on the train rows (coreset_ratio "
            f"{configs_of(1)[1].coreset_ratio}, projection {configs_of(1)[1].projection_dim}, layers "
            f"{', '.join(map(str, layers))}), test rows scored; rows 1 and 8 share one model and one set of maps",
            "every row is single-scale (no context scales, maps from the whole patch vectors); patchwatch's PatchCore "
            "default adds a 0.25 context scale (anomaly.settings.default_features): bench_detectors.py measures it",
            "image score: eq. 7 of the PatchCore paper (PatchCore.score) or the mean of the image's patch scores",
            "pixel AUROC: every pixel of every test image pooled; AUPRO up to FPR 0.3 (rows "
            f"{', '.join(map(str, AUPRO_ROWS))} only unless --aupro-all); pixel AUROC <type>: the good test images "
            f"plus that type's images; without {HELD_OUT_TYPE}: every test image except the {HELD_OUT_TYPE} ones",
            "fit s = train feature extraction (backbone + aggregation, images already decoded) + coreset + index "
            "build; score s = test feature extraction + kNN + eq. 7 + maps (upsample + smoothing); one image at a "
            f"time, {args.threads} thread(s)",
            "cached = features and memory came from --work: their times are those measured when the cache was filled",
            "= PatchCore.score: the staged scoring here (patch scores -> eq. 7, anomaly_map) gives exactly "
            "PatchCore.score's image score and map on the first test image",
        ]}]
    if first is not None:
        maps, run = first
        scores = {name: image_auroc(test.labels, run["model"][name]) for name in ("eq7", "mean")}
        table, notes = breakdown(test, maps, run["metrics"], scores)
        sections.append({"title": "Where row 1 (Lite0, scale 0.5) loses pixel AUROC", "rows": table, "notes": notes})

    meta["wall_s"] = time.perf_counter() - started
    meta["parameters"] = {
        "split": args.split, "train images": len(train_uris), "test images": len(test.uris),
        "rows": numbers, "FeatureConfig (row 1)": configs_of(1)[0].to_dict(),
        "PatchCoreConfig (row 1)": configs_of(1)[1].to_dict(), "threads": args.threads, "cache": str(work),
    }
    common.report(args.out, args.name, "patchwatch detection quality on MTD", meta, sections)
    return 0


if __name__ == "__main__":
    sys.exit(main())
