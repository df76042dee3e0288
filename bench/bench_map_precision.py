#!/usr/bin/env python
"""Anomaly maps stored in float16 against float32 (``storage.results_store.map_dtype``): what a
user's figures lose and what the store saves.

PatchCore with its defaults (the pure engine, one thread) is fitted on the split's train rows and
scores its test rows whole, 16 images a task as the score-batch task does. The same in-memory
float32 maps are then:

- stored both ways through ``ResultStore.write_maps``, a task's 16 maps at a time into a local
  root, in ``--rounds`` rounds alternating which type goes first (float32: the same write with
  ``map_dtype`` answering float32, the store before float16 maps): ms a map, bytes a map on disk,
  and ms a map to read back (``ResultStore.read_map``, as the evaluate flow reads maps);
- compared value by value (float16's rounding error, absolute and relative);
- scored: pixel AUROC and AUPRO (to FPR 0.3), overall and per defect type, from the float32 maps
  and from the float16 ones as read back (``evaluate_detection``, binned as the evaluate flow
  computes them; its bound on the binning error is given beside).

A mosaic of the test images (``--stitched-side``, ~21 MP by default) is scored in tiles and its
stitched map stored both ways, 512 px chunks: bytes a pixel. With ``--sets``, the pixel metrics'
comparison is repeated on ``bench/eval_sets.py``'s evaluation sets (built into ``--work``, image
counts x ``--set-scale``; MTD: ``--mtd-limit`` train and test images), PaDiM's and PatchCore's
defaults on each.

    python bench/bench_map_precision.py --sets all    # also every evaluation set, at 0.3x their images

    python bench/bench_map_precision.py                       # the MTD split, all train and test rows
    python bench/bench_map_precision.py --limit 40 --test-limit 60 --out /tmp/bench   # a quick check
"""
from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"
os.environ.setdefault("PATCHWATCH_ALLOW_SOURCES", "/work/shared")

import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

sys.path.insert(0, str(common.REPO))

TASK = 16          # maps a score-batch task writes together (flows' batch_size default)
VERSION = "v0001"


def stitched_map(extractor, model, records, side: int):
    """The full-resolution map of a ``side`` x ``side`` mosaic of the test images, scored in tiles
    and stitched as the score-tiles and stitch-map tasks do: (StitchedMap, its grid's largest |value|)."""
    from bench_score_profile import mosaic

    from patchwatch.anomaly.maps import StitchedMap
    from patchwatch.anomaly.tiling import TilingConfig, stitch_grids, tile_grid, tile_sigma
    from patchwatch.storage.images import read_image
    from patchwatch.storage.results_store import largest_magnitude

    image = mosaic([read_image(r.uri) for r in records], side)
    tiling = TilingConfig()
    tiles = tile_grid(side, side, tiling.tile, tiling.overlap)
    grids, features = [], []
    for first in range(0, len(tiles), TASK):
        features = [extractor.extract([image[t.top:t.bottom, t.left:t.right]])[0] for t in tiles[first:first + TASK]]
        grids += [grid.astype(np.float32) for _, grid in model.image_scores_and_grids(features)]
    stitcher = stitch_grids((side, side), tiles, grids, tiling.overlap)
    grid = stitcher.grid()
    sigma = tile_sigma(model.config.sigma, tiles[0].shape, features[0].input_shape)
    return StitchedMap(grid, stitcher.stride, (side, side), sigma), largest_magnitude(grid)


def store_stitched_both_ways(rendered, largest: float, work: Path) -> dict:
    """Bytes a pixel of the stitched map written in 512 px chunks, float32 and float16 (as the
    stitch-map task writes it), and the largest |float16 - float32| as read back."""
    from patchwatch.anomaly.tiling import blocks
    from patchwatch.storage.results_store import MAP_CHUNK, ResultStore

    store = ResultStore(str(work / "stitched"))
    store.prepare()
    found = {}
    for kind, bound in (("float32", None), ("float16", largest)):
        writer = store.open_map(f"mosaic-{kind}", f"/mosaic-{kind}.tif", VERSION, rendered.image_shape, largest=bound)
        writer.write_blocks([(b.top, b.left, rendered.block(b.top, b.left, b.bottom, b.right))
                             for b in blocks(*rendered.image_shape, MAP_CHUNK)])
        found[kind] = {"bytes": sum(p.stat().st_size for p in Path(writer.url).iterdir() if p.name.startswith("c.")),
                       "values": store.read_map(writer.url), "dtype": str(writer.dtype)}
    pixels = rendered.image_shape[0] * rendered.image_shape[1]
    return {"bytes_per_pixel": {k: v["bytes"] / pixels for k, v in found.items()},
            "dtype": {k: v["dtype"] for k, v in found.items()},
            "largest_error": float(np.abs(found["float16"]["values"] - found["float32"]["values"]).max()),
            "largest_value": float(np.abs(found["float32"]["values"]).max())}


