"""URL helpers shared by the stores."""
from __future__ import annotations

import io
import json
import posixpath
import uuid

import fsspec
from fsspec.core import url_to_fs


def join(url: str, *parts: str) -> str:
    """Join path parts onto a local path or URL."""
    url = str(url).rstrip("/")
    return "/".join([url, *[p.strip("/") for p in parts if p]])


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a URL or local path."""
    return url_to_fs(str(url))


def is_local(url: str) -> bool:
    fs, _ = filesystem(url)
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def numbered_parts(url: str, prefix: str, suffix: str = ".parquet") -> dict[int, str]:
    """{number: path} of the files ``PREFIX-NNNNN SUFFIX`` directly below ``url``, listed afresh."""
    parts = {}
    for path in list_dir(url):
        name = posixpath.basename(path)
        number = name[len(prefix) + 1:-len(suffix)]
        if name.startswith(prefix + "-") and name.endswith(suffix) and number.isdigit():
            parts[int(number)] = path
    return parts


def remove_numbered_parts(url: str, prefix: str, first: int) -> None:
    """Remove the parts numbered ``first`` and up (left by an earlier, larger run)."""
    fs, _ = filesystem(url)
    for number, path in numbered_parts(url, prefix).items():
        if number >= first:
            fs.rm(path)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    # fresh answer: s3fs decides from a cached listing of the parent folder when it has one,
    # which misses objects written since by other processes (the Dask workers)
    fs.invalidate_cache(path)
    return fs.exists(path)


def list_dir(url: str) -> list[str]:
    """Paths directly below ``url`` (none if it does not exist), listed afresh.

    Filesystem instances are shared per process and object-store listings are cached with no
    expiry, so a long-lived process (flow runner, Dask worker) would otherwise keep seeing the
    listing from before other processes wrote their parts.
    """
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    return fs.ls(path, detail=False)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)


def write_bytes_atomically(url: str, data: bytes) -> None:
    """Write so that a reader sees the old object or the whole new one, never a part.

    Object stores replace an object atomically on PUT; a local file is written to a temporary
    name and renamed over the target.
    """
    fs, path = filesystem(url)
    if is_local(url):
        # object stores have no folders, and s3fs's makedirs creates a missing bucket: a
        # results bucket deleted mid-run would silently come back
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        temporary = f"{path}.{uuid.uuid4().hex}.partial"  # unique: concurrent writers never interleave
        with fs.open(temporary, "wb") as handle:
            handle.write(data)
        fs.mv(temporary, path)
    else:
        fs.pipe_file(path, data)


def write_parquet(url: str, frame) -> str:
    """A table as one Parquet object, written whole or not at all; returns ``url``."""
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    write_bytes_atomically(url, buffer.getvalue())
    return url


def read_parquet(url: str, columns: list[str] | None = None):
    import pandas as pd

    return pd.read_parquet(io.BytesIO(read_bytes(url)), columns=columns)


def read_parquet_parts(url: str, paths, columns: list[str] | None = None):
    """The non-empty tables at ``paths`` (as listed below ``url``, in its filesystem's own path
    form) concatenated; an empty frame when there are none."""
    import pandas as pd

    fs, _ = filesystem(url)
    frames = [pd.read_parquet(io.BytesIO(fs.cat_file(p)), columns=columns) for p in paths]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def write_json(url: str, payload: dict) -> None:
    write_bytes_atomically(url, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())


def read_json(url: str) -> dict:
    return json.loads(read_bytes(url))


def open_file(url: str, mode: str = "rb"):
    return fsspec.open(str(url), mode)
