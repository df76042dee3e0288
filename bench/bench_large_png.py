"""Scoring one large image given as a PNG against the same pixels as a tiled TIFF.

A model is fitted on the MTD train rows (as ``bench_tiling.py`` does). One image of mirrored MTD
texture (default 12000 x 12000) is written twice, as a PNG and as a tiled TIFF (256 x 256 TIFF
tiles). Each is scored the way the score flow does it, each step in a fresh process (peak memory
its own): the PNG is staged once (``stage_large_image_task``: decoded once into a scratch Zarr
array), its tile tasks (``score_tiles_task``, 16 tiles each, the flow's default) read that; the
TIFF's tile tasks read the file through tifffile's Zarr view. Both then stitch the map. The
formats alternate (TIFF, PNG, TIFF, PNG, ... for ``--repeats``).

Before issue 15 every tile task decoded the whole PNG again: that path is not run whole (it took
533 s for two such images); its time is given as the TIFF's plus one full decode per tile task
and one in the batch task, with the decode timed here (``LargeImage`` without a staged copy).
:func:`measure` runs it inside ``flows.runner.prefect_api()`` (bench_throughput.py calls it).
Usage: python bench/bench_large_png.py [--side 12000] [--repeats 1] [--out bench/results]
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import (base_parser, command_line, machine_info, mark_baseline, peak_rss_mib, report,  # noqa: E402
                     run_fresh, utc_now)
from bench_tiling import fit_model  # noqa: E402

TILES_PER_TASK = 16  # the flow's default


def texture(side: int, split: str) -> np.ndarray:
    import pandas as pd
    from PIL import Image

    table = pd.read_csv(split, dtype=str, keep_default_na=False)
    free = table[(table.split == "test") & (table.label == "good")].image.iloc[0]
    with Image.open(Path(split).parent / free) as image:
        tile = np.asarray(image.convert("L").resize((256, 256)))
    block = np.block([[tile, tile[:, ::-1]], [tile[::-1], tile[::-1, ::-1]]])
    reps = -(-side // 512)
    return np.ascontiguousarray(np.tile(block, (reps, reps))[:side, :side])


def stage(uri: str, location: str) -> dict:
    from patchwatch.tasks.tiles import stage_large_image_task

    baseline = mark_baseline()
    started = time.perf_counter()
    outcome = stage_large_image_task.fn(uri, location)
    assert outcome["error"] is None, outcome
    return {"s": time.perf_counter() - started, "step MiB": peak_rss_mib() - baseline}


def decode_whole(uri: str) -> dict:
    """What each tile task did before: open a LargeImage of a PNG without a staged copy."""
    from patchwatch.storage.images import LargeImage

    baseline = mark_baseline()
    started = time.perf_counter()
    with LargeImage(uri) as image:
        image.read(0, 0, 16, 16)
    return {"s": time.perf_counter() - started, "step MiB": peak_rss_mib() - baseline}


def score(root: str, uri: str, results: str, staged: str | None) -> dict:
    from patchwatch.anomaly.tiling import TilingConfig, tile_grid
    from patchwatch.storage.images import image_shape
    from patchwatch.storage.model_store import ModelRegistry
    from patchwatch.storage.results_store import ResultStore
    from patchwatch.tasks.scoring import ModelRef
    from patchwatch.tasks.tiles import score_tiles_task, stitch_map_task

    ResultStore(results).prepare()  # as the score flow does before any task
    store = ModelRegistry(root).resolve()
    manifest = store.read_manifest()
    model = ModelRef.of(store, manifest)
    tiling = TilingConfig(**manifest["tiling_config"])
    shape = image_shape(uri)
    tiles = tile_grid(*shape, tiling.tile, tiling.overlap)
    baseline = mark_baseline()
    started = time.perf_counter()
    scored = []
    for i in range(0, len(tiles), TILES_PER_TASK):
        scored += score_tiles_task.fn(model, uri, tiles[i:i + TILES_PER_TASK], staged=staged)
    scored_s = time.perf_counter() - started
    row = stitch_map_task.fn(results, Path(uri).name, uri, model.version, shape, scored,
                             manifest["detector_config"]["sigma"], tiling.overlap)
    return {"tiles": len(tiles), "tile tasks": -(-len(tiles) // TILES_PER_TASK), "score tiles s": scored_s,
            "stitch s": time.perf_counter() - started - scored_s, "s": time.perf_counter() - started,
            "step MiB": peak_rss_mib() - baseline, "map": row["map"]}


def measure(split: str, side: int = 12000, repeats: int = 1) -> dict:
    """Fit, write the PNG and the TIFF, score each ``repeats`` times (each step in a fresh process),
    inside ``flows.runner.prefect_api()``. Returns the table's rows and notes and the ratio."""
    import tifffile
    import zarr
    from PIL import Image

    from patchwatch.flows.runner import prefect_api
    from patchwatch.storage.images import remove_staged, staged_location

    runs = []
    with prefect_api(), tempfile.TemporaryDirectory(prefix="bench-large-png-") as tmp:
        root = str(Path(tmp) / "model")
        fit_model(split, root)
        pixels = texture(side, split)
        png, tif = Path(tmp) / "texture.png", Path(tmp) / "texture.tif"
        Image.fromarray(pixels).save(png)
        tifffile.imwrite(tif, pixels, tile=(256, 256), bigtiff=True)
        sizes = {"png": png.stat().st_size, "tif": tif.stat().st_size}
        del pixels
        decode = run_fresh(decode_whole, str(png))
        maps = {}
        for repeat in range(repeats):
            for kind, uri in (("tif", tif), ("png", png)):
                results = str(Path(tmp) / f"results-{kind}-{repeat}")
                row = {"image": f"{kind.upper()} {side} x {side}", "repeat": repeat + 1,
                       "file MiB": sizes[kind] / 2**20}
                staged = None
                if kind == "png":
                    staged = staged_location(results, str(uri))
                    staging = run_fresh(stage, str(uri), staged)
                    row.update({"stage s": staging["s"], "stage step MiB": staging["step MiB"]})
                scoring = run_fresh(score, root, str(uri), results, staged)
                if staged:
                    remove_staged(staged)
                maps[kind] = scoring.pop("map")
                row.update({"tiles": scoring["tiles"], "tile tasks": scoring["tile tasks"],
                            "score tiles s": scoring["score tiles s"], "stitch s": scoring["stitch s"],
                            "score step MiB": scoring["step MiB"],
                            "total s": row.get("stage s", 0.0) + scoring["s"]})
                runs.append(row)
            same = np.array_equal(zarr.open_array(maps["png"], mode="r")[...],
                                  zarr.open_array(maps["tif"], mode="r")[...])
            runs[-1]["map equals the TIFF's"] = same
    tif_total = float(np.median([r["total s"] for r in runs if r["image"].startswith("TIF")]))
    for row in runs:
        row["total ÷ TIFF"] = row["total s"] / tif_total
    tasks = runs[0]["tile tasks"]
    before = {"image": f"PNG {side} x {side}, before (each tile task decoding it whole)",
              "repeat": None, "file MiB": sizes["png"] / 2**20, "tiles": runs[0]["tiles"], "tile tasks": tasks,
              "decode s (timed once)": decode["s"], "decode step MiB": decode["step MiB"],
              "total s": tif_total + (tasks + 1) * decode["s"]}
    before["total ÷ TIFF"] = before["total s"] / tif_total
    notes = ["model: PatchCore fitted on the MTD train rows with the defaults (1 Dask worker)",
             "the same pixels (mirrored MTD texture, grey) as a PNG and as a tiled BigTIFF (256 x 256 TIFF tiles)",
             "PNG: stage-large-image decodes it once into a scratch Zarr array (256 x 256 chunks) in a fresh "
             "process, then the tile tasks read regions of that; TIFF: the tile tasks read the file in place",
             f"tile tasks of {TILES_PER_TASK} tiles run one after the other in one fresh process (score step "
             "MiB: its peak memory added), then stitch-map writes the full-resolution Zarr map",
             "total ÷ TIFF: against the median TIFF total of this run",
             "the 'before' row is not run: TIFF total + (tile tasks + 1) x the timed whole-image decode "
             "(each tile task decoded it, and the batch task once); its memory per task is the decode step's"]
    png_ratio = float(np.median([r["total ÷ TIFF"] for r in runs if r["image"].startswith("PNG")]))
    return {"rows": runs + [before], "notes": notes, "png ÷ tiff": png_ratio,
            "maps equal": all(r["map equals the TIFF's"] for r in runs if "map equals the TIFF's" in r)}


def main() -> None:
    parser = base_parser(__doc__, "large_png")
    parser.add_argument("--side", type=int, default=12000)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    started, machine = time.perf_counter(), machine_info()
    result = measure(args.split, args.side, args.repeats)
    meta = {"command": command_line(), "date": utc_now(), "machine": machine, "wall_s": time.perf_counter() - started,
            "parameters": {"split": args.split, "side": args.side, "repeats": args.repeats}}
    report(args.out, args.name, "A large PNG against the same pixels as a tiled TIFF", meta,
           [{"title": "Scoring one large image", "rows": result["rows"], "notes": result["notes"]}])

if __name__ == "__main__":
    main()
