"""A model root: one append-only feature bank shared by immutable model versions.

    ROOT/bank/batch-NNNNN        Zarr v3 arrays (rows, dim) float32: one work batch's patch
                                 features (nominal images the detector learns from)
    ROOT/bank/holdout-NNNNN      the same for held-out nominal images (they calibrate the
                                 threshold and never enter a model's memory)
    ROOT/bank/outcomes/          one JSON per batch: counts, skipped files, large images left for
                                 tiling (a resumed fit reads it instead of running the batch)
    ROOT/bank/index/             one Parquet part per batch, written after its array: which rows
                                 came from which image (and its geometry)
    ROOT/versions/vNNNN/         one fitted model, never changed once complete:
        memory, memory.faiss     PatchCore: the coreset (Zarr) and its faiss index
        detector.npz             PaDiM / SPADE arrays
        plan.parquet             the images the fit featurises, batch by batch: a killed fit
                                 resumes exactly this plan
        coreset.npz              which bank rows the memory holds (for incremental re-fits)
        holdout.parquet          the held-out images' scores behind the threshold
        manifest.json            configs, threshold and lineage; written last: marks it complete
        metrics.json             metrics on a labelled split, when one was evaluated
    ROOT/current.json            {"version": ...}: the version scoring uses, replaced atomically
    ROOT/locks/fit-NNNNN.json    the lease of the fit writing the root (storage/leases.py): two
                                 fits would append to one plan and both call it the same version

The bank only grows: a re-fit featurises only images it does not hold yet, and every version
records which bank batches it was built from, so a version stays reproducible after later ones
append. One array per work batch lets every worker write its own part without coordination.
"""
from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
import time

import numpy as np
import pandas as pd
import zarr

from .leases import Lease
from .locations import (exists, join, list_dir, numbered_parts, read_bytes, read_json, read_parquet,
                        read_parquet_parts, write_bytes_atomically, write_json, write_parquet)

FORMAT_VERSION = 2
BANK_INDEX_COLUMNS = ["image_id", "uri", "batch", "row_start", "row_stop", "grid_h", "grid_w",
                      "height", "width", "input_h", "input_w"]
TRAIN, HOLDOUT = "batch", "holdout"  # the two kinds of bank batch (their name prefixes)
VERSION_PATTERN = re.compile(r"^v(\d{4,})$")


class IncompatibleModelError(RuntimeError):
    """The model root was written by a newer or unknown patchwatch format, or with other features."""


def manifest_fingerprint(manifest: dict) -> str:
    """The fingerprint of a model from its manifest, for callers that have read it already."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


class FeatureBank:
    """The patch features of every nominal image a model root has seen, batch by batch."""

    def __init__(self, root: str):
        self.root = str(root).rstrip("/")
        self.url = join(self.root, "bank")

    def batch_name(self, batch: int, kind: str = TRAIN) -> str:
        return f"{kind}-{batch:05d}"

    def _group(self, mode: str = "a") -> zarr.Group:
        return zarr.open_group(self.url, mode=mode, zarr_format=3)

    def write_batch(self, batch: int, vectors: np.ndarray, index_rows: list[dict], rows_per_chunk: int,
                    kind: str = TRAIN, outcome: dict | None = None) -> None:
        """Write one batch's patch vectors, its ``outcome`` (counts, skipped files, large images
        left for tiling: what a resumed fit needs without running the batch again), then its
        index part (the part marks it complete)."""
        array = self._group().create_array(
            self.batch_name(batch, kind), shape=vectors.shape, dtype="float32",
            chunks=(max(1, min(rows_per_chunk, len(vectors))), vectors.shape[1]), overwrite=True)
        array[...] = vectors
        if outcome is not None:
            write_json(join(self.url, "outcomes", f"{self.batch_name(batch, kind)}.json"), outcome)
        write_parquet(join(self.url, "index", f"{self.batch_name(batch, kind)}.parquet"),
                      pd.DataFrame(index_rows, columns=BANK_INDEX_COLUMNS))

    def outcome(self, batch: int, kind: str = TRAIN) -> dict | None:
        url = join(self.url, "outcomes", f"{self.batch_name(batch, kind)}.json")
        return read_json(url) if exists(url) else None

    def batches(self, kind: str = TRAIN) -> list[int]:
        """Complete batches of one kind (their index part, written last, exists), from one listing."""
        return sorted(numbered_parts(join(self.url, "index"), kind))

    def next_batch(self) -> int:
        """The number after every batch of either kind: appended batches never reuse one."""
        return max(self.batches(TRAIN) + self.batches(HOLDOUT), default=-1) + 1

    def index(self, kind: str | None = None) -> pd.DataFrame:
        """Which rows of which batch array belong to which image (complete batches only), with
        a ``kind`` column; one kind or both."""
        frames = [read_parquet_parts(self.url, sorted(numbered_parts(join(self.url, "index"), part_kind).values()))
                  .assign(kind=part_kind) for part_kind in ([kind] if kind else [TRAIN, HOLDOUT])]
        frames = [f for f in frames if len(f)]
        if not frames:
            return pd.DataFrame(columns=[*BANK_INDEX_COLUMNS, "kind"])
        return pd.concat(frames, ignore_index=True)

    def read_batch(self, batch: int, kind: str = TRAIN) -> np.ndarray:
        return self._group(mode="r")[self.batch_name(batch, kind)][...]

    def iter_batches(self, batches: list[int], kind: str = TRAIN):
        """Stream batch arrays one at a time: (batch, vectors)."""
        for batch in batches:
            yield batch, self.read_batch(batch, kind)

    def rows_per_batch(self, batches: list[int], kind: str = TRAIN) -> dict[int, int]:
        group = self._group(mode="r")
        return {batch: group[self.batch_name(batch, kind)].shape[0] for batch in batches}

    def dim(self, batch: int, kind: str = TRAIN) -> int:
        return self._group(mode="r")[self.batch_name(batch, kind)].shape[1]

    # the feature settings every batch was made with: appending with others would mix spaces
    def settings(self) -> dict | None:
        if not exists(join(self.url, "zarr.json")):
            return None
        return self._group(mode="r").attrs.asdict().get("settings")

    def claim(self, settings: dict) -> None:
        """Record the bank's feature settings, or refuse settings other than the recorded ones."""
        settings = json.loads(json.dumps(settings))  # tuples -> lists, as stored
        recorded = self.settings()
        if recorded is None:
            self._group().attrs["settings"] = settings
            return
        there, asked = _flatten(recorded), _flatten(settings)
        changed = sorted(k for k in set(there) | set(asked) if there.get(k) != asked.get(k))
        if changed:
            raise IncompatibleModelError(
                f"the feature bank at {self.url} was made with other feature settings: "
                + "; ".join(f"{k} is {there.get(k)!r} there, {asked.get(k)!r} asked" for k in changed)
                + ". Fit into a new root to use other feature settings")


