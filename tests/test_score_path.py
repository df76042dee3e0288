"""Scoring's work around the backbone (issue 15, item 2, second round): maps written without zarr's
per-call round trips, and the nearest-neighbour pass ranked by a bfloat16 (or, on CPUs without it,
float32) matrix product whose candidates are re-ranked exactly.

Tolerances: maps are float32 and written exactly (equal arrays); the kNN's distances and rows equal
those of the float32 pass it replaced (the same sum((q - m)^2) of the same rows) wherever no two
memory vectors tie within float32 rounding, checked against float64 brute force at relative 1e-5.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import xarray as xr
import zarr

from patchwatch.storage.results_store import WHOLE_MAP_PIXELS, MapDescription, ResultStore


@pytest.fixture
def store(tmp_path):
    out = ResultStore(str(tmp_path / "results"))
    out.prepare()
    out.describe_maps("v0001", MapDescription(image_threshold=2.0, pixel_threshold=1.0, units="u"))
    return out


# above WHOLE_MAP_PIXELS: 512 x 512 chunks with partial edge chunks; one chunk; a row of one chunk;
# values float16 holds (stored as float16, read back as its rounding) and values beyond it (float32)
@pytest.mark.parametrize("shape", [(1100, 1000), (373, 248), (1, 513)])
@pytest.mark.parametrize(("scale", "stored"), [(27.0, np.float16), (1.0e5, np.float32)])
def test_a_written_map_reads_back_as_stored_with_zarrs_own_metadata_and_edge_chunks(store, shape, scale, stored):
    values = np.random.default_rng(0).random(shape).astype(np.float32) * np.float32(scale)
    url = store.write_map("scans/a.png", "/src/scans/a.png", "v0001", values)
    expected = values.astype(stored).astype(np.float32)
    np.testing.assert_array_equal(store.read_map(url), expected)
    np.testing.assert_array_equal(store.read_map(url, step=3), expected[::3, ::3])  # a preview's read
    array = zarr.open_array(url, mode="r", zarr_format=3)
    # a map of an image that is not tiled is one chunk: no edge chunk padded and encoded
    chunks = shape if shape[0] * shape[1] <= WHOLE_MAP_PIXELS else (min(512, shape[0]), min(512, shape[1]))
    assert array.chunks == chunks and array.dtype == stored
    # the same document zarr writes for the map of create_map (the tiled path), attributes aside
    reference = store.create_map("scans/b.png", "/src/scans/b.png", "v0001", values.shape, chunk=max(chunks),
                                 dtype=np.dtype(stored).name)
    written = json.loads(open(url.removeprefix("file://") + "/zarr.json").read())
    expected = json.loads(open(store.map_url("scans/b.png", "/src/scans/b.png", "v0001").removeprefix("file://")
                               + "/zarr.json").read())
    assert {k: v for k, v in written.items() if k != "attributes"} == {k: v for k, v in expected.items()
                                                                        if k != "attributes"}
    assert written["attributes"] == {**expected["attributes"], "image_id": "scans/a.png",
                                     "source_uri": "/src/scans/a.png"}
    assert reference.metadata.codecs[-1].to_dict()["name"] == "blosc"


def test_maps_are_blosc_lz4_compressed(store):
    """zarr's default (zstd level 0) took three times as long per chunk and compressed maps less."""
    smooth = np.add.outer(np.linspace(0, 20, 300), np.linspace(0, 5, 200)).astype(np.float32)
    url = store.write_map("a.png", "/src/a.png", "v0001", smooth)
    codec = zarr.open_array(url, mode="r", zarr_format=3).metadata.codecs[-1].to_dict()
    assert codec["name"] == "blosc" and codec["configuration"]["cname"] == "lz4"


def test_writing_a_map_again_replaces_it_whole_and_xarray_opens_the_group(store):
    store.write_map("a.png", "/src/a.png", "v0001", np.ones((600, 600), np.float32))
    url = store.write_map("a.png", "/src/a.png", "v0001", np.full((40, 30), 2.0, np.float32))
    np.testing.assert_array_equal(store.read_map(url), 2.0)
    store.write_map("b.png", "/src/b.png", "v0001", np.zeros((40, 30), np.float32))
    maps = xr.open_zarr(store.maps_url(), group="v0001", consolidated=False)
    assert sorted(maps[name].shape for name in maps.data_vars) == [(40, 30), (40, 30)]
    assert maps.attrs["pixel_threshold"] == 1.0
    assert all(maps[name].attrs["pixel_threshold"] == 1.0 and maps[name].dims == ("y_40", "x_30")
               for name in maps.data_vars)


