#!/usr/bin/env python
"""Pixel metrics on real MTD maps: the exact metrics that hold every pixel at once (the evaluate
flow before streaming) against the binned, streaming ones (``anomaly.metrics.PixelCurves``, the
default): time, peak memory and |binned - exact| of pixel AUROC and AUPRO, overall and per defect
type, on the test set (1x) and on the test set repeated (4x).

The maps are real: PatchCore with the defaults, fitted with the pure engine on the split's train
rows (no hold-out), scores the test rows once; the maps go to a result store in --work, written as
the scoring flow writes them (``ResultStore.write_map``: Zarr arrays, 512 x 512 chunks, Blosc LZ4;
kept for reruns), and every variant reads them from there one at a time, as ``flows/evaluate.py``
does (``ResultStore.read_map``), masks from the data set's PNGs. Each variant runs in a fresh process
that has first imported the evaluate flow, as ``patchwatch evaluate``'s has (:func:`run_variant`):

- old: read every map and mask into lists, then ``evaluate_detection_exact`` (the flow's former
  metrics path; it also kept the maps for the overlays);
- new: read each map and mask, add it to a ``PixelCurves`` and drop it, then ``evaluate_detection``
  from the filled accumulator (the flow's path now);
- before (only with ``--before REV``): the same streamed metrics with ``anomaly/metrics.py`` as it
  was at git revision REV, each map read through zarr (``zarr.open_array``, the read before
  ``read_map_array``), in ``--rounds`` rounds interleaved with new's: both times side by side in one
  run, the figures compared for equality.

4x = every test image four times (the same maps, re-read): the exact metrics are unchanged by the
repetition, so the 4x rows also check that nothing drifts. A bins sweep (one pass, several
accumulators) shows how the binning error falls with the number of bins. :func:`measure` runs it
all and :func:`sections` makes the tables (bench_throughput.py runs only the streamed variant).

    python bench/bench_metrics.py                  # full MTD split (fit + scoring once, then the runs)
    python bench/bench_metrics.py --limit 40 --test-limit 60 --out /tmp/bench   # a quick check
    python bench/bench_metrics.py --scales 1 --no-exact --before ebc5ecc --rounds 3   # streamed: now vs then
"""
from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import importlib.util  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import zarr  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

GOOD_TYPE = "free"
SWEEP_BINS = (1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18)
LAYOUT = "result store, float16 maps"  # how make_maps stores the maps (a cache in another layout is made again)
VERSION = "v0001"


# ---- the maps, once ----------------------------------------------------------------------------------
def make_maps(split: str, limit: int | None, test_limit: int | None, work: Path, threads: int) -> dict:
    """Fit PatchCore (defaults) on the train rows, score the test rows, store maps + a row table."""
    import torch

    from patchwatch.anomaly.detectors import default_features, detector_config, for_features
    from patchwatch.anomaly.features import PatchFeatureExtractor
    from patchwatch.anomaly.patchcore import PatchCore
    from patchwatch.storage.images import read_image
    from patchwatch.storage.results_store import ResultStore

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
    store = ResultStore(str(work / "results"))
    store.prepare()
    started = time.perf_counter()
    for record in test:
        image = read_image(record.uri)
        score, amap = model.score(extractor.extract([image])[0])
        location = store.write_map(record.image_id, record.uri, VERSION, amap)  # as the scoring flow writes it
        pixels += amap.size
        rows.append({"image_id": record.image_id, "map": location, "score": float(score), "label": int(record.label == "defect"),
                     "defect_type": record.defect_type or (GOOD_TYPE if record.label == "good" else ""),
                     "mask_uri": record.mask_uri or "", "shape": list(amap.shape)})
    info = {"split": str(split), "layout": LAYOUT, "train_images": len(train), "test_images": len(test), "pixels": pixels,
            "fit_s": fit_s, "score_s": time.perf_counter() - started, "rows": rows}
    (work / "maps.json").write_text(json.dumps(info))
    return info


