"""Scoring results under one root URL.

    RESULTS/maps                  Zarr v3 group of the anomaly maps; one subgroup per model
                                 version (its attributes: model_version, image_threshold,
                                 pixel_threshold, threshold_quantile, units)
    RESULTS/maps/VERSION/STEM-HASH   one array per image: (height, width) float16 (float32 where
                                 its values exceed float16's range) at the
                                 image's original size, Blosc LZ4, one chunk (a tiled image's:
                                 512 x 512 chunks), dimensions y_H, x_W; attributes source_uri,
                                 image_id, model_version, shape and the version's thresholds
                                 and units. STEM: the file name without its extension; HASH: of
                                 the full URI
    RESULTS/results.json          written when a run opens the root: a run checks it before
                                 writing parts, so a root deleted mid-run is never re-created
    RESULTS/scores/part-*.parquet the score table, one part per work batch
    RESULTS/errors/part-*.parquet files that could not be scored, with the reason
    RESULTS/summary.json          counts, timings and metrics of the run
    RESULTS/report.html           the page to open first: summary, the worst images' overlays
                                 (and for evaluate ROC/PRO curves and per-defect figures);
                                 self-contained (images embedded), so it also works downloaded
    RESULTS/overlays/KIND-NN-NAME-HASH.png   overlays of the images the report shows (KIND:
                                 most-anomalous, false-alarm, missed; NN: rank)

Maps are one array per image because images differ in size; large maps are chunked so that a
viewer reads only the tiles it shows. A version's subgroup opens as one xarray Dataset
(``xr.open_zarr(RESULTS/maps, group=VERSION, consolidated=False)``): each map's dimensions
are named after its size (``y_768``, ``x_1024``), so maps of one size share them and maps of
different sizes never conflict. A map's name is readable (the image's stem, sanitised and
truncated) and unique (a hash of the image's full URI), so that images that share a name never
share a map and no name is too long for the file system; maps of different model versions never
overwrite each other. Roots written before maps was a group hold bare arrays at
``RESULTS/maps/VERSION/<folders>/<name.ext>-<hash>`` (see :func:`map_key`): the score table
names them, and they are read as before.

Nightly scoring keeps one such result root per night, and a history of nightly summaries:

    RESULTS/nights/YYYY-MM-DD/    a result root (maps, score parts, scores.parquet, summary)
    RESULTS/history/YYYY-MM-DD.parquet   that night's summary row (counts, quantiles, flagged)
    RESULTS/trend.png             flagged images per night (the last nights), updated each night
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import posixpath
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass

import numcodecs
import numpy as np
import pandas as pd
import zarr
import zarr.codecs
import zarr.storage

from .locations import (exists, filesystem, is_local, is_local_filesystem, join, list_dir, numbered_parts,
                        parquet_rows, read_json, read_parquet, read_parquet_parts, remove_numbered_parts,
                        write_bytes_atomically, write_json, write_parquet)

MAP_CHUNK = 512
# a map written whole of at most this many pixels is one chunk: an image below the tiling threshold
# (1024 px a side) gets one chunk file, and no edge chunk padded with NaN to 512 (a fifth of MTD's
# maps had one: 16 % more pixels encoded, a second file)
WHOLE_MAP_PIXELS = 1024 * 1024
MAP_NAME_BYTES = 48  # per readable component of a map key: far below any file system's 255
MAP_FOLDERS = 2      # folders of the image's path kept in its map key, nearest the file first
MARKER = "results.json"
MAPS_GROUP = "maps"  # earlier roots: bare arrays at maps/<map_key>, no group metadata


# the maps' chunk codec (byte shuffling too): zarr's metadata names it, MapWriter encodes with it
MAP_BLOSC = {"cname": "lz4", "clevel": 5}
# chunk keys 'c.0.0' beside the metadata (zarr v3's default encoding, '.' separator): one folder a
# map in a local root, where '/' made three (c/, c/0/). MTD-like maps written 16 at a time, the two
# alternated in one process (2026-12-02): 0.64 against 0.73 ms a map (medians of 6 rounds). Earlier
# maps keep their keys (in their metadata)
MAP_KEY_SEPARATOR = "."
# A map is stored in float16 where its largest |value| lies in float16's normal range, [2^-14,
# 65,504]: every value of at least 2^-14 is then held within 2^-11 of itself (smaller ones within
# 2^-25), far finer than a map's own noise; elsewhere float32, exactly. Readers get float32 back.
# MTD's 581 test maps (values up to 33, shuffled LZ4): 0.40x float32's bytes to write and send, less
# time to write and read a map; a tiled 21 MP image's stitched map 0.37x the bytes; pixel AUROC and
# AUPRO from them within 1.5e-5 of float32's, on every evaluation set within 3.8e-4
# (bench/results/map_precision.md)
FLOAT16_LARGEST = 65504.0
FLOAT16_SMALLEST_NORMAL = 2.0 ** -14


def map_dtype(largest: float | None) -> str:
    """The stored type of a map whose largest |value| is ``largest`` (None: not known, as for a
    stitched map whose grid was not given): float16 within float16's normal range, else float32."""
    if largest is not None and FLOAT16_SMALLEST_NORMAL <= largest <= FLOAT16_LARGEST:
        return "float16"
    return "float32"


