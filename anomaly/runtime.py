"""Inference runtimes for the backbone's forward pass: torch eager, ONNX Runtime, OpenVINO.

Only the stage feature maps come from the runtime; preprocessing and the patch arithmetic stay in
torch (anomaly.features), shared by every runtime. On CPUs, one thread, ONNX Runtime ran the
EfficientNet-Lite0 stages 2.2-3.3x (one dynamic-shape session) and 3.2-8.1x (a session per
shape) faster than torch eager, its maps within 6.4e-5 of torch's, and MTD feature extraction end
to end 2.2x faster (bench/results/runtime.md, bench/bench_runtime.py). OpenVINO fp32 was as fast
per call but compiles a shape 4-5x slower. torch stays the reference and the runtime on GPUs.

The runtime is a setting of the process that runs the backbone, never of the model: a model
fitted with one runtime scores with any other (within :data:`MAP_TOLERANCE`).
"""
from __future__ import annotations

import collections
import hashlib
import os
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

RUNTIMES = ("torch", "onnxruntime", "openvino")
# the fastest exact CPU runtime measured by bench/bench_runtime.py (bench/results/runtime.md)
CPU_DEFAULT_RUNTIME = "onnxruntime"
AUTO = "auto"
RUNTIME_ENV = "PATCHWATCH_RUNTIME"             # read where the backbone runs (tasks.runtime)
THREADS_ENV = "PATCHWATCH_RUNTIME_THREADS"
DEVICE_ENV = "PATCHWATCH_DEVICE"              # read where the backbone runs, like RUNTIME_ENV
CACHE_ENV = "PATCHWATCH_CACHE_DIR"
# stage maps of an exported runtime against torch eager: largest absolute difference measured
# 6.4e-5 on maps of magnitude ~20 (bench/results/runtime.md); this bound leaves room for other CPUs
MAP_TOLERANCE = 5e-4
# "fixed": a session compiled for each input shape (1.4x faster per call than one dynamic-shape
# session at 144 x 64 to 512 x 512, 3.7x at 72 x 32, none at 128 x 304; bench/results/runtime.md)
# once the shape has come COMPILE_AFTER times, for at most FIXED_SHAPES shapes; other shapes go
# through the dynamic session. A compile (34-72 ms for ONNX Runtime, 176-310 ms for OpenVINO) pays
# for itself after about 2 (512 x 512) to 45 (144 x 64) calls of its shape: a shape seen a few
# times is not worth one. "dynamic": the dynamic session only. Padding to shape buckets is not an
# option: zero padding changes the border features, so the maps would no longer equal torch's.
SHAPE_POLICIES = ("fixed", "dynamic")
COMPILE_AFTER = 10
# each fixed-shape ONNX Runtime session holds its own re-laid-out weights (~19 MiB for Lite0)
FIXED_SHAPES = 16
ONNX_OPSET = 17
EXPORT_FORMAT = 1  # bump when the export itself changes: older cached files are then ignored


def resolve_runtime(name: str | None, device: str | torch.device = "cpu") -> str:
    """``name`` checked, or for None / "auto" the default: torch on a GPU, else the CPU default."""
    name = name or AUTO
    if name == AUTO:
        return "torch" if torch.device(device).type != "cpu" else CPU_DEFAULT_RUNTIME
    if name not in RUNTIMES:
        raise ValueError(f"unknown backbone runtime {name!r}; choose one of {', '.join((AUTO,) + RUNTIMES)}")
    if name != "torch" and torch.device(device).type != "cpu":
        raise ValueError(f"the {name} runtime runs on the CPU; use --runtime torch for device {device}")
    return name


def configured_runtime() -> tuple[str, int]:
    """(runtime, threads) this process's backbone runs with: ``PATCHWATCH_RUNTIME`` (default
    auto) and ``PATCHWATCH_RUNTIME_THREADS`` (default 1, like torch on the workers)."""
    return os.environ.get(RUNTIME_ENV) or AUTO, int(os.environ.get(THREADS_ENV) or 1)


def resolve_device(name: str | None) -> torch.device:
    """The device the backbone runs on: "auto" (or None) is the first GPU where torch sees one,
    else the CPU; "cpu", "cuda", "cuda:N" as torch names them, refused with a reason where this
    machine has no such device."""
    name = (name or AUTO).strip().lower()
    if name == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; choose auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU here "
                             f"(torch {torch.__version__}); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {name!r}; choose auto, cpu, cuda or cuda:N")
    return device


