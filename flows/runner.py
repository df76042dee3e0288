"""Task runner, Prefect API and progress helpers shared by the flows."""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import sys

# Prefect's, Dask's and tqdm's modules are imported where they are used: 'patchwatch models' and
# 'promote' import this module and must answer in well under 2 s
from patchwatch.storage.locations import for_log, redact

logger = logging.getLogger("patchwatch")

# the API URL of this run's own temporary server, if it started one (its UI links die with it)
_temporary_api_url: str | None = None

# a local cluster that has not shut down by then is left to end with this process: the flow's
# outcome is already decided and must not be turned into a failure by the shutdown
CLUSTER_CLOSE_TIMEOUT_S = 30
# Prefect's own default (20 s) is too short for a first start (database migrations) on a loaded
# machine; PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS may only lengthen it
SERVER_STARTUP_TIMEOUT_S = 180
UVICORN_STARTUP_FAILED = 3  # uvicorn's exit code when the app's startup (lifespan) fails
SERVER_STARTS = 5  # tries when it does
# Dask's default pre-spawn MALLOC_TRIM_THRESHOLD_=65536 also switches glibc's dynamic mmap threshold
# off: every block above 128 KiB (each backbone activation) is then a fresh mmap, page-faulted in and
# unmapped again on free, and the backbone ran ~3x slower. A fixed 32 MiB mmap threshold keeps those
# blocks on the heap; a 64 MiB trim threshold keeps them there once freed: at 65536 each freed block
# at the heap's top went back to the OS and was faulted in again by the next task, and PatchCore's kNN
# (an 8 MiB distance matrix per query block at 8k memory rows) took 1.7x the CPU (4.00 against 2.36
# ms an MTD image), for 17 MiB less resident memory (bench/results/workers.md). glibc reads these once, at process start: they must be in
# the environment the worker is spawned with (the nanny's pre-spawn-environ, which overrides a
# container's own variables of the same names).
WORKER_ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "67108864"}


@contextlib.contextmanager
def dask_cluster(address: str | None = None, workers: int | None = None):
    """Address of the Dask cluster to use: ``address`` if given, else a local cluster with one
    single-threaded worker process per core (each runs the backbone on one batch at a time)."""
    if address:
        yield address
        return
    import dask
    from distributed import LocalCluster

    env = {}
    api_url = _current_api_url()
    if api_url:  # workers report their task runs to the same Prefect API as the flow
        env["PREFECT_API_URL"] = api_url
    workers = workers or max(1, os.cpu_count() or 1)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": worker_spawn_environ()}):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                               env=env)
    try:
        yield cluster.scheduler_address
    finally:
        try:
            cluster.close(timeout=CLUSTER_CLOSE_TIMEOUT_S)
        except (TimeoutError, OSError) as error:  # asyncio.TimeoutError is TimeoutError (3.11)
            logger.warning("the local Dask cluster did not shut down cleanly (%s: %s); its worker "
                           "processes end with this one", type(error).__name__, error)


def worker_spawn_environ(allocator: dict | None = None) -> dict:
    """Dask's ``distributed.nanny.pre-spawn-environ`` (set before a worker process starts) with
    ``allocator`` (default :data:`WORKER_ALLOCATOR_ENV`) over it; a value of None removes a variable."""
    import dask

    merged = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}),
              **(WORKER_ALLOCATOR_ENV if allocator is None else allocator)}
    return {key: value for key, value in merged.items() if value is not None}


def _current_api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    configured = PREFECT_API_URL.value()
    if configured:
        return configured
    try:  # inside a flow run in ephemeral mode: the temporary server it started
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return str(client.api_url)
    except Exception:
        return None


def run_on_dask(flow_function, address: str, **parameters):
    """Run ``flow_function`` with its tasks on the Dask cluster at ``address``."""
    from prefect_dask import DaskTaskRunner

    _set_up_worker_logging(address)
    return run_and_link(flow_function.with_options(task_runner=DaskTaskRunner(address=address)), **parameters)


def run_and_link(flow_function, **parameters):
    """Run ``flow_function`` and return its result; with a Prefect server of the user's
    (``PREFECT_API_URL`` set before this run), print where the UI shows the run, logs included:
    the terminal only shows warnings (see patchwatch.cli)."""
    state = flow_function(**parameters, return_state=True)
    url = flow_run_url(state.state_details.flow_run_id)
    if url:
        print(f"{flow_function.name} run: {url}", flush=True)
    return state.result()