def scored_maps(split: str, limit: int | None, test_limit: int | None, detector: str = "patchcore"):
    """(test records, their float32 maps, image scores, the extractor, the model): PatchCore, or
    PaDiM at the input size a fit on the set sets (bench_score_profile.fit_padim), with their
    default settings fitted on the train rows."""
    from bench_score_profile import fit_padim, padim_features

    from patchwatch.anomaly.detectors import default_features
    from patchwatch.anomaly.features import PatchFeatureExtractor
    from patchwatch.storage.images import read_image

    if detector == "padim":
        extractor = PatchFeatureExtractor(padim_features(split), threads=1)
        model, _ = fit_padim(extractor, split, limit)
    else:
        extractor = PatchFeatureExtractor(default_features("patchcore"), threads=1)
        model = common.fit_default_patchcore(extractor, [r.uri for r in common.select_records(split, "train", limit)])
    records = common.select_records(split, "test", test_limit)
    maps, scores = [], []
    for first in range(0, len(records), TASK):
        features = [extractor.extract([read_image(r.uri)])[0] for r in records[first:first + TASK]]
        for score, amap in model.scores(features):
            scores.append(score)
            maps.append(amap)
    return records, maps, np.array(scores), extractor, model


def store_both_ways(records, maps: list[np.ndarray], rounds: int, work: Path) -> dict:
    """ms a map to write and to read, bytes a map, per stored type; the float16 maps as read back."""
    from patchwatch.storage import results_store
    from patchwatch.storage.results_store import ResultStore

    chosen = results_store.map_dtype
    kinds = {"float16": chosen, "float32": lambda largest: "float32"}
    write_s = {kind: 0.0 for kind in kinds}
    read_s = {kind: 0.0 for kind in kinds}
    stored_bytes, read_back = {}, {}
    for number in range(rounds):
        for kind in (list(kinds) if number % 2 == 0 else list(kinds)[::-1]):
            root = work / f"{kind}-{number}"
            store = ResultStore(str(root))
            store.prepare()
            results_store.map_dtype = kinds[kind]
            try:
                store.write_maps([("warm-up", "/warm-up.png", VERSION, maps[0])])  # the group's metadata, once
                urls = []
                started = time.perf_counter()
                for first in range(0, len(maps), TASK):
                    urls += store.write_maps([(r.image_id, r.uri, VERSION, m)
                                              for r, m in zip(records[first:first + TASK], maps[first:first + TASK])])
                write_s[kind] += time.perf_counter() - started
            finally:
                results_store.map_dtype = chosen
            started = time.perf_counter()
            found = [store.read_map(url) for url in urls]
            read_s[kind] += time.perf_counter() - started
            if number == 0:
                read_back[kind] = found
                stored_bytes[kind] = sum(path.stat().st_size for url in urls
                                         for path in Path(url).iterdir() if path.name.startswith("c."))
            shutil.rmtree(root)
    count = rounds * len(maps)
    return {"write_ms": {k: 1e3 * v / count for k, v in write_s.items()},
            "read_ms": {k: 1e3 * v / count for k, v in read_s.items()},
            "bytes": {k: v / len(maps) for k, v in stored_bytes.items()}, "read_back": read_back}


