"""Backbone and score throughput on a GPU (torch on CUDA, batched) against the CPU, in one run.

Issue 15, item 6: the torch path on CUDA with batching, measured as images/s and megapixels/s.
Every variant extracts the same images, one after the other in one process:

- ``cpu torch``: torch eager, 1 thread, one image at a time (the reference; what one CPU worker
  runs without ONNX Runtime), and ``cpu onnxruntime``: the CPU default runtime, 1 thread;
- ``cuda bN``: torch on the GPU, N images of one input size per forward pass, full float32
  (patchwatch's setting: anomaly.features.strict_float32_on_gpus);
- ``cuda bN tf32``: the same with PyTorch's default TF32 convolutions, to show what exactness
  costs (not patchwatch's setting).

Inputs: synthetic textures (blocky colour noise plus fine noise, a bright square defect in every
fourth image; the time of a CNN does not depend on content) at each ``--sizes`` side, and the
512 px tiles (overlap 128) of one ``--tiled-side`` square image. Both default feature
configurations are measured: PaDiM's (the default detector; every image resized to the one input
size a fit on such images sets, plus a half-size context pass; bench/results/gpu.md was measured
when that size was 320 x 320 for every input) and PatchCore's (half the image's size, plus a quarter-size
context pass). Megapixels/s counts the images' own pixels (for the tiled image: its pixels, not
the tiles' overlapping ones).

The score path (``--score``; the CPU variants, and the GPU at batch 1 and at patchwatch's GPU
batch size): extraction plus the detector's batched scores and maps (PaDiM
and, where faiss imports, PatchCore with the default 10 % coreset), the detector on the CPU as
in the pipeline, fitted on CPU-torch features of separate nominal textures of the same size.
``max |Δ feature|`` and ``max rel Δ score`` compare each variant with ``cpu torch`` on the same
images.

Where torch sees no GPU, only the CPU variants run and the table says so. Usage::

    python bench/bench_gpu.py                     # everything (about 3-6 min on an H200 host)
    python bench/bench_gpu.py --quick             # small counts, for a check of the script
"""
from __future__ import annotations

import importlib.util
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch

from _common import DEFAULT_OUT, command_line, cpu_model, report, total_memory_gib, utc_now

from patchwatch.anomaly.detectors import default_features, detector_config, with_input_size
from patchwatch.anomaly.engine import fit_detector
from patchwatch.anomaly.features import GPU_BATCH_SIZE, PatchFeatureExtractor
from patchwatch.anomaly.tiling import TilingConfig, tile_grid

HAS_FAISS = importlib.util.find_spec("faiss") is not None


