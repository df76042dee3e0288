"""A model version's stored settings and arrays, checked before they are used.

A model root is data another process (or person) wrote: a manifest with ``tile: 2`` made one
small image cost tens of thousands of tile passes, and a memory array declaring 3e6 rows was
allocated whole before any check. Settings are checked against ranges here (plain Python: the
light commands import no torch), arrays' shapes against the manifest from their metadata, before
a byte of data is read. Every refusal is one :class:`StoredModelError` line naming the version's
folder and the field.
"""
from __future__ import annotations

import math
import struct
import zipfile

import numpy as np

from patchwatch.anomaly.settings import MIRRORS

from .model_store import IncompatibleModelError


class StoredModelError(IncompatibleModelError, ValueError):
    """A stored setting or array out of range or inconsistent with the manifest (ValueError: a
    retry would read the same files)."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


# (kind, low, high): the bounds are wide (no fit the CLI or API makes is refused) but keep the
# cost of one image bounded; "int" / "number" / "str" / "ints" / "numbers"
FEATURE_FIELDS = {
    "backbone": ("str", None, None), "layers": ("ints", 0, 8), "input_scale": ("number", 1 / 64, 8),
    "context_scales": ("numbers", 1 / 64, 8), "square_side": ("int", 0, 8192),
    "fixed_shape": ("ints", 1, 8192), "size_multiple": ("int", 1, 256),
    "patch_size": ("int", 1, 31), "layer_dim": ("int", 1, 8192), "embed_dim": ("int", 1, 8192),
    "mirrors": ("choices", MIRRORS, None),
}
TILING_FIELDS = {"tile": ("int", 64, 16384), "overlap": ("int", 0, 8192), "threshold": ("int", 64, 1 << 20)}
SIGMA = ("number", 0, 64)  # a Gaussian of sigma 1e9 px would never finish
DETECTOR_FIELDS = {
    "patchcore": {"coreset_ratio": ("number", 1e-6, 1), "projection_dim": ("int", 0, 8192),
                  "num_neighbors": ("int", 1, 1000), "sigma": SIGMA, "seed": ("int", None, None),
                  "map_dims": ("int", 0, 8192)},
    "padim": {"channels": ("int", 0, 8192), "seed": ("int", None, None), "sigma": SIGMA,
              "epsilon": ("number", 0, 1e6), "shrinkage": ("str", None, None)},
    "spade": {"k_images": ("int", 1, 10000), "kappa": ("int", 1, 10000), "sigma": SIGMA,
              "image_score": ("str", None, None)},
}
COUNT_FIELDS = ("memory_rows", "bank_rows", "n_images")


def _problem(value, kind: str, low, high) -> str | None:
    """Why ``value`` is not a ``kind`` within [low, high] (None: it is)."""
    if kind == "str":
        return None if isinstance(value, str) and value else "expected a non-empty string"
    if kind == "choices":  # a list of distinct values out of ``low``
        if not isinstance(value, (list, tuple)) or len(set(map(str, value))) != len(value) or len(value) > len(low):
            return f"expected a list of distinct values out of {', '.join(low)}"
        return next((f"{v!r} is not one of {', '.join(low)}" for v in value if v not in low), None)
    if kind in ("ints", "numbers"):
        if not isinstance(value, (list, tuple)) or len(value) > 8:
            return "expected a list of at most 8 values"
        return next(filter(None, (_problem(v, kind[:-1] if kind == "ints" else "number", low, high)
                                  for v in value)), None)
    if not (_is_int(value) if kind == "int" else _is_number(value)):
        return f"expected {'a whole number' if kind == 'int' else 'a finite number'}"
    if (low is not None and value < low) or (high is not None and value > high):
        return f"out of range [{low:g}, {high:g}]"
    return None


def _check_section(root: str, name: str, values, fields: dict, required: bool) -> None:
    if values is None and not required:
        return
    if not isinstance(values, dict):
        raise StoredModelError(f"model at {root}: {name} is {type(values).__name__}, expected a mapping")
    for key in values:
        if key not in fields:
            raise StoredModelError(f"model at {root}: {name}.{key} is not a setting this patchwatch knows")
    for key, (kind, low, high) in fields.items():
        if key in values:
            why = _problem(values[key], kind, low, high)
            if why:
                raise StoredModelError(f"model at {root}: {name}.{key} = {values[key]!r}: {why}")


def check_manifest(manifest: dict, root: str) -> None:
    """Refuse (StoredModelError) a manifest whose settings or counts are out of range."""
    _check_section(root, "feature_config", manifest.get("feature_config"), FEATURE_FIELDS, required=False)
    tiling = manifest.get("tiling_config")
    _check_section(root, "tiling_config", tiling, TILING_FIELDS, required=False)
    if isinstance(tiling, dict) and _is_int(tiling.get("tile", 512)) and _is_int(tiling.get("overlap", 128)):
        # more than half a tile shared with each neighbour: each pixel passes the network 4+ times
        if tiling.get("overlap", 128) > tiling.get("tile", 512) // 2:
            raise StoredModelError(f"model at {root}: tiling_config.overlap = {tiling.get('overlap', 128)!r}: "
                                   f"more than half of tiling_config.tile ({tiling.get('tile', 512)})")
    detector = manifest.get("detector", "patchcore")
    if detector not in DETECTOR_FIELDS:
        raise StoredModelError(f"model at {root}: detector = {detector!r}: unknown to this patchwatch")
    _check_section(root, "detector_config", manifest.get("detector_config"), DETECTOR_FIELDS[detector],
                   required=False)
    for key in COUNT_FIELDS:
        if key in manifest and _problem(manifest[key], "int", 0, 1 << 40):
            raise StoredModelError(f"model at {root}: {key} = {manifest[key]!r}: expected a whole number >= 0")


def _mismatch(root: str, what: str, shape, expected) -> StoredModelError:
    return StoredModelError(f"model at {root}: {what} has shape {tuple(shape)}, the manifest says {tuple(expected)}")


def embed_dim(manifest: dict) -> int:
    return int((manifest.get("feature_config") or {}).get("embed_dim", 256))


def check_memory(root: str, array, manifest: dict) -> None:
    """PatchCore's memory (an opened, unread Zarr array) against the manifest's memory_rows."""
    rows = manifest.get("memory_rows")
    expected = (rows if rows is not None else array.shape[0], embed_dim(manifest))
    if len(array.shape) != 2 or tuple(array.shape) != expected:
        raise _mismatch(root, "memory", array.shape, expected)


# faiss's serialised IndexFlat header: fourcc, d (int32), ntotal (int64), two int64 dummies,
# is_trained (bool), metric (int32), then the codes' length in floats (uint64)
FLAT_HEADER = struct.Struct("<4siqqq?iQ")


def check_index(root: str, header: bytes, size: int, manifest: dict) -> None:
    """The faiss index file (its first bytes and its size) against the memory it must match."""
    rows, dim = manifest.get("memory_rows"), embed_dim(manifest)
    if len(header) < FLAT_HEADER.size:
        raise StoredModelError(f"model at {root}: memory.faiss is truncated ({size} bytes)")
    fourcc, d, ntotal, _, _, _, _, floats = FLAT_HEADER.unpack_from(header)
    if fourcc not in (b"IxF2", b"IxFI"):
        raise StoredModelError(f"model at {root}: memory.faiss is not a flat index ({fourcc!r})")
    if d != dim or (rows is not None and ntotal != rows):
        raise StoredModelError(f"model at {root}: memory.faiss holds {ntotal} vectors of {d} dimensions, "
                               f"the manifest {rows} of {dim}")
    if floats != ntotal * d or size != FLAT_HEADER.size + floats * 4:
        raise StoredModelError(f"model at {root}: memory.faiss is {size} bytes, not the "
                               f"{FLAT_HEADER.size + ntotal * d * 4} of {ntotal} x {d} float32")


def npz_shapes(handle) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of every member of an .npz (an open, seekable file), from the zip directory
    and the members' headers only."""
    shapes = {}
    if not zipfile.is_zipfile(handle):  # np.load refuses it (a raw pickle: allow_pickle=False)
        return shapes
    handle.seek(0)
    with zipfile.ZipFile(handle) as archive:
        for name in archive.namelist():
            with archive.open(name) as member:
                version = np.lib.format.read_magic(member)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(member)
            shapes[name.removesuffix(".npy")] = (tuple(shape), np.dtype(dtype))
    return shapes


