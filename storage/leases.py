"""Leases: one writer at a time on a model root, on a folder or on S3, without a lock server.

A lease is a numbered JSON object ``ROOT/locks/NAME-NNNNN.json`` (holder, host, pid, expiry).
Taking the lease means *creating* the next number, exclusively: a local file is linked into
place (``link`` fails if the name exists), an S3 object is put with ``If-None-Match: *`` (the
conditional PUT that S3 and moto honour; s3fs sends it for ``pipe_file(mode="create")``). Of
two processes that race for the same number exactly one wins, whatever the timing.

The highest number is the lease in force. It is free when its holder released it, when it
expired (the holder renews it from a background thread every quarter of its term: a holder
that stopped renewing has died or hung), or when its holder is a process of this host that no
longer exists (a killed fit must not block the next for a whole term). A holder that finds a
higher number than its own has lost the lease (it expired while the holder hung) and must not
commit anything: :meth:`Lease.check`.
"""
from __future__ import annotations

import json
import os
import posixpath
import socket
import threading
import time
import uuid

from .locations import filesystem, is_local, join, numbered_parts, read_json, write_json

ENV = "PATCHWATCH_LEASE_SECONDS"
DEFAULT_SECONDS = 300.0


class LeaseHeldError(RuntimeError):
    """Another process holds the lease."""


class LeaseLostError(RuntimeError):
    """This process's lease expired and another process took it over."""


def lease_seconds() -> float:
    text = os.environ.get(ENV, "").strip()
    try:
        seconds = float(text) if text else DEFAULT_SECONDS
    except ValueError:
        raise ValueError(f"{ENV}={text!r}: expected seconds, e.g. 300") from None
    if seconds <= 0:
        raise ValueError(f"{ENV}={text!r}: expected a positive number of seconds")
    return seconds


def create_exclusively(url: str, data: bytes) -> None:
    """Write ``url`` whole, only if nothing is there yet; FileExistsError if something is.

    Atomic on a local folder (the bytes go to a temporary name that is hard-linked into place)
    and on S3 (conditional PUT). Other fsspec stores get fsspec's ``mode="create"``, which
    checks and writes in two steps.
    """
    fs, path = filesystem(url)
    if is_local(url):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        temporary = f"{path}.{uuid.uuid4().hex}.partial"
        with open(temporary, "wb") as handle:
            handle.write(data)
        try:
            os.link(temporary, path)
        finally:
            os.unlink(temporary)
    else:
        fs.pipe_file(path, data, mode="create")


def _now() -> float:
    return time.time()


def _stamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class Lease:
    """The lease ``NAME`` on the locations below ``url`` (use it as a context manager)."""

    def __init__(self, url: str, name: str, purpose: str, seconds: float | None = None):
        self.url = str(url).rstrip("/")
        self.name = name
        self.purpose = purpose  # for the message a refused process prints
        self.seconds = float(seconds) if seconds is not None else lease_seconds()
        self.token = uuid.uuid4().hex
        self.number: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None

    # ------------------------------------------------------------------ reading
    def _numbers(self) -> dict[int, str]:
        return numbered_parts(self.url, self.name, ".json")

    def _path(self, number: int) -> str:
        return join(self.url, f"{self.name}-{number:05d}.json")

    def holder(self) -> dict | None:
        """The record of the lease in force (the highest number) if someone holds it, else None."""
        for _ in range(5):  # the newest may be removed under us by a taker cleaning up: list again
            numbers = self._numbers()
            if not numbers:
                return None
            try:
                record = read_json(self._path(max(numbers)))
            except FileNotFoundError:
                continue
            return record if self._active(record) else None
        return None

    @staticmethod
    def _active(record: dict) -> bool:
        if record.get("released"):
            return False
        if float(record.get("expires", 0)) <= _now():
            return False
        if record.get("host") == socket.gethostname() and not _process_alive(int(record.get("pid", -1))):
            return False  # killed: no need to wait for its term to run out
        return True

    def _record(self, **extra) -> bytes:
        now = _now()
        return json.dumps({"holder": self.token, "purpose": self.purpose, "host": socket.gethostname(),
                           "pid": os.getpid(), "acquired": self._acquired, "renewed": _stamp(now),
                           "expires": now + self.seconds, "expires_at": _stamp(now + self.seconds),
                           **extra}, indent=2).encode()

    # ------------------------------------------------------------------ taking and giving back
    def acquire(self) -> "Lease":
        self._acquired = _stamp(_now())
        for _ in range(5):
            numbers = self._numbers()
            latest = max(numbers, default=0)
            if numbers:
                try:
                    record = read_json(self._path(latest))
                except FileNotFoundError:
                    continue  # cleaned up by a taker just now: look again
                if self._active(record):
                    raise LeaseHeldError(self._held_message(record))
            try:
                create_exclusively(self._path(latest + 1), self._record())
            except FileExistsError:
                continue  # another process took this number first: see who holds it now
            self.number = latest + 1
            self._remove_older()
            self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.name}", daemon=True)
            self._thread.start()
            return self
        holder = self.holder()
        raise LeaseHeldError(self._held_message(holder) if holder else
                             f"{self.url}: could not take the {self.name} lease (other processes kept taking it)")

    def _held_message(self, record: dict) -> str:
        return (f"{posixpath.dirname(self.url)} is locked by another {record.get('purpose', self.name)} "
                f"(host {record.get('host')}, pid {record.get('pid')}, since {record.get('acquired')}, "
                f"lease renewed until {record.get('expires_at')}): try again when it has finished")

    def _remove_older(self) -> None:
        fs, _ = filesystem(self.url)
        for number, path in self._numbers().items():
            if number < self.number:
                try:
                    fs.rm(path)
                except FileNotFoundError:
                    pass

    def _superseded(self) -> bool:
        return max(self._numbers(), default=0) > self.number

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.seconds / 4):
            try:
                if self._superseded():
                    self._lost = "another process took the lease over after it expired"
                    return
                write_json(self._path(self.number), json.loads(self._record()))
            except Exception as error:  # a storage hiccup: the next renewal tries again; check() decides
                self._last_error = error

    def check(self) -> None:
        """Raise :class:`LeaseLostError` unless this process still holds the lease: call it right
        before a write that commits (a manifest, the ``current`` pointer)."""
        if self.number is None:
            raise LeaseLostError(f"{self.url}: the {self.name} lease was never taken")
        if self._lost is None and self._superseded():
            self._lost = "another process took the lease over after it expired"
        if self._lost is None:
            record = read_json(self._path(self.number))
            if record.get("holder") != self.token or float(record["expires"]) <= _now():
                self._lost = "it expired (renewals failed or the process hung)"
        if self._lost:
            raise LeaseLostError(f"{posixpath.dirname(self.url)}: this {self.purpose} lost its lock ({self._lost}); "
                                 "nothing was committed")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.number is not None and not self._lost and not self._superseded():
            write_json(self._path(self.number), {**json.loads(self._record()), "released": _stamp(_now())})
        self.number = None

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