# ---- the nearest-neighbour pass -----------------------------------------------------------------
def brute_force(queries: np.ndarray, memory: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 distances to the nearest row, the row, and the gap to the second nearest."""
    q, m = queries.astype(np.float64), memory.astype(np.float64)
    squared = ((q[:, None, :] - m[None]) ** 2).sum(-1)
    order = np.argsort(squared, axis=1)
    lines = np.arange(len(q))
    nearest, second = squared[lines, order[:, 0]], squared[lines, order[:, 1]]
    return np.sqrt(nearest), order[:, 0], np.sqrt(second) - np.sqrt(nearest)


@pytest.mark.parametrize("precision", ["bfloat16", "float32"])
def test_the_ranked_distances_stay_within_their_stated_bound(precision):
    """The bound the candidates rest on: |computed - exact| <= error + u |computed| / (1 - u)."""
    from patchwatch.anomaly.patchcore import FORMATS, _as_float, _Ranking

    rng = np.random.default_rng(0)
    for scale, dims in ((1.0, 64), (40.0, 256), (0.01, 300)):
        memory = (rng.standard_normal((500, dims)) * scale * rng.random((500, 1)) * 3).astype(np.float32)
        queries = (rng.standard_normal((200, dims)) * scale).astype(np.float32)
        ranking = _Ranking.of(memory.astype(np.float64), slice(None), precision=precision)
        bits, query_norms = ranking.distances(queries.astype(np.float64))   # memory rows by padded queries
        computed = _as_float(bits[:len(memory), :len(queries)].T).astype(np.float64)   # less the padding's
        exact = ((queries[:, None, :].astype(np.float64) - memory[None]) ** 2).sum(-1)
        u = FORMATS[precision].roundoff
        allowed = ranking.error(query_norms[:, None], ranking.norms[None]) + np.abs(computed) * u / (1 - u)
        assert (np.abs(computed - exact) <= allowed).all()
        # the bound is not vacuous (float32's, worst-case summation over up to 258 terms, sits far above
        # the typical error; it is still ~1e-5 of the distance)
        assert (np.abs(computed - exact) / allowed).max() > (0.05 if precision == "bfloat16" else 0.002)


@pytest.mark.parametrize("precision", ["bfloat16", "float32"])
@pytest.mark.parametrize("case", ["near ties", "far from the origin", "norms apart", "duplicates",
                                  "queries far from everything", "a memory of 3 rows"])
def test_the_nearest_memory_vector_is_the_float64_one_where_no_float32_tie(case, precision):
    from patchwatch.anomaly.patchcore import FORMATS, PatchCore, PatchCoreConfig

    block = max(number_format.query_block for number_format in FORMATS.values())  # more than a block in either format
    rng = np.random.default_rng(1)
    dims = 48
    centres = rng.standard_normal((6, dims)) * 3
    memory = centres[rng.integers(0, 6, 900)] + 0.3 * rng.standard_normal((900, dims))
    queries = centres[rng.integers(0, 6, block + 40)] + 0.3 * rng.standard_normal((block + 40, dims))
    if case == "near ties":      # every query has many memory vectors within 1e-3 of each other
        memory = centres[rng.integers(0, 6, 900)] + 1e-3 * rng.standard_normal((900, dims))
        queries = centres[rng.integers(0, 6, len(queries))] + 0.05 * rng.standard_normal((len(queries), dims))
    elif case == "far from the origin":  # ReLU-like features: large norms, small differences
        memory, queries = memory + 500.0, queries + 500.0
    elif case == "norms apart":
        memory = memory * np.exp(rng.uniform(-3, 3, (900, 1)))
    elif case == "duplicates":
        memory = np.concatenate([memory, memory[:300]])
        queries[:50] = memory[:50]
    elif case == "queries far from everything":  # large distances, small relative gaps between them
        queries[::2] += 300.0 * rng.standard_normal((1, dims))
    elif case == "a memory of 3 rows":   # fewer rows than eq. 7's neighbours, than any query block
        memory = memory[:3]
    memory, queries = memory.astype(np.float32), queries.astype(np.float32)
    model = PatchCore(memory, PatchCoreConfig(map_dims=16), precision=precision)
    scores, rows, map_scores = model.nearest(queries)
    expected, expected_rows, gap = brute_force(queries, memory)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5 * expected.max())
    clear = gap > 1e-4 * expected.max()  # not a float32 tie
    np.testing.assert_array_equal(rows[clear], expected_rows[clear])
    expected_map, _, _ = brute_force(queries[:, :16], memory[:, :16])
    np.testing.assert_allclose(map_scores, expected_map, rtol=1e-5, atol=1e-5 * expected_map.max())
    if case == "duplicates":     # a patch equal to a memory vector: distance 0, the lower of equal rows
        np.testing.assert_array_equal(scores[:50], 0)
        np.testing.assert_array_equal(rows[:50], np.arange(50))


MIXING = np.random.default_rng(10).standard_normal((6, 64))


@pytest.fixture
def small_memories_projected(monkeypatch):
    """The principal-axes ranking for memories of any size (it waits for 2048 rows, a speed choice):
    these tests' memories stay small enough for a float64 brute force."""
    from patchwatch.anomaly import patchcore

    monkeypatch.setattr(patchcore, "PROJECTION_MIN_ROWS", 0)


def low_rank(rng, count: int, noise: float = 0.05, offset: float = 20.0) -> np.ndarray:
    """Features as a CNN's are: most of their variance on a few axes (MIXING's), far from the origin."""
    return rng.standard_normal((count, len(MIXING))) @ MIXING + noise * rng.standard_normal((count, MIXING.shape[1])) + offset


def moved_along_the_leading_axes(rng, rows: np.ndarray, step: float = 0.3) -> np.ndarray:
    """Queries whose difference to their own memory row lies on the memory's leading axes: there a
    projected distance is the whole distance, and a bound a little too tight loses the nearest row."""
    return rows + step * rng.standard_normal((len(rows), len(MIXING))) @ MIXING


def unprojected(model):
    """The same model ranking on every dimension (the passes before the principal-axes ranking)."""
    from patchwatch.anomaly.patchcore import PatchCore

    plain = PatchCore(model.memory, model.config, model.index, model.precision, principal_axes=False)
    assert plain._full_projection is None and plain._map_projection is None
    return plain


@pytest.mark.parametrize("precision", ["bfloat16", "float32"])
@pytest.mark.parametrize("case", ["spread", "moved along the leading axes", "near ties", "duplicates",
                                  "a query far from everything", "a NaN query", "an infinite query", "small norms"])
def test_ranking_on_the_memorys_principal_axes_finds_the_same_nearest_rows(case, precision, small_memories_projected):
    """Both nearest-neighbour passes rank on the memory's leading principal axes when they hold
    its variance: the distances, rows and map distances must be those of the full ranking, bit for
    bit, and the float64 ones where no float32 tie."""
    from patchwatch.anomaly.patchcore import FORMATS, PatchCore, PatchCoreConfig

    rng = np.random.default_rng(11)
    block = max(number_format.query_block for number_format in FORMATS.values())
    memory, queries = low_rank(rng, 1500), low_rank(rng, block + 70)  # more than a block in either format
    if case == "moved along the leading axes":
        queries = moved_along_the_leading_axes(rng, memory[rng.integers(0, 1500, len(queries))])
    elif case == "near ties":          # many memory vectors within 1e-3 of each other, around 8 points
        memory = memory[rng.integers(0, 8, 1500)] + 1e-3 * rng.standard_normal((1500, 64))
        queries = memory[rng.integers(0, 1500, len(queries))] + 0.02 * rng.standard_normal((len(queries), 64))
    elif case == "duplicates":
        memory[1000:1300] = memory[:300]
        queries[:50] = memory[1000:1050]                      # equal to rows 0..49 and 1000..1049
    elif case == "a query far from everything":
        queries[::5] += 300.0 * rng.standard_normal((1, 64))
    elif case == "a NaN query":
        queries[7] = np.nan
    elif case == "an infinite query":
        queries[7, 3] = np.inf
    elif case == "small norms":
        memory, queries = memory * 1e-3, queries * 1e-3
    memory, queries = memory.astype(np.float32), queries.astype(np.float32)
    model = PatchCore(memory, PatchCoreConfig(map_dims=32), precision=precision)
    assert model._full_projection is not None and model._map_projection is not None
    assert model._full_projection.basis.shape == (64, 32) and model._map_projection.basis.shape == (32, 16)
    plain_model = unprojected(model)
    got, plain = model.nearest(queries), plain_model.nearest(queries)
    for projected, full in zip(got, plain):
        np.testing.assert_array_equal(projected, full)
    scores, rows, map_scores = got
    finite = np.isfinite(queries).all(1)
    if case in ("a NaN query", "an infinite query"):
        assert not np.isfinite(scores[7]) and rows[7] == 0 and finite.sum() == len(queries) - 1
    expected, expected_rows, gap = brute_force(queries[finite], memory)
    np.testing.assert_allclose(scores[finite], expected, rtol=1e-5, atol=1e-5 * expected.max())
    clear = gap > 1e-4 * expected.max()
    np.testing.assert_array_equal(rows[finite][clear], expected_rows[clear])
    expected_map, _, _ = brute_force(queries[finite][:, :32], memory[:, :32])
    np.testing.assert_allclose(map_scores[finite], expected_map, rtol=1e-5, atol=1e-5 * expected_map.max())
    if case == "duplicates":
        np.testing.assert_array_equal(scores[:50], 0)
        np.testing.assert_array_equal(rows[:50], np.arange(50))   # the lower of equal rows
    sizes = [100, 1, 250, 60, 130]       # and each image's worst patch, as from every patch's pass
    bounds = np.cumsum([0] + sizes)
    found = model.worst_patches(queries[:bounds[-1]], bounds)
    found_plain = plain_model.worst_patches(queries[:bounds[-1]], bounds)
    for name in ("map_scores", "patches", "scores", "rows"):
        np.testing.assert_array_equal(getattr(found, name), getattr(found_plain, name))


@pytest.mark.parametrize("precision", ["bfloat16", "float32"])
def test_the_projected_distances_stay_within_the_bound_the_candidates_rest_on(precision, small_memories_projected):
    """The candidates rest on: embedded distance (the leading axes and the residual's norm, computed
    in the ranking's format) <= S x the true distance + the embedding's rounding + the ranking's
    bound; it must hold and not be vacuous."""
    from patchwatch.anomaly.patchcore import FORMATS, _as_float, _Projection

    rng = np.random.default_rng(12)
    memory = low_rank(rng, 900)
    centre = memory.mean(0)
    projection = _Projection.of(memory - centre, slice(None), 512, precision)
    # rows moved along what the axes leave of them: only the residual's norm sees that distance
    basis = projection.basis.astype(np.float64)
    rows = memory[150:300] - centre
    residuals = rows - rows @ basis @ basis.T
    along_residual = memory[150:300] + 25.0 * residuals / np.linalg.norm(residuals, axis=1, keepdims=True)
    queries = np.concatenate([low_rank(rng, 150), moved_along_the_leading_axes(rng, memory[:150]), along_residual])
    part = np.ascontiguousarray((queries - centre).astype(np.float32))
    embedded, margin = projection.embedded(part)
    bits, query_norms = projection.ranking.distances_by_query(embedded)
    computed = _as_float(bits[:len(queries), :len(memory)]).astype(np.float64)   # less the padding's
    true = np.sqrt(((queries[:, None, :] - memory[None]) ** 2).sum(-1))
    u, ranking = FORMATS[precision].roundoff, projection.ranking
    slack = np.abs(computed) * u / (1 - u) + ranking.error(query_norms[:, None], ranking.norms[None])
    allowed = (projection.stretch * true + margin[:, None]) ** 2
    assert ((computed - slack) <= allowed).all()
    # not vacuous: a query moved along the leading axes from its row, or along its row's residual,
    # is as far from it in the embedding
    moved = np.arange(150, 450)
    ratio = (computed - slack)[moved, moved - 150] / allowed[moved, moved - 150]
    assert ratio[:150].max() > 0.97 and ratio[150:].max() > 0.97


def test_a_memory_without_a_few_dominant_axes_ranks_on_every_dimension(small_memories_projected):
    """Isotropic features: half the axes hold about half the variance, and a bound on them would
    keep most rows; the model ranks on all dimensions and still finds the nearest rows."""
    from patchwatch.anomaly.patchcore import PatchCore, PatchCoreConfig

    rng = np.random.default_rng(13)
    memory, queries = rng.standard_normal((1500, 64)).astype(np.float32), rng.standard_normal((300, 64)).astype(np.float32)
    model = PatchCore(memory, PatchCoreConfig(map_dims=32), precision="bfloat16")
    assert model._full_projection is None and model._map_projection is None
    expected, expected_rows, _ = brute_force(queries, memory)
    scores, rows, _ = model.nearest(queries)
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    np.testing.assert_array_equal(rows, expected_rows)


# ---- a score batch's images share one pass ------------------------------------------------------
class FeaturesOf:
    """An extractor stand-in: each 'image' is already its patch features, or an exception to raise."""

    def extract(self, images):
        if isinstance(images[0], Exception):
            raise images[0]
        return images


def test_a_batch_scored_together_gives_each_images_own_score_map_and_error_rows(store):
    from patchwatch.anomaly.features import PatchFeatures
    from patchwatch.anomaly.patchcore import PatchCore, PatchCoreConfig
    from patchwatch.storage.images import ImageRecord
    from patchwatch.tasks.scoring import ModelRef, score_images

    rng = np.random.default_rng(2)
    model = PatchCore.fit(rng.standard_normal((2000, 32)).astype(np.float32),
                          PatchCoreConfig(coreset_ratio=0.2, projection_dim=8, map_dims=16))
    ref = ModelRef(root="unused", version="v0001", fingerprint="f", threshold=6.0)

    def features(rows, cols):
        return PatchFeatures(rng.standard_normal((rows * cols, 32)).astype(np.float32) * rng.uniform(0.5, 3),
                             (rows, cols), (rows * 8, cols * 8), (rows * 8, cols * 8))

    nan = features(5, 5)
    nan.vectors[3] = np.nan
    images = [features(6, 9), ValueError("an odd image"), features(4, 4), nan, features(12, 7)]
    records = [ImageRecord(image_id=f"i{n}.png", uri=f"/src/i{n}.png") for n in range(len(images))]
    rows, errors = score_images(records, images, FeaturesOf(), model, store, ref)
    assert [row["image_id"] for row in rows] == ["i0.png", "i2.png", "i4.png"]
    assert [(e["image_id"], e["reason"]) for e in errors] == [
        ("i1.png", "cannot score it (ValueError: an odd image)"),
        ("i3.png", "its score is not finite (NaN or infinite values)")]
    for row, image in zip(rows, [images[0], images[2], images[4]]):   # as each image alone
        score, amap = model.score(image)
        assert row["score"] == pytest.approx(score, rel=1e-6) and row["is_anomalous"] == (score > 6.0)
        np.testing.assert_allclose(store.read_map(row["map"]), amap, rtol=2.0 ** -11, atol=2.0 ** -25)  # float16


def test_a_padim_batch_scored_together_gives_each_image_its_own_score_map_and_error_rows(store):
    """PaDiM's batch reads each position's inverse covariance once for all images; a wrong-grid
    image makes the shared pass fail, and every image is then scored alone (its own error row)."""
    from patchwatch.anomaly.features import PatchFeatures
    from patchwatch.anomaly.padim import Padim, PadimConfig
    from patchwatch.storage.images import ImageRecord
    from patchwatch.tasks.scoring import ModelRef, score_images

    rng = np.random.default_rng(3)
    grid = (5, 6)
    model = Padim.fit([rng.standard_normal((30, 24)).astype(np.float32) for _ in range(40)], grid,
                      PadimConfig(channels=16))
    ref = ModelRef(root="unused", version="v0001", fingerprint="f", threshold=6.0)

    def features(shape=grid):
        return PatchFeatures(rng.standard_normal((shape[0] * shape[1], 24)).astype(np.float32) * rng.uniform(0.5, 3),
                             shape, (40, 48), (40, 48))

    for images, failing in (([features(), features(), features()], []),
                            ([features(), features((6, 5)), features()], ["i1.png"])):
        records = [ImageRecord(image_id=f"i{n}.png", uri=f"/src/i{n}.png") for n in range(len(images))]
        rows, errors = score_images(records, images, FeaturesOf(), model, store, ref)
        assert [e["image_id"] for e in errors] == failing
        for row in rows:
            score, amap = model.score(images[int(row["image_id"][1])])
            assert row["score"] == pytest.approx(score, rel=1e-9)
            np.testing.assert_allclose(store.read_map(row["map"]), amap, rtol=2.0 ** -11, atol=2.0 ** -25)  # float16
    stack = np.stack([features().vectors for _ in range(4)])
    np.testing.assert_allclose(model.patch_scores_many(stack), [model.patch_scores(v) for v in stack], rtol=1e-12)


def test_a_map_opened_for_blocks_reads_nan_where_no_block_came_and_takes_only_whole_chunks(store):
    writer = store.open_map("big.tif", "/src/big.tif", "v0001", (1100, 700))
    writer.write_block(512, 512, np.full((512, 188), 3.0, np.float32))
    writer.write_block(1024, 0, np.full((76, 512), 4.0, np.float32))
    for top, left, shape in ((0, 100, (512, 512)), (0, 0, (512, 188)), (1024, 512, (76, 189))):
        with pytest.raises(ValueError, match="not one chunk"):
            writer.write_block(top, left, np.zeros(shape, np.float32))
    written = store.read_map(writer.url)
    assert (written[512:1024, 512:] == 3.0).all() and (written[1024:, :512] == 4.0).all()
    assert np.isnan(written[:512]).all() and np.isnan(written[512:1024, :512]).all() and np.isnan(written[1024:, 512:]).all()
    zarr_written = store.create_map("b.tif", "/src/b.tif", "v0001", (1100, 700)).metadata.to_dict()
    opened = zarr.open_array(writer.url, mode="r", zarr_format=3).metadata.to_dict()
    assert {**opened, "attributes": None} == {**zarr_written, "attributes": None}


def test_the_stitched_maps_preview_is_the_enlarged_grids_overlay():
    from PIL import Image

    from patchwatch.anomaly.maps import heatmap_overlay
    from patchwatch.tasks.tiles import _preview

    grid = np.random.default_rng(3).random((37, 52)).astype(np.float32) * 9
    enlarged = np.kron(grid, np.ones((19, 19), np.float32))       # 1024 // 52 = 19
    expected = heatmap_overlay(np.zeros(enlarged.shape, np.float32), enlarged, 2.0, 8.0, opacity=1.0)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(_preview(grid, 2.0, 8.0)))), expected)