def pixel_figures(records, maps: list[np.ndarray], scores: np.ndarray) -> dict:
    from patchwatch.anomaly.metrics import PixelCurves, evaluate_detection, pixel_group
    from patchwatch.storage.images import read_mask

    labels = np.array([r.label == "defect" for r in records])
    types = [r.defect_type or "" for r in records]
    curves = PixelCurves()
    for record, amap, label, kind in zip(records, maps, labels, types):
        mask = read_mask(record.mask_uri, amap.shape) if record.mask_uri else None
        curves.add(amap, mask, group=pixel_group(label, kind))
    result = evaluate_detection(labels, scores, defect_types=types, pixels=curves)
    figures = {("overall", "pixel AUROC"): result["pixel_auroc"], ("overall", "AUPRO"): result["aupro"]}
    for kind, found in result["per_defect_type"].items():
        figures[(kind, "pixel AUROC")] = found["pixel_auroc"]
        figures[(kind, "AUPRO")] = found["aupro"]
    bounds = curves.error_bounds()
    return {"figures": figures, "bounds": bounds}


def every_set_rows(names: list[str], work: Path, scale: float, mtd_limit: int) -> list[dict]:
    """Per evaluation set and detector (PaDiM: what --auto picked on every set; PatchCore:
    --no-auto's): pixel AUROC and AUPRO from the float32 maps and from the same maps rounded to
    float16, as the store keeps them (numpy's rounding: the store's, tested)."""
    import eval_sets

    rows = []
    for name, detector in ((name, detector) for name in names for detector in ("padim", "patchcore")):
        split = str(eval_sets.build(name, work, scale))
        limit = mtd_limit if name == "mtd" else None
        records, maps, scores, *_ = scored_maps(split, limit, limit, detector)
        exact = pixel_figures(records, maps, scores)["figures"]
        rounded = pixel_figures(records, [amap.astype(np.float16).astype(np.float32) for amap in maps], scores)["figures"]
        rows.append({"set": name, "detector": detector, "test images": len(records), "largest map value": max(float(m.max()) for m in maps),
                     **{f"{metric}, float{bits}": figures[("overall", metric)]
                        for metric in ("pixel AUROC", "AUPRO") for bits, figures in ((32, exact), (16, rounded))},
                     "largest |difference|, overall and per type": max(abs(rounded[key] - exact[key]) for key in exact
                                                                      if np.isfinite(exact[key]))})
    return rows


