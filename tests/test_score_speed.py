"""The faster scoring path (issue 15, item 2) gives the numbers of the reference computations.

- kNN: ``PatchCore.nearest`` (one matrix-product pass for the image score and the map) against a
  float64 brute-force search, and ``image_score_and_grid`` against the two faiss flat searches it
  replaced; tolerance: relative 1e-5 on distances (float32 rounding of sum((q - m)^2)).
- maps: ``anomaly_map`` (separable matrices) against torch's bilinear resize + scipy's Gaussian, and
  ``StitchedMap`` against ``anomaly.tiling.render_block``; tolerance: 1e-5 x the grid's largest
  value (float32 rounding; measured differences are ~3e-7 relative).
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from patchwatch.anomaly.engine import score_features
from patchwatch.anomaly.features import PatchFeatures
from patchwatch.anomaly.maps import StitchedMap, anomaly_map
from patchwatch.anomaly.patchcore import FORMATS, PatchCore, PatchCoreConfig, build_index, reweight_image_score
from patchwatch.anomaly.tiling import Tile, TilingConfig, blocks, render_block, stitch_grids, tile_grid, tile_sigma

torch.set_num_threads(1)

DISTANCE_RTOL = 1e-5
MAP_RTOL = 1e-5


def clustered(rng, rows: int, dims: int, centres: int = 12, spread: float = 0.3) -> np.ndarray:
    """Vectors around a few centres, like patch features of one texture: close competitors for
    the nearest neighbour, which is where a faster search could pick another one."""
    middle = rng.standard_normal((centres, dims)) * 3
    return (middle[rng.integers(0, centres, rows)] + spread * rng.standard_normal((rows, dims))).astype(np.float32)


def brute_force(queries: np.ndarray, memory: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 distances to the nearest row, and its index."""
    q, m = queries.astype(np.float64), memory.astype(np.float64)
    squared = (q ** 2).sum(1)[:, None] + (m ** 2).sum(1)[None] - 2 * q @ m.T
    rows = squared.argmin(1)
    return np.sqrt(((q - m[rows]) ** 2).sum(1)), rows


@pytest.mark.parametrize("map_dims", [0, 24])
def test_one_pass_gives_the_exact_nearest_distances_for_the_image_score_and_the_map(map_dims):
    rng = np.random.default_rng(0)
    block = max(number_format.query_block for number_format in FORMATS.values())
    memory, queries = clustered(rng, 700, 48), clustered(rng, block + 300, 48)  # two query blocks or more
    model = PatchCore(memory, PatchCoreConfig(map_dims=map_dims))
    scores, rows, map_scores = model.nearest(queries)
    expected, expected_rows = brute_force(queries, memory)
    np.testing.assert_allclose(scores, expected, rtol=DISTANCE_RTOL)
    assert (rows == expected_rows).mean() > 0.999  # another row only at a float32 tie
    split = map_dims or 48
    expected_map, _ = brute_force(queries[:, :split], memory[:, :split])
    np.testing.assert_allclose(map_scores, expected_map, rtol=DISTANCE_RTOL)
    np.testing.assert_array_equal(model.patch_scores(queries)[0], scores)


def test_a_query_equal_to_a_memory_vector_scores_zero():
    # the distance is summed from differences, not from norms minus products (which cancel to noise)
    memory = clustered(np.random.default_rng(1), 200, 32) * 50
    scores, rows, map_scores = PatchCore(memory, PatchCoreConfig(map_dims=16)).nearest(memory[::7])
    np.testing.assert_array_equal(scores, 0)
    np.testing.assert_array_equal(map_scores, 0)
    np.testing.assert_array_equal(rows, np.arange(0, 200, 7))


