#!/usr/bin/env python
"""Where score time goes around the backbone, before and after issue 15 (item 2).

For MTD test images (whole images) and one tiled 8192 x 8192 mosaic of MTD images, each image or
tile goes through the backbone once; its features are then scored by both paths, one after the
other (alternating which goes first), so "before" and "after" share the machine's load:

- before: the code as it was (kept here only for this comparison): image by image, a faiss flat
  search of the full vectors (image score), a second one of the map's primary half, eq. 7, torch
  bilinear upsampling then scipy's Gaussian on the full-resolution map (tiles:
  ``anomaly.tiling.upsample_block`` and ``smooth_block``, i.e. ``render_block``, per Zarr chunk),
  maps written through zarr with its default codec (zstd);
- after: as the score-batch and score-tiles tasks do now: a task's images (16) or tiles (16) share
  one ``PatchCore.worst_patches`` pass (candidates ranked in bfloat16, or float32 on CPUs without
  it, with a bound on the error, on the memory's principal axes
  where they hold it, exact distances: every patch's
  map distance, the full vectors' only where a patch can hold its image's score; tiles:
  ``PatchCore.tile_scores_and_grids``, the full vectors' pass and eq. 7 only in the task's tile
  that can give the image's score, timed with the kNN), eq. 7,
  ``anomaly.maps`` (upsample and smooth as two small matrix products; tiles: ``StitchedMap``),
  ``ResultStore.write_map`` / ``create_map`` (Blosc LZ4).

A third path, PaDiM as scored now (``fit --auto`` picks it on MTD), is profiled on the MTD images
with its own default features: backbone, Mahalanobis distances, map, Zarr write.

The PatchCore model is fitted in process on evenly spread MTD train images, once per
``--train-limits`` entry (the memory's size is what the kNN costs scale with). Every stage runs
with one thread (torch, faiss, ONNX Runtime, BLAS) and the workers' glibc allocator settings
(``flows.runner.WORKER_ALLOCATOR_ENV``: the script re-runs itself with them), as on the Dask workers.

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
    ("knn_once", "kNN, one pass for both (per task: 16 images or tiles)"),
    ("mahalanobis", "PaDiM: Mahalanobis distances"),
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
    """``anomaly.tiling.render_block``, its two steps timed apart."""
    from patchwatch.anomaly.tiling import smooth_block, upsample_block

    upsampled, window = timed(clock, "upsample", upsample_block, grid, stride, shape, block, sigma)
    return timed(clock, "smoothing", smooth_block, upsampled, window, block, sigma)


def before_create_map(store, name: str, shape):
    """``ResultStore.create_map`` as it was: through zarr, with zarr's default codec (zstd level 0)."""
    import zarr

    store._require_groups("v")
    height, width = int(shape[0]), int(shape[1])
    return zarr.create_array(store.map_url(name, name, "v"), shape=(height, width), dtype="float32",
                             chunks=(min(512, height), min(512, width)), fill_value=np.nan,
                             dimension_names=[f"y_{height}", f"x_{width}"],
                             attributes=store._map_attributes(name, name, "v", height, width),
                             overwrite=True, zarr_format=3)


