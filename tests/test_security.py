"""Security: credentials stay out of every record of a run, model files cannot run code when
loaded, and a model root of a newer format is refused by name.

1. Credentials. ``patchwatch fit`` + ``patchwatch score`` against the loopback S3 endpoint (images,
   model and results all on S3), with distinctive random credentials (access key id, secret key,
   session token) and Prefect logging at DEBUG. None of the three strings may appear in: the CLI
   output (flow, tasks, Dask workers), any object the run wrote (manifest.json, summary.json,
   Parquet, Zarr metadata...), the run's PREFECT_HOME (task results and cache records), what the
   Prefect server returns for the runs through the client (flow runs with their parameters, task
   runs and their states, logs, artifacts), nor the server's database files.
2. Model files. A pickle payload that writes a marker file (first shown to run when loaded the
   unsafe way) in place of ``detector.npz`` (raw pickle, or an object array inside an npz), as the
   Zarr ``memory`` array (a pickle codec, v3 and v2 metadata), and as the backbone's ``.pth``
   weights. Each is refused through patchwatch's own loading path (ModelStore, the workers'
   ``load_model``, the feature extractor's backbone loader) and the marker never appears. Every
   ``torch.load`` made while loading a backbone is spied on: ``weights_only=True`` each time; and
   the source is checked for unsafe loader calls (a static check on top, not instead).
3. Format version. ``format_version: 999`` -> IncompatibleModelError naming the version, from the
   store, from the workers' loader and from ``patchwatch score`` (non-zero exit, no results).
"""
from __future__ import annotations

import ast
import io
import json
import pickle
import secrets
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from tests.servers import REPO, patchwatch_command, patchwatch_env, run_patchwatch

zarr = pytest.importorskip("zarr")
s3fs = pytest.importorskip("s3fs")

pytestmark = pytest.mark.filterwarnings(r"ignore:Object at (index|outcomes) is not recognized:UserWarning")

CLI_TIMEOUT = 240
SHAPE = (128, 128)
SOURCE_PACKAGES = ("anomaly", "storage", "tasks", "flows", "patchwatch", "bench")