def _flatten(settings: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class ModelStore:
    """One model version's files (see the module docstring)."""

    def __init__(self, root: str):
        self.root = str(root).rstrip("/")

    @property
    def version(self) -> str:
        return posixpath.basename(self.root)

    def write_memory(self, memory: np.ndarray, attributes: dict | None = None) -> None:
        array = zarr.create_array(join(self.root, "memory"), shape=memory.shape, dtype="float32",
                                  chunks=(min(65536, max(1, len(memory))), memory.shape[1]),
                                  overwrite=True, zarr_format=3)
        array[...] = memory
        if attributes:
            array.attrs.update(attributes)

    def read_memory(self, manifest: dict | None = None) -> np.ndarray:
        """The memory; with ``manifest``, its shape is checked (from the metadata) before the read."""
        array = zarr.open_array(join(self.root, "memory"), mode="r", zarr_format=3)
        if manifest is not None:
            from .model_checks import check_memory

            check_memory(self.root, array, manifest)
        return array[...]

    def write_index(self, index: "faiss.Index") -> None:
        import faiss  # here, not at import: 'patchwatch models' and 'promote' need no faiss

        write_bytes_atomically(join(self.root, "memory.faiss"), faiss.serialize_index(index).tobytes())

    def read_index(self, manifest: dict | None = None) -> "faiss.Index":
        import faiss

        if manifest is not None:
            self.check_index(manifest)
        return faiss.deserialize_index(np.frombuffer(read_bytes(join(self.root, "memory.faiss")), dtype=np.uint8))

    def write_arrays(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_bytes_atomically(join(self.root, f"{name}.npz"), buffer.getvalue())

    def check_index(self, manifest: dict) -> None:
        """The index file's header and size against the manifest, reading its first bytes only."""
        from .locations import filesystem
        from .model_checks import FLAT_HEADER, check_index

        fs, path = filesystem(join(self.root, "memory.faiss"))
        with fs.open(path, "rb") as handle:
            header = handle.read(FLAT_HEADER.size)
        check_index(self.root, header, fs.size(path), manifest)

    def check_arrays(self, manifest: dict) -> None:
        """The detector's stored arrays against the manifest, from their metadata (nothing is read
        whole): a version whose arrays do not match it is refused before any work."""
        from .locations import filesystem
        from .model_checks import check_detector_arrays, check_memory, npz_shapes

        detector = manifest.get("detector", "patchcore")
        if detector == "patchcore":
            check_memory(self.root, zarr.open_array(join(self.root, "memory"), mode="r", zarr_format=3), manifest)
            self.check_index(manifest)
            return
        fs, path = filesystem(join(self.root, "detector.npz"))
        with fs.open(path, "rb") as handle:
            check_detector_arrays(self.root, npz_shapes(handle), manifest, detector)

    def read_arrays(self, name: str) -> dict[str, np.ndarray]:
        # allow_pickle=False: a model file must never be able to run code when loaded
        with np.load(io.BytesIO(read_bytes(join(self.root, f"{name}.npz"))), allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    def write_table(self, name: str, frame: pd.DataFrame) -> None:
        write_parquet(join(self.root, f"{name}.parquet"), frame)

    def read_table(self, name: str) -> pd.DataFrame | None:
        url = join(self.root, f"{name}.parquet")
        return read_parquet(url) if exists(url) else None

    def write_manifest(self, manifest: dict) -> None:
        write_json(join(self.root, "manifest.json"), {"format_version": FORMAT_VERSION, **manifest})

    def is_complete(self) -> bool:
        return exists(join(self.root, "manifest.json"))

    def read_manifest(self) -> dict:
        url = join(self.root, "manifest.json")
        if not exists(url):
            raise FileNotFoundError(f"no complete model at {self.root} (missing manifest.json)")
        manifest = read_json(url)
        version = manifest.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise IncompatibleModelError(
                f"model at {self.root} has format version {version!r}; this patchwatch reads "
                f"versions up to {FORMAT_VERSION}: upgrade patchwatch or re-fit")
        from .model_checks import check_manifest

        check_manifest(manifest, self.root)  # stored settings are data: ranges checked before any use
        return manifest

    def fingerprint(self) -> str:
        return manifest_fingerprint(self.read_manifest())

    def write_metrics(self, metrics: dict) -> None:
        write_json(join(self.root, "metrics.json"), metrics)

    def read_metrics(self) -> dict | None:
        url = join(self.root, "metrics.json")
        return read_json(url) if exists(url) else None


class ModelRegistry:
    """The versions under one model root and the ``current`` pointer."""

    def __init__(self, root: str):
        self.root = str(root).rstrip("/")
        self.bank = FeatureBank(self.root)

    def _pointer(self) -> str:
        return join(self.root, "current.json")

    def fit_lease(self, seconds: float | None = None) -> Lease:
        """The lease a fit holds on this root for as long as it runs: a second fit is refused."""
        return Lease(join(self.root, "locks"), "fit", "fit", seconds)

    def model(self, version: str) -> ModelStore:
        if not VERSION_PATTERN.match(version):
            raise ValueError(f"{version!r} is not a version name (v0001, v0002, ...)")
        return ModelStore(join(self.root, "versions", version))

    def versions(self) -> list[str]:
        """Every version folder, complete or not, oldest first."""
        names = [posixpath.basename(p.rstrip("/")) for p in list_dir(join(self.root, "versions"))]
        return sorted((n for n in names if VERSION_PATTERN.match(n)), key=lambda n: int(n[1:]))

    def complete_versions(self) -> list[str]:
        return [v for v in self.versions() if self.model(v).is_complete()]

    def new_version(self) -> ModelStore:
        """A folder for the next version. An unfinished one left by a killed fit is reused: it was
        never current and nothing refers to it."""
        versions = self.versions()
        if versions and not self.model(versions[-1]).is_complete():
            return self.model(versions[-1])
        number = int(versions[-1][1:]) + 1 if versions else 1
        return self.model(f"v{number:04d}")

    def current(self) -> str | None:
        url = self._pointer()
        return read_json(url)["version"] if exists(url) else None

    def promote(self, version: str) -> dict:
        """Point ``current`` at ``version`` (complete versions only), in one atomic write: a reader
        sees the old pointer or the new one, and either names a complete version."""
        versions = self.versions()
        if version not in versions:  # a typo, or the wrong root: say which versions there are
            raise LookupError(f"no such version {version} at {self.root}; "
                              + (f"its versions: {', '.join(versions)} (current {self.current()})" if versions
                                 else "it holds no versions: run 'patchwatch fit' first"))
        model = self.model(version)
        if not model.is_complete():
            raise ValueError(f"version {version} at {self.root} is not complete (no manifest.json): cannot promote it")
        model.read_manifest()  # refuses versions this patchwatch cannot read
        pointer = {"version": version, "previous": self.current(),
                   "promoted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_json(self._pointer(), pointer)
        return pointer

    def resolve(self, version: str | None = None) -> ModelStore:
        """The model to score with: ``version``, or the current one."""
        version = version or self.current()
        if version is None:
            raise FileNotFoundError(f"no fitted model at {self.root} (no current version): run 'patchwatch fit' first")
        model = self.model(version)
        model.check_arrays(model.read_manifest())  # a missing, incompatible or inconsistent model fails here, clearly
        return model