def faiss_reference(model: PatchCore, features: PatchFeatures) -> tuple[float, np.ndarray]:
    """The scoring before: faiss flat search of the full vectors (eq. 7), another of the map's half."""
    squared, nearest = model.index.search(features.vectors, 1)
    scores = np.sqrt(np.maximum(squared[:, 0], 0))
    image_score = reweight_image_score(features.vectors, scores, nearest[:, 0], model.memory, model.index,
                                       model.config.num_neighbors)
    if not model.config.map_dims:
        return image_score, scores.reshape(features.grid)
    split = model.config.map_dims
    squared, _ = build_index(model.memory[:, :split]).search(np.ascontiguousarray(features.vectors[:, :split]), 1)
    return image_score, np.sqrt(np.maximum(squared[:, 0], 0)).reshape(features.grid)


@pytest.mark.parametrize("map_dims", [0, 32])
def test_image_score_and_grid_equal_the_two_faiss_searches(map_dims):
    rng = np.random.default_rng(2)
    model = PatchCore.fit(clustered(rng, 3000, 64), PatchCoreConfig(coreset_ratio=0.2, projection_dim=16,
                                                                    map_dims=map_dims))
    for _ in range(5):
        features = PatchFeatures(clustered(rng, 12 * 9, 64, spread=0.6), (12, 9), (96, 72), (96, 72))
        score, grid = model.image_score_and_grid(features)
        expected_score, expected_grid = faiss_reference(model, features)
        assert score == pytest.approx(expected_score, rel=DISTANCE_RTOL)
        np.testing.assert_allclose(grid, expected_grid, rtol=DISTANCE_RTOL, atol=1e-6)


def reference_anomaly_map(grid, image_shape, sigma, input_shape):
    """The map as it was computed: torch bilinear resize of the whole grid, then scipy's Gaussian."""
    tensor = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32))[None, None]
    upsampled = F.interpolate(tensor, size=image_shape, mode="bilinear", align_corners=False)[0, 0].numpy()
    sigma = sigma * np.sqrt(image_shape[0] * image_shape[1] / (input_shape[0] * input_shape[1]))
    return gaussian_filter(upsampled, sigma=sigma) if sigma > 0 else upsampled


@pytest.mark.parametrize("grid_shape, image_shape, input_shape, sigma", [
    ((9, 4), (293, 120), (144, 64), 4.0),        # an MTD image at half size
    ((6, 10), (301, 517), (96, 160), 4.0),       # non-square, odd sizes
    ((23, 15), (373, 248), (368, 240), 4.0),
    ((1, 1), (40, 40), (16, 16), 4.0),           # one patch
    ((3, 5), (30, 50), (48, 80), 12.0),          # the kernel wider than the image: 'reflect' repeats
    ((8, 8), (128, 128), (128, 128), 0.0),       # no smoothing
])
def test_anomaly_map_equals_upsampling_then_gaussian_smoothing(grid_shape, image_shape, input_shape, sigma):
    grid = np.random.default_rng(3).random(grid_shape).astype(np.float32) * 7
    amap = anomaly_map(grid, image_shape, sigma, input_shape)
    expected = reference_anomaly_map(grid, image_shape, sigma, input_shape)
    assert amap.shape == image_shape and amap.dtype == np.float32
    np.testing.assert_allclose(amap, expected, rtol=0, atol=MAP_RTOL * grid.max())


def _axis_sizes() -> list[tuple[int, int, float]]:
    """Named cases, then 60 drawn ones spanning what any data set's maps can ask for: 2-3,000
    pixels, 1-200 cells (a stride of 2-64 pixels), sigma 0.3-40 pixels, whole axes and windows."""
    named = [(293, 9, 7.9), (120, 4, 8.3), (37, 2, 30.0),   # filtered whole (WHOLE_AXIS_SAMPLES)
             (373, 23, 4.1), (2048, 64, 8.0)]               # in windows
    rng = np.random.default_rng(15)
    drawn = []
    while len(drawn) < 60:
        pixels = int(np.exp(rng.uniform(np.log(2), np.log(3000))))
        cells = int(np.clip(pixels / np.exp(rng.uniform(np.log(2), np.log(64))), 1, 200))
        drawn.append((pixels, cells, round(float(np.exp(rng.uniform(np.log(0.3), np.log(40)))), 3)))
    return named + drawn


