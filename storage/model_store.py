"""A fitted model's files under one root URL.

    ROOT/manifest.json      format version, detector, backbone, configs, counts; written last
    ROOT/bank/batch-NNNNN   Zarr v3 arrays (rows, dim) float32: the patch features of one work
                            batch, chunked by image rows; written by the workers directly
    ROOT/bank/index/        Parquet parts: which bank rows came from which image
    ROOT/memory             Zarr v3 array: the coreset (the detector's memory)
    ROOT/memory.faiss       the faiss index over the memory
    ROOT/detector.npz       extra arrays of detectors other than PatchCore (PaDiM, SPADE)

One array per work batch (rather than one big array) lets every worker write its own part
without coordination, and makes a finished batch a unit that a re-run can skip.
"""
from __future__ import annotations

import hashlib
import io
import json

import faiss
import numpy as np
import pandas as pd
import zarr

from .locations import (exists, filesystem, join, list_dir, numbered_parts, read_bytes, read_json,
                        remove_numbered_parts, write_bytes_atomically, write_json)

FORMAT_VERSION = 1
BANK_INDEX_COLUMNS = ["image_id", "uri", "batch", "row_start", "row_stop", "grid_h", "grid_w",
                      "height", "width", "input_h", "input_w"]


class IncompatibleModelError(RuntimeError):
    """The model root was written by a newer or unknown patchwatch format."""


def manifest_fingerprint(manifest: dict) -> str:
    """The fingerprint of a model from its manifest, for callers that have read it already."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


class ModelStore:
    def __init__(self, root: str):
        self.root = str(root).rstrip("/")

    # ---- feature bank -------------------------------------------------------------------
    def batch_name(self, batch: int) -> str:
        return f"batch-{batch:05d}"

    def _bank_group(self, mode: str = "a") -> zarr.Group:
        return zarr.open_group(join(self.root, "bank"), mode=mode, zarr_format=3)

    def write_bank_batch(self, batch: int, vectors: np.ndarray, index_rows: list[dict],
                         rows_per_chunk: int) -> None:
        """Write one batch's patch vectors, then its index part (the part marks it complete)."""
        group = self._bank_group()
        array = group.create_array(self.batch_name(batch), shape=vectors.shape, dtype="float32",
                                   chunks=(max(1, min(rows_per_chunk, len(vectors))), vectors.shape[1]),
                                   overwrite=True)
        array[...] = vectors
        table = pd.DataFrame(index_rows, columns=BANK_INDEX_COLUMNS)
        buffer = io.BytesIO()
        table.to_parquet(buffer, index=False)
        write_bytes_atomically(join(self.root, "bank", "index", f"{self.batch_name(batch)}.parquet"),
                               buffer.getvalue())

    def drop_bank_batches_from(self, first: int) -> None:
        """Forget bank batches numbered ``first`` and up (left by an earlier, larger fit)."""
        remove_numbered_parts(join(self.root, "bank", "index"), "batch", first)

    def fingerprint(self) -> str:
        """Identifies one fitted model: changes whenever the root is re-fitted."""
        return manifest_fingerprint(self.read_manifest())

    def written_bank_batches(self) -> set[int]:
        """Batches whose index part (written last) is in storage: complete batches."""
        return set(numbered_parts(join(self.root, "bank", "index"), "batch"))

    def has_bank_batch(self, batch: int) -> bool:
        return exists(join(self.root, "bank", "index", f"{self.batch_name(batch)}.parquet"))

    def bank_index(self) -> pd.DataFrame:
        """Which rows of which batch array belong to which image (complete batches only)."""
        fs, _ = filesystem(self.root)
        parts = sorted(p for p in list_dir(join(self.root, "bank", "index")) if p.endswith(".parquet"))
        if not parts:
            return pd.DataFrame(columns=BANK_INDEX_COLUMNS)
        return pd.concat([pd.read_parquet(io.BytesIO(fs.cat_file(p))) for p in parts], ignore_index=True)

    def bank_batches(self) -> list[int]:
        """Complete batches, from one listing (not by reading every index part)."""
        return sorted(self.written_bank_batches())

    def read_bank_batch(self, batch: int) -> np.ndarray:
        return self._bank_group(mode="r")[self.batch_name(batch)][...]

    def iter_bank(self, batches: list[int] | None = None):
        """Stream the bank one batch array at a time: (batch, vectors)."""
        for batch in (self.bank_batches() if batches is None else batches):
            yield batch, self.read_bank_batch(batch)

    def bank_shape(self, batches: list[int] | None = None) -> tuple[int, int]:
        group = self._bank_group(mode="r")
        rows, dim = 0, 0
        for batch in (self.bank_batches() if batches is None else batches):
            shape = group[self.batch_name(batch)].shape
            rows, dim = rows + shape[0], shape[1]
        return rows, dim

    # ---- memory (coreset) and its index ---------------------------------------------------
    def write_memory(self, memory: np.ndarray, attributes: dict | None = None) -> None:
        array = zarr.create_array(join(self.root, "memory"), shape=memory.shape, dtype="float32",
                                  chunks=(min(65536, max(1, len(memory))), memory.shape[1]),
                                  overwrite=True, zarr_format=3)
        array[...] = memory
        if attributes:
            array.attrs.update(attributes)

    def read_memory(self) -> np.ndarray:
        return zarr.open_array(join(self.root, "memory"), mode="r", zarr_format=3)[...]

    def write_index(self, index: faiss.Index) -> None:
        write_bytes_atomically(join(self.root, "memory.faiss"), faiss.serialize_index(index).tobytes())

    def read_index(self) -> faiss.Index:
        return faiss.deserialize_index(np.frombuffer(read_bytes(join(self.root, "memory.faiss")), dtype=np.uint8))

    def write_arrays(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_bytes_atomically(join(self.root, f"{name}.npz"), buffer.getvalue())

    def read_arrays(self, name: str) -> dict[str, np.ndarray]:
        # allow_pickle=False: a model file must never be able to run code when loaded
        with np.load(io.BytesIO(read_bytes(join(self.root, f"{name}.npz"))), allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    # ---- manifest ------------------------------------------------------------------------
    def write_manifest(self, manifest: dict) -> None:
        write_json(join(self.root, "manifest.json"), {"format_version": FORMAT_VERSION, **manifest})

    def has_manifest(self) -> bool:
        return exists(join(self.root, "manifest.json"))

    def read_manifest(self) -> dict:
        url = join(self.root, "manifest.json")
        if not exists(url):
            raise FileNotFoundError(f"no fitted model at {self.root} (missing manifest.json)")
        manifest = read_json(url)
        version = manifest.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise IncompatibleModelError(
                f"model at {self.root} has format version {version!r}; this patchwatch reads "
                f"versions up to {FORMAT_VERSION}: upgrade patchwatch or re-fit")
        return manifest
