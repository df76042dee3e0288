#!/usr/bin/env python
"""Pixel metrics on real MTD maps: the exact metrics that hold every pixel at once (the evaluate
flow before streaming) against the binned, streaming ones (``anomaly.metrics.PixelCurves``, the
default): time, peak memory and |binned - exact| of pixel AUROC and AUPRO, overall and per defect
type, on the test set (1x) and on the test set repeated (4x).

The maps are real: PatchCore with the defaults, fitted with the pure engine on the split's train
rows (no hold-out), scores the test rows once; the maps go to Zarr arrays in --work (512 x 512 chunks
as in a result store; kept for reruns) and every variant reads them from there one at a time, as
``flows/evaluate.py`` does, masks from the data set's PNGs. Each variant runs in a fresh process:

- old: read every map and mask into lists, then ``evaluate_detection_exact`` (the flow's former
  metrics path; it also kept the maps for the overlays);
- new: read each map and mask, add it to a ``PixelCurves`` and drop it, then ``evaluate_detection``
  from the filled accumulator (the flow's path now).

4x = every test image four times (the same maps, re-read): the exact metrics are unchanged by the
repetition, so the 4x rows also check that nothing drifts. A bins sweep (one pass, several
accumulators) shows how the binning error falls with the number of bins. :func:`measure` runs it
all and :func:`sections` makes the tables (bench_throughput.py runs only the streamed variant).

    python bench/bench_metrics.py                  # full MTD split (fit + scoring once, then the runs)
    python bench/bench_metrics.py --limit 40 --test-limit 60 --out /tmp/bench   # a quick check
"""
from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import zarr  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

GOOD_TYPE = "free"
MAP_CHUNK = 512  # as the result store writes maps
SWEEP_BINS = (1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18)


# ---- the maps, once ----------------------------------------------------------------------------------
def make_maps(split: str, limit: int | None, test_limit: int | None, work: Path, threads: int) -> dict:
    """Fit PatchCore (defaults) on the train rows, score the test rows, store maps + a row table."""
    import torch

    from patchwatch.anomaly.detectors import default_features, detector_config, for_features
    from patchwatch.anomaly.features import PatchFeatureExtractor
    from patchwatch.anomaly.patchcore import PatchCore
    from patchwatch.storage.images import read_image

    torch.set_num_threads(threads)
    train = common.select_records(split, "train", limit)
    test = common.select_records(split, "test", test_limit)
    features = default_features("patchcore")
    extractor = PatchFeatureExtractor(features)
    started = time.perf_counter()
    bank = np.concatenate([extractor.extract([read_image(r.uri)])[0].vectors for r in train])
    model = PatchCore.fit(bank, for_features("patchcore", detector_config("patchcore"), features))
    del bank
    fit_s = time.perf_counter() - started
    rows, pixels = [], 0
    started = time.perf_counter()
    for record in test:
        image = read_image(record.uri)
        score, amap = model.score(extractor.extract([image])[0])
        location = str(work / "maps" / f"{len(rows):05d}")
        zarr.create_array(location, data=amap.astype(np.float32), chunks=tuple(min(MAP_CHUNK, s) for s in amap.shape),
                          overwrite=True, zarr_format=3)
        pixels += amap.size
        rows.append({"image_id": record.image_id, "map": location, "score": float(score), "label": int(record.label == "defect"),
                     "defect_type": record.defect_type or (GOOD_TYPE if record.label == "good" else ""),
                     "mask_uri": record.mask_uri or "", "shape": list(amap.shape)})
    info = {"split": str(split), "train_images": len(train), "test_images": len(test), "pixels": pixels,
            "fit_s": fit_s, "score_s": time.perf_counter() - started, "rows": rows}
    (work / "maps.json").write_text(json.dumps(info))
    return info


def load_maps(split: str, limit: int | None, test_limit: int | None, work: Path, threads: int) -> dict:
    path = work / "maps.json"
    if path.exists():
        info = json.loads(path.read_text())
        if (info["split"], info["train_images"]) == (str(split), len(common.select_records(
                split, "train", limit))) and info["test_images"] == len(
                common.select_records(split, "test", test_limit)):
            print(f"maps: reusing {work} ({info['test_images']} test images)")
            return info
    print("maps: fitting PatchCore on the train rows and scoring the test rows (once) ...", flush=True)
    return common.run_fresh(make_maps, split, limit, test_limit, work, threads)


# ---- the measured variants (each in a fresh process) -------------------------------------------------
def _inputs(info: dict, scale: int):
    rows = info["rows"] * scale
    labels = np.array([r["label"] for r in rows], bool)
    scores = np.array([r["score"] for r in rows])
    types = [r["defect_type"] for r in rows]
    return rows, labels, scores, types


def _read(row):
    from patchwatch.storage.images import read_mask

    amap = zarr.open_array(row["map"], mode="r", zarr_format=3)[...]
    return amap, (read_mask(row["mask_uri"], amap.shape) if row["mask_uri"] else None)


