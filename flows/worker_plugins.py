"""Dask worker plugins, in a module of their own: importing distributed takes a while, and
flows.runner is imported by commands that start no cluster ('patchwatch models', 'promote')."""
from __future__ import annotations

from distributed.diagnostics.plugin import WorkerPlugin


class LogSanitiser(WorkerPlugin):
    """Installs the log sanitiser in every worker of a cluster (local or remote, present and
    future): task logs are written there."""

    name = "patchwatch-log-sanitiser"

    def setup(self, worker):
        from patchwatch.flows.runner import install_log_sanitiser

        install_log_sanitiser()
