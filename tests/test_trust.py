"""Crashes and trust boundaries (issue 14): what a split CSV may name, how bad listings, wrong keys,
a silent S3 endpoint, a full disk and a shut-down timeout end, what a log line may carry, and the
run's own Prefect server. Case numbers are the issue's.

Fast checks call the storage, task and runner functions in this process; the CLI checks run
``patchwatch`` as a subprocess against loopback stand-ins: a web server that records every request
(the "metadata service"), an S3 endpoint that denies every request, and one that accepts
connections and never answers.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.servers import REPO, patchwatch_command, patchwatch_env

CLI_TIMEOUT = 240
SECRET = "pwS3cretValue"  # must never be printed


def png(seed: int, shape=(96, 128)) -> bytes:
    pixels = np.random.default_rng(seed).integers(60, 200, (*shape, 3)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_csv(path: Path, rows: list[dict] | None, text: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if text is not None:
        path.write_text(text)
    else:
        pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(autouse=True)
def no_allowed_sources(monkeypatch):
    """These tests decide for themselves what a CSV may name (conftest allows MTD for the others)."""
    monkeypatch.delenv("PATCHWATCH_ALLOW_SOURCES", raising=False)


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (folder / name).write_bytes(png(ord(name[0])))
    return folder


def run_cli(args: list, env: dict, timeout: float = CLI_TIMEOUT, cwd: Path = REPO) -> tuple[int, str, float]:
    """(exit code, stdout + stderr, seconds) of ``patchwatch ARGS``; its process group is killed after."""
    started = time.monotonic()
    process = subprocess.Popen(patchwatch_command() + [str(a) for a in args], env=env, cwd=cwd,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True, text=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        output += f"\n[killed by the test after {timeout:.0f} s]"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    return process.returncode, output, time.monotonic() - started


def cli_env(tmp_path: Path, prefect_server=None, **extra) -> dict:
    env = patchwatch_env(tmp_path / "prefect-home", api_url=prefect_server.api_url if prefect_server else None)
    env.pop("PATCHWATCH_ALLOW_SOURCES", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


# --------------------------------------------------------------------------- 6. duplicate rows


def test_6_duplicate_rows_are_listed_once_and_reported_with_their_rows(images):
    from patchwatch.storage.images import list_images

    csv = write_csv(images / "split.csv", [
        {"image": "a.png", "label": "good", "split": "test"},
        {"image": "b.png", "label": "good", "split": "test"},
        {"image": "./a.png", "label": "good", "split": "test"},   # the same file, written otherwise
        {"image": "c.png", "label": "defect", "split": "test"},
        {"image": "a.png", "label": "good", "split": "test"},
    ])
    records = list_images(str(csv), "test")
    assert sorted(Path(r.uri).name for r in records) == ["a.png", "b.png", "c.png"]

    from patchwatch.storage.images import scan_source
    listing = scan_source(str(csv), "test")
    assert len(listing.warnings) == 1, listing.warnings
    assert "a.png" in listing.warnings[0] and "rows 2, 4, 6" in listing.warnings[0]
    assert "split.csv" in listing.warnings[0]


# --------------------------------------------------------------------------- 8. labels


def test_8_upper_case_label_is_read_as_defect_with_a_warning(images):
    from patchwatch.storage.images import list_images

    csv = write_csv(images / "split.csv", [
        {"image": "a.png", "label": "good", "split": "test"},
        {"image": "b.png", "label": "DEFECT", "split": "test"},
        {"image": "c.png", "label": "Defect ", "split": "test"},
    ])
    assert [r.label for r in list_images(str(csv), "test")] == ["good", "defect", "defect"]

    from patchwatch.storage.images import scan_source
    warnings = scan_source(str(csv), "test").warnings
    assert any("'DEFECT'" in w and "row 3" in w and "'defect'" in w for w in warnings), warnings


def test_8_unknown_label_refuses_the_csv_naming_the_row(images):
    from patchwatch.storage.images import list_images

    csv = write_csv(images / "split.csv", [
        {"image": "a.png", "label": "good", "split": "test"},
        {"image": "b.png", "label": "bad", "split": "test"},
    ])
    with pytest.raises(ValueError, match=r"split\.csv.*'bad'.*row 3"):
        list_images(str(csv), "test")


# --------------------------------------------------------------------------- 10 + also: listings that list nothing


@pytest.mark.parametrize("case, text, split, reason", [
    ("empty", "", None, "empty file"),
    ("header-only", "image,mask,label,defect_type,split\n", None, "header only"),
    ("no-split-column", "image,label\na.png,good\n", "test", "no 'split' column"),
    ("no-row-of-split", "image,label,split\na.png,good,train\n", "test", "no row has split 'test'"),
], ids=lambda v: v if isinstance(v, str) and v and "," not in v and " " not in v else None)
def test_10_a_csv_that_lists_nothing_is_one_error_naming_the_file(images, case, text, split, reason):
    from patchwatch.storage.images import list_images

    csv = write_csv(images / f"{case}.csv", None, text)
    with pytest.raises(ValueError) as raised:
        list_images(str(csv), split)
    message = str(raised.value)
    assert f"{case}.csv" in message and reason in message and "\n" not in message, message


def test_10_a_folder_without_images_is_one_error_naming_it(tmp_path):
    from patchwatch.storage.images import list_images

    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"{tmp_path}: no images found"):
        list_images(str(tmp_path))


@pytest.mark.parametrize("error, retried", [
    (ValueError("bad value"), False), (pd.errors.EmptyDataError("No columns"), False),
    (FileNotFoundError(2, "No such file"), False), (PermissionError(13, "Permission denied"), False),
    (OSError(errno.ENOSPC, "No space left on device"), False),
    (ConnectionResetError(104, "Connection reset by peer"), True), (TimeoutError("read timed out"), True),
    (OSError(errno.EIO, "Input/output error"), True),
], ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None)
def test_10_only_transient_failures_are_retried(error, retried):
    from prefect.states import Failed

    from patchwatch.tasks.retries import transient

    assert transient(None, None, Failed(data=error)) is retried


def test_every_task_records_a_retry_delay_the_prefect_ui_can_show():
    """The UI's task panel formats the run policy's retry_delay as seconds: a list (a back-off
    schedule) showed "Retry Delay: NaNs". Each retried task waits one number of seconds."""
    from prefect import Task
    from prefect.client.schemas.objects import TaskRunPolicy

    import patchwatch.tasks as tasks_package
    import pkgutil, importlib

    found = {}
    for module in pkgutil.iter_modules(tasks_package.__path__):
        for value in vars(importlib.import_module(f"patchwatch.tasks.{module.name}")).values():
            if isinstance(value, Task) and value.retries:
                found[value.name] = value
    assert {"list-images", "extract-features", "select-coreset", "score-batch", "score-tiles"} <= set(found)
    for name, task in found.items():
        policy = TaskRunPolicy(max_retries=task.retries, retry_delay=task.retry_delay_seconds)
        assert isinstance(policy.retry_delay, (int, float)) and policy.retry_delay > 0, (name, policy.retry_delay)


def test_10_the_listing_task_does_not_retry_a_parse_error(images, prefect_server, monkeypatch):
    """An empty CSV: before, read 4 times over 42 s of back-off (125 s on the issue's machine)."""
    from prefect import flow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import patchwatch.storage.images as images_module
    from patchwatch.tasks.listing import list_images_task

    reads = []
    real_read_csv = pd.read_csv
    monkeypatch.setattr(images_module.pd, "read_csv", lambda *a, **k: reads.append(1) or real_read_csv(*a, **k))
    csv = write_csv(images / "empty.csv", None, "")

    @flow(name="trust-listing")
    def listing_flow(source):
        return list_images_task(source)

    started = time.monotonic()
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        with pytest.raises(ValueError) as raised:
            listing_flow(str(csv))
    assert len(reads) == 1, f"read {len(reads)} times in {time.monotonic() - started:.0f} s: a parse error was retried"
    assert "empty.csv: empty file" in str(raised.value)


def test_10_a_full_disk_names_the_path(tmp_path, writes_die_half_way):
    from patchwatch.storage.locations import write_json

    target = tmp_path / "results" / "summary.json"
    writes_die_half_way()
    with pytest.raises(OSError) as raised:
        write_json(str(target), {"images": 1})
    assert raised.value.errno == errno.ENOSPC and str(target) in str(raised.value)
    assert not list((tmp_path / "results").glob("*.partial")), "the half-written temporary file was left"


def test_10_cli_reports_a_full_disk_in_one_line(tmp_path, monkeypatch, capsys):
    import patchwatch.cli as cli

    def full_disk(args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cli, "_run", full_disk)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # no server is started for this
    code = cli.main(["score", "--images", str(tmp_path), "--root", str(fake_model_root(tmp_path)),
                     "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip()
    assert code == 1 and error.count("\n") == 0, error
    assert "No space left on device" in error and str(tmp_path / "out") in error


# --------------------------------------------------------------------------- also: forged log lines


def test_also_a_name_with_a_newline_cannot_forge_a_log_line():
    from patchwatch.flows.runner import install_log_sanitiser

    install_log_sanitiser()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    log = logging.getLogger("patchwatch.test-trust")
    log.addHandler(handler)
    try:
        forged = "x.png\n12:00:00.000 | ERROR   | Flow run 'nightly' - all images deleted"
        log.error("skipped %s: %s", forged, "not an image file")
        log.error("reading %s", "http://user:" + SECRET + "@host/a.png")
    finally:
        log.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0] == "skipped x.png\\n12:00:00.000 | ERROR   | Flow run 'nightly' - all images deleted: not an image file"
    assert SECRET not in lines[1] and "http://user:***@host/a.png" in lines[1]


# --------------------------------------------------------------------------- 12. relative paths


def test_12_relative_paths_reach_the_flows_absolute(tmp_path, monkeypatch):
    import patchwatch.flows.runner as runner_module
    import patchwatch.cli as cli

    received = {}

    @contextlib.contextmanager
    def no_cluster(address=None, workers=None):
        yield "tcp://127.0.0.1:1"

    def capture(flow_function, address, **parameters):
        received.update(parameters)
        return {"version": "v0001"}

    monkeypatch.setattr(runner_module, "dask_cluster", no_cluster)
    monkeypatch.setattr(runner_module, "run_on_dask", capture)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    fake_model_root(tmp_path)  # ./model: the command checks that its inputs exist
    assert cli.main(["score", "--images", "images", "--root", "model", "--out", "../results"]) == 0
    assert received["images"] == str(tmp_path / "images")
    assert received["root"] == str(tmp_path / "model")
    assert received["results"] == str(tmp_path.parent / "results")


# --------------------------------------------------------------------------- 13. shutdown timeout


def test_13_a_cluster_that_does_not_shut_down_in_time_is_a_warning(monkeypatch, caplog):
    import distributed

    from patchwatch.flows.runner import dask_cluster

    class SlowToClose:
        scheduler_address = "tcp://127.0.0.1:1"

        def __init__(self, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

        def close(self, timeout=None):
            raise TimeoutError("Timed out trying to close the cluster")

    monkeypatch.setattr(distributed, "LocalCluster", SlowToClose)
    monkeypatch.setattr("patchwatch.flows.runner._current_api_url", lambda: None)
    with caplog.at_level(logging.WARNING, logger="patchwatch"):
        with dask_cluster(None, 1) as address:
            assert address == SlowToClose.scheduler_address
    assert "did not shut down" in caplog.text

    with pytest.raises(KeyError):  # the body's own failure still comes through
        with dask_cluster(None, 1):
            raise KeyError("flow failed")


def test_13_a_heartbeat_cut_off_by_its_workers_own_shutdown_prints_no_traceback():
    """CI saw a failed run's output end in a worker's 'Failed to communicate with scheduler during
    heartbeat' and its traceback: a heartbeat in flight while the worker closes its connections
    (dask/distributed#7105). Said while the worker runs, it is still said in full."""
    from distributed.comm.core import CommClosedError
    from distributed.core import Status

    from patchwatch.flows import worker_plugins

    class StandInWorker:
        status = Status.running

    def heartbeat_fails(log):
        try:
            raise CommClosedError("in <TCP (closed) ConnectionPool.heartbeat_worker>: Stream is closed")
        except OSError:  # distributed.worker.Worker.heartbeat's own words
            log.exception("Failed to communicate with scheduler during heartbeat.")

    worker = StandInWorker()
    plugin = worker_plugins.WorkerLogging()
    plugin.setup(worker)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    log = logging.getLogger("distributed.worker")
    log.addHandler(handler)
    try:
        worker.status = Status.closing
        heartbeat_fails(log)
        assert stream.getvalue() == ""
        worker.status = Status.running
        heartbeat_fails(log)
        assert "Failed to communicate" in stream.getvalue() and "Traceback" in stream.getvalue()
    finally:
        log.removeHandler(handler)
        plugin.teardown(worker)
        # the filter stays on after its workers' teardown (a late heartbeat must still be dropped);
        # this process is no Dask worker
        log.removeFilter(worker_plugins._closing_heartbeats)


# --------------------------------------------------------------------------- 14. what a split CSV may name


class RecordingServer:
    """A loopback web server standing in for a cloud metadata service: records every request."""

    def __init__(self):
        self.requests: list[str] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                recorder.requests.append(self.path)
                body = json.dumps({"AccessKeyId": "ASIA-LEAKED", "SecretAccessKey": SECRET}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def metadata_service():
    server = RecordingServer()
    yield server
    server.close()


def hostile_rows(metadata_url: str, outside: Path) -> list[dict]:
    return [
        {"image": "a.png", "label": "good", "split": "train"},
        {"image": "b.png", "label": "good", "split": "train"},
        {"image": "../../../../../../../../etc/passwd", "label": "good", "split": "train"},
        {"image": "file:///etc/hostname", "label": "good", "split": "train"},
        {"image": f"{metadata_url}/latest/meta-data/iam/security-credentials/", "label": "good", "split": "train"},
        {"image": str(outside), "label": "good", "split": "train"},
        {"image": f"http://user:{SECRET}@127.0.0.1:9/c.png", "label": "good", "split": "train"},
        {"image": "c.png", "mask": "../outside/mask.png", "label": "defect", "split": "train"},
    ]


def test_14_split_csv_entries_stay_in_the_csvs_folder(images, metadata_service, tmp_path):
    from patchwatch.storage.images import list_images, scan_source

    outside = tmp_path / "outside" / "secret.png"
    outside.parent.mkdir()
    outside.write_bytes(png(9))
    csv = write_csv(images / "split.csv", hostile_rows(metadata_service.url, outside))
    records = list_images(str(csv), "train")
    assert [Path(r.uri).name for r in records] == ["a.png", "b.png"]

    listing = scan_source(str(csv), "train")
    assert [line.split(":")[0].rsplit(" ", 2)[-2:] for line in listing.refused] == [
        ["row", str(n)] for n in range(4, 10)], listing.refused
    assert "http:// URLs are not allowed" in listing.refused[2] and "file:// URLs" in listing.refused[1]
    assert "outside the CSV's folder" in listing.refused[0] and "credentials" in listing.refused[4]
    assert not any(SECRET in line for line in listing.refused)

    # allowed on purpose: the outside folder and the web server
    allowed = scan_source(str(csv), "train", allow=[str(outside.parent), metadata_service.url])
    assert {Path(r.uri).name for r in allowed.records} >= {"secret.png", "c.png"}
    assert any("meta-data" in r.uri for r in allowed.records)
    assert metadata_service.requests == [], "listing fetched a URL"


def test_14_an_s3_csv_may_name_its_own_bucket_only():
    from patchwatch.storage.images import SourcePolicy

    policy = SourcePolicy("s3://plant/datasets/v1/split.csv", [])
    assert policy.refusal("s3://plant/images/a.png") is None
    assert policy.refusal("s3://plant/datasets/v1/../../x.png") is None
    assert "bucket" in policy.refusal("s3://other/a.png")
    assert "bucket" in policy.refusal("s3://plant/datasets/../../other/a.png")
    assert "outside the CSV's store" in policy.refusal("/etc/passwd")
    assert SourcePolicy("s3://plant/split.csv", ["s3://other/shared"]).refusal("s3://other/shared/a.png") is None


def test_14_15_fit_from_a_hostile_csv_reads_only_its_folder(images, metadata_service, tmp_path, prefect_server):
    """The CLI end to end: refused rows are named one line each, the web server is never asked,
    the secret in a row is never printed, and the fit goes on with the two good images."""
    outside = tmp_path / "outside" / "secret.png"
    outside.parent.mkdir()
    outside.write_bytes(png(9))
    csv = write_csv(images / "split.csv", hostile_rows(metadata_service.url, outside))
    root = tmp_path / "model"
    code, output, _ = run_cli(["fit", "--images", csv, "--split", "train", "--root", root, "--workers", "1"],
                              cli_env(tmp_path, prefect_server))
    assert code == 0, output[-6000:]
    assert metadata_service.requests == [], f"requested {metadata_service.requests}"
    assert SECRET not in output
    for row in range(4, 10):
        assert sum(f"split.csv row {row}:" in line for line in output.splitlines()) == 1, (row, output[-6000:])
    assert "passwd" not in "".join(p.read_text(errors="replace") for p in root.rglob("*.json"))
    manifest = json.loads(next(root.glob("versions/*/manifest.json")).read_text())
    assert manifest["n_images"] == 2


# --------------------------------------------------------------------------- also: listings through the CLI


def fake_model_root(tmp_path: Path) -> Path:
    """A model root whose current version is complete and consistent but tiny: a 4-row memory
    (enough for score to pass the stored-model checks and reach the listing)."""
    import numpy as np

    from patchwatch.anomaly.detectors import detector_config
    from patchwatch.anomaly.features import FeatureConfig
    from patchwatch.anomaly.patchcore import build_index
    from patchwatch.storage.model_store import ModelStore

    root = tmp_path / "model"
    features = FeatureConfig()
    memory = np.zeros((4, features.embed_dim), np.float32)
    store = ModelStore(str(root / "versions" / "v0001"))
    store.write_memory(memory)
    store.write_index(build_index(memory))
    store.write_manifest({
        "detector": "patchcore", "feature_config": features.to_dict(), "memory_rows": len(memory),
        "detector_config": detector_config("patchcore").to_dict()})
    (root / "current.json").write_text(json.dumps({"version": "v0001"}))
    return root


def test_also_score_split_on_a_csv_without_split_column_fails_naming_the_file(images, tmp_path, prefect_server):
    csv = write_csv(images / "nosplit.csv", [{"image": "a.png", "label": "good"}])
    root = fake_model_root(tmp_path)
    code, output, _ = run_cli(["score", "--images", csv, "--split", "test", "--root", root,
                               "--out", tmp_path / "results", "--workers", "1"], cli_env(tmp_path, prefect_server))
    assert code != 0, output[-4000:]
    lines = [line for line in output.splitlines() if "nosplit.csv" in line and "no 'split' column" in line]
    assert lines, output[-4000:]
    assert "Traceback" not in output, output[-6000:]


# --------------------------------------------------------------------------- 15. credentials, wrong keys, silent endpoint


def test_15_credentials_in_a_url_argument_are_refused_and_never_printed(tmp_path):
    url = f"s3://AKIAPWTEST:{SECRET}@bucket/images"
    code, output, _ = run_cli(["fit", "--images", url, "--root", tmp_path / "model", "--workers", "1"],
                              cli_env(tmp_path, None, PREFECT_API_URL="http://127.0.0.1:9/api"), timeout=120)
    assert code == 1, output[-4000:]
    assert SECRET not in output
    assert "credentials in a URL are not accepted" in output and "AKIAPWTEST:***@bucket" in output
    assert len(output.strip().splitlines()) == 1, output


class FakeS3:
    """A loopback "S3 endpoint": ``deny`` answers every request with 403 InvalidAccessKeyId (wrong
    keys); otherwise it accepts connections and never answers."""

    def __init__(self, deny: bool):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.deny, self.open = deny, []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidAccessKeyId</Code>'
                b"<Message>The AWS Access Key Id you provided does not exist in our records.</Message></Error>")
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            self.open.append(connection)  # kept open: a silent endpoint just holds it
            if self.deny:
                threading.Thread(target=self.answer, args=(connection, body), daemon=True).start()

    @staticmethod
    def answer(connection, body):
        with contextlib.suppress(OSError):
            while True:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = connection.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, rest = data.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(rest) < length:
                    rest += connection.recv(65536)
                connection.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\n"
                                   + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)

    def close(self):
        self.sock.close()
        for connection in self.open:
            connection.close()


def s3_env(tmp_path: Path, endpoint: str, **extra) -> dict:
    return cli_env(tmp_path, None, PREFECT_API_URL="http://127.0.0.1:9/api", AWS_ENDPOINT_URL=endpoint,
                   AWS_ACCESS_KEY_ID="AKIAWRONGKEY", AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION="us-east-1",
                   **extra)


def test_15_wrong_s3_keys_are_one_line_naming_the_bucket(tmp_path):
    fake = FakeS3(deny=True)
    try:
        code, output, _ = run_cli(["fit", "--images", "s3://plant-images/nominal", "--root", "s3://plant-model/m",
                                   "--workers", "1"], s3_env(tmp_path, fake.endpoint), timeout=180)
    finally:
        fake.close()
    assert code == 1, output[-4000:]
    assert len(output.strip().splitlines()) == 1, output[-6000:]
    assert "s3://plant-images" in output and "denied" in output and fake.endpoint in output
    assert SECRET not in output


def test_15_a_silent_s3_endpoint_fails_within_its_timeouts_naming_it(tmp_path):
    fake = FakeS3(deny=False)
    # the run's timeouts through fsspec's own configuration (FSSPEC_S3): connect 2 s, read 3 s
    config = json.dumps({"config_kwargs": {"connect_timeout": 2, "read_timeout": 3}})
    try:
        code, output, seconds = run_cli(["score", "--images", "s3://plant-images/night", "--root", fake_model_root(tmp_path),
                                         "--workers", "1"], s3_env(tmp_path, fake.endpoint, FSSPEC_S3=config),
                                        timeout=150)
    finally:
        fake.close()
    assert code == 1, output[-4000:]
    assert fake.endpoint in output and "did not answer within 5 s" in output, output[-4000:]
    assert len(output.strip().splitlines()) == 1, output[-6000:]
    assert seconds < 60, f"{seconds:.0f} s"


# --------------------------------------------------------------------------- 11. the run's own Prefect server


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    found.append(int(entry.name))
    return found + [g for c in found for g in _children_of(c)]


def _is_prefect_server(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return b"prefect.server.api.server:create_app" in Path(f"/proc/{pid}/cmdline").read_bytes()
    return False


def _alive(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_11_a_killed_run_takes_its_prefect_server_with_it(images, tmp_path):
    """No PREFECT_API_URL: the run starts its own server. SIGKILL the run (only its own pid): the
    server must not outlive it (before, it ran on, ~220 MB, until someone killed it)."""
    env = cli_env(tmp_path, None)
    process = subprocess.Popen(patchwatch_command() + ["fit", "--images", str(images), "--root",
                                                       str(tmp_path / "model"), "--workers", "1"],
                               env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    servers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not servers and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.5)
            servers = [p for p in _children_of(process.pid) if _is_prefect_server(p)]
        assert servers, "the run started no Prefect server"
        time.sleep(1)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in servers) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(_alive(p) for p in servers), "the Prefect server outlived its killed run"
    finally:
        for pid in servers:  # ours alone, by pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


SERVER_SCRIPT = """
import json, sys, urllib.request
from patchwatch.flows.runner import prefect_api
with prefect_api() as url:
    health = urllib.request.urlopen(url + "/health", timeout=30).read().decode()
    print(json.dumps({"url": url, "health": health}), flush=True)
"""


def test_11_two_runs_at_once_get_two_servers(tmp_path):
    env = cli_env(tmp_path, None)
    env.pop("PREFECT_API_URL", None)
    runs = [subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT], env=env, cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True) for _ in range(2)]
    try:
        outputs = [run.communicate(timeout=240) for run in runs]
    finally:
        for run in runs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.pid, signal.SIGKILL)
    results = []
    for run, (out, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["health"] == "true" for r in results), results
    assert results[0]["url"] != results[1]["url"]


def test_11_the_port_of_a_runs_prefect_server_is_held_before_the_server_starts(tmp_path, monkeypatch):
    """CI saw a run die at start with 'Server disconnected without sending a response': its
    server's port was chosen free, released, and bound by uvicorn only after its start-up (seconds
    later), and meanwhile another process took it. The port must listen, held by the run, from
    before the server process starts until the run ends."""
    import subprocess as subprocess_module

    from patchwatch.flows import runner

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    server = runner._server_class()()
    listening_at_launch = []
    real_popen = subprocess_module.Popen

    def launch(*args, **kwargs):
        with socket.socket() as probe:
            listening_at_launch.append(probe.connect_ex(("127.0.0.1", server.port)) == 0)
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(subprocess_module, "Popen", launch)
    try:
        server.start(timeout=120)
        with urllib.request.urlopen(server.api_url + "/health", timeout=30) as response:
            assert response.read() == b"true"
    finally:
        server.stop()
    assert listening_at_launch and all(listening_at_launch), listening_at_launch