def load_maps(split: str, limit: int | None, test_limit: int | None, work: Path, threads: int) -> dict:
    path = work / "maps.json"
    if path.exists():
        info = json.loads(path.read_text())
        if (info["split"], info.get("layout"), info["train_images"]) == (str(split), LAYOUT, len(common.select_records(
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


def _read(row, through_zarr: bool = False):
    """A row's map, as ``ResultStore.read_map`` reads it (or through zarr, the read before), and mask."""
    from patchwatch.storage.images import read_mask
    from patchwatch.storage.results_store import read_map_array

    amap = zarr.open_array(row["map"], mode="r", zarr_format=3)[...] if through_zarr else read_map_array(row["map"])
    return amap, (read_mask(row["mask_uri"], amap.shape) if row["mask_uri"] else None)


def before_module(revision: str, work: Path) -> Path:
    """``anomaly/metrics.py`` as it was at git ``revision``, written to ``work`` (the "before" variant imports it)."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "show", f"{revision}:anomaly/metrics.py"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    path = work / f"metrics_before_{revision}.py"
    path.write_text(source)
    return path


def _load(path: str):
    spec = importlib.util.spec_from_file_location("metrics_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_variant(variant: str, info: dict, scale: int, before: str | None = None) -> dict:
    """One variant at one scale (in a fresh process: see :func:`measure`); ``before``: the "before"
    variant's metrics module (a file from :func:`before_module`).

    The process first imports the evaluate flow, as ``patchwatch evaluate``'s process has when its
    metrics loop runs: torch among its modules (float16 maps are widened through it, F16C: 0.03
    against 0.33 ms an MTD map through numpy's table here), and no module's first import inside
    the timed loop. Without it, 1.83 against 1.46 s on MTD's 581 maps (medians of 6 fresh
    processes each, alternated, 2026-12-03)."""
    import patchwatch.flows.evaluate  # noqa: F401
    from patchwatch.anomaly import metrics as present

    metrics = _load(before) if variant == "before" else present
    PixelCurves, evaluate_detection, pixel_group = metrics.PixelCurves, metrics.evaluate_detection, metrics.pixel_group
    evaluate_detection_exact = metrics.evaluate_detection_exact
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
        pixels, through_zarr = PixelCurves(), variant == "before"
        for row, label, kind in zip(rows, labels, types):
            amap, mask = _read(row, through_zarr)
            pixels.add(amap, mask, group=pixel_group(label, kind))
        read_s = time.perf_counter() - started  # reading and binning are one loop here
        result = evaluate_detection(labels, scores, defect_types=types, pixels=pixels)
        bounds = {"overall": pixels.error_bounds(),
                  **{t: pixels.error_bounds(groups=[None, t]) for t in result["per_defect_type"]}}
    total_s = time.perf_counter() - started
    return {"result": result, "bounds": bounds, "total_s": total_s, "loop_s": read_s,
            "baseline_mib": baseline, "peak_mib": common.peak_rss_mib(),
            **({"histograms": {str(key): value for key, value in pixels._histograms.items()}} if before else {})}


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
            exact: bool = True, sweep: bool = True, before: str | None = None, rounds: int = 1) -> dict:
    """The maps (made once, or reused from ``work``), then each variant at each scale in a fresh
    process ("old", the exact metrics, only with ``exact``; "before", the streamed metrics of git
    revision ``before``, in ``rounds`` rounds interleaved with "new", the median run kept), then the
    bins sweep (with ``sweep``). Returns the table rows, the notes, the maps' facts (``info``) and the
    raw runs by (variant, scale)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    info = load_maps(split, limit, test_limit, work, threads)
    scales = [int(s) for s in str(scales).split(",")]
    module = str(before_module(before, work)) if before else None
    streamed = ("new", "before") if before else ("new",)
    rounds = max(1, int(rounds))

    runs, notes, same = {}, [], {}
    for scale in scales:
        repeats = {variant: [] for variant in streamed}
        for round_ in range(rounds):
            for variant in streamed if round_ % 2 == 0 else streamed[::-1]:
                print(f"{variant} metrics, {scale}x, round {round_ + 1} of {rounds} ...", flush=True)
                repeats[variant].append(common.run_fresh(run_variant, variant, info, scale, module))
        if before:  # every run's histograms against the first new run's
            first = repeats["new"][0]["histograms"]
            same[scale] = all(entry["histograms"].keys() == first.keys() and all(
                np.array_equal(entry["histograms"][key], first[key]) for key in first)
                for done in repeats.values() for entry in done)
        for variant, done in repeats.items():
            for entry in done:
                entry.pop("histograms", None)
            run = sorted(done, key=lambda entry: entry["total_s"])[(len(done) - 1) // 2]  # the median (lower)
            runs[(variant, scale)] = {**run, "totals_s": [entry["total_s"] for entry in done]}
        for variant in ("old",) if exact else ():
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
    names = {"old": "old: exact, all maps held", "new": "new: binned, streamed",
             "before": f"before ({before}): binned, streamed, maps read through zarr"}
    order = {"old": 0, "before": 1, "new": 2}
    for (variant, scale), run in sorted(runs.items(), key=lambda item: (item[0][1], order[item[0][0]])):
        old = runs.get(("old", scale))
        result = run["result"]
        row = {"variant": names[variant],
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
        if before:
            row["time vs before"] = common.ratio(run["total_s"], runs[("before", scale)]["total_s"])
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
    for scale in scales if before else ():
        ours, theirs = runs[("new", scale)], runs[("before", scale)]
        identical = same[scale] and _entries(ours["result"]) == _entries(theirs["result"])
        notes.append(f"{scale}x: new {ours['total_s']:.2f} s against before ({before}) {theirs['total_s']:.2f} s: "
                     f"{ours['total_s'] / theirs['total_s']:.2f} of its time (median of {rounds} interleaved rounds, "
                     f"each a fresh process; new {', '.join(f'{t:.2f}' for t in ours['totals_s'])} s, before "
                     f"{', '.join(f'{t:.2f}' for t in theirs['totals_s'])} s); histograms and every figure "
                     f"{'identical' if identical else 'DIFFERENT'}")
    for scale in scales:
        if ("old", scale) in runs:
            old, ours = runs[("old", scale)], runs[("new", scale)]
            notes.append(f"{scale}x: new takes {ours['total_s'] / old['total_s']:.3f} of old's time "
                         f"({old['total_s'] / ours['total_s']:.0f}x faster), step memory "
                         f"{(ours['peak_mib'] - ours['baseline_mib']) / (old['peak_mib'] - old['baseline_mib']):.3f} of old's")
    notes += [
        f"maps: PatchCore (defaults: EfficientNet-Lite0, scale 0.5, context scale 0.25) fitted with the pure engine on "
        f"{info['train_images']} train images (no hold-out; {info['fit_s']:.0f} s), {info['test_images']} test "
        f"images scored ({info['score_s']:.0f} s, the maps' writes included), {info['pixels'] / 1e6:.1f} M map pixels; "
        "written as the scoring flow writes them (ResultStore.write_map: Zarr, Blosc LZ4) and read one at a time by "
        "every variant as the evaluate flow reads them (ResultStore.read_map; before: through zarr), masks from the "
        "split's PNGs; each variant in a fresh process that first imported the evaluate flow, as "
        "`patchwatch evaluate`'s process has (torch among its modules: float16 maps widened through it)",
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
    parser.add_argument("--no-exact", dest="exact", action="store_false",
                        help="skip the exact metrics (and the bins sweep, which is compared with them)")
    parser.add_argument("--before", metavar="REV", default=None,
                        help="also run the streamed metrics of git revision REV (maps read through zarr), "
                             "interleaved with the present ones: both times side by side")
    parser.add_argument("--rounds", type=int, default=1,
                        help="interleaved rounds of new and before, the median run kept (default %(default)s)")
    args = parser.parse_args()
    started = time.perf_counter()
    machine = common.machine_info()
    result = measure(args.split, args.limit, args.test_limit, args.scales, args.work, args.threads, args.force,
                     exact=args.exact, sweep=args.exact, before=args.before, rounds=args.rounds)
    info = result["info"]
    meta = {"command": common.command_line(), "date": common.utc_now(), "machine": machine,
            "wall_s": time.perf_counter() - started,
            "parameters": {"split": args.split, "train images": info["train_images"],
                           "test images": info["test_images"], "scales": args.scales, "exact": args.exact,
                           "before": args.before, "rounds": args.rounds}}
    common.report(args.out, args.name, "Pixel metrics: exact vs binned (streaming)", meta, sections(result))

if __name__ == "__main__":
    main()