def texture(seed: int, shape=SHAPE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = gaussian_filter(rng.normal(size=(*shape, 3)), sigma=(3, 3, 0))
    return np.clip(128 + 40 * noise / noise.std(), 0, 255).astype(np.uint8)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- 1. credentials


@pytest.fixture(scope="module")
def credentials() -> dict[str, str]:
    """Distinctive values, unique to this run: a hit can only come from this module's runs."""
    return {"AWS_ACCESS_KEY_ID": "AKIAPW" + secrets.token_hex(7).upper(),
            "AWS_SECRET_ACCESS_KEY": "pwSecret" + secrets.token_urlsafe(27),
            "AWS_SESSION_TOKEN": "pwToken" + secrets.token_urlsafe(48)}


@pytest.fixture(scope="module")
def secret_run(s3_server, prefect_server, credentials, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("secret-run")
    prefix = f"security-{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem(endpoint_url=s3_server.endpoint, key="testing", secret="testing",
                           skip_instance_cache=True, use_listings_cache=False)
    for i in range(4):
        fs.pipe_file(f"{s3_server.bucket}/{prefix}/images/train/good-{i}.png", png(texture(i)))
    for i in range(2):
        pixels = texture(50 + i)
        pixels[40:46, 20:100] = 250 * i
        fs.pipe_file(f"{s3_server.bucket}/{prefix}/images/test/test-{i}.png", png(pixels))
    env = patchwatch_env(work / "prefect-home", api_url=prefect_server.api_url, s3=s3_server)
    env.update(credentials)
    env["PREFECT_LOGGING_LEVEL"] = "DEBUG"  # the most a run can say about itself
    url = s3_server.url
    root, results = url(prefix, "model"), url(prefix, "results")
    started = time.monotonic()
    fit = run_patchwatch(["fit", "--images", url(prefix, "images", "train"), "--root", root, "--workers", "1",
                          "--batch-size", "2"], env, timeout=CLI_TIMEOUT)
    score = run_patchwatch(["score", "--images", url(prefix, "images", "test"), "--root", root, "--out", results,
                            "--workers", "1"], env, timeout=CLI_TIMEOUT)
    print(f"fit + score on S3 with distinctive credentials: {time.monotonic() - started:.1f}s")
    return {"fs": fs, "prefix": f"{s3_server.bucket}/{prefix}", "root": root, "results": results,
            "output": fit.stdout + score.stdout, "home": work / "prefect-home",
            "api_url": prefect_server.api_url, "server_home": prefect_server.home}


def recorded_by_prefect(api_url: str, root: str, settle: float = 60) -> dict[str, list]:
    """What the Prefect server holds about the fit and score runs of ``root``, as JSON texts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowFilter, FlowFilterName,
                                                FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId)
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + settle
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        while True:  # artifacts and task runs reach the database through the server's event pipeline
            runs = [r for r in client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["fit", "score"])),
                                                     sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=100)
                    if str(r.parameters.get("root")) == root]
            ids = [r.id for r in runs]
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))
            if len(runs) == 2 and {a.key for a in artifacts} >= {"fit-summary", "score-summary", "most-anomalous"} \
                    or time.monotonic() > deadline:
                break
            time.sleep(2)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
        states = [s for t in tasks for s in client.read_task_run_states(t.id)]
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))
    return {"flow runs": [r.model_dump_json() for r in runs], "task runs": [t.model_dump_json() for t in tasks],
            "task run states": [s.model_dump_json() for s in states], "logs": [g.model_dump_json() for g in logs],
            "artifacts": [a.model_dump_json() for a in artifacts]}


def leaks(blob: bytes | str, credentials: dict[str, str]) -> list[str]:
    data = blob.encode() if isinstance(blob, str) else blob
    return [name for name, value in credentials.items() if value.encode() in data]


def test_credentials_never_recorded(secret_run, credentials):
    sources: dict[str, bytes | str] = {"CLI output (fit + score, workers included)": secret_run["output"]}

    fs, prefix = secret_run["fs"], secret_run["prefix"]
    objects = [p for p in fs.find(prefix) if "/images/" not in p]
    for path in objects:
        sources[f"s3://{path}"] = fs.cat_file(path)
    manifest = json.loads(sources[f"s3://{prefix}/model/versions/v0001/manifest.json"])
    summary = json.loads(sources[f"s3://{prefix}/results/summary.json"])
    assert manifest["n_images"] == 4 and summary["images"] == 2  # the runs did their work

    home_files = [p for p in secret_run["home"].rglob("*") if p.is_file()]
    for path in home_files:
        sources[str(path)] = path.read_bytes()

    recorded = recorded_by_prefect(secret_run["api_url"], secret_run["root"])
    assert len(recorded["flow runs"]) == 2, recorded["flow runs"]
    assert len(recorded["artifacts"]) >= 3 and any(secret_run["root"] in a for a in recorded["artifacts"])
    assert recorded["task runs"] and recorded["task run states"]
    for kind, texts in recorded.items():
        for i, text in enumerate(texts):
            sources[f"Prefect server: {kind} #{i}"] = text
    database = [p for p in secret_run["server_home"].glob("prefect.db*") if p.is_file()]
    assert database, list(secret_run["server_home"].iterdir())
    for path in database:
        sources[f"Prefect database {path.name}"] = path.read_bytes()

    found = {source: names for source, blob in sources.items() if (names := leaks(blob, credentials))}
    assert not found, f"credentials recorded in: {found}"
    print(f"{len(sources)} sources scanned: CLI output {len(secret_run['output'])} chars, {len(objects)} S3 objects, "
          f"{len(home_files)} PREFECT_HOME files, " + ", ".join(f"{len(v)} {k}" for k, v in recorded.items()))


def test_leak_detector_finds_a_planted_secret(credentials):
    """The scan itself works: a record holding a credential is caught (the test can fail)."""
    planted = json.dumps({"storage_options": {"secret": credentials["AWS_SECRET_ACCESS_KEY"]}})
    assert leaks(planted, credentials) == ["AWS_SECRET_ACCESS_KEY"]
    assert leaks(pickle.dumps({"token": credentials["AWS_SESSION_TOKEN"]}), credentials) == ["AWS_SESSION_TOKEN"]


# --------------------------------------------------------------------------- 2. model files run no code


class Payload:
    """Unpickling this writes ``marker``: stands for any code an attacker's model file would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def npz_with_object_array(marker: Path) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, mean=np.zeros((4, 3), np.float32), config=np.array([Payload(marker)], dtype=object))
    return buffer.getvalue()


def raw_pickle(marker: Path) -> bytes:
    return pickle.dumps({"mean": Payload(marker)})


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PAYLOAD-RAN"


def model_root(tmp_path: Path, detector: str, **extra) -> Path:
    """The folder of version v0001 (current) of a model root at tmp_path/model."""
    from patchwatch.anomaly.features import FeatureConfig
    from patchwatch.anomaly.detectors import detector_config
    from patchwatch.storage.model_store import ModelStore

    root = tmp_path / "model" / "versions" / "v0001"
    ModelStore(str(root)).write_manifest({"detector": detector, "feature_config": FeatureConfig().to_dict(),
                                          "detector_config": detector_config(detector).to_dict(), **extra})
    (tmp_path / "model" / "current.json").write_text(json.dumps({"version": "v0001"}))
    return root


@pytest.mark.parametrize("make", [npz_with_object_array, raw_pickle], ids=["object-array-in-npz", "raw-pickle"])
def test_pickled_detector_file_is_refused(make, marker, tmp_path):
    from patchwatch.storage.model_store import ModelStore
    from patchwatch.tasks.scoring import load_model

    data = make(marker)
    # the payload is live: loading it the unsafe way runs it
    loaded = np.load(io.BytesIO(data), allow_pickle=True)
    if hasattr(loaded, "files"):  # an npz: members load on access
        [loaded[k] for k in loaded.files]
    assert marker.exists(), "the payload did not run even when loaded unsafely: not a valid test"
    marker.unlink()

    root = model_root(tmp_path, "padim")
    (root / "detector.npz").write_bytes(data)
    with pytest.raises(ValueError, match="allow_pickle"):
        ModelStore(str(root)).read_arrays("detector")
    with pytest.raises(ValueError, match="allow_pickle"):  # what a Dask worker does before scoring
        load_model(str(root), f"malicious-{make.__name__}")
    assert not marker.exists(), "loading a model file ran code"


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_pickled_memory_array_is_refused(zarr_format, marker, tmp_path):
    from patchwatch.storage.model_store import ModelStore
    from patchwatch.tasks.scoring import load_model

    root = model_root(tmp_path, "patchcore")
    memory = root / "memory"
    memory.mkdir()
    payload = pickle.dumps(np.array([Payload(marker)] * 4, dtype=object))
    if zarr_format == 3:
        (memory / "zarr.json").write_text(json.dumps({
            "zarr_format": 3, "node_type": "array", "shape": [4], "data_type": "float32",
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [4]}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": 0.0, "codecs": [{"name": "numcodecs.pickle", "configuration": {}}], "attributes": {}}))
        (memory / "c").mkdir()
        (memory / "c" / "0").write_bytes(payload)
    else:
        (memory / ".zarray").write_text(json.dumps({
            "zarr_format": 2, "shape": [4], "chunks": [4], "dtype": "|O", "compressor": None, "fill_value": None,
            "filters": [{"id": "pickle", "protocol": 5}], "order": "C"}))
        (memory / "0").write_bytes(payload)
    pickle.loads(payload)
    assert marker.exists(), "the payload did not run even when loaded unsafely: not a valid test"
    marker.unlink()

    refusal = r"(?i)unknown codec|no array found|data type"  # zarr reads v3 arrays of plain numbers only
    with pytest.raises(Exception, match=refusal) as refused:
        ModelStore(str(root)).read_memory()
    with pytest.raises(Exception, match=refusal):
        load_model(str(root), f"malicious-memory-v{zarr_format}")
    assert not marker.exists(), f"reading the memory array ran code ({refused.value!r})"


def test_malicious_backbone_weights_are_refused(marker, tmp_path, monkeypatch):
    import torch

    import patchwatch.anomaly.backbone as backbone
    from patchwatch.anomaly.features import FeatureConfig, PatchFeatureExtractor

    weights = tmp_path / "efficientnet-lite0.pth"
    torch.save({"_conv_stem.weight": Payload(marker)}, weights)
    torch.load(weights, weights_only=False)
    assert marker.exists(), "the payload did not run even when loaded unsafely: not a valid test"
    marker.unlink()

    monkeypatch.setattr(backbone, "offline_weights_path", lambda name: str(weights))
    with pytest.raises(pickle.UnpicklingError):
        PatchFeatureExtractor(FeatureConfig())  # the workers' path: feature_extractor -> create_backbone
    with pytest.raises(pickle.UnpicklingError):
        backbone.create_backbone(backbone.DEFAULT_BACKBONE)
    assert not marker.exists(), "loading backbone weights ran code"


def test_every_torch_load_is_weights_only(monkeypatch):
    import torch

    import patchwatch.anomaly.backbone as backbone
    from patchwatch.anomaly.features import FeatureConfig, PatchFeatureExtractor

    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    PatchFeatureExtractor(FeatureConfig())
    backbone.create_backbone(backbone.DEFAULT_BACKBONE)
    assert calls and all(c is True for c in calls), f"torch.load weights_only arguments: {calls}"


UNSAFE_LOADERS = {("pickle", "load"), ("pickle", "loads"), ("cloudpickle", "load"), ("cloudpickle", "loads"),
                  ("dill", "load"), ("dill", "loads"), ("joblib", "load"), ("marshal", "loads")}


def test_no_unsafe_loader_in_the_source():
    """Static check over the project's code (on top of the loading tests above): torch.load with
    weights_only=True, np.load without allow_pickle=True, no pickle-family loader."""
    problems = []
    files = [p for package in SOURCE_PACKAGES for p in (REPO / package).rglob("*.py")]
    assert len(files) > 20
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name)):
                continue
            call, where = (node.func.value.id, node.func.attr), f"{path.relative_to(REPO)}:{node.lineno}"
            keywords = {k.arg: k.value for k in node.keywords}
            if call == ("torch", "load"):
                value = keywords.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            elif call in (("np", "load"), ("numpy", "load")):
                value = keywords.get("allow_pickle")
                if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                    problems.append(f"{where}: np.load with allow_pickle")
            elif call in UNSAFE_LOADERS:
                problems.append(f"{where}: {'.'.join(call)}")
    assert not problems, problems


# --------------------------------------------------------------------------- 3. format version


def test_newer_format_is_refused_by_the_store_and_the_workers(tmp_path):
    from patchwatch.storage.model_store import FORMAT_VERSION, IncompatibleModelError, ModelStore
    from patchwatch.tasks.scoring import load_model

    root = model_root(tmp_path, "patchcore")
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION < 999
    for version in (999, "1", None, 1.5):
        (root / "manifest.json").write_text(json.dumps({**manifest, "format_version": version}))
        with pytest.raises(IncompatibleModelError, match=f"format version {version!r}"):
            ModelStore(str(root)).read_manifest()
    (root / "manifest.json").write_text(json.dumps({**manifest, "format_version": 999}))
    with pytest.raises(IncompatibleModelError, match="format version 999"):
        ModelStore(str(root)).fingerprint()
    with pytest.raises(IncompatibleModelError, match="format version 999"):
        load_model(str(root), "newer-format")


def test_score_refuses_a_newer_model_root(prefect_server, tmp_path):
    root = model_root(tmp_path, "patchcore")
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "format_version": 999}))
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(texture(7)).save(images / "a.png")
    results = tmp_path / "results"
    env = patchwatch_env(tmp_path / "prefect-home", api_url=prefect_server.api_url)
    command = patchwatch_command() + ["score", "--images", str(images), "--root", str(tmp_path / "model"), "--out", str(results),
                                      "--workers", "1"]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=CLI_TIMEOUT,
                          stdin=subprocess.DEVNULL)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-4000:]
    assert "IncompatibleModelError" in output and "format version 999" in output, output[-4000:]
    assert "upgrade patchwatch or re-fit" in output, output[-4000:]
    assert not results.exists() or not any(results.rglob("*.parquet")), "scored with a model it cannot read"