def textures(height: int, width: int, count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    images = []
    for number in range(count):
        coarse = rng.random((height // 16 + 1, width // 16 + 1, 3))
        image = np.kron(coarse, np.ones((16, 16, 1)))[:height, :width] * 180 + rng.random((height, width, 3)) * 75
        if number % 4 == 3:
            side = max(4, min(height, width) // 20)
            top, left = rng.integers(0, height - side), rng.integers(0, width - side)
            image[top:top + side, left:left + side] = 255
        images.append(image.astype(np.uint8))
    return images


def tiles_of(side: int, count: int | None, seed: int) -> tuple[list[np.ndarray], int]:
    """The 512 px tiles of one side x side texture (the first ``count``), and how many it has."""
    tiling = TilingConfig()
    grid = tile_grid(side, side, tiling.tile, tiling.overlap)
    image = textures(side, side, 1, seed)[0]
    chosen = grid if count is None else grid[:count]
    return [image[t.top:t.bottom, t.left:t.right] for t in chosen], len(grid)


def variants(batches: list[int], gpu: bool, tf32_batch: int) -> list[dict]:
    rows = [{"name": "cpu torch", "device": "cpu", "runtime": "torch", "batch": 1},
            {"name": "cpu onnxruntime", "device": "cpu", "runtime": "onnxruntime", "batch": 1}]
    if gpu:
        rows += [{"name": f"cuda b{b}", "device": "cuda", "runtime": "torch", "batch": b} for b in batches]
        rows.append({"name": f"cuda b{tf32_batch} tf32", "device": "cuda", "runtime": "torch", "batch": tf32_batch,
                     "tf32": True})
    return rows


def make_extractor(config, variant: dict) -> PatchFeatureExtractor:
    extractor = PatchFeatureExtractor(config, device=variant["device"], runtime=variant["runtime"],
                                      batch_size=variant["batch"], threads=1)
    if variant.get("tf32"):  # after the constructor, which asks for full float32
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = True
    return extractor


def restore_float32() -> None:
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def timed(function, repeats: int) -> tuple[float, object]:
    """Median wall seconds of ``function()`` over ``repeats`` runs (after one warm-up run), and
    its last result. Features come back as numpy arrays on the host, so the GPU has finished."""
    result = function()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def max_feature_diff(features, reference) -> float:
    return max(float(np.abs(a.vectors - b.vectors).max()) for a, b in zip(features, reference))


def measure(args) -> dict:
    gpu = torch.cuda.is_available()
    torch.set_num_threads(1)
    batches = [int(b) for b in args.batches.split(",")]
    inputs = []  # (label, images, megapixels per counted image set, images the CPU runs, note)
    for side in [int(s) for s in args.sizes.split(",")]:
        count = args.images if side <= 512 else max(8, args.images // 4)
        images = textures(side, side, count, seed=side)
        inputs.append({"input": f"{side} x {side}", "images": images, "cpu_count": min(args.cpu_images, count),
                       "pixels_each": side * side, "pixels_total": None})
    if args.tiled_side:
        tiles, total = tiles_of(args.tiled_side, None if gpu else args.cpu_images, seed=7)
        inputs.append({"input": f"{args.tiled_side} x {args.tiled_side} in {total} tiles of 512",
                       "images": tiles, "cpu_count": min(args.cpu_images, len(tiles)), "tiles_total": total,
                       "pixels_total": args.tiled_side ** 2})
    rows, score_rows = [], []
    configs = {"padim": default_features("padim"), "patchcore": default_features("patchcore")}
    for detector_name in configs:
        for item in inputs:
            images = item["images"]
            # PaDiM's one input size, as a fit on these images sets it
            config = with_input_size(detector_name, configs[detector_name], [image.shape[:2] for image in images])
            reference_extractor = make_extractor(config, {"device": "cpu", "runtime": "torch", "batch": 1})
            reference = reference_extractor.extract(images[:item["cpu_count"]])
            model = None
            if args.score and "tiles" not in item["input"] and (detector_name == "padim" or HAS_FAISS):
                side = int(item["input"].split()[0])
                train = reference_extractor.extract(textures(side, side, args.train_images, seed=side + 1))
                model = fit_detector(detector_name, detector_config(detector_name), train)
                reference_scores = [s for s, _ in model.scores(reference)]
            for variant in variants(batches, gpu, args.tf32_batch):
                if variant["runtime"] == "onnxruntime" and not importlib.util.find_spec("onnxruntime"):
                    continue
                on_cpu = variant["device"] == "cpu"
                subset = images[:item["cpu_count"]] if on_cpu else images
                extractor = make_extractor(config, variant)
                if gpu:
                    torch.cuda.reset_peak_memory_stats()
                seconds, features = timed(lambda: extractor.extract(subset), args.repeats)
                per_second = len(subset) / seconds
                if item["pixels_total"]:  # one tiled image: its pixels over the time of all its tiles
                    megapixels = item["pixels_total"] / 1e6 / (item["tiles_total"] / per_second)
                else:
                    megapixels = per_second * item["pixels_each"] / 1e6
                row = {"features": detector_name, "input": item["input"], "variant": variant["name"],
                       "images timed": len(subset), "images/s": round(per_second, 2),
                       "Mpx/s": round(megapixels, 3), "max |Δ feature| vs cpu torch":
                           max_feature_diff(features[:len(reference)], reference)}
                if gpu and not on_cpu:
                    row["GPU peak MiB"] = round(torch.cuda.max_memory_allocated() / 2 ** 20)
                rows.append(row)
                print(f"  {detector_name} {item['input']} {variant['name']}: {row['images/s']} images/s "
                      f"({time.strftime('%H:%M:%S')})", flush=True)
                # the score path for the CPU variants and the GPU at batch 1 and at the default batch
                if model is not None and not variant.get("tf32") and (on_cpu or variant["batch"] in (1, GPU_BATCH_SIZE)):
                    score_seconds, scored = timed(lambda: model.scores(extractor.extract(subset)), args.repeats)
                    got = [s for s, _ in scored[:len(reference_scores)]]
                    score_rows.append({
                        "detector": detector_name, "input": item["input"], "variant": variant["name"],
                        "images timed": len(subset), "images/s": round(len(subset) / score_seconds, 2),
                        "Mpx/s": round(len(subset) / score_seconds * item["pixels_each"] / 1e6, 3),
                        "extraction share": round(seconds / score_seconds, 3),
                        "max rel Δ score vs cpu torch": max(abs(a - b) / abs(b) for a, b in zip(got, reference_scores))})
                restore_float32()
                del extractor
                if gpu:
                    torch.cuda.empty_cache()
    for table in (rows, score_rows):
        base = {}
        for row in table:
            key = (row.get("features") or row.get("detector"), row["input"])
            if row["variant"] == "cpu torch":
                base[key] = row["images/s"]
            row["÷ cpu torch (1 thread)"] = round(row["images/s"] / base[key], 2) if base.get(key) else None
    return {"gpu": torch.cuda.get_device_name(0) if gpu else None, "rows": rows, "score_rows": score_rows}


def sections(result: dict, args) -> list[dict]:
    where = result["gpu"] or "none: torch.cuda.is_available() is False, the CUDA variants did not run"
    common = [f"GPU: {where}",
              "each variant: one warm-up extraction of its image set, then the median of the timed repeats; "
              "features come back to the host as numpy arrays (so the GPU work is finished)",
              f"CPU variants time the first {args.cpu_images} images (their rate is per image, as on one worker "
              "process with one thread)",
              "Mpx/s: the images' own pixels per second; for the tiled image, its pixels over the time of all "
              "its tiles (tiles overlap by 128 px)",
              "max |Δ feature|: over the images the CPU reference extracted (patch vectors of magnitude ~1-20)"]
    out = [{"title": "Feature extraction (backbone + patch arithmetic) throughput", "rows": result["rows"],
            "notes": common + ["tf32: PyTorch's default TF32 convolutions on the GPU: patchwatch turns them off "
                               "(anomaly.features.strict_float32_on_gpus); shown for its speed and error"]}]
    if result["score_rows"]:
        out.append({"title": "Score path throughput (extraction + the detector's batched scores and maps, "
                             "detector on the CPU)", "rows": result["score_rows"],
                    "notes": [f"detectors fitted on CPU-torch features of {args.train_images} separate textures "
                              "of the same size; scores compared on the CPU reference's images",
                              "extraction share: the extraction's time ÷ the score path's (same variant, same images)"]
                    + ([] if HAS_FAISS else ["PatchCore not run: faiss is not installed here"])})
    return out


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256,512,1024", help="square image sides (default %(default)s)")
    parser.add_argument("--tiled-side", type=int, default=8192,
                        help="side of one image scored in 512 px tiles (0: none; default %(default)s)")
    parser.add_argument("--images", type=int, default=256, help="images per size on the GPU (default %(default)s; "
                                                               "a quarter of it above 512 px)")
    parser.add_argument("--cpu-images", type=int, default=12, help="images the CPU variants time (default %(default)s)")
    parser.add_argument("--batches", default="1,8,32,64", help="GPU batch sizes (default %(default)s)")
    parser.add_argument("--tf32-batch", type=int, default=32, help="batch of the TF32 variant (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per variant (default %(default)s)")
    parser.add_argument("--train-images", type=int, default=24, help="nominal images per detector fit")
    parser.add_argument("--score", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the score path (default on)")
    parser.add_argument("--quick", action="store_true", help="small counts: a check that the script runs")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="results folder (default %(default)s)")
    parser.add_argument("--name", default="gpu", help="results file name (default %(default)s)")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.tiled_side, args.images, args.cpu_images = "256", 1536, 8, 4
        args.repeats, args.train_images, args.batches = 1, 8, "1,4"
    started = time.perf_counter()
    result = measure(args)
    machine = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
               "cpus_usable": len(os.sched_getaffinity(0)), "memory_gib": total_memory_gib(), "torch_threads": torch.get_num_threads(),
               "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
               "torch": torch.__version__, "numpy": np.__version__,
               "faiss": __import__("faiss").__version__ if HAS_FAISS else "not installed"}
    meta = {"command": command_line(), "date": utc_now(), "machine": machine, "measures_memory": False,
            "wall_s": time.perf_counter() - started, "gpu": result["gpu"],
            "parameters": {k: v for k, v in vars(args).items() if k not in ("out", "name")}}
    report(args.out, args.name, "Backbone and score throughput: torch on CUDA (batched) against the CPU",
           meta, sections(result, args))


if __name__ == "__main__":
    main()