def largest_magnitude(values: np.ndarray) -> float:
    """max |value| (NaN if any is NaN: such a map stays float32)."""
    return float(max(values.max(initial=-np.inf), -values.min(initial=np.inf))) if values.size else 0.0


# float16 <-> float32 conversions go through torch where the process has loaded it (the scoring
# and evaluate processes have: F16C, 0.01-0.04 ms an MTD map), else through numpy (its cast: 0.2-0.5
# ms; widening by a table of every float16: ~0.14 ms): a process that only reads maps does not import
# torch for it (~1 s and ~180 MiB). Both round to nearest even: the same values
def _loaded_torch():
    return sys.modules.get("torch")


def _stored(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``values`` as ``dtype`` (float16 or float32), contiguous."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype != np.float16:
        return values
    torch = _loaded_torch()
    return torch.from_numpy(values).to(torch.float16).numpy() if torch else values.astype(np.float16)


def _widen_into(target: np.ndarray, values: np.ndarray) -> None:
    """``target[...] = values``: float32 from writable float16, exactly."""
    torch = _loaded_torch()
    if torch:
        torch.from_numpy(target).copy_(torch.from_numpy(values))
    else:
        target[...] = _float16_table()[values.view(np.uint16)]


def _widened(values: np.ndarray) -> np.ndarray:
    """A writable float16 array as float32, exactly."""
    out = np.empty(values.shape, np.float32)
    _widen_into(out, values)
    return out


@functools.cache
def _float16_table() -> np.ndarray:
    """float32 of every float16, by its bits (256 KiB)."""
    return np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def _map_settings(height: int, width: int, chunk_h: int, chunk_w: int, dtype: str = "float32") -> dict:
    """zarr.create_array's settings of a map. Blosc LZ4 with byte shuffling: on MTD maps and 512 x
    512 chunks of stitched maps it compresses better than zarr's default (zstd level 0: ratio 1.7
    against 1.2, 1.4 against 1.16) in a third of the time (0.6 against 1.8 ms a chunk), and loses
    nothing of the stored values (float16 or float32: :func:`map_dtype`). Maps written before keep
    their own codec (in their metadata).
    Dimensions are named by size: maps of one size share them, maps of different sizes never clash
    when xarray opens a version's group as one Dataset."""
    return {"shape": (height, width), "dtype": dtype, "chunks": (chunk_h, chunk_w), "fill_value": np.nan,
            "compressors": [zarr.codecs.BloscCodec(**MAP_BLOSC, shuffle="shuffle")],
            "chunk_key_encoding": {"name": "default", "separator": MAP_KEY_SEPARATOR},
            "dimension_names": [f"y_{height}", f"x_{width}"], "zarr_format": 3}


MAPS_ABOUT = ("anomaly maps, one subgroup per model version, one array per image; each array's attributes "
              "say its source image, model version, thresholds and units")


def _map_metadata(height: int, width: int, chunk_h: int, chunk_w: int, dtype: str = "float32") -> dict:
    """zarr's metadata document of a map of this size and type, attributes aside: the one zarr
    writes for a 1 x 1 map, with the size's shape, chunks and dimension names (MTD images have as
    many sizes as images: zarr itself, each time, took ~3 ms)."""
    metadata = _map_template(dtype)
    metadata["chunk_grid"]["configuration"]["chunk_shape"] = [chunk_h, chunk_w]
    return {**metadata, "shape": [height, width], "dimension_names": [f"y_{height}", f"x_{width}"]}


def _map_template(dtype: str) -> dict:
    if dtype not in _TEMPLATES:
        objects: dict = {}
        zarr.create_array(zarr.storage.MemoryStore(objects), **_map_settings(1, 1, 1, 1, dtype))
        template = json.loads(objects["zarr.json"].to_bytes())
        template.pop("attributes", None)
        _TEMPLATES[dtype] = json.dumps(template)
    return json.loads(_TEMPLATES[dtype])  # a fresh copy


_TEMPLATES: dict[str, str] = {}


@dataclass(frozen=True)
class MapDescription:
    """What a model version's map values mean: recorded on its group and on each of its maps."""

    image_threshold: float | None = None   # image scores above it are flagged
    pixel_threshold: float | None = None   # map values above it are anomalous pixels (None: no hold-out maps)
    units: str | None = None
    threshold_quantile: float | None = None  # both thresholds are this quantile of held-out nominal images

    def attributes(self) -> dict:
        return {"image_threshold": self.image_threshold, "pixel_threshold": self.pixel_threshold,
                "threshold_quantile": self.threshold_quantile, "units": self.units}


def _group_json(attributes: dict) -> bytes:
    """A Zarr v3 group's metadata document."""
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attributes}, indent=2).encode()


