"""Task retry delays, overridable by the environment.

``PATCHWATCH_RETRY_DELAYS`` (comma-separated seconds, e.g. ``0.5,1,2``) replaces every task's
default delays: tests of storage outages must not wait 2 + 10 + 30 s per task, and an operator
may want longer waits for a flaky object store. The number of retries stays each task's own; a
list shorter than that repeats its last value. Read when the task modules are imported, in the
flow process and in each Dask worker: set it in the environment of both.
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
