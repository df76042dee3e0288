"""Faults during a run: the night's outputs must come out complete and identical to a clean run's.

1. Worker loss. A Dask cluster started here (``dask scheduler`` + two ``dask worker`` processes,
   each under its nanny, one single-threaded worker each) runs ``patchwatch fit`` and ``patchwatch
   score`` through ``--dask-address``. Once the first part of the run is in storage, a worker
   process whose thread is inside the task's own code (extract_features_task / score_batch_task)
   is SIGKILLed (the worker, not its nanny: the nanny starts a new one, as Kubernetes would
   restart a pod). The run must finish with exit 0, the Prefect server must show the cut task run
   started again (Running -> Pending -> Running -> Completed), and the outputs must be the same
   bank index, bank arrays, memory, faiss index and score table (values and maps) as an
   undisturbed run on the same cluster. The recovery is Dask's: the scheduler reschedules the
   lost task (up to distributed.scheduler.allowed-failures, 3); Prefect's task retries never see
   a killed worker (with allowed-failures=0 the flow fails with KilledWorker).

2. Storage outage. A dedicated moto S3 server sits behind a small TCP proxy (this module's
   :class:`TcpProxy`) that can be stopped and started on the same port: moto keeps its
   in-memory bucket, the run sees connection refused. Stopped once the first bank part is
   written: the tasks retry after a delay (``PATCHWATCH_RETRY_DELAY`` shortens it, and
   the AwaitingRetry states recorded by the Prefect server show them growing), then the run fails
   with a non-zero exit naming the unreachable endpoint. Every part written before the outage is
   intact (readable, same content as the clean run's), no batch without its index part is
   counted; after the endpoint returns the re-run completes without writing any object of those
   batches again (moto's request log: no PUT under their keys) and gives the clean run's model.
   Plus the local half of "no partial object is read as complete": a write that dies half way
   leaves only a ``*.partial`` temp name, which no listing takes for a part.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from tests.servers import (BIN, REPO, ServerProcess, patchwatch_command, patchwatch_env, running_s3_server, s3_env,
                           wait_until)

zarr = pytest.importorskip("zarr")
s3fs = pytest.importorskip("s3fs")
distributed = pytest.importorskip("distributed")

# ROOT/bank/index/ and outcomes/ (Parquet, JSON) lie inside the bank's Zarr group: zarr warns when it lists it
pytestmark = pytest.mark.filterwarnings(r"ignore:Object at (index|outcomes) is not recognized:UserWarning")

CLI_TIMEOUT = 240          # generous: 2 shared cores
N_TRAIN, N_TEST = 6, 6     # one image per work batch: 6 batches, so a fault lands mid-run
SHAPE = (320, 320)
RETRY_DELAY, RETRIES = 1.0, 3  # instead of 10 s (PATCHWATCH_RETRY_DELAY); the storage tasks retry 3 times
FAST = {"skip_instance_cache": True, "use_listings_cache": False}


# --------------------------------------------------------------------------- images


def texture(seed: int, shape=SHAPE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = gaussian_filter(rng.normal(size=(*shape, 3)), sigma=(3, 3, 0))
    return np.clip(128 + 40 * noise / noise.std(), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict:
    """train/: nominal textures; test/: nominal ones and ones with a bright scratch."""
    folder = tmp_path_factory.mktemp("fault-images")
    for i in range(N_TRAIN):
        (folder / "train").mkdir(exist_ok=True)
        Image.fromarray(texture(i)).save(folder / "train" / f"good-{i}.png")
    for i in range(N_TEST):
        (folder / "test").mkdir(exist_ok=True)
        pixels = texture(100 + i)
        if i % 2:
            pixels[80 + 20 * i:88 + 20 * i, 40:260] = 250
        Image.fromarray(pixels).save(folder / "test" / f"test-{i}.png")
    return {"train": folder / "train", "test": folder / "test"}


# --------------------------------------------------------------------------- CLI in the background


class Background:
    """``patchwatch ARGS`` in its own process group, output to a file (no pipe to fill)."""

    def __init__(self, args: list, env: dict, log: Path):
        self.log = log
        self.args = [str(a) for a in args]
        with log.open("wb") as out:
            self.process = subprocess.Popen(patchwatch_command() + self.args, env=env, cwd=REPO, stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        self.started = time.monotonic()

    def running(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = CLI_TIMEOUT) -> tuple[int, str]:
        try:
            self.process.wait(timeout=max(1.0, timeout - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"patchwatch {' '.join(self.args)} timed out:\n{self.output()[-6000:]}")
        finally:
            self.kill()  # a LocalCluster's workers are in the group: none may outlive the command
        return self.process.returncode, self.output()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)


def run_ok(args: list, env: dict, log: Path) -> str:
    code, output = Background(args, env, log).wait()
    assert code == 0, f"patchwatch {' '.join(map(str, args))} exited {code}:\n{output[-6000:]}"
    return output


def poll(check, timeout: float, what: str, run: Background | None = None, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        if run is not None and not run.running():
            pytest.fail(f"the run ended (exit {run.process.returncode}) before {what}:\n{run.output()[-6000:]}")
        time.sleep(interval)
    pytest.fail(f"timed out waiting for {what}" + (f":\n{run.output()[-4000:]}" if run else ""))


# --------------------------------------------------------------------------- reading outputs back


def read_model(root: str, storage_options: dict | None = None) -> dict:
    """A fitted (or partly fitted) model root read with fsspec + zarr + pandas only: the bank
    index, the bank arrays of the batches whose index part exists, memory, faiss bytes, manifest."""
    import fsspec

    options = storage_options or {}
    fs, path = fsspec.core.url_to_fs(root, **options)
    parts = sorted(p for p in (fs.ls(f"{path}/bank/index", detail=False) if fs.exists(f"{path}/bank/index") else [])
                   if p.endswith(".parquet"))
    index = {Path(p).stem: pd.read_parquet(io.BytesIO(fs.cat_file(p))) for p in parts}
    bank = {name: zarr.open_array(f"{root}/bank/{name}", mode="r", storage_options=storage_options)[...]
            for name in index}
    model = {"index": index, "bank": bank}
    if fs.exists(f"{path}/current.json"):  # the version scoring would use
        version = json.loads(fs.cat_file(f"{path}/current.json"))["version"]
        manifest = json.loads(fs.cat_file(f"{path}/versions/{version}/manifest.json"))
        manifest.pop("created")
        model.update(manifest=manifest, faiss=fs.cat_file(f"{path}/versions/{version}/memory.faiss"),
                     memory=zarr.open_array(f"{root}/versions/{version}/memory", mode="r",
                                            storage_options=storage_options)[...])
    return model


def assert_same_bank(model: dict, clean: dict, names=None) -> None:
    for name in (sorted(model["index"]) if names is None else names):
        pd.testing.assert_frame_equal(model["index"][name], clean["index"][name], obj=f"index part {name}")
        np.testing.assert_array_equal(model["bank"][name], clean["bank"][name], err_msg=f"bank array {name}")


def without_placement(manifest: dict) -> dict:
    """The manifest without where the fit ran (its recorded --workers / --dask-address): the clean
    run used the test cluster, the disturbed ones local workers; the model must not differ."""
    settings = {k: v for k, v in manifest.get("settings", {}).items() if k not in ("workers", "dask_address")}
    return {**manifest, "settings": settings}


def assert_same_model(model: dict, clean: dict) -> None:
    assert sorted(model["index"]) == sorted(clean["index"]), "not the clean run's bank batches"
    assert_same_bank(model, clean)
    assert without_placement(model["manifest"]) == without_placement(clean["manifest"])
    np.testing.assert_array_equal(model["memory"], clean["memory"], err_msg="memory (coreset)")
    assert model["faiss"] == clean["faiss"], "faiss index bytes"


def read_results(results: Path) -> tuple[pd.DataFrame, dict]:
    table = pd.read_parquet(results / "scores.parquet").sort_values("image_id").reset_index(drop=True)
    maps = {row.image_id: zarr.open_array(row.map, mode="r")[...] for row in table.itertuples()}
    return table, maps


# --------------------------------------------------------------------------- a Dask cluster of our own


@dataclasses.dataclass
class DaskCluster:
    address: str
    client: "distributed.Client"
    scheduler: ServerProcess
    workers: list[ServerProcess]

    def worker_pids(self) -> dict[str, int]:
        return self.client.run(os.getpid)

    def wait_for_workers(self, n: int, timeout: float = 120) -> None:
        self.client.wait_for_workers(n, timeout=timeout)


@contextlib.contextmanager
def running_dask_cluster(workdir: Path, env: dict, n_workers: int = 2):
    dask = str(BIN / "dask")
    workdir.mkdir(parents=True, exist_ok=True)
    scheduler_file = workdir / "scheduler.json"
    scheduler = ServerProcess("dask scheduler", [dask, "scheduler", "--host", "127.0.0.1", "--port", "0",
                                                 "--no-dashboard", "--scheduler-file", str(scheduler_file)],
                              # room in its transition log for every transition of the module (started_twice)
                              {**env, "DASK_DISTRIBUTED__ADMIN__LOW_LEVEL_LOG_LENGTH": "100000"},
                              workdir / "scheduler.log").start()
    workers, client = [], None
    try:
        address = wait_until(lambda: json.loads(scheduler_file.read_text())["address"], 90, scheduler,
                             "scheduler file written")
        for i in range(n_workers):
            # under its nanny (default): a killed worker process is replaced
            workers.append(ServerProcess(
                f"dask worker {i}", [dask, "worker", address, "--nworkers", "1", "--nthreads", "1",
                                     "--no-dashboard", "--name", f"worker-{i}", "--memory-limit", "0",
                                     "--local-directory", str(workdir / f"worker-{i}")],
                env, workdir / f"worker-{i}.log").start())
        client = distributed.Client(address, timeout=60, set_as_default=False)
        client.wait_for_workers(n_workers, timeout=180)
        yield DaskCluster(address, client, scheduler, workers)
    finally:
        if client is not None:
            client.close()
        for worker in workers:
            worker.stop(grace=10)
        scheduler.stop(grace=10)


@pytest.fixture(scope="module")
def cluster(prefect_server, tmp_path_factory):
    work = tmp_path_factory.mktemp("dask")
    # the workers run the tasks: they report to the Prefect server and keep the task cache in the
    # same PREFECT_HOME as the CLI runs of this module
    env = patchwatch_env(work / "prefect-home", api_url=prefect_server.api_url)
    with running_dask_cluster(work, env) as cluster:
        yield {"cluster": cluster, "env": env, "work": work, "api_url": prefect_server.api_url}


@pytest.fixture(scope="module")
def clean_fit(cluster, images) -> dict:
    """The undisturbed fit on the same cluster: the reference outputs."""
    work, env = cluster["work"], cluster["env"]
    root = work / "clean-model"
    started = time.monotonic()
    run_ok(["fit", "--images", images["train"], "--root", root, "--batch-size", "1",
            "--dask-address", cluster["cluster"].address], env, work / "clean-fit.log")
    print(f"clean fit {time.monotonic() - started:.1f}s")
    return {"root": root, "model": read_model(str(root))}


def task_run_histories(api_url: str, flow: str, parameter: str, value, done, settle: float = 60) -> dict[str, list]:
    """States, oldest first, of each task run of the ``flow`` run whose ``parameter`` is ``value``
    (the Prefect server is shared by the session), polled until ``done(histories)``: task runs
    reach the server's database through its event pipeline, a moment after the run ends."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + settle
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        while True:
            runs = [r for r in client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])),
                                                     sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=100)
                    if str(r.parameters.get(parameter)) == str(value)]
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in runs])))
            histories = {task.name: sorted(client.read_task_run_states(task.id), key=lambda s: s.timestamp)
                         for task in tasks}
            if done(histories) or time.monotonic() > deadline:
                return histories
            time.sleep(1)