@pytest.mark.parametrize("mode", ["reflect", "nearest"])
def test_an_axis_is_its_hats_gaussian_filtered_whole_bit_for_bit(mode):
    """Whole or in windows, with the weights built once a sigma: scipy's gaussian_filter1d of every
    column, the definition, to the bit, at every size drawn (so a map is the same whatever the
    data set's image and grid sizes)."""
    from scipy.ndimage import gaussian_filter1d

    from patchwatch.anomaly.maps import WHOLE_AXIS_SAMPLES, _smoothed

    sizes = _axis_sizes()
    assert {pixels * cells <= WHOLE_AXIS_SAMPLES for pixels, cells, _ in sizes} == {True, False}  # both paths
    for pixels, cells, sigma in sizes:
        identity = torch.eye(cells, dtype=torch.float64)[None]
        hats = F.interpolate(identity, size=pixels, mode="linear", align_corners=False)[0].T.numpy()
        expected = gaussian_filter1d(hats, sigma, axis=0, mode=mode).astype(np.float32)
        np.testing.assert_array_equal(_smoothed(hats, sigma, mode), expected, err_msg=f"{pixels} x {cells}, sigma {sigma}")


@pytest.mark.parametrize("grid_shape, stride, image_shape, sigma, side", [
    ((40, 50), 16, (640, 800), 4.0, 128),
    ((47, 33), 32, (1500, 1040), 8.0, 512),      # partial last cells and blocks
    ((20, 20), 32, (640, 640), 0.0, 256),
    ((6, 70), 16, (90, 1111), 30.0, 300),        # the kernel longer than one axis
])
def test_stitched_map_blocks_equal_render_block(grid_shape, stride, image_shape, sigma, side):
    grid = np.random.default_rng(4).random(grid_shape).astype(np.float32) * 5
    rendered = StitchedMap(grid, stride, image_shape, sigma)
    tolerance = MAP_RTOL * grid.max()
    for block in blocks(*image_shape, side):
        np.testing.assert_allclose(rendered.block(block.top, block.left, block.bottom, block.right),
                                   render_block(grid, stride, image_shape, block, sigma), rtol=0, atol=tolerance)
    whole = render_block(grid, stride, image_shape, Tile(0, 0, *image_shape), sigma)
    np.testing.assert_allclose(rendered.whole(), whole, rtol=0, atol=tolerance)


def test_tiled_engine_score_and_map_equal_the_reference_stitching():
    """The engine's tiled scoring (score-tiles + stitch-map in memory) against the faiss searches and
    render_block: the image score of the tile with the largest patch, the rendered stitched grid."""
    rng = np.random.default_rng(5)
    model = PatchCore.fit(clustered(rng, 2000, 32), PatchCoreConfig(coreset_ratio=0.2, projection_dim=8, map_dims=16))
    tiling, shape = TilingConfig(tile=128, overlap=32, threshold=128), (300, 420)
    views = [(tile, PatchFeatures(clustered(rng, 64, 32, spread=0.6), (8, 8), tile.shape, (64, 64)))
             for tile in tile_grid(*shape, tiling.tile, tiling.overlap)]
    scored = score_features(model, views, shape, tiling)
    reference = [faiss_reference(model, features) for _, features in views]
    grids = [grid for _, grid in reference]
    stitcher = stitch_grids(shape, [tile for tile, _ in views], grids, tiling.overlap)
    sigma = tile_sigma(model.config.sigma, views[0][0].shape, (64, 64))
    expected = render_block(stitcher.grid(), stitcher.stride, shape, Tile(0, 0, *shape), sigma)
    assert scored.score == pytest.approx(reference[int(np.argmax([g.max() for g in grids]))][0], rel=DISTANCE_RTOL)
    np.testing.assert_allclose(scored.map, expected, rtol=0, atol=MAP_RTOL * expected.max())