def run_variant(variant: str, info: dict, scale: int) -> dict:
    from patchwatch.anomaly.metrics import PixelCurves, evaluate_detection, evaluate_detection_exact, pixel_group

    rows, labels, scores, types = _inputs(info, scale)
    baseline = common.mark_baseline()
    started = time.perf_counter()
    if variant == "old":
        masks, maps = [], []
        for row in rows:
            amap, mask = _read(row)
            maps.append(amap)
            masks.append(mask if mask is not None else np.zeros(amap.shape, bool))
        read_s = time.perf_counter() - started
        result = evaluate_detection_exact(labels, scores, masks, maps, types)
        bounds = None
    else:
        pixels = PixelCurves()
        for row, label, kind in zip(rows, labels, types):
            amap, mask = _read(row)
            pixels.add(amap, mask, group=pixel_group(label, kind))
        read_s = time.perf_counter() - started  # reading and binning are one loop here
        result = evaluate_detection(labels, scores, defect_types=types, pixels=pixels)
        bounds = {"overall": pixels.error_bounds(),
                  **{t: pixels.error_bounds(groups=[None, t]) for t in result["per_defect_type"]}}
    total_s = time.perf_counter() - started
    return {"result": result, "bounds": bounds, "total_s": total_s, "loop_s": read_s,
            "baseline_mib": baseline, "peak_mib": common.peak_rss_mib()}


def run_sweep(info: dict) -> dict:
    """One pass over the 1x maps into one accumulator per bin count: the binned figures per bins."""
    from patchwatch.anomaly.metrics import PixelCurves, evaluate_detection, pixel_group

    rows, labels, scores, types = _inputs(info, 1)
    curves = {bins: PixelCurves(bins) for bins in SWEEP_BINS}
    for row, label, kind in zip(rows, labels, types):
        amap, mask = _read(row)
        for accumulator in curves.values():
            accumulator.add(amap, mask, group=pixel_group(label, kind))
    return {bins: {"result": evaluate_detection(labels, scores, defect_types=types, pixels=c),
                   "bounds": c.error_bounds(), "width": c.width} for bins, c in curves.items()}


# ---- comparison ----------------------------------------------------------------------------------------
def _entries(result: dict) -> dict:
    return {"overall": result, **result["per_defect_type"]}


def max_delta(result: dict, reference: dict, key: str) -> float:
    ours, theirs = _entries(result), _entries(reference)
    return max(abs(ours[name][key] - theirs[name][key]) for name in theirs)