def retry_waits(api_url: str, root: str) -> list[list[float]]:
    """Per task run of the fit into ``root`` that was retried: the delay of each AwaitingRetry state
    (its scheduled start minus the time it was set)."""
    def waits(histories):
        return [found for history in histories.values()
                if (found := [(s.state_details.scheduled_time - s.timestamp).total_seconds()
                              for s in history if s.name == "AwaitingRetry"])]

    return waits(task_run_histories(api_url, "fit", "root", root,
                                    lambda h: any(len(w) >= RETRIES for w in waits(h))))


def kill_a_busy_worker(cluster: DaskCluster, run: Background, task_function: str) -> int:
    """SIGKILL the worker process (not its nanny) while it is inside ``task_function`` (the
    Prefect task's own code, not Prefect's bookkeeping around it)."""
    def inside(dask_worker) -> tuple[int, bool]:  # runs on each worker (pickled by value)
        import sys

        for frame in sys._current_frames().values():
            while frame is not None:
                if frame.f_code.co_name == task_function:
                    return os.getpid(), True
                frame = frame.f_back
        return os.getpid(), False

    def busy():
        return [pid for pid, yes in cluster.client.run(inside).values() if yes]

    pid = poll(busy, 60, f"a worker inside {task_function}", run, interval=0.01)[0]
    os.kill(pid, signal.SIGKILL)
    return pid