def test_a_large_memory_gets_smaller_query_blocks_and_the_same_answers():
    from patchwatch.anomaly import patchcore
    from patchwatch.anomaly.patchcore import PatchCore, PatchCoreConfig

    rng = np.random.default_rng(4)
    memory, queries = rng.standard_normal((3000, 16)).astype(np.float32), rng.standard_normal((700, 16)).astype(np.float32)
    whole = PatchCore(memory, PatchCoreConfig(map_dims=8)).nearest(queries)
    saved = patchcore.BLOCK_BYTES
    try:
        patchcore.BLOCK_BYTES = 4 * 3000 * 100          # 100 query rows: 64 (a multiple of 64)
        small = PatchCore(memory, PatchCoreConfig(map_dims=8))
        assert small._block == 64
        for got, expected in zip(small.nearest(queries), whole):
            np.testing.assert_array_equal(got, expected)
    finally:
        patchcore.BLOCK_BYTES = saved


@pytest.mark.parametrize("by_query", [False, True])
@pytest.mark.parametrize("dtype", [np.int16, np.int32])
def test_results_found_through_chunk_minima_are_those_of_the_whole_matrix(by_query, dtype):
    """_Results reads only the chunks whose minimum reaches a query's limit: each query's smallest
    result, a row holding it, and every result within its limit must be the whole matrix's, the
    padding rows and the padding queries never among them."""
    from patchwatch.anomaly.patchcore import CHUNK_ROWS, _as_float, _bits_at_least, _Results

    rng = np.random.default_rng(8)
    rows, count, padded_queries = 3 * CHUNK_ROWS - 11, 50, 64
    values = rng.exponential(10.0, (rows, padded_queries)).astype(np.float32)
    values[rng.random(values.shape) < 0.02] = -1e-6      # negative rounding of 0 here and there
    values[:, 7] = values[5, 7]                           # a query whose every result ties
    padded = np.vstack([values, np.full((3 * CHUNK_ROWS - rows, padded_queries), 2.0 ** 100, np.float32)])
    bits = padded.view(np.int32) if dtype == np.int32 else (padded.view(np.int32) >> 16).astype(np.int16)
    exact = _as_float(bits[:rows, :count])                # what each result is, as the matrix holds it
    matrix = np.ascontiguousarray(bits.T) if by_query else bits
    results = _Results(matrix, by_query, rows)

    np.testing.assert_array_equal(results.smallest(count), bits[:rows, :count].min(0))
    found = results.a_smallest_row(count)
    np.testing.assert_array_equal(bits[found, np.arange(count)], bits[:rows, :count].min(0))

    loose = np.quantile(exact, 0.03, axis=0).astype(np.float64)
    loose[3], loose[11] = np.nan, np.inf                  # NaN features: nothing but -0.0
    line, row, value = results.within(loose)
    expected_line, expected_row = np.nonzero(
        (bits[:rows, :count] <= _bits_at_least(np.maximum(np.nan_to_num(loose, posinf=1.0), 2.0 ** -100), bits.dtype)).T
        & np.isfinite(loose)[:, None])
    assert sorted(zip(line, row)) == sorted(zip(expected_line, expected_row))
    np.testing.assert_array_equal(value, exact[row, line])
    assert row.max() < rows and len(set(line)) > count // 2 and not {3, 11} & set(line)


