"""One Dask scheduler + one single-threaded worker, shared by a test module's CLI calls
(``--dask-address``): the backbone loads once, and each call skips starting a cluster."""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

from .servers import stop_process_group

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def dask_cluster(work: Path, env: dict, worker_prefix: tuple[str, ...] = (), nanny: bool = True):
    """Yield the scheduler address; both processes are ended by their own process-group ids.
    ``worker_prefix``: a command the worker runs under (e.g. one that drops privileges)."""
    scheduler_file = work / "scheduler.json"
    commands = [
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
         "--no-dashboard", "--scheduler-file", str(scheduler_file)],
        [*worker_prefix, sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
         str(scheduler_file), "--nthreads", "1", "--no-dashboard", *([] if nanny else ["--no-nanny"])],
    ]
    processes = []
    try:
        for command in commands:
            processes.append(subprocess.Popen(command, env=env, cwd=REPO, stdin=subprocess.DEVNULL,
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                              start_new_session=True))
            deadline = time.monotonic() + 120
            while not scheduler_file.exists():
                assert processes[-1].poll() is None, f"{command[2]} exited with {processes[-1].returncode}"
                assert time.monotonic() < deadline, "Dask scheduler did not start"
                time.sleep(0.2)
        yield json.loads(scheduler_file.read_text())["address"]
    finally:
        for process in reversed(processes):  # the workers, then their scheduler
            stop_process_group(process)