def started_twice(cluster: DaskCluster, since: float) -> list[str]:
    """Dask keys that the scheduler sent to a worker ("processing") twice or more since ``since``:
    tasks the lost worker held (running, or queued there) sent again to another. The scheduler's own
    transition log, not the task runs' Prefect states: a killed worker's last state events may
    never reach the Prefect server (its Pending and Running both lost: the history then shows one
    clean start), while the scheduler records every transition as it makes it."""
    def processing_counts(dask_scheduler) -> collections.Counter:  # runs in the scheduler process
        return collections.Counter(str(entry.key) for entry in dask_scheduler.transition_log
                                   if entry.timestamp >= since and entry.finish == "processing")

    return sorted(key for key, n in cluster.client.run_on_scheduler(processing_counts).items() if n >= 2)


def parts_in(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.parquet")} if folder.exists() else set()


# --------------------------------------------------------------------------- 1. worker loss


def test_worker_killed_mid_fit_gives_the_clean_model(cluster, clean_fit, images):
    dask, env, work = cluster["cluster"], cluster["env"], cluster["work"]
    root = work / "fit-with-worker-loss"
    pids_before = dask.worker_pids()
    started = time.time()
    run = Background(["fit", "--images", images["train"], "--root", root, "--batch-size", "1",
                      "--dask-address", dask.address], env, work / "fit-worker-loss.log")
    poll(lambda: parts_in(root / "bank" / "index"), 120, "the first bank part", run)
    killed = kill_a_busy_worker(dask, run, "extract_features_task")
    parts_at_kill = parts_in(root / "bank" / "index")
    code, output = run.wait()
    assert code == 0, f"fit did not survive the loss of a worker:\n{output[-6000:]}"
    assert killed in pids_before.values()
    assert len(parts_at_kill) < N_TRAIN, "the kill must land before the last bank part"
    with pytest.raises(ProcessLookupError):
        os.kill(killed, 0)
    assert_same_model(read_model(str(root)), clean_fit["model"])
    rerun = started_twice(dask, started)
    assert rerun, "no task was cut short by the kill and run again"
    print(f"worker {killed} killed with {len(parts_at_kill)} parts written; run again: "
          f"{rerun}")
    dask.wait_for_workers(2)  # the nanny restarted the worker for the next test
    assert killed not in dask.worker_pids().values()


def test_worker_killed_mid_score_gives_the_clean_scores(cluster, clean_fit, images):
    dask, env, work = cluster["cluster"], cluster["env"], cluster["work"]
    root = clean_fit["root"]
    clean, disturbed = work / "clean-results", work / "results-with-worker-loss"
    run_ok(["score", "--images", images["test"], "--root", root, "--out", clean, "--batch-size", "1",
            "--dask-address", dask.address], env, work / "clean-score.log")
    dask.wait_for_workers(2)
    started = time.time()
    run = Background(["score", "--images", images["test"], "--root", root, "--out", disturbed, "--batch-size", "1",
                      "--dask-address", dask.address], env, work / "score-worker-loss.log")
    poll(lambda: parts_in(disturbed / "scores"), 120, "the first score part", run)
    killed = kill_a_busy_worker(dask, run, "score_batch_task")
    parts_at_kill = parts_in(disturbed / "scores")
    code, output = run.wait()
    assert code == 0, f"score did not survive the loss of a worker:\n{output[-6000:]}"
    assert len(parts_at_kill) < N_TEST, "the kill must land before the last score part"

    table, maps = read_results(disturbed)
    clean_table, clean_maps = read_results(clean)
    assert len(table) == N_TEST and table.image_id.is_unique
    columns = [c for c in table.columns if c != "map"]  # map URLs differ by results root
    pd.testing.assert_frame_equal(table[columns], clean_table[columns])
    assert maps.keys() == clean_maps.keys()
    for image_id in maps:
        np.testing.assert_array_equal(maps[image_id], clean_maps[image_id], err_msg=image_id)
    summary = json.loads((disturbed / "summary.json").read_text())
    assert summary["images"] == N_TEST and summary["skipped"] == 0
    assert sorted(parts_in(disturbed / "scores")) == sorted(parts_in(clean / "scores"))
    rerun = started_twice(dask, started)
    assert rerun, "no task was cut short by the kill and run again"
    print(f"worker {killed} killed with {len(parts_at_kill)} parts written; run again: "
          f"{rerun}")
    dask.wait_for_workers(2)


# --------------------------------------------------------------------------- 2. storage outage


class TcpProxy:
    """127.0.0.1:port -> 127.0.0.1:upstream, byte for byte. ``stop()`` closes the listening socket
    and every open connection (clients then get connection refused / reset); ``start()`` listens
    again on the same port. Loopback only; its threads end with the sockets."""

    def __init__(self, upstream: int):
        self.upstream = upstream
        self.port = 0
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "TcpProxy":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() thread
            listener.close()
        with self._lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream), timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # stopped meanwhile
                    client.close()
                    upstream.close()
                    return
                self._connections.update((client, upstream))
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, target), daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._connections.difference_update((source, target))
            source.close()


