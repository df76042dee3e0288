"""Scoring results under one root URL.

    RESULTS/maps/<image_id>      Zarr v3 array per image, (height, width) float32 at the image's
                                 original size, chunked in 512 x 512 tiles
    RESULTS/scores/part-*.parquet the score table, one part per work batch
    RESULTS/errors/part-*.parquet files that could not be scored, with the reason
    RESULTS/summary.json          counts, timings and metrics of the run

Maps are one array per image because images differ in size; large maps are chunked so that a
viewer reads only the tiles it shows.

Nightly scoring keeps one such result root per night, and a history of nightly summaries:

    RESULTS/nights/YYYY-MM-DD/    a result root (maps, score parts, scores.parquet, summary)
    RESULTS/history/YYYY-MM-DD.parquet   that night's summary row (counts, quantiles, flagged)
"""
from __future__ import annotations

import hashlib
import posixpath
import re

import numpy as np
import pandas as pd
import zarr

from .locations import (exists, join, list_dir, numbered_parts, read_json, read_parquet_parts, remove_numbered_parts,
                        write_bytes_atomically, write_json, write_parquet)

MAP_CHUNK = 512


def part_name(number: int) -> str:
    """The name of a numbered table part (one per work batch)."""
    return f"part-{number:05d}"


def map_key(image_id: str) -> str:
    """A Zarr node path for an image id: nested by its folders, with unsafe characters replaced.

    When anything had to be replaced, a short hash of the id is appended, so ids that differ
    only in such characters ("a b.png", "a_b.png") never share a map.
    """
    raw = [p for p in image_id.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    parts = [re.sub(r"[^\w.\-]", "_", p) or "_" for p in raw]
    parts = [("_" + p) if p.startswith("__") else p for p in parts]
    if parts != raw or not parts:
        digest = hashlib.sha1(image_id.encode()).hexdigest()[:8]
        parts = (parts or ["_"])[:-1] + [f"{(parts or ['_'])[-1]}-{digest}"]
    return "/".join(parts)


class ResultStore:
    def __init__(self, root: str):
        self.root = str(root).rstrip("/")

    def map_url(self, image_id: str) -> str:
        return join(self.root, "maps", map_key(image_id))

    def write_map(self, image_id: str, anomaly_map: np.ndarray) -> str:
        array = zarr.create_array(self.map_url(image_id), shape=anomaly_map.shape, dtype="float32",
                                  chunks=tuple(min(MAP_CHUNK, s) for s in anomaly_map.shape),
                                  overwrite=True, zarr_format=3)
        array[...] = anomaly_map.astype(np.float32, copy=False)
        return self.map_url(image_id)

    def create_map(self, image_id: str, shape: tuple[int, int], chunk: int = MAP_CHUNK) -> zarr.Array:
        """An empty map to be filled region by region (tiled scoring of large images)."""
        return zarr.create_array(self.map_url(image_id), shape=shape, dtype="float32",
                                 chunks=(min(chunk, shape[0]), min(chunk, shape[1])), fill_value=0.0,
                                 overwrite=True, zarr_format=3)

    def read_map(self, image_id: str) -> np.ndarray:
        return zarr.open_array(self.map_url(image_id), mode="r", zarr_format=3)[...]

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

    def done(self, version: str) -> set[str]:
        """URIs scored (or found unusable) by ``version`` on any night: they are not scored again."""
        parts = [path for night in self.nights() for table in ("scores", "errors")
                 for path in numbered_parts(join(self.root, "nights", night, table), "part").values()]
        frame = read_parquet_parts(self.root, parts, columns=["uri", "model_version"])
        return set(frame.uri[frame.model_version == version]) if len(frame) else set()

    def write_history(self, date: str, row: dict) -> None:
        write_parquet(join(self.root, "history", f"{date}.parquet"), pd.DataFrame([row]))

    def history(self) -> pd.DataFrame:
        return read_parquet_parts(self.root, sorted(p for p in list_dir(join(self.root, "history"))
                                                    if p.endswith(".parquet")))
