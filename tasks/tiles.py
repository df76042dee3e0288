"""Large images as tiles: feature extraction for the bank, scoring, stitching into one map."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image
from prefect import task

from patchwatch.anomaly.detectors import score_grid
from patchwatch.anomaly.features import FeatureConfig
from patchwatch.anomaly.maps import StitchedMap, heatmap_overlay
from patchwatch.anomaly.patchcore import PatchCore
from patchwatch.anomaly.settings import mirror_views
from patchwatch.anomaly.tiling import Tile, blocks, holding_the_largest, stitch_grids, tile_sigma
from patchwatch.storage.images import TIFF_SUFFIXES, ImageReadError, LargeImage, remove_staged, stage_image, staged_location
from patchwatch.storage.model_store import FeatureBank
from patchwatch.storage.results_store import MAP_CHUNK, ResultStore, largest_magnitude, map_key

from .features import bank_index_row, view_id
from .runtime import feature_extractor
from .retries import retry_delay, transient
from .scoring import CONTENT_CACHE, ModelRef, load_model

PREVIEW_SIDE = 1024


def needs_staging(uri: str) -> bool:
    """A TIFF is read region by region in place; any other format has to be decoded whole."""
    return not uri.lower().endswith(TIFF_SUFFIXES)


# an unreadable image is an error row (returned, not raised: decoding it again would fail the same way)
@task(name="stage-large-image", retries=3, retry_delay_seconds=retry_delay(10),
      retry_condition_fn=transient)
def stage_large_image_task(uri: str, location: str) -> dict:
    """Decode one large non-TIFF image, once, into a chunked Zarr array at ``location``: its
    tile tasks read regions of that instead of each decoding the whole file again."""
    try:
        stage_image(uri, location)
    except ImageReadError as error:
        return {"staged": None, "error": error.reason}
    return {"staged": location, "error": None}


def stage_large_images(large: list, scratch_root: str) -> tuple[dict, list[dict]]:
    """Stage the non-TIFF ones of ``large`` ((record, shape) pairs) under ``scratch_root``, one
    task each, in parallel. Returns ({image_id: staged location}, error rows of those that failed)."""
    futures = {record.image_id: (record, stage_large_image_task.submit(record.uri,
                                                                       staged_location(scratch_root, record.uri)))
               for record, _ in large if needs_staging(record.uri)}
    staged, errors = {}, []
    for image_id, (record, future) in futures.items():
        outcome = future.result()
        if outcome["error"]:
            errors.append({"image_id": image_id, "uri": record.uri, "reason": outcome["error"]})
        else:
            staged[image_id] = outcome["staged"]
    return staged, errors


def remove_staged_copies(staged: dict) -> None:
    """The staged copies are scratch: removed once the run is done with its images (a re-run
    decodes again, once), also when it failed."""
    for location in staged.values():
        remove_staged(location)


# no result cache: a batch the bank holds is recalled from its stored outcome, never re-run
@task(name="extract-tile-features", task_run_name="extract-tile-features batch {batch:05d}", retries=3, retry_delay_seconds=retry_delay(10),
      retry_condition_fn=transient)
def extract_tile_features_task(root: str, batch: int, image_id: str, uri: str, tiles: list[Tile],
                               config: FeatureConfig, rows_per_chunk: int = 4096, staged: str | None = None) -> dict:
    """Patch features of some tiles of one large nominal image -> one bank batch (``staged``: its
    decoded pixels, see :func:`stage_large_image_task`)."""
    extractor = feature_extractor(config)
    rows, index_rows, start = [], [], 0
    with LargeImage(uri, staged) as image:
        # one call: on a GPU the task's tiles share forward passes (one at a time on CPUs)
        # each tile's mirror images (FeatureConfig.mirrors) are rows of their own beside it
        views = [(view_id(f"{image_id}#{tile.top},{tile.left}", mirror), pixels)
                 for tile in tiles
                 for mirror, pixels in mirror_views(image.read(tile.top, tile.left, tile.bottom, tile.right),
                                                    config.mirrors)]
        tile_features = extractor.extract([pixels for _, pixels in views])
        for (row_id, _), features in zip(views, tile_features):
            index_rows.append(bank_index_row(row_id, uri, batch, start, features))
            rows.append(features.vectors)
            start += len(features.vectors)
    result = {"batch": batch, "images": 0, "tiles": len(tiles), "rows": start, "errors": [], "large": []}
    FeatureBank(root).write_batch(batch, np.concatenate(rows), index_rows, rows_per_chunk, outcome=result)
    return result


def _score_tiles_run_name(parameters: dict) -> str:
    """The image and where its first tile starts: the UI tells the tile tasks of one image apart."""
    first = parameters["tiles"][0] if parameters["tiles"] else None
    return (f"score-tiles {str(parameters['uri']).rstrip('/').rsplit('/', 1)[-1]}"
            + (f" at {first.top},{first.left}" if first is not None else ""))


@task(name="score-tiles", task_run_name=_score_tiles_run_name, retries=3, retry_delay_seconds=retry_delay(10),
      retry_condition_fn=transient, cache_policy=CONTENT_CACHE,
      persist_result=True)
def score_tiles_task(model: ModelRef, uri: str, tiles: list[Tile], staged: str | None = None) -> list[dict]:
    """Patch-score grids of some tiles of one image (small: 1/stride^2 of the tile's pixels);
    ``staged``: its decoded pixels (see :func:`stage_large_image_task`)."""
    extractor, detector = load_model(model.root, model.fingerprint)
    with LargeImage(uri, staged) as image:
        features = extractor.extract([image.read(tile.top, tile.left, tile.bottom, tile.right) for tile in tiles])
    # PatchCore: one nearest-neighbour pass over all the task's tiles (fewer, larger matrix products),
    # eq. 7 only for the tile that can hold the image's score (the others' "weighted" is None)
    grids = (detector.tile_scores_and_grids(features) if isinstance(detector, PatchCore)
             else [score_grid(detector, item) for item in features])
    return [{"tile": tile, "grid": grid.astype(np.float32), "max": float(grid.max()), "weighted": tile_score,
             "input_shape": item.input_shape,
             # the stitched map records the version's thresholds: stitch-map sees no model
             "map_description": model.map_description()}
            for tile, item, (tile_score, grid) in zip(tiles, features, grids)]


# rendered map blocks written together (on an object store their requests go out at once): a row of
# an 8192 px map's 512 px chunks, 16 MiB of float32 held at a time
BLOCKS_TOGETHER = 16


# transient() refuses to retry a vanished results root too (ResultsRootGoneError is a FileNotFoundError)
@task(name="stitch-map", task_run_name="stitch-map {image_id}", retries=3, retry_delay_seconds=retry_delay(10), retry_condition_fn=transient)
def stitch_map_task(results: str, image_id: str, uri: str, version: str, shape: tuple[int, int],
                    tile_scores: list[dict], sigma: float, overlap: int) -> dict:
    """Blend the tiles' grids and render the full-resolution map into Zarr, block by block."""
    first = tile_scores[0]
    stitcher = stitch_grids(shape, [item["tile"] for item in tile_scores], [item["grid"] for item in tile_scores],
                            overlap)
    grid = stitcher.grid()
    sigma_px = tile_sigma(sigma, first["tile"].shape, first["input_shape"])
    out = ResultStore(results)
    out.require()
    if first.get("map_description") is not None:  # absent from tile results cached before it was added
        out.describe_maps(version, first["map_description"])
    writer = out.open_map(image_id, uri, version, shape, largest=largest_magnitude(grid))  # the map is within its grid's range
    rendered = StitchedMap(grid, stitcher.stride, shape, sigma_px)
    every_block = blocks(shape[0], shape[1], MAP_CHUNK)
    for start in range(0, len(every_block), BLOCKS_TOGETHER):
        writer.write_blocks([(block.top, block.left, rendered.block(block.top, block.left, block.bottom, block.right))
                             for block in every_block[start:start + BLOCKS_TOGETHER]])
    best = tile_scores[holding_the_largest([item["max"] for item in tile_scores])]  # its max patch, eq. 7 weighted
    preview = _preview(grid, float(np.percentile(grid, 50)), float(grid.max()))
    preview_url = out.write_file(f"previews/{map_key(image_id, uri, version)}.png", preview)
    return {"image_id": image_id, "score": best["weighted"], "height": shape[0], "width": shape[1],
            "map": out.map_url(image_id, uri, version), "preview": preview_url, "tiles": len(tile_scores)}


def _preview(grid: np.ndarray, low: float, high: float) -> bytes:
    """A small PNG of the stitched map (the grid itself, enlarged to at most PREVIEW_SIDE)."""
    scale = max(1, PREVIEW_SIDE // max(grid.shape))
    # coloured, then enlarged: each cell's colour depends on its value alone, so this is the
    # enlarged grid's overlay, from scale^2 fewer pixels
    rgb = heatmap_overlay(np.zeros(grid.shape, np.float32), grid, low, high, opacity=1.0)
    if scale > 1:
        rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()
