"""Tiled scoring of large images: peak memory and time for 4k, 8k and 16k pixel squares.

A model is fitted (engine, in memory) on a few MTD training images; each large image is a tiled
BigTIFF of MTD texture written to a scratch folder. Scoring runs the score flow's tile tasks
directly (``score_tiles_task.fn`` then ``stitch_map_task.fn``: read tiles lazily, score them,
stitch the grid, render the full-resolution Zarr map block by block), in a fresh process per
image, so the peak resident memory is the tiled path's alone.
Usage: python bench/bench_tiling.py [--sides 4096,8192,16384] [--out bench/results]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (DEFAULT_OUT, DEFAULT_SPLIT, command_line, machine_info, mark_baseline,  # noqa: E402
                     peak_rss_mib, report, run_fresh, utc_now)


def fit_model(split: str, root: str) -> None:
    from patchwatch.flows.fit import fit_flow
    from patchwatch.flows.runner import dask_cluster, run_on_dask

    with dask_cluster(workers=1) as address:
        run_on_dask(fit_flow, address, images=split, root=root, split="train", batch_size=32)


def write_texture_tiff(path: Path, side: int, split: str) -> None:
    """A BigTIFF of MTD texture, written strip by strip (never whole in this process either)."""
    import pandas as pd
    import tifffile
    from PIL import Image

    table = pd.read_csv(split, dtype=str, keep_default_na=False)
    free = table[(table.split == "test") & (table.label == "good")].image.iloc[0]
    with Image.open(Path(split).parent / free) as image:
        tile = np.asarray(image.convert("L").resize((256, 256)))
    block = np.block([[tile, tile[:, ::-1]], [tile[::-1], tile[::-1, ::-1]]])
    row = np.tile(block, (1, side // 512))

    def strips():
        for _ in range(side // 512):
            for r in range(0, 512, 256):
                for c in range(0, side, 256):
                    yield row[r:r + 256, c:c + 256]

    tifffile.imwrite(path, strips(), shape=(side, side), dtype=np.uint8, tile=(256, 256), bigtiff=True)


def score_large(root: str, uri: str, results: str) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from patchwatch.anomaly.tiling import TilingConfig, tile_grid
    from patchwatch.storage.images import image_shape
    from patchwatch.storage.model_store import ModelRegistry
    from patchwatch.tasks.scoring import ModelRef
    from patchwatch.storage.results_store import ResultStore
    from patchwatch.tasks.tiles import score_tiles_task, stitch_map_task

    store = ModelRegistry(root).resolve()  # the version the fit made current
    manifest = store.read_manifest()
    model = ModelRef.of(store)
    tiling = TilingConfig(**manifest["tiling_config"])
    shape = image_shape(uri)
    tiles = tile_grid(*shape, tiling.tile, tiling.overlap)
    ResultStore(results).prepare()  # as the score flow does before its tasks write
    baseline = mark_baseline()
    started = time.perf_counter()
    scored = []
    for i in range(0, len(tiles), 16):  # the flow's tiles_per_task
        scored += score_tiles_task.fn(model, uri, tiles[i:i + 16])
    scored_s = time.perf_counter() - started
    stitch_map_task.fn(results, "large", uri, store.version, shape, scored, manifest["detector_config"]["sigma"], tiling.overlap)
    total_s = time.perf_counter() - started
    return {"tiles": len(tiles), "score tiles s": scored_s, "stitch + write s": total_s - scored_s,
            "total s": total_s, "baseline MiB": baseline, "peak MiB": peak_rss_mib(),
            "step MiB": peak_rss_mib() - baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--split", default=str(DEFAULT_SPLIT))
    parser.add_argument("--sides", default="4096,8192,16384")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()
    started, machine, rows = time.perf_counter(), machine_info(), []
    from patchwatch.flows.runner import prefect_api

    # one Prefect server of this run's own, always stopped: without it each process that runs a
    # flow or task starts an ephemeral server that outlives the benchmark
    with prefect_api(), tempfile.TemporaryDirectory(prefix="bench-tiling-") as tmp:
        root = str(Path(tmp) / "model")
        fit_model(args.split, root)
        for side in (int(s) for s in args.sides.split(",")):
            image = Path(tmp) / f"texture-{side}.tif"
            write_texture_tiff(image, side, args.split)
            result = run_fresh(score_large, root, str(image), str(Path(tmp) / f"results-{side}"))
            rows.append({"image": f"{side} x {side}", "megapixels": side * side / 1e6, **result,
                         "s / megapixel": result["total s"] / (side * side / 1e6)})
            image.unlink()
    base = rows[0]
    for row in rows:
        row["step ÷ first"] = row["step MiB"] / base["step MiB"]
        row["time ÷ first"] = row["total s"] / base["total s"]
    title = "Tiled scoring of large images (PatchCore, defaults)"
    meta = {"command": command_line(), "date": utc_now(), "machine": machine,
            "wall_s": time.perf_counter() - started, "parameters": {"split": args.split}}
    notes = ["model: PatchCore fitted on the MTD train rows with the defaults",
             "each image: tiled BigTIFF (256 x 256 TIFF tiles) of mirrored MTD texture, read lazily through tifffile's Zarr view",
             "the map is written as a chunked Zarr array at full resolution (float32)",
             "step MiB: peak resident memory added by scoring one image, in its own fresh process"]
    report(args.out, "tiling", title, meta, [{"title": "Large images", "rows": rows, "notes": notes}])


if __name__ == "__main__":
    main()
