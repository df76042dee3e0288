"""Real servers on loopback for the integration tests: an S3 endpoint (moto) and a Prefect server.

Each server is a subprocess in its own process group on a free 127.0.0.1 port. It is stopped by
its process-group id (never by name), so a test run only ever ends the processes it started.

Fixtures (session-scoped). A test module loads them with ``pytest_plugins = [servers.__name__]``:
as a plugin they are registered once, so every module of the session shares the same servers
(importing the fixture functions into each module would start one server per module):

* ``s3_server``     -> :class:`S3Server`: endpoint, bucket, and the AWS_* variables that point
                       boto3 / s3fs at it. The code under test gets the endpoint and credentials
                       from those environment variables only.
* ``prefect_server`` -> :class:`PrefectServer`: the API URL (``http://127.0.0.1:PORT/api``) of a
                       ``prefect server start`` with its own PREFECT_HOME and SQLite database.

Helpers: :func:`patchwatch_env` (an isolated environment for ``patchwatch`` subprocesses) and
:func:`run_patchwatch` (runs the CLI, failing with its output on a non-zero exit).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# variables of the developer's own shell that would point a subprocess elsewhere
_FOREIGN_PREFIXES = ("AWS_", "PREFECT_", "BOTO_", "S3_")
_FOREIGN_NAMES = ("FSSPEC_CONFIG_DIR",)


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the caller retries if it is lost)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """``os.environ`` without AWS/Prefect settings of the caller's shell, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(_FOREIGN_PREFIXES) and k not in _FOREIGN_NAMES}
    env.update({k: str(v) for k, v in extra.items()})
    return env


@dataclass
class ServerProcess:
    """A server subprocess in its own process group, with its output in a log file."""

    name: str
    command: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        try:
            self.process = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True, cwd=REPO)
        finally:
            log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self, grace: float = 15.0) -> None:
        if self.process is not None:
            stop_process_group(self.process, grace)


def stop_process_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group of ``process`` (started with start_new_session), then SIGKILL
    it if it has not exited after ``grace`` s; children left in the group are killed too."""
    pgid = process.pid  # start_new_session: the group id is the leader's pid
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; children of the group (uvicorn workers...) may linger
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        break


def wait_until(check, timeout: float, server: ServerProcess, what: str, interval: float = 0.5):
    """Poll ``check()`` until it returns a truthy value; fail with the server's log otherwise."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"{server.name} exited with {server.process.returncode} before {what}:\n"
                               f"{server.log_tail()}")
        try:
            result = check()
            if result:
                return result
        except Exception as error:  # not up yet
            last_error = error
        time.sleep(interval)
    raise TimeoutError(f"{server.name} not ready after {timeout:.0f}s ({what}; last error: {last_error!r}):\n"
                       f"{server.log_tail()}")


def http_ok(url: str, timeout: float = 5.0) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read() if response.status == 200 else None
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None


def start_with_port(make_server, ready, attempts: int = 3):
    """Start ``make_server(port)`` on a free port and wait with ``ready(server, port)``; retry on
    another port if the server dies at once (e.g. the port was taken between check and bind)."""
    errors = []
    for _ in range(attempts):
        port = free_port()
        server = make_server(port).start()
        try:
            ready(server, port)
            return server, port
        except RuntimeError as error:  # exited early: retry on a new port
            server.stop()
            errors.append(str(error))
        except BaseException:
            server.stop()
            raise
    raise RuntimeError("could not start server:\n" + "\n---\n".join(errors))


# --------------------------------------------------------------------------- S3 (moto)


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    process: ServerProcess
    env: dict[str, str] = field(default_factory=dict)

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *[p.strip("/") for p in parts]])

    def filesystem(self):
        """A fresh s3fs filesystem configured from the (applied) environment, no listing cache."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)

    def create_bucket(self, name: str) -> None:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=name)


def s3_env(endpoint: str, home: Path) -> dict[str, str]:
    """AWS variables that point boto3 / s3fs at ``endpoint`` with moto's test credentials.

    AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE point at files that do not exist, so that a
    developer's ~/.aws profiles cannot override the test endpoint.
    """
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_CONFIG_FILE": str(home / "aws-config-absent"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials-absent"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@contextlib.contextmanager
def running_s3_server(workdir: Path, bucket: str = "patchwatch-test"):
    moto = shutil.which("moto_server", path=str(BIN)) or shutil.which("moto_server")
    if moto is None:
        pytest.skip("moto_server not installed (pip install 'moto[server]')")

    def make(port: int) -> ServerProcess:
        return ServerProcess("moto_server", [moto, "-H", "127.0.0.1", "-p", str(port)],
                             clean_env(), workdir / f"moto-{port}.log")

    def ready(server: ServerProcess, port: int) -> None:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/moto-api/data.json"), 60, server, "HTTP up")

    server, port = start_with_port(make, ready)
    endpoint = f"http://127.0.0.1:{port}"
    s3 = S3Server(endpoint=endpoint, bucket=bucket, process=server, env=s3_env(endpoint, workdir))
    try:
        s3.create_bucket(bucket)
        yield s3
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    with running_s3_server(tmp_path_factory.mktemp("s3-server")) as server:
        yield server


@pytest.fixture
def s3_environment(s3_server, monkeypatch) -> S3Server:
    """Apply the S3 server's variables to this test's own process (for reading results back)."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "BOTO_")):
            monkeypatch.delenv(name)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server