def check_detector_arrays(root: str, shapes: dict, manifest: dict, name: str) -> None:
    """PaDiM's or SPADE's arrays (shapes from :func:`npz_shapes`) against the manifest."""
    dim = embed_dim(manifest)
    if not shapes:
        return  # not an .npz at all: left to np.load's refusal
    for member, (_, dtype) in shapes.items():
        if dtype.hasobject:
            raise StoredModelError(f"model at {root}: detector.npz {member} holds Python objects, which are "
                                   f"never loaded (allow_pickle=False)")

    def need(member: str, expected) -> None:
        if member not in shapes:
            raise StoredModelError(f"model at {root}: detector.npz has no {member!r} array")
        shape = shapes[member][0]
        if len(shape) != len(expected) or any(e is not None and s != e for s, e in zip(shape, expected)):
            raise StoredModelError(f"model at {root}: detector.npz {member} has shape {shape}, the manifest says "
                                   f"{tuple('any' if e is None else e for e in expected)}")

    if name == "spade":
        rows = manifest.get("bank_rows")
        need("patches", (rows, dim))
        images = shapes["global_features"][0][0] if len(shapes.get("global_features", ((),))[0]) == 2 else None
        need("global_features", (images, dim))
        need("offsets", ((images or 0) + 1,))
        if rows is not None and images is not None and images > rows:
            raise StoredModelError(f"model at {root}: detector.npz holds {images} images for {rows} patches")
    elif name == "padim":
        need("grid", (2,))
        need("channel_index", (None,))
        channels = shapes["channel_index"][0][0]
        side = (manifest.get("feature_config") or {}).get("square_side") or 8192
        if not 0 < channels <= dim:
            raise StoredModelError(f"model at {root}: detector.npz channel_index has {channels} channels, "
                                   f"the features {dim}")
        need("mean", (None, channels))
        positions = shapes["mean"][0][0]
        if positions > side * side:
            raise StoredModelError(f"model at {root}: detector.npz mean has {positions} positions, more than "
                                   f"a {side} px square holds")
        need("inv_cov", (positions, channels, channels))
