"""The fast paths of the streamed metrics give exactly what the plain code gives.

``PixelCurves.add`` bins float32 maps by scaling in float32 (no float64 copy), skips masks without
defect pixels and labels only the defects' bounding box; ``read_map_array`` (``ResultStore.read_map``)
reads a local map's chunks itself instead of through zarr. Each is checked here bit for bit against
what it replaced (speed itself is measured in bench/bench_metrics.py, never asserted)."""

import math

import numpy as np
import pytest
import zarr
import zarr.codecs
from scipy import ndimage

from patchwatch.anomaly.metrics import PixelCurves, _pixel_pair
from patchwatch.storage.results_store import ResultStore, _read_plain_map, read_map_array

EIGHT = np.ones((3, 3), bool)


# --------------------------------------------------------------------------- binning


class PlainCurves(PixelCurves):
    """PixelCurves with the add of before the fast path, verbatim: float32 -> float64, divide by the
    width, floor, the whole mask (a zero one for None) labelled. The grid code is shared."""

    def add(self, amap, mask=None, group=None) -> None:
        mask, amap = _pixel_pair(mask, amap)
        scores = amap.astype(np.float32, copy=False).astype(np.float64).ravel()
        low, high = (float(scores.min()), float(scores.max())) if scores.size else (0.0, 0.0)
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError("anomaly maps must be finite")
        self._images[group] += 1
        if group not in self._histograms:
            self._histograms[group] = np.zeros((3, self.bins))
        if not scores.size:
            return
        self._cover(low, high)
        histogram = self._histograms[group]
        np.divide(scores, self.width, out=scores)
        np.floor(scores, out=scores)
        index = scores.astype(np.intp)
        index -= self.first
        counts = np.bincount(index, minlength=self.bins)
        labeled, regions = ndimage.label(mask, structure=EIGHT)
        if regions:
            flat = labeled.ravel()
            defect = flat > 0
            defect_index = index[defect]
            defect_counts = np.bincount(defect_index, minlength=self.bins)
            region_size = np.bincount(flat, minlength=regions + 1)
            histogram[0] += counts - defect_counts
            histogram[1] += defect_counts
            histogram[2] += np.bincount(defect_index, weights=1.0 / region_size[flat[defect]],
                                        minlength=self.bins)
            self._regions[group] += regions
        else:
            histogram[0] += counts


def assert_same(ours: PixelCurves, plain: PixelCurves) -> None:
    assert (ours.width, ours.first, ours.low, ours.high) == (plain.width, plain.first, plain.low, plain.high)
    assert ours._histograms.keys() == plain._histograms.keys()
    for key, histogram in plain._histograms.items():
        np.testing.assert_array_equal(ours._histograms[key], histogram, err_msg=f"group {key}")
    assert +ours._regions == +plain._regions and ours._images == plain._images


def _blobs(rng, shape, count) -> np.ndarray:
    """A mask of ``count`` rectangles (touching ones merge into one 8-connected region)."""
    mask = np.zeros(shape, bool)
    for _ in range(count):
        top, left = rng.integers(0, shape[0] - 2), rng.integers(0, shape[1] - 2)
        mask[top:top + rng.integers(1, 6), left:left + rng.integers(1, 6)] = True
    return mask


def _maps(seed: int):
    """(map, mask) pairs: positive and negative scores, values exactly on bin edges, float64 input,
    tiny and subnormal scores, masks with several regions, empty masks and None."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(12):
        shape = (int(rng.integers(8, 40)), int(rng.integers(8, 40)))
        amap = rng.gamma(2.0, 1.5, shape).astype(np.float32)
        if i % 3 == 1:
            amap -= np.float32(2.0)  # negative scores
        if i % 4 == 2:  # ties on dyadic values: exactly on the edges of any power-of-two grid this fine
            amap = (np.round(amap * 64) / 64).astype(np.float32)
        if i == 5:
            amap = amap.astype(np.float64) * 1.000001  # float64 input: rounded to float32 first
        if i == 7:
            amap[0, :3] = [0.0, -0.0, np.float32(1e-42)]  # zeros and a subnormal
        mask = None if i % 5 == 0 else (_blobs(rng, shape, int(rng.integers(1, 6))) if i % 5 != 4 else
                                         np.zeros(shape, np.uint8))
        out.append((amap, mask))
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("bins", [16, 1 << 10, 1 << 16])
def test_add_equals_the_plain_arithmetic(seed, bins):
    """After every image (the grid widening as maps arrive) the histograms, region counts and grid
    equal those of the plain arithmetic bit for bit."""
    ours, plain = PixelCurves(bins), PlainCurves(bins)
    for i, (amap, mask) in enumerate(_maps(seed)):
        group = ("a", "b", None)[i % 3]
        ours.add(amap, mask, group=group)
        plain.add(amap, mask, group=group)
        assert_same(ours, plain)


@pytest.mark.parametrize("scale", [2.0 ** -140, 1e-30, 1e-3, 1e3, 1e30, 2.0 ** 120])
def test_add_equals_the_plain_arithmetic_at_any_magnitude(scale):
    """Grids whose 1 / width is no float32 (the float64 route) and ones near float32's limits."""
    ours, plain = PixelCurves(1 << 12), PlainCurves(1 << 12)
    for i, (amap, mask) in enumerate(_maps(99)[:6]):
        amap = (np.asarray(amap, np.float64) * scale).astype(np.float32)
        ours.add(amap, mask, group=i % 2)
        plain.add(amap, mask, group=i % 2)
        assert_same(ours, plain)