def test_query_blocks_are_padded_to_a_few_row_counts():
    from patchwatch.anomaly.patchcore import query_row_sizes, query_rows

    assert query_row_sizes(512) == [64, 128, 192, 256, 384, 512]
    assert query_row_sizes(448) == [64, 128, 192, 256, 384, 448]
    assert query_row_sizes(64) == [64]
    for block in (64, 448, 512):   # room for every count; beyond 128 rows, at most half as many again
        assert all(count <= query_rows(count, block) <= max(128, count * 3 // 2) for count in range(1, block + 1))
    assert query_rows(1, 512) == 64 and query_rows(129, 512) == 192 and query_rows(300, 448) == 384
    assert query_rows(600, 512) == 640   # more than a block (eq. 7's neighbourhoods of many images)


@pytest.mark.parametrize("features", ["isotropic", "low rank"])
def test_scoring_multiplies_only_shapes_the_model_compiled_when_made(monkeypatch, features, small_memories_projected):
    """oneDNN compiles a kernel per product shape (~3 ms at 8k rows): a model makes them all when it is
    made (warm_up), and any number of queries, eq. 7's neighbourhoods included, uses only those."""
    import torch

    from patchwatch.anomaly.patchcore import PatchCore, PatchCoreConfig

    shapes = []
    plain = torch.Tensor.__matmul__

    def spy(left, right):
        if left.dtype == torch.bfloat16:   # float32 products (the queries' projection) compile nothing
            shapes.append((tuple(left.shape), tuple(right.shape), left.dtype))
        return plain(left, right)

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    rng = np.random.default_rng(6)
    dims = 24 if features == "isotropic" else 64
    memory = (rng.standard_normal((1200, dims)) if features == "isotropic" else low_rank(rng, 1200)).astype(np.float32)
    model = PatchCore(memory, PatchCoreConfig(map_dims=dims // 2, num_neighbors=5), precision="bfloat16")
    compiled = set(shapes)
    # (full, head, and on the principal axes: full and head) x (64, 128, 192, 256, 384, 512 rows)
    assert len(compiled) == (2 if features == "isotropic" else 4) * 6
    shapes.clear()
    for count in (1, 63, 64, 65, 200, 511, 512, 513, 1100):
        queries = (rng.standard_normal((count, dims)) if features == "isotropic" else low_rank(rng, count)).astype(np.float32)
        scores, rows, _ = model.nearest(queries)
        expected, _, _ = brute_force(queries, memory)
        np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
        model.neighbourhoods(rows[:17], 5)
    assert shapes and set(shapes) <= compiled


@pytest.mark.parametrize("precision", ["bfloat16", "float32"])
@pytest.mark.parametrize("duplicates", [False, True])
def test_eq7_neighbourhoods_from_the_ranking_equal_the_faiss_searches(duplicates, precision):
    from patchwatch.anomaly.patchcore import PatchCore, PatchCoreConfig, reweight_image_score

    rng = np.random.default_rng(5)
    centres = rng.standard_normal((8, 40)) * 3 + 20      # far from the origin, clustered
    memory = (centres[rng.integers(0, 8, 1500)] + 0.4 * rng.standard_normal((1500, 40))).astype(np.float32)
    if duplicates:
        memory[1000:1100] = memory[:100]
    model = PatchCore(memory, PatchCoreConfig(map_dims=20, num_neighbors=9), precision=precision)
    rows = np.arange(0, 1500, 7)
    support = model.neighbourhoods(rows, 9)
    _, expected = model.index.search(memory[rows], 9)
    exact = ((memory[rows][:, None] - memory[None]) ** 2).sum(-1)
    for line in range(len(rows)):
        got, want = exact[line, support[line]], exact[line, expected[line]]
        np.testing.assert_allclose(np.sort(got), np.sort(want), rtol=1e-5, atol=1e-5)  # the same neighbourhood
        assert exact[line, support[line][0]] == 0                                      # m* (or its copy) first
    # the image score with them: as with the faiss search
    queries = (centres[rng.integers(0, 8, 300)] + 0.6 * rng.standard_normal((300, 40))).astype(np.float32)
    features = [_features(queries[i:i + 60]) for i in range(0, 300, 60)]
    for (score, _), item in zip(model.image_scores_and_grids(features), features):
        scores, nearest, _ = model.nearest(item.vectors)
        expected_score = reweight_image_score(item.vectors, scores, nearest, model.memory, model.index, 9)
        assert score == pytest.approx(expected_score, rel=1e-6)


@pytest.mark.parametrize("precision", ["bfloat16", "float32"])
@pytest.mark.parametrize("case", ["clusters", "near ties", "tied worst patches", "a patch far from everything",
                                  "duplicates", "a NaN patch", "a memory of 3 rows", "one patch an image"])
def test_image_scores_from_the_worst_patches_alone_equal_those_from_every_patchs_nearest(case, precision):
    """image_scores_and_grids finds each image's full-vector nearest distances only where a patch
    could hold the image's largest one (its distance to its map-nearest row is an upper bound):
    the image score, its patch and m* must be those of a full pass over every patch."""
    from patchwatch.anomaly.patchcore import PatchCore, PatchCoreConfig, reweight_image_score

    rng = np.random.default_rng(7)
    dims, rows = 40, 1200
    centres = rng.standard_normal((8, dims)) * 3 + 10
    memory = centres[rng.integers(0, 8, rows)] + 0.5 * rng.standard_normal((rows, dims))
    sizes = [60, 1, 33, 140, 60, 7, 96, 60]
    patches = centres[rng.integers(0, 8, sum(sizes))] + 0.6 * rng.standard_normal((sum(sizes), dims))
    if case == "near ties":
        memory = centres[rng.integers(0, 8, rows)] + 1e-3 * rng.standard_normal((rows, dims))
        patches = centres[rng.integers(0, 8, sum(sizes))] + 0.05 * rng.standard_normal((sum(sizes), dims))
    elif case == "tied worst patches":   # each image's worst patch repeated further on: the first one wins
        patches[70:74] = patches[61:62] + 4.0
        patches[80:83] = patches[70]
    elif case == "a patch far from everything":
        patches[100] += 200.0
    elif case == "duplicates":
        memory[600:] = memory[:600]
        patches[::3] = memory[rng.integers(0, rows, len(patches[::3]))]
    elif case == "a NaN patch":
        patches[65] = np.nan
    elif case == "a memory of 3 rows":
        memory = memory[:3]
    elif case == "one patch an image":
        sizes = [1] * 40
        patches = patches[:40]
    memory, patches = memory.astype(np.float32), patches.astype(np.float32)
    model = PatchCore(memory, PatchCoreConfig(map_dims=20, num_neighbors=9), precision=precision)
    bounds = np.cumsum([0] + sizes)
    features = [PatchFeatures_of(patches[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    got = model.image_scores_and_grids(features)
    single = [model.image_score_and_grid(item) for item in features]
    scores, nearest, map_scores = model.nearest(patches)
    expected, _, _ = brute_force(patches, memory)
    for (score, grid), (alone, alone_grid), a, b in zip(got, single, bounds[:-1], bounds[1:]):
        reference = reweight_image_score(patches[a:b], scores[a:b], nearest[a:b], memory, model.index, 9)
        np.testing.assert_array_equal(grid.ravel(), map_scores[a:b])
        np.testing.assert_array_equal(alone_grid, grid)
        if case == "a NaN patch" and a <= 65 < b:
            assert np.isnan(score) and np.isnan(alone)
            continue
        assert score == pytest.approx(reference, rel=1e-6) and alone == pytest.approx(reference, rel=1e-6)
        worst = a + int(np.argmax(expected[a:b]))       # float64: the same largest distance
        assert scores[a:b].max() == pytest.approx(expected[worst], rel=1e-5)
    found = model.worst_patches(patches, bounds)
    np.testing.assert_array_equal(found.map_scores, map_scores)
    finite = [k for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) if np.isfinite(patches[a:b]).all()]
    for k in finite:
        a, b = bounds[k], bounds[k + 1]
        assert found.patches[k] == a + int(np.argmax(scores[a:b]))       # the first of tied worst patches
        assert found.scores[k] == scores[found.patches[k]] and found.rows[k] == nearest[found.patches[k]]
    if case == "tied worst patches":
        assert found.patches[1] == 60 and found.patches[2] == 70         # 61+4 tied at 70..73 and 80..82


@pytest.mark.parametrize("precision", ["bfloat16", "float32"])
@pytest.mark.parametrize("case", ["clusters", "tied largest map values", "a NaN tile", "no map split"])
def test_tiles_get_every_grid_and_the_image_score_from_the_first_tile_holding_the_largest(case, precision):
    """A tiled image's score is that of its tile holding the largest grid value (the first of ties;
    the first NaN one before all, as the stitch-map task picks): tile_scores_and_grids gives every
    tile's grid, and that tile's eq. 7 score alone, equal to what image_scores_and_grids gives."""
    from patchwatch.anomaly.patchcore import PatchCore, PatchCoreConfig

    rng = np.random.default_rng(11)
    dims, rows, sizes = 40, 1200, [64, 64, 64, 64, 64, 64]
    centres = rng.standard_normal((8, dims)) * 3 + 10
    memory = (centres[rng.integers(0, 8, rows)] + 0.5 * rng.standard_normal((rows, dims))).astype(np.float32)
    patches = (centres[rng.integers(0, 8, sum(sizes))] + 0.6 * rng.standard_normal((sum(sizes), dims))).astype(np.float32)
    patches[200] += 30.0                                   # tile 3 holds the largest
    if case == "tied largest map values":                 # tile 1 holds the same patch: the first wins
        patches[100] = patches[200]
    elif case == "a NaN tile":                            # NaN features: the image scores NaN
        patches[4 * 64 + 10] = np.nan
    model = PatchCore(memory, PatchCoreConfig(map_dims=0 if case == "no map split" else 20, num_neighbors=9),
                      precision=precision)
    bounds = np.cumsum([0] + sizes)
    features = [PatchFeatures_of(patches[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    every = model.image_scores_and_grids(features)
    got = model.tile_scores_and_grids(features)
    for (score, grid), (expected_score, expected_grid) in zip(got, every):
        np.testing.assert_array_equal(grid, expected_grid)
    best = {"tied largest map values": 1, "a NaN tile": 4}.get(case, 3)
    assert [k for k, (score, _) in enumerate(got) if score is not None] == [best]
    if case == "a NaN tile":
        assert np.isnan(got[best][0]) and np.isnan(every[best][0])
    else:
        assert got[best][0] == every[best][0]


def test_the_tile_chosen_among_all_is_the_one_chosen_first_within_its_task():
    """Score-tiles tasks choose among their own tiles, stitch-map among all: the image's tile must
    be its task's choice, whatever the ties and NaN values, so its eq. 7 score exists."""
    from patchwatch.anomaly.tiling import holding_the_largest

    rng = np.random.default_rng(3)
    for _ in range(500):
        maxima = list(rng.choice([1.0, 2.0, 3.0, np.nan], size=int(rng.integers(1, 40)), p=[0.4, 0.3, 0.25, 0.05]))
        tasks = [maxima[start:start + 5] for start in range(0, len(maxima), 5)]
        chosen = [start + holding_the_largest(task) for start, task in zip(range(0, len(maxima), 5), tasks)]
        best = holding_the_largest(maxima)
        assert best in chosen
        expected = (next(k for k, value in enumerate(maxima) if np.isnan(value)) if np.isnan(maxima).any()
                    else int(np.argmax(maxima)))   # the first NaN, else the first largest
        assert best == expected


def PatchFeatures_of(vectors):
    from patchwatch.anomaly.features import PatchFeatures

    return PatchFeatures(vectors, (1, len(vectors)), (8, 8 * len(vectors)), (8, 8 * len(vectors)))


def _features(vectors):
    from patchwatch.anomaly.features import PatchFeatures

    return PatchFeatures(vectors, (6, 10), (48, 80), (48, 80))