# --------------------------------------------------------------------------- Prefect server


@dataclass
class PrefectServer:
    api_url: str
    home: Path
    process: ServerProcess


def prefect_server_env(home: Path) -> dict[str, str]:
    # the recorder services (task runs, events) stay on: task runs reach the database through them
    return clean_env(
        PREFECT_HOME=str(home),
        PREFECT_PROFILES_PATH=str(home / "profiles.toml"),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
        PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED="false",
        PREFECT_SERVER_SERVICES_FOREMAN_ENABLED="false",
        PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED="false",
        PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_ENABLED="false",
        PREFECT_SERVER_SERVICES_REPOSSESSOR_ENABLED="false",
        PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED="false",
        PREFECT_SERVER_LOGGING_LEVEL="WARNING",
    )


@contextlib.contextmanager
def running_prefect_server(workdir: Path):
    prefect = shutil.which("prefect", path=str(BIN)) or shutil.which("prefect")
    if prefect is None:
        pytest.skip("prefect CLI not installed")
    home = workdir / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)

    def make(port: int) -> ServerProcess:
        return ServerProcess("prefect server",
                             [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port),
                              "--no-ui", "--analytics-off", "--no-scheduler", "--no-late-runs"],
                             prefect_server_env(home), workdir / f"prefect-server-{port}.log")

    def ready(server: ServerProcess, port: int) -> None:
        # first start runs the database migrations: slow on a busy 2-core machine
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/api/health") == b"true", 240, server,
                   "/api/health answered true", interval=1.0)

    server, port = start_with_port(make, ready)
    try:
        yield PrefectServer(api_url=f"http://127.0.0.1:{port}/api", home=home, process=server)
    finally:
        # flows the tests ran in this process may still have logs queued for this server: a
        # pytest run once hung at exit retrying them ("Still processing items") after it stopped
        from patchwatch.flows.runner import send_queued_logs_and_events

        send_queued_logs_and_events()
        server.stop()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> PrefectServer:
    with running_prefect_server(tmp_path_factory.mktemp("prefect-server")) as server:
        yield server


# --------------------------------------------------------------------------- patchwatch CLI


def patchwatch_env(home: Path, api_url: str | None = None, s3: S3Server | None = None) -> dict[str, str]:
    """Environment for ``patchwatch`` subprocesses: a private PREFECT_HOME (so that task caches and
    results of other runs cannot leak in), the given Prefect API (else an ephemeral one), the S3
    server's AWS variables, and one thread per library (2 shared cores)."""
    home.mkdir(parents=True, exist_ok=True)
    extra = {
        "PREFECT_HOME": str(home),
        "PREFECT_PROFILES_PATH": str(home / "profiles.toml"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if api_url:
        extra["PREFECT_API_URL"] = api_url
    if s3 is not None:
        extra.update(s3.env)
    else:  # no S3 in this run: make sure no stray endpoint is used either
        extra.update(s3_env("http://127.0.0.1:9", home))
    return clean_env(**extra)


def patchwatch_command() -> list[str]:
    exe = shutil.which("patchwatch", path=str(BIN))
    return [exe] if exe else [sys.executable, "-m", "patchwatch.cli"]


def start_patchwatch(args: list, env: dict[str, str], cwd: Path = REPO) -> subprocess.Popen:
    """Start ``patchwatch ARGS`` in its own process group (stdout and stderr together)."""
    return subprocess.Popen(patchwatch_command() + [str(a) for a in args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, text=True)


def finish_patchwatch(process: subprocess.Popen, timeout: float = 300, what: str = "patchwatch") -> tuple[int, str]:
    """(exit code, output) of a started command; the test fails if it outlives ``timeout``."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{what} timed out after {timeout}s:\n{output[-6000:]}")
    finally:
        # Dask worker processes are in the same group: none may outlive the command
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    return process.returncode, output


def run_patchwatch(args: list[str], env: dict[str, str], timeout: float = 300,
                   cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run ``patchwatch ARGS`` in its own process group; kill the group on timeout."""
    command = patchwatch_command() + [str(a) for a in args]
    started = time.monotonic()
    returncode, output = finish_patchwatch(start_patchwatch(args, env, cwd), timeout,
                                           f"patchwatch {' '.join(map(str, args))}")
    elapsed = time.monotonic() - started
    if returncode != 0:
        pytest.fail(f"patchwatch {' '.join(map(str, args))} exited {returncode} after {elapsed:.0f}s:\n"
                    f"{output[-8000:]}")
    return subprocess.CompletedProcess(command, returncode, output, None)