# --------------------------------------------------------------------------- reading maps


def _zarr_read(location: str, step: int = 1) -> np.ndarray:
    return zarr.open_array(location, mode="r", zarr_format=3)[::step, ::step]


def _assert_read_as_zarr(location: str, step: int = 1) -> None:
    """The same values as zarr reads; float16 maps as float32."""
    ours, theirs = read_map_array(location, step), _zarr_read(location, step)
    assert ours.dtype == (np.float32 if theirs.dtype == np.float16 else theirs.dtype) and ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("shape", [(37, 53), (512, 300), (700, 1100), (1024, 512)])
def test_read_map_array_reads_the_stores_maps_as_zarr_does(tmp_path, shape):
    store = ResultStore(str(tmp_path / "results"))
    store.prepare()
    amap = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    location = store.write_map("a/b.png", "/data/a/b.png", "v0001", amap)
    assert _read_plain_map(location) is not None  # the direct path, not zarr's
    stored = amap.astype(np.float16).astype(np.float32)  # values of this range are stored in float16
    np.testing.assert_array_equal(read_map_array(location), stored)
    np.testing.assert_array_equal(store.read_map(location), stored)
    _assert_read_as_zarr(location)
    _assert_read_as_zarr("file://" + location)
    _assert_read_as_zarr(location, step=3)  # a preview: through zarr


def test_read_map_array_unwritten_chunks_read_as_the_fill_value(tmp_path):
    store = ResultStore(str(tmp_path / "results"))
    store.prepare()
    writer = store.open_map("big.tif", "/data/big.tif", "v0001", (600, 1030))
    writer.write_block(0, 512, np.ones((512, 512), np.float32))
    _assert_read_as_zarr(writer.url)
    found = read_map_array(writer.url)
    assert np.isnan(found[:, :512]).all() and (found[:512, 512:1024] == 1).all() and np.isnan(found[512:]).all()


@pytest.mark.parametrize(("settings", "direct"), [
    ({}, True),                                                           # zarr's defaults (zstd)
    ({"compressors": None}, True),                                        # raw bytes
    ({"compressors": [zarr.codecs.GzipCodec()]}, True),
    ({"dtype": "float64", "fill_value": -1.5}, True),
    ({"dtype": "float16"}, True),
    ({"dtype": "float16", "compressors": None}, True),
    ({"chunk_key_encoding": {"name": "default", "separator": "."}}, True),
    ({"chunk_key_encoding": {"name": "v2", "separator": "."}}, False),    # the rest through zarr
    ({"serializer": zarr.codecs.BytesCodec(endian="big")}, False),
    ({"compressors": [zarr.codecs.ZstdCodec(), zarr.codecs.GzipCodec()]}, False),
    ({"filters": [zarr.codecs.TransposeCodec(order=(1, 0))]}, False),
    ({"shards": (64, 64)}, False),
    ({"dtype": "int32", "fill_value": 0}, False),
])
def test_read_map_array_equals_zarr_for_other_layouts(tmp_path, settings, direct):
    settings = {"dtype": "float32", "fill_value": np.nan, **settings}
    values = np.random.default_rng(1).normal(size=(70, 90)) * 100
    location = str(tmp_path / "map")
    array = zarr.create_array(location, shape=values.shape, chunks=(32, 32), zarr_format=3, **settings)
    array[:40, :] = values[:40].astype(array.dtype)  # the lower chunks never written: the fill value
    assert (_read_plain_map(location) is not None) == direct
    _assert_read_as_zarr(location)


@pytest.mark.parametrize("offset", [1.0, 1000.0, 3.0e6])
@pytest.mark.parametrize("spread", [1e-2, 1e-6])
def test_add_equals_the_plain_arithmetic_far_from_zero(offset, spread):
    """Ranges narrow against their distance from 0: at a relative spread of 1e-6 the fine bins'
    indices pass 2^31 (counted in int64, not int32)."""
    rng = np.random.default_rng(7)
    ours, plain = PixelCurves(), PlainCurves()
    for i in range(5):
        noise = rng.normal(0.0, spread * offset, (20, 30))
        amap = (np.float32(offset) + noise.astype(np.float32)).astype(np.float32)
        mask = _blobs(rng, amap.shape, 3) if i % 2 else None
        ours.add(amap, mask, group=i % 2)
        plain.add(amap, mask, group=i % 2)
        assert_same(ours, plain)
    assert (spread > 1e-4) == (math.floor(ours.high / ours.width) < 2**31)
