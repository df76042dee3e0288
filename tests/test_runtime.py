"""Backbone runtimes (anomaly.runtime): exported runtimes give torch's maps, features and scores
within the stated tolerance; the export cache is reused and safe under concurrent exports."""
import importlib.util
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from patchwatch.anomaly.detectors import default_features, detector_config
from patchwatch.anomaly.engine import fit_detector, score_image
from patchwatch.anomaly.features import PatchFeatureExtractor
from patchwatch.anomaly.runtime import (MAP_TOLERANCE, RUNTIME_ENV, OnnxRuntimeStages, TorchStages, backbone_stages,
                             exported_onnx, resolve_runtime)
from patchwatch.anomaly.backbone import create_backbone

torch.set_num_threads(1)  # 2 threads are ~40x slower on the 2-core test machine

EXPORTED = [r for r in ("onnxruntime", "openvino") if importlib.util.find_spec(r)]
# a patch vector is an average of stage-map values (adaptive pooling), so its error is at most the
# maps'; an image score is a distance between such vectors: relative bound, scores are ~1-10
FEATURE_TOLERANCE = MAP_TOLERANCE
SCORE_RELATIVE_TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PATCHWATCH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "runtime-cache"))


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("tf_efficientnet_lite0", features_only=True, out_indices=(3, 4))