class MapWriter:
    """A map array written as plain objects in zarr's layout: chunks encoded here (Blosc LZ4 with
    byte shuffling, in the metadata's type: float16 or float32), metadata zarr's own document for
    the size and type (:func:`_map_metadata`).
    Through zarr each metadata or chunk write was a round trip to its event-loop thread: ~5 ms for
    a small map, ~3.7 ms for each 512 x 512 chunk of a stitched map against ~1 ms here."""

    def __init__(self, url: str, shape: tuple[int, int], chunks: tuple[int, int], metadata: dict):
        self.url, self.shape, self.chunks, self.metadata = url, shape, chunks, metadata
        self._fs, self._path = filesystem(url)   # resolved once: ~40 us a call, a map's write is ~0.7 ms
        self._local = is_local_filesystem(self._fs)
        self._folders: set[str] = set()           # made by this writer: one makedirs per folder
        self._codec = numcodecs.Blosc(**MAP_BLOSC, shuffle=numcodecs.Blosc.SHUFFLE)
        self.dtype = np.dtype(metadata["data_type"])

    def remove_earlier(self) -> None:
        """An earlier array of this name goes whole (its chunks could outnumber the new ones)."""
        if self._local:
            if os.path.lexists(self._path):
                shutil.rmtree(self._path)
        elif self._fs.exists(self._path):
            self._fs.rm(self._path, recursive=True)

    def write_block(self, top: int, left: int, values: np.ndarray) -> None:
        """The chunk whose first pixel is (top, left): ``values`` cover it, cut at the map's edge."""
        self._put(*self.encoded_block(top, left, values))

    def write_blocks(self, blocks: list[tuple[int, int, np.ndarray]]) -> None:
        """:meth:`write_block` of each (top, left, values); on an asynchronous object store their
        requests go out at once (one by one each waited for its round trip)."""
        encoded = [self.encoded_block(top, left, values) for top, left, values in blocks]
        if sends_together(self._fs):
            self._fs.pipe({f"{self._path}/{key}": data for key, data in encoded})
        else:
            for key, data in encoded:
                self._put(key, data)

    def encoded_block(self, top: int, left: int, values: np.ndarray) -> tuple[str, bytes]:
        """(key, encoded chunk) of :meth:`write_block`."""
        chunk_h, chunk_w = self.chunks
        expected = (min(chunk_h, self.shape[0] - top), min(chunk_w, self.shape[1] - left))
        if top % chunk_h or left % chunk_w or tuple(values.shape) != expected:
            raise ValueError(f"block at {top},{left} of shape {values.shape} is not one chunk of {self.chunks}")
        block = _stored(values, self.dtype)
        if block.shape != self.chunks:  # edge chunks are stored whole, padded with the fill value
            padded = np.full(self.chunks, np.nan, self.dtype)
            padded[:block.shape[0], :block.shape[1]] = block
            block = padded
        return MAP_KEY_SEPARATOR.join(("c", str(top // chunk_h), str(left // chunk_w))), self._codec.encode(block)

    def whole_map_blocks(self, values: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
        """(top, left, values) of every chunk of a whole map."""
        chunk_h, chunk_w = self.chunks
        return [(top, left, values[top:top + chunk_h, left:left + chunk_w])
                for top in range(0, self.shape[0], chunk_h) for left in range(0, self.shape[1], chunk_w)]

    def write_metadata(self) -> None:
        self._put("zarr.json", self.metadata_document())

    def metadata_document(self) -> bytes:
        return json.dumps(self.metadata).encode()  # no indent: json's C encoder

    def _put(self, key: str, data: bytes) -> None:
        if self._local:
            target = os.path.join(self._path, key)
            folder = os.path.dirname(target)
            if folder not in self._folders:
                os.makedirs(folder, exist_ok=True)
                while folder.startswith(self._path) and folder not in self._folders:
                    self._folders.add(folder)
                    folder = os.path.dirname(folder)
            with open(target, "wb") as handle:
                handle.write(data)
        else:
            self._fs.pipe_file(f"{self._path}/{key}", data)


def sends_together(fs) -> bool:
    """Whether requests to ``fs`` go out together (an asynchronous object store: s3fs, gcsfs, ...);
    a local folder or a synchronous store writes one after another (no round trips to overlap)."""
    return not is_local_filesystem(fs) and bool(getattr(fs, "async_impl", False))


async def _gathered(coroutines: list) -> list:
    return await asyncio.gather(*coroutines)


def write_maps_together(writers: list[MapWriter], maps: list[np.ndarray]) -> None:
    """Whole maps on one asynchronous object store (s3fs, gcsfs, ...), each request of a kind sent
    together: a listing per map (an earlier array of its name goes whole, in one batched delete),
    every map's chunks, then every map's metadata (a reader never meets metadata without its
    chunks). One by one, each map waited for its requests' round trips in turn: at 20 ms round
    trips 170 ms a new map against 42 ms a map sent together (bench/results/map_writes.md)."""
    from fsspec.asyn import sync

    fs = writers[0]._fs
    listed = sync(fs.loop, _gathered, [fs._find(writer._path) for writer in writers])
    earlier = [path for paths in listed for path in paths]
    if earlier:
        fs.rm(earlier)
    fs.pipe({f"{writer._path}/{key}": data for writer, values in zip(writers, maps)
             for key, data in (writer.encoded_block(*block) for block in writer.whole_map_blocks(values))})
    fs.pipe({f"{writer._path}/zarr.json": writer.metadata_document() for writer in writers})


# chunk codecs read_map_array decodes itself (decoding needs no settings); any other goes through zarr
_PLAIN_COMPRESSORS = {"blosc": numcodecs.Blosc, "zstd": numcodecs.Zstd, "gzip": numcodecs.GZip}
_PLAIN_TYPES = ("float16", "float32", "float64")
_PLAIN_FILLS = {"NaN": np.nan, "Infinity": np.inf, "-Infinity": -np.inf}


def read_map_array(location: str, step: int = 1) -> np.ndarray:
    """The map array at ``location``, every ``step``-th pixel of every ``step``-th row; a float16
    map as float32 (exactly: every float16 is a float32).

    A whole (step 1) local map in zarr v3's plain layout (float, one regular chunk grid, the default
    chunk keys, little-endian bytes and at most one of :data:`_PLAIN_COMPRESSORS`: what
    :class:`MapWriter` and ``zarr.create_array``'s defaults write) is read here, its metadata and chunk
    files read and decoded directly: through zarr each open and each read is a round trip to its
    event-loop thread (~1.6 ms of an MTD map's ~1.8 ms). The values are the same; anything else
    (another layout or codec, a remote URL, a preview's step) is read through zarr."""
    if step == 1:
        found = _read_plain_map(location)
        if found is not None:
            return found
    found = zarr.open_array(location, mode="r", zarr_format=3)[::step, ::step]
    return _widened(np.ascontiguousarray(found)) if found.dtype == np.float16 else found


def _read_plain_map(location: str) -> np.ndarray | None:
    """``location``'s array if it is local and in the plain layout (:func:`read_map_array`), else None."""
    path = location[len("file://"):] if location.startswith("file://") else location
    if "://" in path:
        return None
    try:
        with open(os.path.join(path, "zarr.json"), "rb") as handle:
            meta = json.loads(handle.read())
        shape, dtype = tuple(meta["shape"]), meta["data_type"]
        grid, keys, codecs = meta["chunk_grid"], meta["chunk_key_encoding"], meta["codecs"]
        chunks = tuple(grid["configuration"]["chunk_shape"])
        separator = keys.get("configuration", {}).get("separator", "/")
        fill = meta["fill_value"]
        fill = _PLAIN_FILLS.get(fill, fill)
        plain = (meta.get("zarr_format") == 3 and meta.get("node_type") == "array" and dtype in _PLAIN_TYPES
                 and not meta.get("storage_transformers") and grid["name"] == "regular" and len(shape) == 2
                 and len(chunks) == 2 and min(chunks) > 0 and keys["name"] == "default" and separator in ("/", ".")
                 and isinstance(fill, (int, float)) and not isinstance(fill, bool) and 1 <= len(codecs) <= 2
                 and codecs[0]["name"] == "bytes"
                 and codecs[0].get("configuration", {}).get("endian", "little") == "little"
                 and all(codec["name"] in _PLAIN_COMPRESSORS for codec in codecs[1:]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not plain:
        return None
    decoder = _PLAIN_COMPRESSORS[codecs[1]["name"]]() if len(codecs) == 2 else None
    kind = np.dtype(dtype).newbyteorder("<")
    out = np.empty(shape, np.float32 if kind == np.float16 else kind)
    for row in range(0, shape[0], chunks[0]):
        for column in range(0, shape[1], chunks[1]):
            target = out[row:row + chunks[0], column:column + chunks[1]]
            key = separator.join(("c", str(row // chunks[0]), str(column // chunks[1])))
            try:
                with open(os.path.join(path, *key.split("/")), "rb") as handle:
                    data = handle.read()
            except FileNotFoundError:  # a chunk never written holds the fill value, as in zarr
                target[...] = fill
                continue
            if kind == np.float16:   # decoded into a writable array, then widened (_widen_into)
                block = np.empty(chunks, kind)
                if decoder:
                    decoder.decode(data, out=block)
                else:
                    block.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, np.uint8)
                _widen_into(target, block[:target.shape[0], :target.shape[1]])  # edge chunks are stored whole
                continue
            block = np.frombuffer(decoder.decode(data) if decoder else data, kind).reshape(chunks)
            target[...] = block[:target.shape[0], :target.shape[1]]  # edge chunks are stored whole
    return out


class ResultsRootGoneError(FileNotFoundError):
    """The results root (its bucket or folder) is missing: it is never created or re-created silently."""


def part_name(number: int) -> str:
    """The name of a numbered table part (one per work batch)."""
    return f"part-{number:05d}"


def map_name(image_id: str, uri: str) -> str:
    """An image's map array name in its version's group: ``STEM-HASH``. STEM is the file name
    without its extension (no ``a.jpg`` folder look-alikes), sanitised and cut to MAP_NAME_BYTES;
    HASH, of the full URI, keeps two ``a.png`` in different folders apart."""
    return f"{_key_part(_stem(image_id))}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


def _stem(image_id: str) -> str:
    """The file name of ``image_id`` without its folders and extension."""
    return posixpath.splitext(image_id.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1])[0]


def map_key(image_id: str, uri: str, version: str) -> str:
    """The key of an image's map in the layout before maps was a group, ``VERSION/folder/name-HASH``
    (previews of tiled maps are still named by it).

    Readable: the image id's last folders and name, unsafe characters replaced, each part cut to
    MAP_NAME_BYTES. Unique per source: HASH is a hash of the full URI, so ``a/y.jpg`` and
    ``../y.jpg``, or two long names cut to the same prefix, never share a map.
    """
    raw = [p for p in image_id.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    parts = [_key_part(p) for p in raw[-(MAP_FOLDERS + 1):]] or ["_"]
    parts[-1] = f"{parts[-1]}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"
    return "/".join([_key_part(version), *parts])


def _key_part(part: str) -> str:
    cleaned = re.sub(r"[^\w.\-]", "_", part).encode()[:MAP_NAME_BYTES].decode(errors="ignore") or "_"
    # zarr reserves names starting with "__"; names of dots only are not names
    return "_" + cleaned if cleaned.startswith("__") or not cleaned.strip(".") else cleaned


def picture_name(prefix: str, image_id: str, uri: str) -> str:
    """``PREFIX-NAME-HASH.png``: NAME is the image's file name without its extension (never
    ``a.jpg.png``), HASH a hash of its full URI, so two ``a.png`` in different folders never
    share a picture."""
    return f"{prefix}-{_key_part(_stem(image_id))}-{hashlib.sha256(uri.encode()).hexdigest()[:8]}.png"


def source_stamp(uris: list[str]) -> str:
    """What the result cache knows the images at ``uris`` by: each one's size and modification
    time (or ETag), never its name alone, so an image replaced under the same name is scored
    again. A file that cannot be looked up gets a fresh token: its batch runs again."""
    stamps = []
    for uri in uris:
        fs, path = filesystem(uri)
        try:
            fs.invalidate_cache(path)
            info = fs.info(path)
            stamps.append(f"{uri}|{info.get('size')}|{info.get('mtime') or info.get('LastModified')}|"
                          f"{info.get('ETag') or info.get('ino') or ''}")
        except Exception:
            stamps.append(f"{uri}|{uuid.uuid4().hex}")
    return hashlib.sha256("\n".join(stamps).encode()).hexdigest()


class ResultStore:
    def __init__(self, root: str):
        self.root = str(root).rstrip("/")
        self._maps_by_id: dict[str, str] | None = None
        self._descriptions: dict[str, MapDescription] = {}
        self._ready_groups: set[str] = set()

    # ------------------------------------------------------------------ the root itself
    def prepare(self) -> None:
        """Open the root for a run: a folder is created, a bucket must exist (s3fs would create
        a missing bucket on the first write: patchwatch never does). Then the marker that
        :meth:`require` checks is written."""
        fs, path = filesystem(self.root)
        if is_local(self.root):
            fs.makedirs(path, exist_ok=True)
        else:
            bucket = path.split("/", 1)[0]
            fs.invalidate_cache(bucket)
            if not fs.exists(bucket):
                raise ResultsRootGoneError(f"results root {self.root}: bucket {bucket} does not exist "
                                           "(patchwatch never creates buckets: create it, or check the URL)")
        if not exists(join(self.root, MARKER)):
            write_json(join(self.root, MARKER), {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def require(self) -> None:
        """Raise :class:`ResultsRootGoneError` if the root vanished since :meth:`prepare` (a
        deleted bucket or folder): writing on would re-create it and lose the run's context."""
        if not exists(join(self.root, MARKER)):
            raise ResultsRootGoneError(f"results root {self.root} vanished during the run (bucket or folder "
                                       "deleted?): not re-created; nothing more is written")

    # ------------------------------------------------------------------ maps
    def maps_url(self) -> str:
        """The root's Zarr group of maps (open with zarr, or xarray with ``group=VERSION``)."""
        return join(self.root, MAPS_GROUP)

    def map_url(self, image_id: str, uri: str, version: str) -> str:
        return join(self.maps_url(), _key_part(version), map_name(image_id, uri))

    def describe_maps(self, version: str, description: MapDescription) -> None:
        """What ``version``'s maps mean (thresholds, units): recorded on its group and on each of
        its maps this store writes from now on. Without it a store takes the group's, if any."""
        self._descriptions[version] = description
        self._ready_groups.discard(version)

    def write_map(self, image_id: str, uri: str, version: str, anomaly_map: np.ndarray) -> str:
        """Write a whole map, replacing any earlier array of that name: its chunks, then its
        metadata (a reader never meets metadata without its chunks). See :class:`MapWriter`:
        through zarr a small map cost ~5 ms, up to a fifth of an MTD image's score time."""
        values = np.ascontiguousarray(anomaly_map, dtype=np.float32)
        writer = self._map_writer(image_id, uri, version, values.shape, whole=True, largest=largest_magnitude(values))
        for block in writer.whole_map_blocks(values):
            writer.write_block(*block)
        writer.write_metadata()
        return writer.url

    def write_maps(self, maps: list[tuple[str, str, str, np.ndarray]]) -> list[str | OSError]:
        """:meth:`write_map` of each (image_id, uri, version, map): per map its URL, or the OSError
        writing it raised. On an asynchronous object store the maps' requests go out together
        (:func:`write_maps_together`); should that fail, each map is written again on its own, for
        its own outcome. Elsewhere (:func:`sends_together`) one after another."""
        if not maps:
            return []
        if not sends_together(filesystem(self.root)[0]):
            return [self._write_map_or_error(*item) for item in maps]
        try:
            values = [np.ascontiguousarray(item[3], dtype=np.float32) for item in maps]
            writers = [self._map_writer(image_id, uri, version, array.shape, whole=True, remove_earlier=False,
                                        largest=largest_magnitude(array))
                       for (image_id, uri, version, _), array in zip(maps, values)]
            write_maps_together(writers, values)
            return [writer.url for writer in writers]
        except OSError:
            return [self._write_map_or_error(*item) for item in maps]

    def _write_map_or_error(self, image_id: str, uri: str, version: str, anomaly_map: np.ndarray) -> str | OSError:
        try:
            return self.write_map(image_id, uri, version, anomaly_map)
        except OSError as error:
            return error

    def open_map(self, image_id: str, uri: str, version: str, shape: tuple[int, int],
                 largest: float | None = None) -> "MapWriter":
        """A map to be written block by block (MAP_CHUNK-aligned blocks: a tiled image's stitched
        map), replacing any earlier array of that name; its metadata first, so a region never
        written reads NaN (missing, not a nominal 0), as with :meth:`create_map`. ``largest``: a
        bound on the map's |values| (its type, :func:`map_dtype`; None: float32)."""
        writer = self._map_writer(image_id, uri, version, shape, largest=largest)
        writer.write_metadata()
        return writer

    def _map_writer(self, image_id: str, uri: str, version: str, shape: tuple[int, int],
                    whole: bool = False, remove_earlier: bool = True, largest: float | None = None) -> "MapWriter":
        self._require_groups(version)
        height, width = int(shape[0]), int(shape[1])
        if whole and height * width <= WHOLE_MAP_PIXELS:
            chunks = (height, width)
        else:
            chunks = (min(MAP_CHUNK, height), min(MAP_CHUNK, width))
        metadata = {**_map_metadata(height, width, *chunks, dtype=map_dtype(largest)),
                    "attributes": self._map_attributes(image_id, uri, version, height, width)}
        writer = MapWriter(self.map_url(image_id, uri, version), (height, width), chunks, metadata)
        if remove_earlier:
            writer.remove_earlier()
        return writer

    def _map_attributes(self, image_id: str, uri: str, version: str, height: int, width: int) -> dict:
        return {"image_id": image_id, "source_uri": uri, "model_version": version, "shape": [height, width],
                **self._descriptions.get(version, MapDescription()).attributes()}

    def create_map(self, image_id: str, uri: str, version: str, shape: tuple[int, int],
                   chunk: int = MAP_CHUNK, dtype: str = "float32") -> zarr.Array:
        """An empty map (NaN until written: a region never written is not mistaken for a nominal
        0) to be filled whole or region by region, through zarr (tiled scoring of large images)."""
        self._require_groups(version)
        height, width = int(shape[0]), int(shape[1])
        return zarr.create_array(self.map_url(image_id, uri, version), overwrite=True,
                                 attributes=self._map_attributes(image_id, uri, version, height, width),
                                 **_map_settings(height, width, min(chunk, height), min(chunk, width), dtype))

    def _require_groups(self, version: str) -> None:
        """The maps group and its VERSION subgroup exist, the latter with the version's description.
        Written whole and atomically (many workers write maps at once: none may read a half
        group), and only when missing or different."""
        if version in self._ready_groups:
            return
        root_meta = join(self.maps_url(), "zarr.json")
        if not exists(root_meta):
            write_bytes_atomically(root_meta, _group_json({"about": MAPS_ABOUT}))
        meta = join(self.maps_url(), _key_part(version), "zarr.json")
        found = read_json(meta).get("attributes", {}) if exists(meta) else None
        if version not in self._descriptions and found is not None:
            # described by another writer of this version (a score batch): its maps say the same
            self._descriptions[version] = MapDescription(**{name: found.get(name) for name in
                                                            MapDescription.__dataclass_fields__})
        wanted = {"model_version": version, **self._descriptions.get(version, MapDescription()).attributes()}
        if found != wanted:
            write_bytes_atomically(meta, _group_json(wanted))
        self._ready_groups.add(version)

    def read_map(self, location: str, step: int = 1) -> np.ndarray:
        """The map at ``location``: a score row's ``map`` (either layout), or an image id that
        has exactly one row in the score table; every ``step``-th pixel of every ``step``-th row
        (a preview of a large map, never held whole)."""
        if not location.startswith(self.maps_url() + "/"):
            if self._maps_by_id is None:
                table = self.scores()
                counts = table.image_id.value_counts() if len(table) else pd.Series(dtype=int)
                self._maps_by_id = {row.image_id: row.map for row in table.itertuples()
                                    if counts[row.image_id] == 1}
            if location not in self._maps_by_id:
                raise KeyError(f"{location}: not one row of the score table in {self.root} (use the row's map)")
            location = self._maps_by_id[location]
        return read_map_array(location, step)

    def _write_part(self, table: str, name: str, frame: pd.DataFrame) -> None:
        write_parquet(join(self.root, table, f"{name}.parquet"), frame)

    def write_scores(self, part: str, frame: pd.DataFrame) -> None:
        self._write_part("scores", part, frame)

    def write_errors(self, part: str, frame: pd.DataFrame) -> None:
        self._write_part("errors", part, frame)

    def written_parts(self, table: str) -> set[str]:
        return {part_name(n) for n in numbered_parts(join(self.root, table), "part")}

    def next_part(self) -> int:
        """The number after every score and error part: parts appended later never reuse one."""
        numbers = [n for table in ("scores", "errors") for n in numbered_parts(join(self.root, table), "part")]
        return max(numbers, default=-1) + 1

    def has_part(self, table: str, part: str) -> bool:
        return exists(join(self.root, table, f"{part}.parquet"))

    def _read_table(self, table: str) -> pd.DataFrame:
        parts = sorted(p for p in list_dir(join(self.root, table)) if p.endswith(".parquet"))
        return read_parquet_parts(self.root, parts)

    def scores(self) -> pd.DataFrame:
        return self._read_table("scores")

    def errors(self) -> pd.DataFrame:
        return self._read_table("errors")

    def write_table(self, name: str, frame: pd.DataFrame) -> str:
        """A whole table as one Parquet file (e.g. the merged score table)."""
        return write_parquet(join(self.root, f"{name}.parquet"), frame)

    def write_summary(self, summary: dict) -> None:
        write_json(join(self.root, "summary.json"), summary)

    def read_summary(self) -> dict:
        return read_json(join(self.root, "summary.json"))

    def write_file(self, name: str, data: bytes) -> str:
        url = join(self.root, name)
        write_bytes_atomically(url, data)
        return url


    def write_pictures(self, folder: str, pictures: dict[str, bytes]) -> dict[str, str]:
        """Write ``pictures`` ({file name: PNG bytes}) into ``folder`` and remove the PNGs an
        earlier run left there (a re-run must not show last run's images beside its own).
        Returns {file name: URL}."""
        urls = {name: self.write_file(f"{folder}/{name}", data) for name, data in pictures.items()}
        for path in list_dir(join(self.root, folder)):
            if path.endswith(".png") and posixpath.basename(path) not in pictures:
                fs, _ = filesystem(self.root)
                fs.rm(path)
        return urls

    def link(self, url: str) -> str:
        """``url`` as a browser opens it: a local path as a file:// URL, a store URL as it is."""
        return ("file://" + filesystem(url)[1]) if is_local(url) else url


def drop_parts_from(store: ResultStore, first: int) -> None:
    """Forget score/error parts numbered ``first`` and up (left by an earlier, larger run)."""
    for table in ("scores", "errors"):
        remove_numbered_parts(join(store.root, table), "part", first)


class NightlyResults:
    """Dated partitions of nightly scoring, and what has been scored by which model version."""

    def __init__(self, root: str):
        self.root = str(root).rstrip("/")

    def night(self, date: str) -> ResultStore:
        return ResultStore(join(self.root, "nights", date))

    def nights(self) -> list[str]:
        return sorted(posixpath.basename(p.rstrip("/")) for p in list_dir(join(self.root, "nights")))

    def done(self, version: str | None = None) -> set[str]:
        """URIs scored (or found unusable) on any night: by ``version``, or by any version.

        Read from the nights' merged tables, not their parts: a run killed before it merged
        left parts that no table a user reads holds, and its images must be scored again (the
        next merge of that night keeps one row per image and version)."""
        merged = [path for night in self.nights() for path in self._merged_tables(night).values()]
        frame = read_parquet_parts(self.root, merged, columns=["uri", "model_version"])
        if not len(frame):
            return set()
        return set(frame.uri if version is None else frame.uri[frame.model_version == version])

    def published(self, date: str) -> bool:
        """Whether the night's history row counts its merged tables' rows (false where a run was
        cut short after its merge, before the row: the trend would miss the night). A night
        without a merged table has nothing to publish."""
        counts = {table: parquet_rows(self.root, path) for table, path in self._merged_tables(date).items()}
        if not counts:
            return True
        history = join(self.root, "history", f"{date}.parquet")
        if not exists(history):
            return False
        row = read_parquet(history, columns=["rows", "errors"])
        return len(row) == 1 and (int(row.rows.iloc[0]), int(row.errors.iloc[0])) == (
            counts.get("scores", 0), counts.get("errors", 0))

    def _merged_tables(self, date: str) -> dict[str, str]:
        """{"scores" / "errors": path} of the night's merged tables that exist, from one listing."""
        return {name.removesuffix(".parquet"): path for path in list_dir(join(self.root, "nights", date))
                if (name := posixpath.basename(path)) in ("scores.parquet", "errors.parquet")}

    def write_history(self, date: str, row: dict) -> None:
        write_parquet(join(self.root, "history", f"{date}.parquet"), pd.DataFrame([row]))

    def write_trend(self, png: bytes) -> str:
        return ResultStore(self.root).write_file("trend.png", png)

    def history(self) -> pd.DataFrame:
        return read_parquet_parts(self.root, sorted(p for p in list_dir(join(self.root, "history"))
                                                    if p.endswith(".parquet")))