def flow_run_url(flow_run_id) -> str | None:
    """The UI page of a flow run on the user's own Prefect server; None for this run's temporary
    server (it stops with the command) or without an id."""
    from prefect.settings import PREFECT_API_URL
    from prefect.utilities.urls import url_for

    api_url = PREFECT_API_URL.value()
    if not flow_run_id or not api_url or api_url == _temporary_api_url:
        return None
    return url_for("flow-run", obj_id=flow_run_id)


def location_name(location: str | None, parts: int = 2) -> str:
    """A run-name-sized location: its last ``parts`` path components (``plant/model`` of
    ``s3://plant/model``), credentials masked."""
    if not location:
        return ""
    tail = [p for p in str(location).rstrip("/").split("://")[-1].split("/") if p][-parts:]
    return for_log("/".join(tail))


def run_name(pattern: str, **defaults):
    """A ``flow_run_name`` callable: ``pattern`` formatted with the run's parameters, locations
    (``images``, ``root``, ``results``, ``archive``, ``split_csv``) shortened by :func:`location_name`,
    ``defaults`` (callables) filling parameters left None. The UI lists runs by these names."""
    def name() -> str:
        from prefect.runtime import flow_run

        values = dict(flow_run.parameters)
        for key, default in defaults.items():
            if values.get(key) is None:
                values[key] = default()
        for key in ("images", "root", "results", "archive"):
            if isinstance(values.get(key), str):
                values[key] = location_name(values[key])
        if isinstance(values.get("split_csv"), str):
            values["split_csv"] = location_name(values["split_csv"], 1)
        return pattern.format(**values)

    return name


def gather(futures: list, description: str) -> list:
    """Results of ``futures`` in submission order, with a progress bar as they finish."""
    from prefect.futures import as_completed
    from tqdm.auto import tqdm

    results = {}
    index_of = {id(f): i for i, f in enumerate(futures)}
    with tqdm(total=len(futures), desc=description, unit="batch", disable=not futures) as bar:
        for future in as_completed(futures):
            results[index_of[id(future)]] = future.result()
            bar.update(1)
    return [results[i] for i in range(len(futures))]


# --------------------------------------------------------------------------- log lines


def _expected(error: BaseException | None) -> bool:
    """Failures that are the input's or the machine's, not the program's: their traceback helps
    nobody (the message names the file and the reason), so Prefect's logs of them are one line."""
    from patchwatch.storage.images import SourceError
    from patchwatch.storage.locations import DETERMINISTIC_ERRNOS

    return isinstance(error, (SourceError, PermissionError)) or (
        isinstance(error, OSError) and error.errno in DETERMINISTIC_ERRNOS - {errno.ENOENT})


def _sanitise_record(record: logging.LogRecord) -> logging.LogRecord:
    """Credentials masked in the whole message; newlines and control characters escaped in the
    values put into it (a file name cannot forge a log line; the message's own layout stays);
    no traceback for an expected failure (see :func:`_expected`), its one line instead."""
    try:
        if record.args:
            args = record.args if isinstance(record.args, tuple) else (record.args,)
            record.msg = redact(str(record.msg) % tuple(for_log(a) if isinstance(a, (str, os.PathLike)) else a
                                                        for a in args))
            record.args = None
        elif isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if record.exc_info and _expected(record.exc_info[1]):
            error = record.exc_info[1]
            if for_log(error) not in str(record.msg):  # Prefect's own message may quote it already
                record.msg = f"{str(record.msg).rstrip()} {type(error).__name__}: {for_log(error)}"
            record.exc_info = record.exc_text = None
    except Exception:  # a record that does not format is logging's own problem to report
        pass
    return record