def requests_logged(log: str) -> list[tuple[str, str]]:
    """(method, path) of each request in moto_server's (werkzeug's) access log."""
    return re.findall(r'"(GET|PUT|POST|DELETE|HEAD) (\S+) HTTP/[\d.]+"', log)


def test_storage_outage_fails_clearly_keeps_written_parts_and_resumes(prefect_server, clean_fit, images, tmp_path):
    bucket = "outage"
    with running_s3_server(tmp_path / "s3", bucket=bucket) as s3:  # its own endpoint: the shared one stays up
        proxy = TcpProxy(int(s3.endpoint.rsplit(":", 1)[1])).start()
        try:
            direct = s3fs.S3FileSystem(endpoint_url=s3.endpoint, key="testing", secret="testing", **FAST)
            options = {"endpoint_url": s3.endpoint, "key": "testing", "secret": "testing", **FAST}
            proxied = dataclasses.replace(s3, endpoint=proxy.endpoint, env=s3_env(proxy.endpoint, tmp_path))
            env = patchwatch_env(tmp_path / "prefect-home", api_url=prefect_server.api_url, s3=proxied)
            env.update(PATCHWATCH_RETRY_DELAY=str(RETRY_DELAY),
                       AWS_MAX_ATTEMPTS="1")  # botocore's own retries would add ~5 s per call
            root = f"s3://{bucket}/model"
            fit = ["fit", "--images", images["train"], "--root", root, "--batch-size", "1", "--workers", "1"]

            def parts() -> list[str]:
                direct.invalidate_cache()
                found = direct.glob(f"{bucket}/model/bank/index/*.parquet")
                return sorted(Path(p).stem for p in found)

            run = Background(fit, env, tmp_path / "fit-outage.log")
            poll(parts, 120, "the first bank part", run, interval=0.05)
            proxy.stop()
            cut = time.monotonic()
            code, output = run.wait()
            failed_after = time.monotonic() - cut

            # a clear failure naming the storage problem, after the retries
            assert code != 0, f"the fit went on without its storage:\n{output[-4000:]}"
            assert "Could not connect to the endpoint URL" in output and proxy.endpoint in output, output[-6000:]
            assert "Retries are exhausted" in output, output[-6000:]
            assert failed_after >= RETRIES * RETRY_DELAY, f"failed after {failed_after:.1f}s: no waits?"
            delays = retry_waits(prefect_server.api_url, root)
            assert any(len(w) == RETRIES for w in delays), f"AwaitingRetry delays recorded: {delays}"
            waits = next(w for w in delays if len(w) == RETRIES)
            assert all(abs(w - RETRY_DELAY) < 0.5 for w in waits), waits

            # what was written before the outage: whole, the clean run's content, and only that
            assert not direct.exists(f"{bucket}/model/current.json"), "an unfinished fit must not look finished"
            written = parts()
            assert 1 <= len(written) < N_TRAIN, f"the outage must land mid-run: {written}"
            partial = read_model(root, options)
            assert sorted(partial["index"]) == written
            assert_same_bank(partial, clean_fit["model"], written)
            arrays = {Path(p).name for p in direct.ls(f"{bucket}/model/bank", detail=False)} - {"index", "zarr.json"}
            orphans = sorted(arrays - set(written))  # arrays of the batch cut short: no index part, not counted
            objects = {p: info["ETag"] for p, info in direct.find(f"{bucket}/model", detail=True).items()
                       if any(f"/{name}" in p for name in written)}
            log_before = s3.process.log_path.stat().st_size

            # the endpoint returns (same port, same bucket): the re-run finishes the rest only
            proxy.start()
            started = time.monotonic()
            run_ok(fit, env, tmp_path / "fit-rerun.log")
            rerun_s = time.monotonic() - started
            with s3.process.log_path.open("rb") as log:
                log.seek(log_before)
                requests = requests_logged(log.read().decode(errors="replace"))
            rewritten = [path for method, path in requests if method in ("PUT", "POST", "DELETE")
                         and any(f"/{name}" in path for name in written)]
            assert not rewritten, f"the re-run wrote again what the failed run had finished: {rewritten}"
            assert any(method == "PUT" for method, _ in requests), "moto's request log is not being read"
            after = {p: info["ETag"] for p, info in direct.find(f"{bucket}/model", detail=True).items()
                     if p in objects}
            assert after == objects
            assert_same_model(read_model(root, options), clean_fit["model"])
            print(f"outage: failed {failed_after:.1f}s after the cut (retry waits {delays}), "
                  f"{len(written)} of {N_TRAIN} batches kept, arrays without index part {orphans}, re-run {rerun_s:.1f}s")
        finally:
            proxy.stop()


