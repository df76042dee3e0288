#!/usr/bin/env python
"""Benchmark the PatchCore engine directly (no Prefect, no Dask).

1. fit on the split's train rows: time of reading, feature extraction, bank assembly, coreset and
   index build, and the fit's peak memory (one fresh process);
2. scoring of the test rows: read / backbone / kNN / maps (upsample + smooth + eq. 7), per image
   and in total, and the scoring's peak memory (one fresh process);
3. the in-memory greedy coreset (``select_coreset``) on banks of 1x, 2x, 4x the train bank (the
   bank followed by jittered copies), each in a fresh process: time, peak memory, covering radius;
   for 1x also the textbook exhaustive greedy, timed on its first centres and extrapolated.

    python bench/bench_engine.py                       # full MTD split (long: run on a quiet machine)
    python bench/bench_engine.py --limit 40 --test-limit 20   # a quick check
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402


# ---- steps, each run in a fresh process ------------------------------------------------------------
def _set_threads(threads: int | None) -> int:
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def select_coreset_capturing(bank: np.ndarray, config):
    """``select_coreset(bank, config)`` itself, also keeping the CoresetResult it computed (for the
    covering radius and the work done), which select_coreset does not return."""
    import patchwatch.anomaly.patchcore as patchcore

    captured = []
    original = patchcore.streaming_coreset

    def keep(*args, **kwargs):
        captured.append(original(*args, **kwargs))
        return captured[-1]

    patchcore.streaming_coreset = keep
    try:
        indices = patchcore.select_coreset(bank, config)
    finally:
        patchcore.streaming_coreset = original
    return indices, captured[0]


def fit_step(uris: list[str], work: str, batch_size: int, threads: int | None) -> dict:
    """Read + extract the train images, assemble the bank, select the coreset, build the index."""
    from patchwatch.anomaly.features import FeatureConfig, PatchFeatureExtractor
    from patchwatch.anomaly.patchcore import PatchCore, PatchCoreConfig
    from patchwatch.storage.images import read_image

    torch_threads = _set_threads(threads)
    marks = {"imports": common.current_rss_mib()}
    started = time.perf_counter()
    extractor = PatchFeatureExtractor(FeatureConfig())
    load_s = time.perf_counter() - started
    config = PatchCoreConfig()
    marks["backbone loaded (baseline)"] = common.mark_baseline()

    read_s = extract_s = 0.0
    pieces = []
    for lo in range(0, len(uris), batch_size):
        t0 = time.perf_counter()
        images = [read_image(uri) for uri in uris[lo:lo + batch_size]]
        t1 = time.perf_counter()
        pieces += [f.vectors for f in extractor.extract(images)]
        t2 = time.perf_counter()
        read_s += t1 - t0
        extract_s += t2 - t1
        del images
    marks["after feature extraction"] = common.peak_rss_mib()
    t0 = time.perf_counter()
    bank = np.concatenate(pieces)
    del pieces
    assemble_s = time.perf_counter() - t0
    marks["after bank assembly"] = common.peak_rss_mib()

    t0 = time.perf_counter()
    indices, result = select_coreset_capturing(bank, config)
    coreset_s = time.perf_counter() - t0
    marks["after coreset"] = common.peak_rss_mib()

    t0 = time.perf_counter()
    # what PatchCore.fit does after select_coreset: gather the memory rows, build the faiss index
    model = PatchCore(bank[np.sort(indices)], config)
    index_s = time.perf_counter() - t0
    marks["after index build"] = common.peak_rss_mib()

    # inputs of the later steps (not timed, after the last memory mark)
    common.save_bank(Path(work) / "bank.npy", bank)
    common.save_bank(Path(work) / "memory.npy", model.memory)
    return {"images": len(uris), "bank_rows": int(len(bank)), "dim": int(bank.shape[1]),
            "memory_rows": int(len(model.memory)), "covering_radius": result.covering_radius,
            "load_s": load_s, "read_s": read_s, "extract_s": extract_s, "assemble_s": assemble_s,
            "coreset_s": coreset_s, "index_s": index_s, "rss": marks, "torch_threads": torch_threads}


def score_step(uris: list[str], work: str, threads: int | None) -> dict:
    """Score the test images one at a time with the fitted memory, timing each stage."""
    from patchwatch.anomaly.features import FeatureConfig, PatchFeatureExtractor
    from patchwatch.anomaly.maps import anomaly_map
    from patchwatch.anomaly.patchcore import PatchCore, PatchCoreConfig, reweight_image_score
    from patchwatch.storage.images import read_image

    torch_threads = _set_threads(threads)
    marks = {"imports": common.current_rss_mib()}
    config = PatchCoreConfig()
    extractor = PatchFeatureExtractor(FeatureConfig())
    detector = PatchCore(np.load(Path(work) / "memory.npy"), config)
    marks["model loaded (baseline)"] = common.mark_baseline()

    # warm-up on the first image (not timed), and a check that the staged scoring below is exactly
    # PatchCore.score
    first = extractor.extract([read_image(uris[0])])[0]
    reference_score, reference_map = detector.score(first)

    stages = {name: [] for name in ("read", "backbone", "knn", "upsample_smooth", "eq7")}
    pixels, check = [], None
    for uri in uris:
        t0 = time.perf_counter()
        image = read_image(uri)
        t1 = time.perf_counter()
        features = extractor.extract([image])[0]
        t2 = time.perf_counter()
        scores, nearest = detector.patch_scores(features.vectors)
        t3 = time.perf_counter()
        amap = anomaly_map(scores.reshape(features.grid), features.image_shape, config.sigma, features.input_shape)
        t4 = time.perf_counter()
        image_score = reweight_image_score(features.vectors, scores, nearest, detector.memory, detector.index,
                                           config.num_neighbors)
        t5 = time.perf_counter()
        for name, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            stages[name].append(seconds)
        pixels.append(image.shape[0] * image.shape[1])
        if check is None:
            check = bool(np.isclose(image_score, reference_score, rtol=1e-5)
                         and np.allclose(amap, reference_map, rtol=1e-5, atol=1e-6))
    marks["after scoring"] = common.peak_rss_mib()
    return {"images": len(uris), "stages": stages, "mean_megapixels": float(np.mean(pixels)) / 1e6,
            "memory_rows": int(len(detector.memory)), "matches_patchcore_score": check, "rss": marks,
            "torch_threads": torch_threads}


def coreset_scale_step(bank_path: str, scale: int, relative_jitter: float, exhaustive_centres: int) -> dict:
    """``select_coreset`` on the 1x bank followed by ``scale - 1`` jittered copies."""
    from patchwatch.anomaly.coreset import coreset_size, greedy_coreset_exhaustive, project, projection_matrix, start_index
    from patchwatch.anomaly.patchcore import PatchCoreConfig

    config = PatchCoreConfig()
    bank, sigma = common.scaled_bank(bank_path, scale, relative_jitter, seed=config.seed)
    baseline = common.mark_baseline()
    t0 = time.perf_counter()
    indices, result = select_coreset_capturing(bank, config)
    seconds = time.perf_counter() - t0
    peak = common.peak_rss_mib()
    out = {"scale": scale, "bank_rows": int(len(bank)), "coreset": int(len(indices)), "sigma": sigma,
           "seconds": seconds, "baseline_mib": baseline, "peak_mib": peak,
           "covering_radius": result.covering_radius, "evaluations": int(result.distance_evaluations)}
    if exhaustive_centres:
        # the textbook loop makes one full pass over the bank per centre, whatever the centre: its
        # time is linear in the number of centres, so its first centres give the whole run's time
        size = coreset_size(len(bank), config.coreset_ratio)
        centres = min(size, exhaustive_centres)
        projected = project(bank, projection_matrix(bank.shape[1], config.projection_dim, config.seed))
        start = start_index(len(bank), config.seed)
        t0 = time.perf_counter()
        textbook = greedy_coreset_exhaustive(projected, centres, start)
        measured = time.perf_counter() - t0
        out["exhaustive"] = {"centres_timed": centres, "seconds_timed": measured,
                             "seconds_extrapolated": measured * size / centres,
                             "same_centres": bool(np.array_equal(textbook.indices, indices[:centres]))}
    return out


def select_coreset_estimate(rows: int, dim: int) -> int:
    """Bytes a coreset process needs: the bank, then select_coreset's projection (whatever dtype
    projection_matrix returns), the concatenated copy streaming_coreset makes of it, and the float32
    copy greedy_coreset makes when the projection is not float32."""
    from patchwatch.anomaly.coreset import projection_matrix
    from patchwatch.anomaly.patchcore import PatchCoreConfig

    config = PatchCoreConfig()
    matrix = projection_matrix(dim, config.projection_dim, config.seed)
    width, itemsize = (dim, 4) if matrix is None else (matrix.shape[1], np.result_type(np.float32, matrix).itemsize)
    projected = rows * width * itemsize
    return rows * dim * 4 + 2 * projected + (rows * width * 4 if itemsize != 4 else 0) + rows * 16


# ---- tables ----------------------------------------------------------------------------------------
def fit_rows(fit: dict) -> list[dict]:
    total = fit["read_s"] + fit["extract_s"] + fit["assemble_s"] + fit["coreset_s"] + fit["index_s"]
    rss = fit["rss"]
    n = fit["images"]
    rows = [
        {"phase": "backbone load (not in fit total)", "seconds": fit["load_s"], "ms / image": None,
         "share of fit": None, "peak RSS after (MiB)": rss["backbone loaded (baseline)"]},
        {"phase": "feature extraction: read + decode", "seconds": fit["read_s"], "ms / image": 1e3 * fit["read_s"] / n,
         "share of fit": fit["read_s"] / total, "peak RSS after (MiB)": None},
        {"phase": "feature extraction: backbone + aggregation", "seconds": fit["extract_s"],
         "ms / image": 1e3 * fit["extract_s"] / n, "share of fit": fit["extract_s"] / total,
         "peak RSS after (MiB)": rss["after feature extraction"]},
        {"phase": "feature extraction: bank assembly", "seconds": fit["assemble_s"], "ms / image": None,
         "share of fit": fit["assemble_s"] / total, "peak RSS after (MiB)": rss["after bank assembly"]},
        {"phase": "coreset (select_coreset)", "seconds": fit["coreset_s"], "ms / image": None,
         "share of fit": fit["coreset_s"] / total, "peak RSS after (MiB)": rss["after coreset"]},
        {"phase": "index build (memory gather + faiss)", "seconds": fit["index_s"], "ms / image": None,
         "share of fit": fit["index_s"] / total, "peak RSS after (MiB)": rss["after index build"]},
        {"phase": "fit total", "seconds": total, "ms / image": 1e3 * total / n, "share of fit": 1.0,
         "peak RSS after (MiB)": rss["after index build"]},
    ]
    for row in rows:
        if row["share of fit"] is not None:
            row["share of fit"] = f"{100 * row['share of fit']:.1f} %"
    return rows


def score_rows(score: dict) -> list[dict]:
    stages = {name: np.asarray(values) for name, values in score["stages"].items()}
    stages["maps"] = stages["upsample_smooth"] + stages["eq7"]
    total = stages["read"] + stages["backbone"] + stages["knn"] + stages["maps"]
    labels = [("read + decode", "read"), ("backbone (feature extraction)", "backbone"),
              ("kNN (faiss search, k=1)", "knn"), ("maps (upsample + smooth + eq. 7)", "maps"),
              ("  of which upsample + smooth", "upsample_smooth"), ("  of which eq. 7 reweighting", "eq7")]
    rows = []
    for label, name in labels + [("total", None)]:
        values = total if name is None else stages[name]
        rows.append({"stage": label, "total s": float(values.sum()), "mean ms / image": 1e3 * float(values.mean()),
                     "median ms": 1e3 * float(np.median(values)), "p95 ms": 1e3 * float(np.percentile(values, 95)),
                     "share": f"{100 * values.sum() / total.sum():.1f} %"})
    rows.append({"stage": "throughput (images / s)", "total s": len(total) / float(total.sum())})
    return rows


def coreset_rows(scales: list[dict]) -> list[dict]:
    if not scales:
        return []
    base = scales[0]
    rows = []
    for s in scales:
        step, base_step = s["peak_mib"] - s["baseline_mib"], base["peak_mib"] - base["baseline_mib"]
        rows.append({
            "bank": f"{s['scale']}x", "rows": s["bank_rows"], "coreset": s["coreset"],
            "seconds": s["seconds"], "time ÷ 1x": common.ratio(s["seconds"], base["seconds"]),
            "baseline MiB": s["baseline_mib"], "peak MiB": s["peak_mib"], "step MiB": step,
            "step ÷ 1x": common.ratio(step, base_step), "peak ÷ 1x": common.ratio(s["peak_mib"], base["peak_mib"]),
            "covering radius": s["covering_radius"],
            "distance evals ÷ N·k": s["evaluations"] / (s["bank_rows"] * s["coreset"]),
        })
    return rows


def exhaustive_rows(scales: list[dict]) -> list[dict]:
    rows = []
    for s in scales:
        ex = s.get("exhaustive")
        if not ex:
            continue
        rows.append({"bank": f"{s['scale']}x", "rows": s["bank_rows"], "coreset": s["coreset"],
                     "lazy greedy s (measured)": s["seconds"],
                     "exhaustive: centres timed": ex["centres_timed"], "exhaustive: s timed": ex["seconds_timed"],
                     "exhaustive s (EXTRAPOLATED)": ex["seconds_extrapolated"],
                     "speed-up": ex["seconds_extrapolated"] / s["seconds"],
                     "same first centres": ex["same_centres"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = common.base_parser(__doc__, "engine")
    parser.add_argument("--test-limit", type=int, default=None,
                        help="use only N test images (default: all, or --limit / 2 when --limit is given)")
    parser.add_argument("--scales", default="1,2,4", help="bank sizes for the coreset runs (default %(default)s)")
    parser.add_argument("--jitter", type=float, default=0.05,
                        help="noise std of the jittered copies, relative to the bank's per-coordinate std "
                             "(default %(default)s)")
    parser.add_argument("--exhaustive-centres", type=int, default=100,
                        help="centres of the textbook exhaustive greedy actually timed on the 1x bank "
                             "before extrapolating (0: skip; default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="images per extract() call in the fit, like the fit flow's batches (default %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in the measured processes (default: torch's default)")
    parser.add_argument("--force", action="store_true",
                        help="run every bank size even when its estimated memory exceeds 85%% of the available memory")
    parser.add_argument("--tmp", default=None, help="folder for the temporary bank files (default: system temp)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)

    scales = sorted({int(s) for s in args.scales.split(",")})
    if scales[0] != 1:
        scales = [1] + scales
    test_limit = args.test_limit if args.test_limit is not None else (max(1, args.limit // 2) if args.limit else None)
    started = time.perf_counter()
    meta = {"command": common.command_line(), "date": common.utc_now(), "machine": common.machine_info()}
    train = common.select_records(args.split, "train", args.limit)
    test = common.select_records(args.split, "test", test_limit)
    work = tempfile.mkdtemp(prefix="patchwatch-bench-engine-", dir=args.tmp)
    print(f"engine benchmark: {len(train)} train / {len(test)} test images from {args.split}; scratch {work}",
          flush=True)
    try:
        print("fit ...", flush=True)
        fit = common.run_fresh(fit_step, [r.uri for r in train], work, args.batch_size, args.threads)
        print(f"  bank {fit['bank_rows']:,} x {fit['dim']} -> memory {fit['memory_rows']:,}", flush=True)
        print("score ...", flush=True)
        score = common.run_fresh(score_step, [r.uri for r in test], work, args.threads)
        scale_results, skipped = [], []
        for scale in scales:
            needed, available = select_coreset_estimate(fit["bank_rows"] * scale, fit["dim"]), common.available_memory_bytes()
            if available is not None and needed > 0.85 * available and not args.force:
                skipped.append(f"{scale}x bank skipped: select_coreset needs about {needed / 2**30:.1f} GiB, "
                               f"{available / 2**30:.1f} GiB available (--force runs it anyway)")
                print(skipped[-1], flush=True)
                continue
            print(f"coreset on the {scale}x bank ...", flush=True)
            scale_results.append(common.run_fresh(coreset_scale_step, str(Path(work) / "bank.npy"), scale,
                                                  args.jitter, args.exhaustive_centres if scale == 1 else 0))
    finally:
        if not args.keep_tmp:
            shutil.rmtree(work, ignore_errors=True)

    meta["wall_s"] = time.perf_counter() - started
    meta["parameters"] = {
        "split": args.split, "train images": len(train), "test images": len(test),
        "FeatureConfig": "defaults", "PatchCoreConfig": "defaults",
        "torch threads in the measured processes": fit["torch_threads"],
        "bank": f"{fit['bank_rows']:,} x {fit['dim']} float32 ({fit['bank_rows'] * fit['dim'] * 4 / common.MIB:,.0f} MiB)",
        "jitter (relative to per-coordinate std)": args.jitter,
    }
    ex = next((s["exhaustive"] for s in scale_results if "exhaustive" in s), None)
    sections = [
        {"title": "Fit (train rows; one fresh process)", "rows": fit_rows(fit),
         "notes": [f"{fit['images']} images, batches of {args.batch_size} images per extract() call",
                   "peak RSS after = the process's peak RSS (since the baseline mark) at the end of that phase: "
                   "it only grows",
                   f"RSS after imports {fit['rss']['imports']:,.0f} MiB; baseline (backbone loaded) "
                   f"{fit['rss']['backbone loaded (baseline)']:,.0f} MiB; fit peak {fit['rss']['after index build']:,.0f} MiB "
                   f"(step {fit['rss']['after index build'] - fit['rss']['backbone loaded (baseline)']:,.0f} MiB)",
                   "bank assembly concatenates the per-image vectors: the bank is briefly held twice",
                   f"coreset {fit['memory_rows']:,} of {fit['bank_rows']:,} rows, covering radius "
                   f"{fit['covering_radius']:.4g} (in the projected space)"]},
        {"title": "Scoring (test rows; one fresh process)", "rows": score_rows(score),
         "notes": [f"{score['images']} images, one at a time, mean {score['mean_megapixels']:.3f} Mpx; one warm-up "
                   "image scored first and not timed",
                   f"peak RSS: {score['rss']['model loaded (baseline)']:,.0f} MiB with the model loaded, "
                   f"{score['rss']['after scoring']:,.0f} MiB after scoring (step "
                   f"{score['rss']['after scoring'] - score['rss']['model loaded (baseline)']:,.0f} MiB)",
                   f"staged scoring equals PatchCore.score on the first image: "
                   f"{common.fmt(score['matches_patchcore_score'])}"]},
        {"title": "In-memory greedy coreset (select_coreset) vs bank size; one fresh process per bank",
         "rows": coreset_rows(scale_results),
         "notes": ["2x / 4x banks: the 1x train bank followed by copies with gaussian noise "
                   f"(std {args.jitter} x the bank's per-coordinate std"
                   f"{' = %.4g' % scale_results[-1]['sigma'] if scale_results else ''}), "
                   "built in place before the baseline mark",
                   "baseline = process with the bank loaded; step = peak - baseline = what select_coreset adds "
                   "(the projected bank, the lazy greedy's state)",
                   "covering radius: largest distance of any bank row to the coreset, in the projected space",
                   "distance evals / N·k: the lazy greedy's point-centre distances relative to the textbook loop's",
                   *skipped]},
    ]
    if ex:
        sections.append({
            "title": "Textbook exhaustive greedy vs lazy greedy (1x bank) - exhaustive time EXTRAPOLATED",
            "rows": exhaustive_rows(scale_results),
            "notes": ["greedy_coreset_exhaustive was run for its first centres only, on the same projected bank "
                      "and start; it makes one full pass over the bank per centre, so its time is linear in the "
                      "centres and extrapolated = timed x coreset / centres timed",
                      "same first centres: the exhaustive loop picked exactly select_coreset's first centres"]})

    common.report(args.out, args.name, "patchwatch engine benchmark", meta, sections)
    return 0


if __name__ == "__main__":
    sys.exit(main())