def before_preview(grid: np.ndarray, low: float, high: float) -> bytes:
    """``tasks.tiles._preview`` as it was: the grid enlarged, then coloured."""
    import io

    from PIL import Image

    from patchwatch.anomaly.maps import heatmap_overlay
    from patchwatch.tasks.tiles import PREVIEW_SIDE

    scale = max(1, PREVIEW_SIDE // max(grid.shape))
    enlarged = np.kron(grid, np.ones((scale, scale), np.float32)) if scale > 1 else grid
    rgb = heatmap_overlay(np.zeros(enlarged.shape, np.float32), enlarged, low, high, opacity=1.0)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def before_write_map(store, name: str, amap: np.ndarray) -> None:
    """``ResultStore.write_map`` as it was: create the array, then write it, each through zarr."""
    before_create_map(store, name, amap.shape)[...] = amap.astype(np.float32, copy=False)


# ---- the code after ----------------------------------------------------------------------------------
def after_grids(clock: dict, model, features: list) -> list[tuple[float, np.ndarray]]:
    """``PatchCore.image_scores_and_grids``, its kNN pass (``worst_patches``: every patch's map
    distance, each image's worst patch's) and eq. 7 (m*'s neighbourhoods, the re-weighting) timed
    apart."""
    from patchwatch.anomaly.patchcore import reweight_image_score

    vectors = np.concatenate([item.vectors for item in features])
    bounds = np.cumsum([0] + [len(item.vectors) for item in features])
    found = timed(clock, "knn_once", model.worst_patches, vectors, bounds)
    count = min(model.config.num_neighbors, len(model.memory))
    supports = timed(clock, "eq7", model.neighbourhoods, found.rows, count) if count >= 2 else [None] * len(features)
    return [(timed(clock, "eq7", reweight_image_score, vectors[found.patches[k:k + 1]], found.scores[k:k + 1],
                   found.rows[k:k + 1], model.memory, model.index, model.config.num_neighbors, supports[k]),
             found.map_scores[bounds[k]:bounds[k + 1]].reshape(item.grid))
            for k, item in enumerate(features)]


# ---- the kNN on the memory's principal axes ---------------------------------------------------------
def profile_principal_axes(model, features: list, rounds: int = 5) -> dict:
    """``worst_patches`` as scoring runs it (on the memory's leading principal axes where they hold
    it) against the same model ranking every dimension (``principal_axes=False``), task by task
    (16 images), alternating which goes first; per pass, the axes' share of the memory's variance
    and the candidates a patch keeps (computed exactly afterwards)."""
    from patchwatch.anomaly.patchcore import PatchCore

    plain = PatchCore(model.memory, model.config, model.index, model.precision, principal_axes=False)
    paths = {"principal axes": model, "every dimension": plain}
    clocks, equal = {name: 0.0 for name in paths}, True
    tasks = [features[first:first + TASK_BATCH] for first in range(0, len(features), TASK_BATCH)]
    for number in range(rounds * len(tasks)):
        task = tasks[number % len(tasks)]
        vectors = np.concatenate([item.vectors for item in task])
        bounds = np.cumsum([0] + [len(item.vectors) for item in task])
        found = {}
        for name in (list(paths) if number % 2 == 0 else list(paths)[::-1]):
            started = time.perf_counter()
            found[name] = paths[name].worst_patches(vectors, bounds)
            clocks[name] += time.perf_counter() - started
        equal &= all(np.array_equal(getattr(found["principal axes"], field), getattr(found["every dimension"], field))
                     for field in ("map_scores", "patches", "scores", "rows"))
    vectors = np.concatenate([item.vectors for item in features])
    passes = []
    for name, projection in (("map", model._map_projection), ("full vectors", model._full_projection)):
        if projection is None:
            passes.append({"pass": name, "principal axes": "none (ranks every dimension)"})
            continue
        kept = sum(len(projection.candidates(vectors[first:first + model._block],
                                             vectors[first:first + model._block] - model._centre, model.memory)[0])
                   for first in range(0, len(vectors), model._block))
        passes.append({"pass": name, "dimensions": projection.basis.shape[0], "principal axes": projection.basis.shape[1],
                       "their share of the variance": round(projection.variance_share, 3),
                       "candidates per patch": round(kept / len(vectors), 2)})
    images = rounds * len(features)
    return {"ms": {name: 1e3 * clock / images for name, clock in clocks.items()}, "equal": equal, "passes": passes}


# ---- whole images --------------------------------------------------------------------------------------
# images of one score-batch task, tiles of one score-tiles task (flows' defaults: batch_size, tiles_per_task)
TASK_BATCH = 16


def warm_up_outputs(store, item, sigma: float) -> None:
    """One untimed map render and write per path, as the backbone gets its warm-up pass: a worker
    pays the first call's set-up (torch's first small products, scipy's first filter, the results
    store's group metadata: ~3 ms + ~7 ms, ~0.5 ms an image over 20 images) once per run, not per image."""
    from patchwatch.anomaly.maps import anomaly_map

    zeros = np.zeros(item.grid, np.float32)
    store.write_map("warm-up", "warm-up", "v", anomaly_map(zeros, item.image_shape, sigma, item.input_shape))
    before_write_map(store, "warm-up-before", before_anomaly_map(defaultdict(float), zeros, item, sigma))


def finite_check(score: float, amap: np.ndarray) -> bool:  # what tasks.scoring.scored_image checks
    return bool(np.isfinite(score) and np.isfinite(amap).all())


def cold_map_axes() -> None:
    """Forget the maps' cached axis matrices: each profile meets its images' sizes for the first
    time, as a worker does on MTD (every test image a different size). Before, the second memory's
    MTD profile found all its axes cached by the first's: 0.13 against 0.47 ms per image to render."""
    from patchwatch.anomaly.maps import _stitched_axis, image_axis

    image_axis.cache_clear()
    _stitched_axis.cache_clear()


def profile_whole(extractor, model, images: list[np.ndarray], store) -> dict:
    """Per path: seconds per stage summed over ``images``; the largest differences between paths."""
    from patchwatch.anomaly.maps import anomaly_map

    cold_map_axes()

    before_model = BeforePatchCore(model)
    clocks = {"before": defaultdict(float), "after": defaultdict(float)}
    score_diff, map_diff, map_scale, every_feature = 0.0, 0.0, 0.0, []
    warm_up_outputs(store, extractor.extract(images[:1])[0], model.config.sigma)  # warm-up: sessions, caches
    for first in range(0, len(images), TASK_BATCH):
        numbers = range(first, min(first + TASK_BATCH, len(images)))
        features, backbone = [], 0.0
        for number in numbers:
            started = time.perf_counter()
            features.append(extractor.extract([images[number]])[0])
            backbone += time.perf_counter() - started
        every_feature.extend(features)
        results = {}
        for path in (("before", "after") if (first // TASK_BATCH) % 2 == 0 else ("after", "before")):
            clock = clocks[path]
            clock["backbone"] += backbone
            if path == "before":
                scored = [before_model.grid(clock, item) for item in features]
            else:
                scored = after_grids(clock, model, features)
            results[path] = []
            for number, item, (score, grid) in zip(numbers, features, scored):
                if path == "before":
                    amap = before_anomaly_map(clock, grid, item, model.config.sigma)
                    timed(clock, "rest", finite_check, score, amap)
                    timed(clock, "zarr", before_write_map, store, f"{path}-{number}", amap)
                else:
                    amap = timed(clock, "render", anomaly_map, grid, item.image_shape, model.config.sigma,
                                 item.input_shape)
                    timed(clock, "rest", finite_check, score, amap)
                results[path].append((score, amap))
            if path == "after":  # as tasks.scoring.score_images: the task's maps written together, last
                timed(clock, "zarr", store.write_maps, [(f"{path}-{number}", f"{path}-{number}", "v", amap)
                                                        for number, (_, amap) in zip(numbers, results[path])])
        for (score_before, map_before), (score_after, map_after) in zip(results["before"], results["after"]):
            score_diff = max(score_diff, abs(score_before - score_after))
            map_diff = max(map_diff, float(np.abs(map_before - map_after).max()))
            map_scale = max(map_scale, float(np.abs(map_before).max()))
    return {"clocks": clocks, "images": len(images), "score_diff": score_diff, "map_diff": map_diff,
            "map_scale": map_scale, "features": every_feature}


def profile_padim(extractor, model, images: list[np.ndarray], store) -> dict:
    """PaDiM's score path: 'before' image by image (``Padim.patch_scores``), 'after' as the
    score-batch task does now (``Padim.scores``: a task's 16 images in one stacked
    pass), both on the same features, then the map, its maximum and ``ResultStore.write_map``."""
    from patchwatch.anomaly.maps import anomaly_map

    cold_map_axes()

    clocks = {"before": defaultdict(float), "after": defaultdict(float)}
    warm_up_outputs(store, extractor.extract(images[:1])[0], model.config.sigma)  # warm-up
    score_diff = 0.0
    for first in range(0, len(images), TASK_BATCH):
        batch = images[first:first + TASK_BATCH]
        features = []
        for image in batch:
            features.append(timed(clocks["before"], "backbone", lambda: extractor.extract([image])[0]))
        clocks["after"]["backbone"] = clocks["before"]["backbone"]
        grids = {"before": None, "after": None}
        for path in (("before", "after") if (first // TASK_BATCH) % 2 == 0 else ("after", "before")):
            clock = clocks[path]
            if path == "before":
                grids[path] = [timed(clock, "mahalanobis", model.patch_scores, item.vectors) for item in features]
            else:
                stack = np.stack([item.vectors for item in features])
                grids[path] = list(timed(clock, "mahalanobis", model.patch_scores_many, stack))
            rendered = []
            for number, (item, grid) in enumerate(zip(features, grids[path])):
                amap = timed(clock, "render", anomaly_map, np.reshape(grid, model.grid), item.image_shape,
                             model.config.sigma, item.input_shape)
                score = timed(clock, "rest", lambda: float(amap.max()))
                timed(clock, "rest", finite_check, score, amap)
                if path == "before":
                    timed(clock, "zarr", store.write_map, f"padim-{first + number}", f"padim-{first + number}", "v", amap)
                rendered.append((f"padim-{first + number}", f"padim-{first + number}", "v", amap))
            if path == "after":  # as tasks.scoring.score_images: the task's maps written together, last
                timed(clock, "zarr", store.write_maps, rendered)
        score_diff = max(score_diff, max(float(np.abs(np.ravel(b) - np.ravel(a)).max())
                                         for b, a in zip(grids["before"], grids["after"])))
    return {"clocks": clocks, "images": len(images), "patch_score_diff": score_diff}


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
    from patchwatch.anomaly.tiling import TilingConfig, blocks, holding_the_largest, stitch_grids, tile_grid, tile_sigma
    from patchwatch.storage.results_store import MAP_CHUNK, largest_magnitude
    from patchwatch.tasks.tiles import _preview

    cold_map_axes()

    tiling = TilingConfig()
    shape = image.shape[:2]
    tiles = tile_grid(shape[0], shape[1], tiling.tile, tiling.overlap)
    before_model = BeforePatchCore(model)
    clocks = {"before": defaultdict(float), "after": defaultdict(float)}
    scored = {"before": [], "after": []}
    extractor.extract([image[:tiling.tile, :tiling.tile]])  # warm-up
    for first in range(0, len(tiles), TASK_BATCH):
        task = tiles[first:first + TASK_BATCH]
        features, backbone = [], 0.0
        for tile in task:
            started = time.perf_counter()
            features.append(extractor.extract([image[tile.top:tile.bottom, tile.left:tile.right]])[0])
            backbone += time.perf_counter() - started
        for path in (("before", "after") if (first // TASK_BATCH) % 2 == 0 else ("after", "before")):
            clock = clocks[path]
            clock["backbone"] += backbone
            # after: as the score-tiles task does, eq. 7 for the task's one tile that can give the image's
            # score, timed within the kNN pass
            grids = ([before_model.grid(clock, item) for item in features] if path == "before"
                     else timed(clock, "knn_once", model.tile_scores_and_grids, features))
            scored[path].extend({"grid": grid.astype(np.float32), "max": float(grid.max()), "weighted": score}
                                for score, grid in grids)
    sigma_px = tile_sigma(model.config.sigma, tiles[0].shape, features[0].input_shape)
    results = {}
    for path in ("before", "after"):
        clock, items = clocks[path], scored[path]
        stitcher = timed(clock, "stitch", stitch_grids, shape, tiles, [item["grid"] for item in items], tiling.overlap)
        grid = timed(clock, "stitch", stitcher.grid)
        if path == "before":
            array = timed(clock, "zarr", before_create_map, store, f"{path}-large", shape)
            rendered = None
        else:
            # stored as the stitch-map task stores it: float16 where the grid's values fit
            writer = timed(clock, "zarr", store.open_map, f"{path}-large", "large", "v", shape, largest_magnitude(grid))
            rendered = StitchedMap(grid, stitcher.stride, shape, sigma_px)
        for block in blocks(shape[0], shape[1], MAP_CHUNK):
            if rendered is None:
                values = before_render_block(clock, grid, stitcher.stride, shape, block, sigma_px)
                timed(clock, "zarr", array.__setitem__, (slice(block.top, block.bottom), slice(block.left, block.right)),
                      values)
            else:
                values = timed(clock, "render", rendered.block, block.top, block.left, block.bottom, block.right)
                timed(clock, "zarr", writer.write_block, block.top, block.left, values)
        best = items[holding_the_largest([item["max"] for item in items])]
        preview = before_preview if path == "before" else _preview
        timed(clock, "preview", preview, grid, float(np.percentile(grid, 50)), float(grid.max()))
        location = store.map_url(f"{path}-large", f"{path}-large" if path == "before" else "large", "v")
        results[path] = (best["weighted"], store.read_map(location))
    return {"clocks": clocks, "images": 1, "tiles": len(tiles),
            "score_diff": abs(results["before"][0] - results["after"][0]),
            "map_diff": float(np.abs(results["before"][1] - results["after"][1]).max()),
            "map_scale": float(np.abs(results["before"][1]).max())}


# ---- tables --------------------------------------------------------------------------------------------
def share_rows(profiles: dict[str, dict]) -> list[dict]:
    """One row per stage: per profile and path, ms per image and share of that path's score time."""
    rows = []
    totals = {(name, path): sum(clock.values()) for name, p in profiles.items() for path, clock in p["clocks"].items()}
    for key, label in STAGES + [("total", "score time (sum)")]:
        row, present = {"stage": label}, False
        for name, profile in profiles.items():
            for path in profile["clocks"]:
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
    records = common.select_records(split, "train", limit)
    return common.fit_default_patchcore(extractor, [r.uri for r in records]), len(records)


def padim_features(split: str):
    """PaDiM's default features with the input size a fit on ``split``'s train images sets."""
    from patchwatch.anomaly.detectors import default_features, with_input_size
    from patchwatch.anomaly.tiling import TilingConfig
    from patchwatch.storage.images import image_shape

    shapes = [image_shape(r.uri) for r in common.select_records(split, "train", None)]
    return with_input_size("padim", default_features("padim"), shapes, TilingConfig())


def fit_padim(extractor, split: str, limit: int | None):
    """PaDiM with its default settings, fitted on ``limit`` evenly spread MTD train images (its
    score path's cost does not depend on how many)."""
    from patchwatch.anomaly.detectors import detector_config
    from patchwatch.anomaly.padim import PadimFitter
    from patchwatch.storage.images import read_image

    records = common.select_records(split, "train", limit)
    fitter = None
    for record in records:
        features = extractor.extract([read_image(record.uri)])[0]
        fitter = fitter or PadimFitter(features.grid, features.vectors.shape[1], detector_config("padim"))
        fitter.update(features.vectors)
    return fitter.finish(), len(records)


def main() -> None:
    parser = common.base_parser(__doc__, "score_profile")
    parser.add_argument("--train-limits", default="30,all",
                        help="train images of each fitted memory, comma-separated; 'all': every train row (default %(default)s)")
    parser.add_argument("--test-limit", type=int, default=40, help="MTD test images scored whole (default %(default)s)")
    parser.add_argument("--large-side", type=int, default=8192, help="side of the tiled mosaic (default %(default)s)")
    parser.add_argument("--padim-train-limit", type=int, default=100,
                        help="train images of the PaDiM model (its score time does not depend on it; default %(default)s)")
    parser.add_argument("--runtime", default=None, help="backbone runtime (default: PATCHWATCH_RUNTIME, else auto)")
    parser.add_argument("--tmp", default=None, help="folder for the Zarr maps (default: a temporary one)")
    args = parser.parse_args()
    allocator = common.as_on_the_workers()

    from patchwatch.anomaly.features import PatchFeatureExtractor
    from patchwatch.storage.images import read_image
    from patchwatch.storage.results_store import ResultStore

    wall = time.perf_counter()
    extractor, runtime = common.one_thread_patchcore_extractor(args.runtime)
    machine = common.machine_info()
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
            axes = profile_principal_axes(model, whole.pop("features"))
            tiled = profile_tiled(extractor, model, large, store)
            profiles = {"MTD": whole, f"{args.large_side}px": tiled}
            title = f"Score time by stage, memory of {len(model.memory):,} rows ({train_count} MTD train images)"
            notes = [f"MTD: {whole['images']} test images scored whole, per image; {args.large_side}px: one mosaic of "
                     f"MTD test images in {tiled['tiles']} tiles of 512 px (overlap 128), per image",
                     "share: of the path's own score time (the sum of its stages); before and after ran on the same "
                     "features, task by task (16 images or tiles), alternating which went first",
                     f"after: kNN ranked in {model.precision} (anomaly.patchcore.default_precision on this CPU), on "
                     "the memory's leading principal axes where they hold it (next table), candidates re-ranked "
                     "exactly in float32; every patch's map distance, the full vectors' only "
                     "for patches that can hold their image's score (PatchCore.worst_patches)",
                     f"after vs before, largest |difference|: image score MTD {whole['score_diff']:.2g}, "
                     f"{args.large_side}px {tiled['score_diff']:.2g}; map MTD {whole['map_diff']:.2g} "
                     f"(map values up to {whole['map_scale']:.3g}), {args.large_side}px {tiled['map_diff']:.2g} "
                     f"(up to {tiled['map_scale']:.3g}; after's stitched map as stored, in float16: its rounding, "
                     "at most 2^-11 of a value, included)"]
            sections.append({"title": title, "rows": share_rows(profiles), "notes": notes,
                             "memory_rows": len(model.memory), "train_images": train_count,
                             "score_diff": {"MTD": whole["score_diff"], "large": tiled["score_diff"]},
                             "map_diff": {"MTD": whole["map_diff"], "large": tiled["map_diff"]}})
            ms = axes["ms"]
            sections.append({"title": f"kNN on the memory's principal axes, memory of {len(model.memory):,} rows",
                             "rows": [{**row, "memory rows": f"{len(model.memory):,}"} for row in axes["passes"]]
                             + [{"memory rows": f"{len(model.memory):,}", "pass": "worst_patches, ms per MTD image",
                                 "principal axes (now)": round(ms["principal axes"], 3),
                                 "every dimension (before)": round(ms["every dimension"], 3),
                                 "now / before": round(ms["principal axes"] / ms["every dimension"], 3),
                                 "same results": "yes" if axes["equal"] else "NO"}],
                             "notes": [f"{whole['images']} MTD test images in tasks of {TASK_BATCH}, 5 rounds, alternating "
                                       "which model went first; 'every dimension': PatchCore(principal_axes=False), "
                                       "the ranking before; same results: map distances, worst patches, their "
                                       "distances and rows, bit for bit",
                                       "candidates per patch: rows the projected bound keeps (then compared exactly), "
                                       "over every test patch"]})
            for name, profile in profiles.items():
                totals = {path: sum(profile["clocks"][path].values()) for path in ("before", "after")}
                summary.append({"detector": "PatchCore", "memory rows": f"{len(model.memory):,}", "images": name,
                                "backbone share before": round(profile["clocks"]["before"]["backbone"] / totals["before"], 3),
                                "backbone share after": round(profile["clocks"]["after"]["backbone"] / totals["after"], 3),
                                "score time after / before": round(totals["after"] / totals["before"], 3)})
        padim_extractor = PatchFeatureExtractor(padim_features(args.split), runtime=runtime, threads=1)
        padim, padim_train = fit_padim(padim_extractor, args.split, args.padim_train_limit)
        store = ResultStore(str(folder / "results-padim"))
        store.prepare()
        profile = profile_padim(padim_extractor, padim, test_images, store)
        before, after = profile["clocks"]["before"], profile["clocks"]["after"]
        summary.append({"detector": "PaDiM (--auto's choice on MTD)", "memory rows": "-", "images": "MTD",
                        "backbone share before": round(before["backbone"] / sum(before.values()), 3),
                        "backbone share after": round(after["backbone"] / sum(after.values()), 3),
                        "score time after / before": round(sum(after.values()) / sum(before.values()), 3)})
        rows = share_rows({"PaDiM MTD": profile})
        height, width = padim_extractor.config.fixed_shape
        sections.append({"title": f"PaDiM score time by stage (default features: {height} x {width} input, the train "
                                  f"images' own size; context scales {list(padim_extractor.config.context_scales)}; "
                                  f"{padim.grid[0]} x {padim.grid[1]} positions)",
                         "rows": rows,
                         "notes": [f"{profile['images']} MTD test images scored whole; before: Mahalanobis distances "
                                   f"image by image; after: as the score-batch task does now, {TASK_BATCH} images in one "
                                   f"stacked pass (Padim.patch_scores_many, as Padim.scores does), the same features for both, alternating "
                                   f"which went first; then the map and ResultStore.write_map; model fitted on "
                                   f"{padim_train} train images",
                                   f"largest |patch score difference| after vs before: {profile['patch_score_diff']:.1e}"]})
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    sections.insert(0, {"title": "Backbone share of score time", "rows": summary,
                        "notes": ["the goal (issue 15): backbone >= 80 % of score time",
                                  "before: the code before issue 15 item 2; the first round's after, at 8,021 rows "
                                  "(commit 71272f1): 0.555 MTD, 0.609 8192px; the second's (ebc5ecc, one pass over "
                                  "every patch for both distances), in bench_throughput.py's run: 0.666 MTD, 0.805 "
                                  "8192px"]})
    meta = {"command": common.command_line(), "date": common.utc_now(), "machine": machine,
            "wall_s": time.perf_counter() - wall, "measures_memory": False,
            "parameters": {"runtime": runtime, "threads": 1, "allocator (as the workers')": allocator,
                           "train limits": args.train_limits,
                           "test images": len(test_images), "large side": args.large_side}}
    common.report(args.out, args.name, "Score time around the backbone: before and after (issue 15, item 2)", meta, sections)


if __name__ == "__main__":
    main()