def test_a_write_that_dies_half_way_is_never_listed_as_a_part(tmp_path, monkeypatch, writes_die_half_way):
    """Local roots: the bytes go to ``NAME.partial`` and are renamed over NAME when whole."""
    from patchwatch.storage import locations
    from patchwatch.storage.model_store import FeatureBank
    from patchwatch.storage.results_store import ResultStore

    bank, results = FeatureBank(str(tmp_path / "model")), ResultStore(str(tmp_path / "results"))
    frame = pd.DataFrame({"image_id": ["a"], "score": [1.0]})
    results.write_scores("part-00000", frame)

    writes_die_half_way()
    with pytest.raises(OSError):
        results.write_scores("part-00001", pd.concat([frame] * 100))
    with pytest.raises(OSError):
        bank.write_batch(0, np.ones((4, 8), np.float32),
                         [{"image_id": "a", "uri": "a", "batch": 0, "row_start": 0, "row_stop": 4,
                           "grid_h": 2, "grid_w": 2, "height": 32, "width": 32, "input_h": 32,
                           "input_w": 32}], rows_per_chunk=4)
    monkeypatch.undo()

    assert not (tmp_path / "results" / "scores" / "part-00001.parquet").exists()
    assert results.written_parts("scores") == {"part-00000"}
    assert results.has_part("scores", "part-00000") and not results.has_part("scores", "part-00001")
    pd.testing.assert_frame_equal(results.scores(), frame)
    assert bank.batches() == [] and bank.next_batch() == 0
    assert len(bank.index()) == 0
    # a leftover temp file of a killed writer is not a part either
    (tmp_path / "model" / "bank" / "index").mkdir(parents=True, exist_ok=True)
    (tmp_path / "model" / "bank" / "index" / "batch-00003.parquet.partial").write_bytes(b"PAR1 half")
    assert bank.batches() == []
    locations.write_bytes_atomically(str(tmp_path / "whole.bin"), b"x" * 10)
    assert (tmp_path / "whole.bin").read_bytes() == b"x" * 10 and not (tmp_path / "whole.bin.partial").exists()
