"""URL helpers shared by the stores."""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import posixpath
import re
import uuid

import fsspec
from fsspec.core import split_protocol, url_to_fs

# errors that no retry can mend: the same call fails the same way again
DETERMINISTIC_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT,
                        errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EFBIG}


# --------------------------------------------------------------------------- URLs as text

# scheme://user[:password]@ : the credentials part of a URL
_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.\-]*://)([^/@\s:]*)(:[^/@\s]*)?@")
# C0/C1 control characters and Unicode line breaks: a name holding them could forge log lines
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def has_credentials(url: str) -> bool:
    """Whether ``url`` carries a user name or password (``scheme://user:secret@host/...``)."""
    return bool(_USERINFO.search(str(url)))


def redact(text: str) -> str:
    """``text`` with the credentials of every URL in it masked: ``user:***@`` (``***@`` for a
    user name alone, which is often a token)."""
    return _USERINFO.sub(lambda m: f"{m[1]}{m[2]}:***@" if m[3] else f"{m[1]}***@", str(text))


def escape_controls(text: str) -> str:
    """``text`` with newlines and other control characters written as escapes (``\\n``)."""
    return _CONTROLS.sub(lambda m: m[0].encode("unicode_escape").decode("ascii"), str(text))


def for_log(text) -> str:
    """What may be printed of a URL, path or message: credentials masked, controls escaped."""
    return escape_controls(redact(text))


def absolute(url: str | None) -> str | None:
    """A local path made absolute (it is resolved by processes with other working directories:
    Dask workers, deployments); URLs unchanged."""
    if url is None or "://" in str(url):
        return url
    return os.path.abspath(os.path.expanduser(str(url)))


def location(url: str) -> tuple[str, str]:
    """(protocol, normalised path) of a URL or local path, without touching the store:
    ``..`` resolved lexically, local paths absolute."""
    protocol, path = split_protocol(str(url))
    protocol = protocol or "file"
    if protocol in ("file", "local"):
        return "file", os.path.normpath(os.path.abspath(path))
    return protocol, posixpath.normpath(path).lstrip("/")


def is_below(url: str, prefix: str) -> bool:
    """Whether ``url`` is ``prefix`` or inside it (same protocol, whole path components)."""
    (protocol, path), (prefix_protocol, prefix_path) = location(url), location(prefix)
    if protocol != prefix_protocol:
        return False
    prefix_path = prefix_path.rstrip("/")
    return path == prefix_path or path.startswith(prefix_path + "/") or prefix_path in ("", "/")


def join(url: str, *parts: str) -> str:
    """Join path parts onto a local path or URL."""
    url = str(url).rstrip("/")
    return "/".join([url, *[p.strip("/") for p in parts if p]])


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a URL or local path."""
    return url_to_fs(str(url))


def is_local(url: str) -> bool:
    return is_local_filesystem(filesystem(url)[0])


def is_local_filesystem(fs) -> bool:
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
    try:
        if is_local(url):
            # object stores have no folders, and s3fs's makedirs creates a missing bucket: a
            # results bucket deleted mid-run would silently come back
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
            temporary = f"{path}.{uuid.uuid4().hex}.partial"  # unique: concurrent writers never interleave
            try:
                with fs.open(temporary, "wb") as handle:
                    handle.write(data)
            except BaseException:
                with contextlib.suppress(OSError):
                    fs.rm(temporary)
                raise
            fs.mv(temporary, path)
        else:
            fs.pipe_file(path, data)
    except OSError as error:
        if error.filename or error.errno is None:
            raise
        # a full disk says only "No space left on device": name what could not be written
        try:
            named = type(error)(error.errno, error.strerror, redact(url))
        except Exception:  # an OSError subclass with a constructor of its own
            raise error from None
        raise named from error


def write_parquet(url: str, frame) -> str:
    """A table as one Parquet object, written whole or not at all; returns ``url``."""
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    write_bytes_atomically(url, buffer.getvalue())
    return url


def read_parquet(url: str, columns: list[str] | None = None):
    import pandas as pd

    return pd.read_parquet(io.BytesIO(read_bytes(url)), columns=columns)


def parquet_rows(url: str, path: str) -> int:
    """Rows of the Parquet file at ``path`` (as listed below ``url``), read from its footer alone."""
    import pyarrow.parquet as pq

    fs, _ = filesystem(url)
    with fs.open(path, "rb") as handle:
        return pq.ParquetFile(handle).metadata.num_rows


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


# --------------------------------------------------------------------------- remote stores

S3_PROTOCOLS = ("s3", "s3a")


def _s3_probe_filesystem():
    """An s3fs filesystem configured like the run's (fsspec config: ``FSSPEC_S3``), but trying once."""
    import s3fs

    conf = dict(fsspec.config.conf.get("s3", {}))
    config_kwargs = {"connect_timeout": s3fs.S3FileSystem.connect_timeout,
                     "read_timeout": s3fs.S3FileSystem.read_timeout, **conf.pop("config_kwargs", {}),
                     "retries": {"max_attempts": 1, "mode": "standard"}}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, config_kwargs=config_kwargs, **conf)
    fs.retries = 1  # s3fs's own retry loop around botocore's: a probe asks once
    return fs, config_kwargs


def _endpoint(fs) -> str:
    endpoint = (fs.client_kwargs or {}).get("endpoint_url") or fs.kwargs.get("endpoint_url")
    if not endpoint:
        with contextlib.suppress(Exception):
            endpoint = fs.s3.meta.endpoint_url
    return endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def check_store(url: str) -> None:
    """Fail fast, with one line naming the store, when an object store cannot be used: access
    denied (wrong keys) -> PermissionError; an endpoint that refuses or never answers ->
    ConnectionError after one bounded try (connect + read timeout) instead of minutes of
    retries. Local paths and stores other than S3 are left to the run."""
    protocol, _ = split_protocol(str(url))
    if protocol not in S3_PROTOCOLS:
        return
    from botocore.exceptions import BotoCoreError

    fs, config = _s3_probe_filesystem()
    bucket, key, _ = fs.split_path(str(url))
    shown = f"s3://{bucket}"
    try:
        fs.ls(f"{bucket}/{key}".rstrip("/"), detail=False)
    except FileNotFoundError:  # a root not written yet; a missing bucket is named by the run
        return
    except PermissionError as error:
        raise PermissionError(f"access to {shown} denied by {_endpoint(fs)} ({_one_line(error)}): check the "
                              "credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE)") from None
    except (BotoCoreError, TimeoutError, OSError) as error:
        name = type(error).__name__
        if "Timeout" in name or isinstance(error, TimeoutError):
            why = (f"did not answer within {config['connect_timeout'] + config['read_timeout']:g} s "
                   f"(connect {config['connect_timeout']:g} s + read {config['read_timeout']:g} s)")
        else:
            why = f"cannot be reached ({name}: {_one_line(error)})"
        raise ConnectionError(f"S3 endpoint {_endpoint(fs)} {why}, for {shown}") from None


def _one_line(error: BaseException, limit: int = 160) -> str:
    text = for_log(" ".join(str(error).split())) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
