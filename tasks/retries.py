"""Task retry delays, overridable by the environment, and which failures are worth a retry.

Each retried task waits one number of seconds between tries (the Prefect UI's task panel shows
it; a back-off list showed "Retry Delay: NaNs" there). Throttling by the object store is already
backed off by s3fs/botocore inside each call; these retries are for what outlasts that.
``PATCHWATCH_RETRY_DELAY`` (seconds, e.g. ``0.5``) replaces every task's default delay: tests of
storage outages must not wait 10 s per try, and an operator may want longer waits for a flaky
object store. The number of retries stays each task's own. Read when the task modules are
imported, in the flow process and in each Dask worker: set it in the environment of both.

Retries are for failures that may pass (a dropped connection, a throttled object store). A
deterministic failure (a CSV that does not parse, a missing file, permission denied, a full
disk, a programming error) fails the same way again: :func:`transient` tells Prefect not to
retry it (every task with retries passes it as ``retry_condition_fn``).
"""
from __future__ import annotations

import os

ENV = "PATCHWATCH_RETRY_DELAY"


def retry_delay(default: float) -> float:
    text = os.environ.get(ENV, "").strip()
    if not text:
        return default
    try:
        delay = float(text)
    except ValueError:
        raise ValueError(f"{ENV}={text!r}: expected seconds, e.g. 0.5") from None
    if not delay >= 0:
        raise ValueError(f"{ENV}={text!r}: expected non-negative seconds")
    return delay


def is_deterministic(error: BaseException) -> bool:
    """Whether ``error`` would recur on a retry."""
    from patchwatch.storage.locations import DETERMINISTIC_ERRNOS

    if isinstance(error, (ValueError, TypeError, KeyError, AttributeError, NotImplementedError,
                          FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return True
    return isinstance(error, OSError) and error.errno in DETERMINISTIC_ERRNOS


def transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry unless the failure is deterministic."""
    error = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return not (isinstance(error, BaseException) and is_deterministic(error))
