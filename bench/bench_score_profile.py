#!/usr/bin/env python
"""Where PatchCore score time goes around the backbone, before and after issue 15 (item 2).

For MTD test images (whole images) and one tiled 8192 x 8192 mosaic of MTD images, each image or
tile goes through the backbone once; its features are then scored by both paths, one after the
other (alternating which goes first), so "before" and "after" share the machine's load:

- before: the code as it was (kept here only for this comparison): a faiss flat search of the full
  vectors (image score), a second one of the map's primary half, eq. 7, torch bilinear upsampling
  then scipy's Gaussian on the full-resolution map (tiles: ``anomaly.tiling.render_block`` per
  Zarr chunk);
- after: ``PatchCore.nearest`` (one exact pass serving both the image score and the map), eq. 7,
  ``anomaly.maps`` (upsample and smooth as two small matrix products; tiles: ``StitchedMap``).

Both write their maps to Zarr through ``storage.results_store.ResultStore`` as the workers do. The
model is fitted in process on evenly spread MTD train images, once per ``--train-limits`` entry
(the memory's size is what the kNN costs scale with). Every stage runs with one thread (torch,
faiss, ONNX Runtime, BLAS), as on the Dask workers.

    python bench/bench_score_profile.py                               # 30 and all 763 train images
    python bench/bench_score_profile.py --train-limits 30 --test-limit 20 --large-side 4096 --out /tmp/bench
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
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

sys.path.insert(0, str(common.REPO))

# table rows: (stage key, label), in pipeline order; a path lacks the stages it does not have
STAGES = [
    ("backbone", "backbone (feature extraction)"),
    ("knn_full", "kNN, full vectors (faiss flat)"),
    ("knn_map", "kNN, map half (faiss flat)"),
    ("knn_once", "kNN, one pass for both"),
    ("eq7", "eq. 7 re-weighting"),
    ("upsample", "upsampling"),
    ("smoothing", "Gaussian smoothing"),
    ("render", "upsample + smooth (matrix products)"),
    ("stitch", "stitch tile grids"),
    ("zarr", "Zarr write"),
    ("preview", "preview PNG"),
    ("rest", "rest (finite checks, copies)"),
]


def timed(clock: dict, key: str, function, *args):
    started = time.perf_counter()
    result = function(*args)
    clock[key] += time.perf_counter() - started
    return result


# ---- the code before (this comparison only) ---------------------------------------------------------
class BeforePatchCore:
    """PatchCore's scoring as it was: two faiss flat searches (full vectors, then the map's half)."""

    def __init__(self, model):
        from patchwatch.anomaly.patchcore import build_index

        self.model = model
        split = model.map_split
        self.map_index = build_index(model.memory[:, :split]) if split else None

    def grid(self, clock: dict, features) -> tuple[float, np.ndarray]:
        from patchwatch.anomaly.patchcore import reweight_image_score

        model, vectors = self.model, np.ascontiguousarray(features.vectors, dtype=np.float32)

        def full():
            squared, nearest = model.index.search(vectors, 1)
            return np.sqrt(np.maximum(squared[:, 0], 0)), nearest[:, 0]

        def map_half(scores):
            if self.map_index is None:
                return scores
            squared, _ = self.map_index.search(np.ascontiguousarray(vectors[:, :model.map_split]), 1)
            return np.sqrt(np.maximum(squared[:, 0], 0))

        scores, nearest = timed(clock, "knn_full", full)
        score = timed(clock, "eq7", reweight_image_score, vectors, scores, nearest, model.memory, model.index,
                      model.config.num_neighbors)
        return score, timed(clock, "knn_map", map_half, scores).reshape(features.grid)


def before_anomaly_map(clock: dict, grid: np.ndarray, features, sigma: float) -> np.ndarray:
    import torch
    import torch.nn.functional as F
    from scipy.ndimage import gaussian_filter

    def upsample():
        tensor = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32))[None, None]
        return F.interpolate(tensor, size=tuple(features.image_shape), mode="bilinear", align_corners=False)[0, 0].numpy()

    upsampled = timed(clock, "upsample", upsample)
    scaled = sigma * np.sqrt(features.image_shape[0] * features.image_shape[1]
                             / (features.input_shape[0] * features.input_shape[1]))
    return timed(clock, "smoothing", gaussian_filter, upsampled, scaled)


def before_render_block(clock: dict, grid, stride, shape, block, sigma) -> np.ndarray:
    """``anomaly.tiling.render_block`` (unchanged there), its two halves timed apart."""
    from scipy.ndimage import gaussian_filter

    started = time.perf_counter()
    margin = int(np.ceil(4 * sigma)) + stride
    top, left = max(block.top - margin, 0), max(block.left - margin, 0)
    bottom, right = min(block.bottom + margin, shape[0]), min(block.right + margin, shape[1])
    rows = (np.arange(top, bottom) + 0.5) / stride - 0.5
    cols = (np.arange(left, right) + 0.5) / stride - 0.5
    r0, c0 = int(max(np.floor(rows[0]), 0)), int(max(np.floor(cols[0]), 0))
    r1, c1 = int(min(np.ceil(rows[-1]) + 1, grid.shape[0])), int(min(np.ceil(cols[-1]) + 1, grid.shape[1]))
    patch = grid[r0:r1, c0:c1]
    ry = np.clip(rows - r0, 0, patch.shape[0] - 1)
    cx = np.clip(cols - c0, 0, patch.shape[1] - 1)
    y0, x0 = np.floor(ry).astype(int), np.floor(cx).astype(int)
    y1, x1 = np.minimum(y0 + 1, patch.shape[0] - 1), np.minimum(x0 + 1, patch.shape[1] - 1)
    wy, wx = (ry - y0)[:, None], (cx - x0)[None, :]
    upsampled = ((1 - wy) * ((1 - wx) * patch[np.ix_(y0, x0)] + wx * patch[np.ix_(y0, x1)])
                 + wy * ((1 - wx) * patch[np.ix_(y1, x0)] + wx * patch[np.ix_(y1, x1)]))
    clock["upsample"] += time.perf_counter() - started
    started = time.perf_counter()
    smoothed = gaussian_filter(upsampled.astype(np.float32), sigma=sigma, mode="nearest")
    inner = smoothed[block.top - top: block.bottom - top, block.left - left: block.right - left].astype(np.float32)
    clock["smoothing"] += time.perf_counter() - started
    return inner


# ---- the code after ----------------------------------------------------------------------------------
def after_grid(clock: dict, model, features) -> tuple[float, np.ndarray]:
    from patchwatch.anomaly.patchcore import reweight_image_score

    scores, nearest, map_scores = timed(clock, "knn_once", model.nearest, features.vectors)
    score = timed(clock, "eq7", reweight_image_score, features.vectors, scores, nearest, model.memory, model.index,
                  model.config.num_neighbors)
    return score, map_scores.reshape(features.grid)


# ---- whole images --------------------------------------------------------------------------------------
def write_map(clock: dict, store, name: str, amap: np.ndarray) -> None:
    timed(clock, "zarr", store.write_map, name, name, "v", amap)


def finite_check(score: float, amap: np.ndarray) -> bool:  # what tasks.scoring.score_image checks
    return bool(np.isfinite(score) and np.isfinite(amap).all())


def profile_whole(extractor, model, images: list[np.ndarray], store) -> dict:
    """Per path: seconds per stage summed over ``images``; the largest differences between paths."""
    from patchwatch.anomaly.maps import anomaly_map

    before_model = BeforePatchCore(model)
    clocks = {"before": defaultdict(float), "after": defaultdict(float)}
    score_diff, map_diff, map_scale = 0.0, 0.0, 0.0
    extractor.extract(images[:1])  # warm-up: sessions, caches
    for number, image in enumerate(images):
        started = time.perf_counter()
        features = extractor.extract([image])[0]
        backbone = time.perf_counter() - started
        results = {}
        for path in (("before", "after") if number % 2 == 0 else ("after", "before")):
            clock = clocks[path]
            clock["backbone"] += backbone
            if path == "before":
                score, grid = before_model.grid(clock, features)
                amap = before_anomaly_map(clock, grid, features, model.config.sigma)
            else:
                score, grid = after_grid(clock, model, features)
                amap = timed(clock, "render", anomaly_map, grid, features.image_shape, model.config.sigma,
                             features.input_shape)
            timed(clock, "rest", finite_check, score, amap)
            write_map(clock, store, f"{path}-{number}", amap)
            results[path] = (score, amap)
        score_diff = max(score_diff, abs(results["before"][0] - results["after"][0]))
        map_diff = max(map_diff, float(np.abs(results["before"][1] - results["after"][1]).max()))
        map_scale = max(map_scale, float(np.abs(results["before"][1]).max()))
    return {"clocks": clocks, "images": len(images), "score_diff": score_diff, "map_diff": map_diff,
            "map_scale": map_scale}


# ---- one tiled large image -----------------------------------------------------------------------------
def mosaic(images: list[np.ndarray], side: int, cell: int = 512) -> np.ndarray:
    """A ``side`` x ``side`` RGB image of MTD images resized to ``cell`` px squares, in turn."""
    from PIL import Image

    cells = [np.asarray(Image.fromarray(image).convert("RGB").resize((cell, cell))) for image in images]
    out = np.empty((side, side, 3), np.uint8)
    for number, (top, left) in enumerate((t, l) for t in range(0, side, cell) for l in range(0, side, cell)):
        out[top:top + cell, left:left + cell] = cells[number % len(cells)][:side - top, :side - left]
    return out


def profile_tiled(extractor, model, image: np.ndarray, store) -> dict:
    """The score-tiles and stitch-map tasks' work on ``image``, per path."""
    from patchwatch.anomaly.maps import StitchedMap
    from patchwatch.anomaly.tiling import TilingConfig, blocks, stitch_grids, tile_grid, tile_sigma
    from patchwatch.storage.results_store import MAP_CHUNK
    from patchwatch.tasks.tiles import _preview

    tiling = TilingConfig()
    shape = image.shape[:2]
    tiles = tile_grid(shape[0], shape[1], tiling.tile, tiling.overlap)
    before_model = BeforePatchCore(model)
    clocks = {"before": defaultdict(float), "after": defaultdict(float)}
    scored = {"before": [], "after": []}
    extractor.extract([image[:tiling.tile, :tiling.tile]])  # warm-up
    for number, tile in enumerate(tiles):
        started = time.perf_counter()
        features = extractor.extract([image[tile.top:tile.bottom, tile.left:tile.right]])[0]
        backbone = time.perf_counter() - started
        for path in (("before", "after") if number % 2 == 0 else ("after", "before")):
            clock = clocks[path]
            clock["backbone"] += backbone
            score, grid = (before_model.grid(clock, features) if path == "before"
                           else after_grid(clock, model, features))
            scored[path].append({"grid": grid.astype(np.float32), "max": float(grid.max()), "weighted": score})
    sigma_px = tile_sigma(model.config.sigma, tiles[0].shape, features.input_shape)
    results = {}
    for path in ("before", "after"):
        clock, items = clocks[path], scored[path]
        stitcher = timed(clock, "stitch", stitch_grids, shape, tiles, [item["grid"] for item in items], tiling.overlap)
        grid = timed(clock, "stitch", stitcher.grid)
        array = timed(clock, "zarr", store.create_map, f"{path}-large", "large", "v", shape, MAP_CHUNK)
        rendered = StitchedMap(grid, stitcher.stride, shape, sigma_px) if path == "after" else None
        for block in blocks(shape[0], shape[1], MAP_CHUNK):
            if rendered is None:
                values = before_render_block(clock, grid, stitcher.stride, shape, block, sigma_px)
            else:
                values = timed(clock, "render", rendered.block, block.top, block.left, block.bottom, block.right)
            timed(clock, "zarr", array.__setitem__, (slice(block.top, block.bottom), slice(block.left, block.right)),
                  values)
        best = max(items, key=lambda item: item["max"])
        timed(clock, "preview", _preview, grid, float(np.percentile(grid, 50)), float(grid.max()))
        results[path] = (best["weighted"], store.read_map(store.map_url(f"{path}-large", "large", "v")))
    return {"clocks": clocks, "images": 1, "tiles": len(tiles),
            "score_diff": abs(results["before"][0] - results["after"][0]),
            "map_diff": float(np.abs(results["before"][1] - results["after"][1]).max()),
            "map_scale": float(np.abs(results["before"][1]).max())}