def measure(split: str, limit: int | None = None, test_limit: int | None = None, scales: str = "1,4",
            work: str | Path = "/tmp/bench_metrics", threads: int = 2, force: bool = False,
            exact: bool = True, sweep: bool = True) -> dict:
    """The maps (made once, or reused from ``work``), then each variant at each scale in a fresh
    process ("old", the exact metrics, only with ``exact``), then the bins sweep (with ``sweep``).
    Returns the table rows, the notes, the maps' facts (``info``) and the raw runs by (variant, scale)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    info = load_maps(split, limit, test_limit, work, threads)
    scales = [int(s) for s in str(scales).split(",")]

    runs, notes = {}, []
    for scale in scales:
        for variant in ("new", "old") if exact else ("new",):
            if variant == "old" and scale != scales[0] and not force:
                first = runs[("old", scales[0])]
                estimate = first["baseline_mib"] + (first["peak_mib"] - first["baseline_mib"]) * scale / scales[0]
                available = (common.available_memory_bytes() or 0) / common.MIB
                if estimate > 0.7 * available:
                    notes.append(f"old at {scale}x skipped: estimated peak {estimate:,.0f} MiB > 70 % of the "
                                 f"{available:,.0f} MiB free (--force runs it)")
                    continue
            print(f"{variant} metrics, {scale}x ...", flush=True)
            runs[(variant, scale)] = common.run_fresh(run_variant, variant, info, scale)

    reference = runs[("old", scales[0])]["result"] if exact else None
    delta = (lambda result, key: max_delta(result, reference, key)) if exact else (lambda result, key: None)
    table = []
    for (variant, scale), run in sorted(runs.items(), key=lambda item: (item[0][1], item[0][0] != "old")):
        old = runs.get(("old", scale))
        result = run["result"]
        row = {"variant": "old: exact, all maps held" if variant == "old" else "new: binned, streamed",
               "scale": f"{scale}x", "images": len(info["rows"]) * scale,
               "Mpixels": info["pixels"] * scale / 1e6,
               "total s": run["total_s"], "read (+bin) s": run["loop_s"],
               "peak MiB": run["peak_mib"], "step MiB": run["peak_mib"] - run["baseline_mib"],
               "pixel AUROC": result["pixel_auroc"], "AUPRO": result["aupro"],
               "max |Δ| pixel AUROC": delta(result, "pixel_auroc"),
               "max |Δ| AUPRO": delta(result, "aupro"),
               "bound pixel AUROC": max(b["pixel_auroc"] for b in run["bounds"].values()) if run["bounds"] else None,
               "bound AUPRO": max(b["aupro"] for b in run["bounds"].values()) if run["bounds"] else None,
               "time vs old": common.ratio(run["total_s"], old["total_s"]) if old else None}
        table.append(row)

    sweep_rows = []
    for bins, entry in (common.run_fresh(run_sweep, info).items() if sweep and exact else []):
        sweep_rows.append({"bins": bins, "bin width": entry["width"],
                           "max |Δ| pixel AUROC": max_delta(entry["result"], reference, "pixel_auroc"),
                           "max |Δ| AUPRO": max_delta(entry["result"], reference, "aupro"),
                           "bound pixel AUROC (overall)": entry["bounds"]["pixel_auroc"],
                           "bound AUPRO (overall)": entry["bounds"]["aupro"]})

    new = {scale: runs[("new", scale)] for scale in scales if ("new", scale) in runs}
    if len(new) > 1:
        low, high = new[min(new)], new[max(new)]
        notes.append(f"new: peak memory {max(new)}x / {min(new)}x = {high['peak_mib'] / low['peak_mib']:.2f} "
                     f"(step {high['peak_mib'] - high['baseline_mib']:.0f} vs {low['peak_mib'] - low['baseline_mib']:.0f} MiB)")
    for scale in scales:
        if ("old", scale) in runs:
            old, ours = runs[("old", scale)], runs[("new", scale)]
            notes.append(f"{scale}x: new takes {ours['total_s'] / old['total_s']:.3f} of old's time "
                         f"({old['total_s'] / ours['total_s']:.0f}x faster), step memory "
                         f"{(ours['peak_mib'] - ours['baseline_mib']) / (old['peak_mib'] - old['baseline_mib']):.3f} of old's")
    notes += [
        f"maps: PatchCore (defaults: EfficientNet-Lite0, scale 0.5, context scale 0.25) fitted with the pure engine on "
        f"{info['train_images']} train images (no hold-out; {info['fit_s']:.0f} s), {info['test_images']} test "
        f"images scored ({info['score_s']:.0f} s), {info['pixels'] / 1e6:.1f} M map pixels; stored as Zarr and read "
        "one at a time by every variant, masks from the split's PNGs",
        "4x: every test image four times (the same maps, read again): exact pixel AUROC and AUPRO do not change "
        "under repetition, so the 4x deltas are against the 1x exact figures",
        "max |Δ|: the largest |new - old 1x| over the overall figure and each defect type's (good images + that "
        "type); bound: PixelCurves.error_bounds(), a guaranteed upper bound of |binned - exact| from the "
        "histograms alone (largest over overall and per type)",
        "total s: reading the maps and masks plus the metrics; read (+bin) s: the loop over the images (old: "
        "reading only; new: reading and binning)",
    ]
    return {"info": info, "runs": runs, "table": table, "sweep": sweep_rows, "notes": notes}


def sections(result: dict) -> list[dict]:
    """The tables of :func:`measure`'s result (the sweep's only where it ran)."""
    sweep = [] if not result["sweep"] else [
        {"title": "Binning error against the number of bins (1x, one pass)", "rows": result["sweep"],
         "notes": ["the default is 65,536 bins (anomaly.metrics.DEFAULT_BINS); the grid is a power-of-two width "
                   "fitted to the scores' range, so at least half the bins span [min, max]"]}]
    return [{"title": "Pixel metrics: exact (all maps held) vs binned (streamed)", "rows": result["table"],
             "notes": result["notes"]}, *sweep]


def main() -> None:
    parser = common.base_parser(__doc__.split("\n\n")[0], "metrics")
    parser.add_argument("--test-limit", type=int, default=None, help="use only N test images, spread evenly")
    parser.add_argument("--scales", default="1,4", help="test-set repetitions to measure (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the one-off fit and scoring")
    parser.add_argument("--work", default="/tmp/bench_metrics", help="maps cache (default %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="run the exact metrics even where their estimated memory exceeds 70 %% of the free memory")
    args = parser.parse_args()
    started = time.perf_counter()
    machine = common.machine_info()
    result = measure(args.split, args.limit, args.test_limit, args.scales, args.work, args.threads, args.force)
    info = result["info"]
    meta = {"command": common.command_line(), "date": common.utc_now(), "machine": machine,
            "wall_s": time.perf_counter() - started,
            "parameters": {"split": args.split, "train images": info["train_images"],
                           "test images": info["test_images"], "scales": args.scales}}
    common.report(args.out, args.name, "Pixel metrics: exact vs binned (streaming)", meta, sections(result))

if __name__ == "__main__":
    main()