def install_log_sanitiser() -> None:
    """Every log record this process creates goes through :func:`_sanitise_record` (a record
    factory, so that handlers added later by Prefect or Dask are covered too). Idempotent."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "patchwatch", False):
        return

    def factory(*args, **kwargs):
        return _sanitise_record(previous(*args, **kwargs))

    factory.patchwatch = True
    logging.setLogRecordFactory(factory)


def _set_up_worker_logging(address: str) -> None:
    from distributed import Client

    from .worker_plugins import WorkerLogging

    try:
        with Client(address, timeout=60) as client:
            client.register_plugin(WorkerLogging(), name=WorkerLogging.name)
    except OSError as error:  # the task runner will say it better
        logger.debug("could not register the worker logging plugin on %s: %s", address, error)


# --------------------------------------------------------------------------- Prefect API


def _server_class():
    import atexit
    import subprocess
    import time

    import httpx
    from prefect.server.api.server import SubprocessASGIServer, subprocess_server_logger

    class RunServer(SubprocessASGIServer):
        """Prefect's ephemeral server (the same uvicorn app), on a socket this process binds and
        hands over, so no other process can take its port between choice and use (CI saw a run
        poll a port someone else then held, and die). Bound to this process's lifetime: the
        kernel stops it when this process ends in any way (PR_SET_PDEATHSIG), even when it is
        killed and Prefect's atexit hook never runs."""

        def __new__(cls, *args, **kwargs):
            return object.__new__(cls)  # one server per run, not Prefect's one per port

        def __init__(self):
            super().__init__(port=None)
            # not a key of Prefect's registry of servers: stop() must not unregister Prefect's own
            self._instance_key = ("patchwatch run", id(self))

        def start(self, timeout: int | None = None) -> None:
            timeout = timeout or SERVER_STARTUP_TIMEOUT_S
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
                listener.bind(("127.0.0.1", 0))
                listener.listen(128)
                self.port = listener.getsockname()[1]
                subprocess_server_logger.info(f"Starting temporary server on {self.address}")
                self.running = True
                atexit.register(self.stop)
                try:
                    self._wait_until_it_answers(listener, timeout)
                except BaseException:
                    self.stop()
                    raise
            # the server holds its own copy of the socket

        def _wait_until_it_answers(self, listener: socket.socket, timeout: float) -> None:
            deadline = time.monotonic() + timeout
            self.server_process = self._run_uvicorn_command(listener.fileno())
            starts = 1
            with httpx.Client(timeout=5) as client:
                while time.monotonic() < deadline:
                    code = self.server_process.poll()
                    if code == UVICORN_STARTUP_FAILED and starts < SERVER_STARTS:
                        # as Prefect's own start does: two runs at once on a new database both
                        # migrate it, and the loser's start fails; the next try finds it migrated
                        self.server_process = self._run_uvicorn_command(listener.fileno())
                        starts += 1
                    elif code is not None:
                        raise RuntimeError(f"Prefect's temporary server exited with code {code} before it answered")
                    try:
                        if client.get(f"{self.api_url}/health").status_code == 200:
                            return
                    except httpx.TransportError:  # still starting: connected, not yet answered
                        pass
                    time.sleep(0.1)
            raise RuntimeError(f"Prefect's temporary server did not answer within {timeout:.0f} s")

        def _run_uvicorn_command(self, listening_fd: int):
            import prefect
            from prefect.settings import get_current_settings

            command = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
                       "--factory", "prefect.server.api.server:create_app", "--fd", str(listening_fd),
                       "--log-level", "error", "--lifespan", "on"]
            launcher = ("import ctypes, os, signal, sys\n"
                        "ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
                        f"if os.getppid() != {os.getpid()}: sys.exit(0)  # parent already gone\n"
                        "os.execv(sys.executable, sys.argv[1:])\n")
            if sys.platform.startswith("linux"):
                command = [sys.executable, "-c", launcher, *command]
            env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                   "PREFECT__SERVER_FINAL": "1", **get_current_settings().to_environment_variables(exclude_unset=True)}
            return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, pass_fds=[listening_fd])

    return RunServer


@contextlib.contextmanager
def prefect_api():
    """The Prefect API for this run: ``PREFECT_API_URL`` when set; else a temporary server of this
    run's own, on a free port, started with a long timeout and always stopped."""
    from prefect.settings import (PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
                                  temporary_settings)

    if PREFECT_API_URL.value():
        try:
            yield PREFECT_API_URL.value()
        finally:
            # sent now, not by Prefect's exit-time drain, whose 'Still processing items' warning
            # would otherwise come after the command's own last line
            send_queued_logs_and_events()
        return
    global _temporary_api_url
    server = _server_class()()
    timeout = max(SERVER_STARTUP_TIMEOUT_S, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    try:
        server.start(timeout=timeout)
        _temporary_api_url = server.api_url
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            previous = os.environ.get("PREFECT_API_URL")
            os.environ["PREFECT_API_URL"] = server.api_url  # for the processes this run starts
            try:
                yield server.api_url
            finally:
                if previous is None:
                    os.environ.pop("PREFECT_API_URL", None)
                else:
                    os.environ["PREFECT_API_URL"] = previous
    finally:
        send_queued_logs_and_events()
        server.stop()


def send_queued_logs_and_events(timeout: float = 10.0) -> None:
    """Prefect sends logs and events from background workers; what is still queued when a run
    ends must reach its server before that stops: else Prefect prints 'Error logging to API' at
    exit, and its exit-time drain retries a gone server for as long as items remain."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):  # a server already gone: nothing more can be sent
            worker.drain_all(timeout=timeout)