def configured_device() -> torch.device:
    """The device this process's backbone runs on: ``PATCHWATCH_DEVICE`` (default auto)."""
    return resolve_device(os.environ.get(DEVICE_ENV))


def cache_dir() -> Path:
    """Where exported models are kept: ``PATCHWATCH_CACHE_DIR``, else the user's cache folder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "patchwatch"


def weights_digest(model: torch.nn.Module) -> str:
    """Digest of a model's parameters and buffers: an exported file belongs to these weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def export_key(backbone: str, layers: tuple[int, ...], model: torch.nn.Module) -> str:
    import timm

    parts = [backbone, ",".join(map(str, layers)), weights_digest(model), torch.__version__, timm.__version__,
             str(ONNX_OPSET), str(EXPORT_FORMAT)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def exported_onnx(model: torch.nn.Module, backbone: str, layers: tuple[int, ...],
                  directory: Path | None = None) -> Path:
    """The ONNX file of ``model``'s stages, exported once per (backbone, layers, weights,
    torch/timm version) with dynamic batch, height and width; reused from the cache after.

    Written to a temporary file and renamed into place: a concurrent reader (another worker)
    sees either no file or a complete one, and two concurrent exports both leave a complete one.
    """
    directory = Path(directory or cache_dir()) / "onnx"
    path = directory / f"{backbone}-l{'-'.join(map(str, layers))}-{export_key(backbone, layers, model)}.onnx"
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=path.stem + ".", suffix=".tmp")
    os.close(handle)
    try:
        outputs = [f"stage{layer}" for layer in layers]
        with warnings.catch_warnings():
            # the TorchScript-based exporter is deprecated in favour of dynamo, which needs
            # onnxscript and gave no exactness or speed gain here; TracerWarnings are about
            # Python-side shape arithmetic, which the dynamic padding exports as graph ops
            warnings.simplefilter("ignore")
            torch.onnx.export(model.eval(), (torch.zeros(1, 3, 64, 64),), temporary, dynamo=False,
                              input_names=["input"], output_names=outputs, opset_version=ONNX_OPSET,
                              dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"},
                                            **{o: {0: "batch", 2: f"{o}_h", 3: f"{o}_w"} for o in outputs}})
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def _packaged_export_key(backbone: str, layers: tuple[int, ...]) -> str | None:
    """What an export of a packaged-weights backbone (anomaly.backbone.OFFLINE_WEIGHTS) is made
    from, known without building the model: the weights file's bytes, the code that converts them
    (anomaly/backbone.py), the layers and the torch and timm versions. None for a hub model."""
    from importlib.metadata import version

    from . import backbone as backbone_module

    weights = backbone_module.offline_weights_path(backbone)
    if weights is None:
        return None
    parts = [backbone, ",".join(map(str, layers)), _file_digest(weights), _file_digest(backbone_module.__file__),
             torch.__version__, version("timm"), str(ONNX_OPSET), str(EXPORT_FORMAT)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _description_path(backbone: str, layers: tuple[int, ...], directory: Path | None) -> Path | None:
    key = _packaged_export_key(backbone, tuple(layers))
    if key is None:
        return None
    return Path(directory or cache_dir()) / "onnx" / f"{backbone}-l{'-'.join(map(str, layers))}-packaged-{key}.json"


def cached_export(backbone: str, layers: tuple[int, ...], directory: Path | None = None) -> tuple[Path, dict] | None:
    """(exported file, description) of a packaged-weights backbone exported before, found without
    building the model: building it imports timm (~3 s a process, every worker of every command).
    The description holds what the extractor needs of the model (:func:`record_export`). None when
    nothing matching is cached, or for a hub model (its weights are known only by building it)."""
    import json

    described = _description_path(backbone, layers, directory)
    if described is None or not described.exists():
        return None
    try:
        description = json.loads(described.read_text())
        path = described.parent / description["onnx"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable: the model is built and the description written again
    return (path, description) if path.exists() else None


def record_export(path: Path, backbone: str, layers: tuple[int, ...], description: dict,
                  directory: Path | None = None) -> None:
    """Write ``description`` (JSON values) of the export at ``path`` for :func:`cached_export`;
    atomically, as :func:`exported_onnx` writes (workers record the same export at once)."""
    import json

    described = _description_path(backbone, layers, directory)
    if described is None:
        return
    handle, temporary = tempfile.mkstemp(dir=described.parent, prefix=described.stem + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as out:
            json.dump({**description, "onnx": Path(path).name}, out)
        os.replace(temporary, described)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


class TorchStages:
    """torch eager: the reference, and the runtime on GPUs."""

    name = "torch"

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @torch.inference_mode()
    def __call__(self, inputs: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(inputs))


class _ShapeSessions:
    """One dynamic-shape session plus fixed-shape ones for the first ``fixed_shapes`` input shapes
    seen ``compile_after`` times (policy "fixed"; see :data:`SHAPE_POLICIES`)."""

    name = ""

    def __init__(self, onnx_path: Path, threads: int, shapes: str, fixed_shapes: int = FIXED_SHAPES,
                 compile_after: int = COMPILE_AFTER):
        if shapes not in SHAPE_POLICIES:
            raise ValueError(f"unknown shape policy {shapes!r}; choose one of {', '.join(SHAPE_POLICIES)}")
        self.onnx_path, self.threads, self.shapes = Path(onnx_path), threads, shapes
        self.fixed_shapes = fixed_shapes if shapes == "fixed" else 0
        self.compile_after = compile_after
        self.dynamic = self._compile(None)
        self.fixed: dict[tuple[int, ...], object] = {}
        self.seen: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def _compile(self, shape: tuple[int, ...] | None):
        raise NotImplementedError

    def _run(self, session, array: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def session_for(self, shape: tuple[int, ...]):
        with self._lock:
            if shape in self.fixed:
                return self.fixed[shape]
            self.seen[shape] += 1
            if self.seen[shape] >= self.compile_after and len(self.fixed) < self.fixed_shapes:
                self.fixed[shape] = self._compile(shape)
                return self.fixed[shape]
            return self.dynamic

    def __call__(self, inputs: torch.Tensor) -> list[torch.Tensor]:
        array = np.ascontiguousarray(inputs.detach().cpu().numpy(), dtype=np.float32)
        return [torch.from_numpy(np.asarray(m)) for m in self._run(self.session_for(array.shape), array)]


class OnnxRuntimeStages(_ShapeSessions):
    """ONNX Runtime, CPU execution provider, full graph optimisation (its NCHWc layout is what
    makes it fast: 4.7x slower without, measured)."""

    name = "onnxruntime"

    def _compile(self, shape):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if shape is not None:  # fixes the free dimensions: the same file, compiled for one shape
            for dimension, size in zip(("batch", "height", "width"), (shape[0], shape[2], shape[3])):
                options.add_free_dimension_override_by_name(dimension, size)
        return ort.InferenceSession(str(self.onnx_path), options, providers=["CPUExecutionProvider"])

    def _run(self, session, array):
        return session.run(None, {"input": array})


class OpenVinoStages(_ShapeSessions):
    """OpenVINO on the CPU in fp32: its default precision on CPUs with bf16 support is bf16,
    whose maps differ from torch's by up to ~1, so f32 is asked for explicitly."""

    name = "openvino"

    def _compile(self, shape):
        import openvino

        core = openvino.Core()
        model = core.read_model(str(self.onnx_path))
        if shape is not None:
            model.reshape({"input": list(shape)})
        return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                 "INFERENCE_NUM_THREADS": self.threads, "NUM_STREAMS": 1,
                                                 "PERFORMANCE_HINT": "LATENCY"})

    def _run(self, session, array):
        results = session(array)
        return [results[output] for output in session.outputs]


def backbone_stages(model: torch.nn.Module, backbone: str, layers: tuple[int, ...], runtime: str | None = None,
                    device: str | torch.device = "cpu", threads: int = 1, shapes: str = "fixed"):
    """A callable (B, 3, h, w) normalised inputs -> the ``layers`` stage maps (torch tensors),
    run by ``runtime`` (None / "auto": :func:`resolve_runtime`)."""
    runtime = resolve_runtime(runtime, device)
    if runtime == "torch":
        return TorchStages(model)
    return exported_stages(runtime, exported_onnx(model, backbone, tuple(layers)), threads, shapes)


def exported_stages(runtime: str, path: Path, threads: int = 1, shapes: str = "fixed"):
    """The stages callable of an exported ``runtime`` (onnxruntime, openvino) for the file at ``path``."""
    stages = OnnxRuntimeStages if runtime == "onnxruntime" else OpenVinoStages
    return stages(path, threads, shapes)