def main() -> None:
    parser = common.base_parser(__doc__, "map_precision")
    parser.add_argument("--test-limit", type=int, default=None, help="use only N test images, spread evenly")
    parser.add_argument("--rounds", type=int, default=4, help="write/read rounds per type (default %(default)s)")
    parser.add_argument("--stitched-side", type=int, default=4608,
                        help="side of the tiled mosaic whose stitched map is stored both ways (default %(default)s: ~21 MP)")
    parser.add_argument("--sets", default="", help="evaluation sets to compare pixel metrics on too: comma-separated, or all")
    parser.add_argument("--set-scale", type=float, default=0.3, help="their image counts x this (default %(default)s)")
    parser.add_argument("--mtd-limit", type=int, default=120, help="MTD among --sets: N train and test images")
    parser.add_argument("--work", default="/tmp/evalsets-map-precision", help="where --sets are built")
    args = parser.parse_args()
    allocator = common.as_on_the_workers()
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    records, maps, scores, extractor, model = scored_maps(args.split, args.limit, args.test_limit)
    work = Path(tempfile.mkdtemp(prefix="bench-map-precision-"))
    try:
        stored = store_both_ways(records, maps, args.rounds, work)
        stitched = store_stitched_both_ways(*stitched_map(extractor, model, records, args.stitched_side), work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    half = stored["read_back"]["float16"]
    float32_equal = all(np.array_equal(found, amap) for found, amap in zip(stored["read_back"]["float32"], maps))
    errors = [np.abs(found - amap) for found, amap in zip(half, maps)]
    relative = max(float((error / np.abs(amap)).max()) for error, amap in zip(errors, maps))
    largest = max(float(np.abs(amap).max()) for amap in maps)
    exact = pixel_figures(records, maps, scores)
    rounded = pixel_figures(records, half, scores)
    pixels = sum(amap.size for amap in maps)
    storage_rows = [{"stored as": kind, "write ms / map": stored["write_ms"][kind], "read ms / map": stored["read_ms"][kind],
                     "KiB / map on disk": stored["bytes"][kind] / 1024,
                     "bytes / pixel": stored["bytes"][kind] * len(maps) / pixels,
                     "vs float32": stored["bytes"][kind] / stored["bytes"]["float32"]} for kind in ("float32", "float16")]
    metric_rows = [{"group": group, "metric": metric, "float32 maps": exact["figures"][(group, metric)],
                    "float16 maps": rounded["figures"][(group, metric)],
                    "|difference|": abs(rounded["figures"][(group, metric)] - exact["figures"][(group, metric)])}
                   for group, metric in exact["figures"]]
    worst = max(row["|difference|"] for row in metric_rows)
    bound = max(max(exact["bounds"].values()), max(rounded["bounds"].values()))
    sections = [
        {"title": "Storing and reading a map", "rows": storage_rows, "notes": [
            f"{len(maps)} MTD test maps (float32 in memory, {pixels / len(maps):,.0f} pixels a map on average), written "
            f"{TASK} at a time with ResultStore.write_maps into a local root, {args.rounds} rounds alternating which "
            "type went first; read back with ResultStore.read_map (float16 maps widened to float32)",
            "float32: the same write with storage.results_store.map_dtype answering float32 (the store before "
            "float16 maps); bytes: the chunk files (each map's zarr.json aside)",
            f"the workers' allocator settings: {allocator}"]},
        {"title": "A stitched map (a tiled image's), 512 px chunks", "rows": [
            {"stored as": kind, "type written": stitched["dtype"][kind], "bytes / pixel": stitched["bytes_per_pixel"][kind],
             "vs float32": stitched["bytes_per_pixel"][kind] / stitched["bytes_per_pixel"]["float32"]}
            for kind in ("float32", "float16")], "notes": [
            f"a {args.stitched_side} x {args.stitched_side} mosaic of the test images (512 px cells), scored in 512 px "
            "tiles (overlap 128) and stitched as the score-tiles and stitch-map tasks do; written with "
            "ResultStore.open_map + MapWriter.write_blocks, once with the grid's largest value (float16, as the "
            "stitch-map task writes it) and once without (float32)",
            f"largest |float16 - float32| read back: {stitched['largest_error']:.3g} "
            f"(values up to {stitched['largest_value']:.3g})"]},
        {"title": "Values: float16 as stored against the float32 maps", "rows": [
            {"largest map value": largest, "largest |error|": max(float(e.max()) for e in errors),
             "largest relative error": relative, "float16's bound (2^-11)": 2.0 ** -11,
             "float32 maps read back equal": float32_equal}]},
        {"title": "Pixel metrics from float32 and from float16 maps", "rows": metric_rows, "notes": [
            f"largest |difference|: {worst:.2g}; the binned curves' own bound on |binned - exact| "
            f"(PixelCurves.error_bounds, largest over both): {bound:.2g}",
            "binned as the evaluate flow computes them (evaluate_detection on a filled PixelCurves, default bins); "
            "per defect type: the good images and that type's",
            f"PatchCore with its defaults fitted on the train rows ({len(model.memory):,} memory rows), 1 thread"]},
    ]
    if args.sets:
        import eval_sets

        names = list(eval_sets.SETS) if args.sets == "all" else args.sets.split(",")
        rows = every_set_rows(names, Path(args.work), args.set_scale, args.mtd_limit)
        sections.append({"title": "Pixel metrics from float32 and float16 maps on every evaluation set", "rows": rows,
                         "notes": [f"largest |difference| over every set: {max(r['largest |difference|, overall and per type'] for r in rows):.2g}",
                                   f"bench/eval_sets.py's sets at {args.set_scale}x their images (MTD: {args.mtd_limit} "
                                   "train and test images), PaDiM's and PatchCore's defaults fitted on each set's train images; "
                                   "binned as the evaluate flow computes them"]})
    meta = {"command": common.command_line(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": common.machine_info(), "wall_s": time.perf_counter() - started, "measures_memory": False,
            "parameters": {"test images": len(maps), "rounds": args.rounds, "stitched side": args.stitched_side,
                           "sets": args.sets or "none", "set scale": args.set_scale}}
    common.report(args.out, args.name, "Anomaly maps stored in float16 against float32", meta, sections)


if __name__ == "__main__":
    main()
