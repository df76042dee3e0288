"""Dask worker plugins, in a module of their own: importing distributed takes a while, and
flows.runner is imported by commands that start no cluster ('patchwatch models', 'promote')."""
from __future__ import annotations

import logging
import weakref

from distributed.core import Status
from distributed.diagnostics.plugin import WorkerPlugin

# distributed.worker.Worker.heartbeat's message when the scheduler cannot be reached
HEARTBEAT_FAILED = "Failed to communicate with scheduler during heartbeat"


class WorkerLogging(WorkerPlugin):
    """What every worker of a cluster (local or remote, present and future) logs: the log
    sanitiser (task logs are written there), and no heartbeat failure from a closing worker."""

    name = "patchwatch-worker-logging"

    def setup(self, worker):
        from patchwatch.flows.runner import install_log_sanitiser

        install_log_sanitiser()
        _closing_heartbeats.workers.add(worker)
        logging.getLogger("distributed.worker").addFilter(_closing_heartbeats)

    def teardown(self, worker):
        _closing_heartbeats.workers.discard(worker)


class _ClosingHeartbeats(logging.Filter):
    """Drops a heartbeat's failure while this process's workers are all closing: a heartbeat in
    flight when a worker closes its connections fails with a traceback (dask/distributed#7105,
    seen at the end of a failed run's output) that says nothing about the run. While a worker
    runs, the failure is a lost scheduler and is logged as distributed logs it."""

    def __init__(self):
        super().__init__()
        self.workers = weakref.WeakSet()

    def filter(self, record: logging.LogRecord) -> bool:
        if not (record.exc_info and isinstance(record.exc_info[1], OSError)
                and record.getMessage().startswith(HEARTBEAT_FAILED)):
            return True
        return any(worker.status in (Status.running, Status.paused) for worker in self.workers)


# one per process (a process may hold several workers; adding it twice to a logger is a no-op)
_closing_heartbeats = _ClosingHeartbeats()
