"""Task retry delays, overridable by the environment, and which failures are worth a retry.

``PATCHWATCH_RETRY_DELAYS`` (comma-separated seconds, e.g. ``0.5,1,2``) replaces every task's
default delays: tests of storage outages must not wait 2 + 10 + 30 s per task, and an operator
may want longer waits for a flaky object store. The number of retries stays each task's own; a
list shorter than that repeats its last value. Read when the task modules are imported, in the
flow process and in each Dask worker: set it in the environment of both.

Retries are for failures that may pass (a dropped connection, a throttled object store). A
deterministic failure (a CSV that does not parse, a missing file, permission denied, a full
disk, a programming error) fails the same way again: :func:`transient` tells Prefect not to
retry it (every task with retries passes it as ``retry_condition_fn``).
"""
from __future__ import annotations

import os

ENV = "PATCHWATCH_RETRY_DELAYS"


def retry_delays(*default: float) -> list[float]:
    text = os.environ.get(ENV, "").strip()
    if not text:
        return list(default)
    try:
        delays = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{ENV}={text!r}: expected comma-separated seconds, e.g. 0.5,1,2") from None
    if not delays or any(d < 0 for d in delays):
        raise ValueError(f"{ENV}={text!r}: expected comma-separated non-negative seconds")
    return delays


def is_deterministic(error: BaseException) -> bool:
    """Whether ``error`` would recur on a retry."""
    from storage.locations import DETERMINISTIC_ERRNOS

    if isinstance(error, (ValueError, TypeError, KeyError, AttributeError, NotImplementedError,
                          FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return True
    return isinstance(error, OSError) and error.errno in DETERMINISTIC_ERRNOS


def transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry unless the failure is deterministic."""
    error = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return not (isinstance(error, BaseException) and is_deterministic(error))