# ---- tables --------------------------------------------------------------------------------------------
def share_rows(profiles: dict[str, dict]) -> list[dict]:
    """One row per stage: per profile and path, ms per image and share of that path's score time."""
    rows = []
    totals = {(name, path): sum(p["clocks"][path].values()) for name, p in profiles.items() for path in ("before", "after")}
    for key, label in STAGES + [("total", "score time (sum)")]:
        row, present = {"stage": label}, False
        for name, profile in profiles.items():
            for path in ("before", "after"):
                clock = profile["clocks"][path]
                seconds = totals[(name, path)] if key == "total" else clock.get(key)
                present |= seconds is not None and key != "total"
                per_image = None if seconds is None else 1000 * seconds / profile["images"]
                row[f"{name} {path} ms/image"] = per_image
                row[f"{name} {path} share"] = None if seconds is None else round(seconds / totals[(name, path)], 3)
        if present or key == "total":
            rows.append(row)
    return rows


def fit(extractor, split: str, limit: int | None):
    from patchwatch.anomaly.detectors import default_features, detector_config, for_features
    from patchwatch.anomaly.patchcore import PatchCore
    from patchwatch.storage.images import read_image

    records = common.select_records(split, "train", limit)
    bank = np.concatenate([extractor.extract([read_image(r.uri)])[0].vectors for r in records])
    config = for_features("patchcore", detector_config("patchcore"), default_features("patchcore"))
    return PatchCore.fit(bank, config), len(records)