def textured_images(count: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth random textures of a few sizes (odd stage-grid sizes included: 'same' padding
    depends on each side's parity)."""
    rng = np.random.default_rng(seed)
    sizes = [(288, 128), (320, 192), (272, 336)]
    images = []
    for i in range(count):
        h, w = sizes[i % len(sizes)]
        coarse = rng.random((h // 8, w // 8, 3))
        image = np.kron(coarse, np.ones((8, 8, 1))) * 200 + rng.random((h, w, 3)) * 55
        images.append(image.astype(np.uint8))
    return images


@pytest.mark.parametrize("runtime", EXPORTED)
@pytest.mark.parametrize("shapes", ["fixed", "dynamic"])
def test_stage_maps_equal_torch_within_tolerance(lite0, runtime, shapes):
    stages = backbone_stages(lite0, "tf_efficientnet_lite0", (3, 4), runtime, shapes=shapes)
    stages.compile_after = 2  # the default waits for 10 sightings
    reference = TorchStages(lite0)
    generator = torch.Generator().manual_seed(0)
    # each shape three times: dynamic session, then (policy "fixed") a fixed-shape one
    for shape in [(1, 3, 128, 96), (1, 3, 272, 336)] * 3:
        inputs = torch.randn(*shape, generator=generator)
        got, expected = stages(inputs), reference(inputs)
        assert [tuple(g.shape) for g in got] == [tuple(e.shape) for e in expected]
        for g, e in zip(got, expected):
            assert float((g - e).abs().max()) <= MAP_TOLERANCE
    if shapes == "fixed":
        assert set(stages.fixed) == {(1, 3, 128, 96), (1, 3, 272, 336)}
    else:
        assert not stages.fixed


@pytest.mark.parametrize("runtime", EXPORTED)
def test_patch_features_equal_torch_within_tolerance(runtime):
    config = default_features("patchcore")  # with its context scale: two backbone passes per image
    torch_features = PatchFeatureExtractor(config, runtime="torch").extract(textured_images(3))
    exported = PatchFeatureExtractor(config, runtime=runtime)
    assert exported.runtime == runtime
    for expected, got in zip(torch_features, exported.extract(textured_images(3))):
        assert got.grid == expected.grid and got.input_shape == expected.input_shape
        assert float(np.abs(got.vectors - expected.vectors).max()) <= FEATURE_TOLERANCE


def test_fit_with_torch_scores_the_same_with_onnxruntime():
    """A model fitted with torch scores with ONNX Runtime (and the other way round) to the same
    image scores and maps: the runtime is not part of the model."""
    config = default_features("patchcore")
    settings = detector_config("patchcore")
    train, test = textured_images(6, seed=1), textured_images(3, seed=2)
    test[0][100:140, 40:90] = 255  # a bright defect
    by_runtime = {name: PatchFeatureExtractor(config, runtime=name) for name in ("torch", "onnxruntime")}
    for fit_with, score_with in (("torch", "onnxruntime"), ("onnxruntime", "torch")):
        detector = fit_detector("patchcore", settings, by_runtime[fit_with].extract(train))
        for image in test:
            expected = score_image(by_runtime[fit_with], detector, image, None)
            got = score_image(by_runtime[score_with], detector, image, None)
            assert got.score == pytest.approx(expected.score, rel=SCORE_RELATIVE_TOLERANCE)
            assert float(np.abs(got.map - expected.map).max()) <= SCORE_RELATIVE_TOLERANCE * float(expected.map.max())


def test_export_is_cached_and_reused(lite0, tmp_path, monkeypatch):
    first = exported_onnx(lite0, "tf_efficientnet_lite0", (3, 4), tmp_path)
    stamp = first.stat().st_mtime_ns

    def no_second_export(*args, **kwargs):
        raise AssertionError("exported again although the cached file matches")

    monkeypatch.setattr(torch.onnx, "export", no_second_export)
    assert exported_onnx(lite0, "tf_efficientnet_lite0", (3, 4), tmp_path) == first
    assert first.stat().st_mtime_ns == stamp
    # other layers or other weights: another file
    other = create_backbone("tf_efficientnet_lite0", features_only=True, out_indices=(3, 4))
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(AssertionError, match="exported again"):
        exported_onnx(other, "tf_efficientnet_lite0", (3, 4), tmp_path)


def _export_in_process(directory: str) -> str:
    torch.set_num_threads(1)
    model = create_backbone("tf_efficientnet_lite0", features_only=True, out_indices=(3, 4))
    return str(exported_onnx(model, "tf_efficientnet_lite0", (3, 4), Path(directory)))


def test_concurrent_exports_leave_one_complete_file(tmp_path):
    """Two workers exporting at once: each writes a temporary file and renames it, so the cached
    file is always a complete model and no temporary file is left behind."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        paths = pool.map(_export_in_process, [str(tmp_path)] * 2)
    assert paths[0] == paths[1]
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == [Path(paths[0]).name]
    stages = OnnxRuntimeStages(Path(paths[0]), threads=1, shapes="dynamic")
    assert [tuple(m.shape) for m in stages(torch.zeros(1, 3, 64, 64))] == [(1, 112, 4, 4), (1, 320, 2, 2)]


def test_runtime_choice():
    assert resolve_runtime(None) == resolve_runtime("auto") == "onnxruntime"
    assert resolve_runtime("auto", "cuda") == "torch"
    assert resolve_runtime("torch") == "torch"
    with pytest.raises(ValueError, match="unknown backbone runtime"):
        resolve_runtime("tensorrt")
    with pytest.raises(ValueError, match="runs on the CPU"):
        resolve_runtime("onnxruntime", "cuda")


def test_runtime_option_reaches_the_workers_extractor(monkeypatch):
    """``--runtime`` sets PATCHWATCH_RUNTIME before any worker starts; the workers' extractor
    (tasks.runtime.feature_extractor) reads it: torch still works, as does the default."""
    from patchwatch.cli import _prepare, build_parser
    from patchwatch.tasks.runtime import feature_extractor

    monkeypatch.setenv(RUNTIME_ENV, "auto")  # restored after the test
    config = default_features("spade")
    assert feature_extractor(config).runtime == "onnxruntime"
    args = build_parser().parse_args(["score", "--images", ".", "--root", ".", "--runtime", "torch"])
    monkeypatch.setattr("patchwatch.storage.locations.check_store", lambda location: None)
    monkeypatch.setattr("patchwatch.storage.model_store.ModelRegistry.current", lambda self: None)
    _prepare(args)
    assert os.environ[RUNTIME_ENV] == "torch"
    assert feature_extractor(config).runtime == "torch"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["score", "--images", ".", "--root", ".", "--runtime", "tensorrt"])


_FRESH_EXTRACTOR = """
import json, sys
import numpy as np
from patchwatch.anomaly.features import FeatureConfig, PatchFeatureExtractor
extractor = PatchFeatureExtractor(FeatureConfig(), runtime=sys.argv[1])
image = (np.arange(160 * 224, dtype=np.float64).reshape(160, 224) % 251).astype(np.uint8)
features = extractor.extract([image])[0]
np.save(sys.argv[2], features.vectors)
print(json.dumps({"timm": "timm" in sys.modules, "runtime": extractor.runtime}))
"""


def _fresh_extractor(runtime: str, out: Path, cache: Path) -> dict:
    """A new process's extractor of the default features: what it imported, its features saved."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "PATCHWATCH_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _FRESH_EXTRACTOR, runtime, str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("runtime", EXPORTED)
def test_a_process_with_the_export_cached_extracts_without_building_the_model(runtime, tmp_path):
    """A worker process whose backbone's export is cached (every command's workers after the
    first) finds it without building the model in timm (importing timm alone took ~3 s a
    process), and extracts the same features as the process that built it."""
    cache = tmp_path / "cache"
    first = _fresh_extractor(runtime, tmp_path / "first.npy", cache)
    assert first == {"timm": True, "runtime": runtime}   # nothing cached: the model is built, then exported
    again = _fresh_extractor(runtime, tmp_path / "again.npy", cache)
    assert again == {"timm": False, "runtime": runtime}
    np.testing.assert_array_equal(np.load(tmp_path / "again.npy"), np.load(tmp_path / "first.npy"))
    # torch itself runs the model: it is built
    assert _fresh_extractor("torch", tmp_path / "torch.npy", cache)["timm"] is True


def test_a_cached_export_is_found_for_its_own_weights_and_layers_only(tmp_path, monkeypatch):
    from patchwatch.anomaly import backbone
    from patchwatch.anomaly.runtime import cached_export, record_export

    exported = tmp_path / "onnx" / "lite0.onnx"
    exported.parent.mkdir()
    exported.write_bytes(b"an exported model")
    about = {"mean": [0.5] * 3, "std": [0.5] * 3, "reductions": [8, 16]}
    record_export(exported, "tf_efficientnet_lite0", (3, 4), about, tmp_path)
    assert cached_export("tf_efficientnet_lite0", (3, 4), tmp_path) == (exported, {**about, "onnx": "lite0.onnx"})
    assert cached_export("tf_efficientnet_lite0", (2, 3), tmp_path) is None
    assert cached_export("resnet18", (2, 3), tmp_path) is None   # hub weights: known by building the model only
    # the packaged weights file changed (another package version): the export is not theirs
    changed = tmp_path / "weights.pth"
    data = bytearray(Path(backbone.offline_weights_path("tf_efficientnet_lite0")).read_bytes())
    data[-1] ^= 1
    changed.write_bytes(bytes(data))
    with monkeypatch.context() as patched:
        patched.setattr(backbone, "offline_weights_path", lambda name: str(changed))
        assert cached_export("tf_efficientnet_lite0", (3, 4), tmp_path) is None
    exported.unlink()  # the description alone is not an export
    assert cached_export("tf_efficientnet_lite0", (3, 4), tmp_path) is None