def main() -> None:
    parser = common.base_parser(__doc__, "score_profile")
    parser.add_argument("--train-limits", default="30,all",
                        help="train images of each fitted memory, comma-separated; 'all': every train row (default %(default)s)")
    parser.add_argument("--test-limit", type=int, default=40, help="MTD test images scored whole (default %(default)s)")
    parser.add_argument("--large-side", type=int, default=8192, help="side of the tiled mosaic (default %(default)s)")
    parser.add_argument("--runtime", default=None, help="backbone runtime (default: PATCHWATCH_RUNTIME, else auto)")
    parser.add_argument("--tmp", default=None, help="folder for the Zarr maps (default: a temporary one)")
    args = parser.parse_args()

    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    from patchwatch.anomaly.detectors import default_features
    from patchwatch.anomaly.features import PatchFeatureExtractor
    from patchwatch.anomaly.runtime import resolve_runtime
    from patchwatch.storage.images import read_image
    from patchwatch.storage.results_store import ResultStore

    wall = time.perf_counter()
    machine = common.machine_info()
    runtime = resolve_runtime(args.runtime or os.environ.get("PATCHWATCH_RUNTIME"))
    extractor = PatchFeatureExtractor(default_features("patchcore"), runtime=runtime, threads=1)
    test_images = [read_image(r.uri) for r in common.select_records(args.split, "test", args.test_limit)]
    large = mosaic(test_images, args.large_side)
    folder = Path(tempfile.mkdtemp(prefix="score-profile-", dir=args.tmp))
    sections, summary = [], []
    try:
        for limit_text in args.train_limits.split(","):
            limit = None if limit_text.strip() == "all" else int(limit_text)
            model, train_count = fit(extractor, args.split, limit)
            store = ResultStore(str(folder / f"results-{limit_text.strip()}"))
            store.prepare()
            print(f"memory: {len(model.memory)} rows from {train_count} train images", flush=True)
            whole = profile_whole(extractor, model, test_images, store)
            tiled = profile_tiled(extractor, model, large, store)
            profiles = {"MTD": whole, f"{args.large_side}px": tiled}
            title = f"Score time by stage, memory of {len(model.memory):,} rows ({train_count} MTD train images)"
            notes = [f"MTD: {whole['images']} test images scored whole, per image; {args.large_side}px: one mosaic of "
                     f"MTD test images in {tiled['tiles']} tiles of 512 px (overlap 128), per image",
                     "share: of the path's own score time (the sum of its stages); before and after ran on the same "
                     "features, image by image (tile by tile), alternating which went first",
                     f"after vs before, largest |difference|: image score MTD {whole['score_diff']:.2g}, "
                     f"{args.large_side}px {tiled['score_diff']:.2g}; map MTD {whole['map_diff']:.2g} "
                     f"(map values up to {whole['map_scale']:.3g}), {args.large_side}px {tiled['map_diff']:.2g} "
                     f"(up to {tiled['map_scale']:.3g})"]
            sections.append({"title": title, "rows": share_rows(profiles), "notes": notes,
                             "memory_rows": len(model.memory), "train_images": train_count,
                             "score_diff": {"MTD": whole["score_diff"], "large": tiled["score_diff"]},
                             "map_diff": {"MTD": whole["map_diff"], "large": tiled["map_diff"]}})
            for name, profile in profiles.items():
                totals = {path: sum(profile["clocks"][path].values()) for path in ("before", "after")}
                summary.append({"memory rows": len(model.memory), "images": name,
                                "backbone share before": round(profile["clocks"]["before"]["backbone"] / totals["before"], 3),
                                "backbone share after": round(profile["clocks"]["after"]["backbone"] / totals["after"], 3),
                                "score time after / before": round(totals["after"] / totals["before"], 3)})
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    sections.insert(0, {"title": "Backbone share of score time", "rows": summary,
                        "notes": ["the goal (issue 15): backbone >= 80 % of score time"]})
    meta = {"command": common.command_line(), "date": common.utc_now(), "machine": machine,
            "wall_s": time.perf_counter() - wall, "measures_memory": False,
            "parameters": {"runtime": runtime, "threads": 1, "train limits": args.train_limits,
                           "test images": len(test_images), "large side": args.large_side}}
    common.report(args.out, args.name, "Score time around the backbone: before and after (issue 15, item 2)", meta, sections)


if __name__ == "__main__":
    main()
