"""The backbone on a chosen device, images of one input size in shared forward passes.

GPUs are measured by bench/bench_gpu.py where one exists; what must hold on every machine is
tested here on the CPU: a batched image's features equal its unbatched ones within float32
rounding (so its score does not depend on which images shared its batch), order and shapes are
kept, a score batch still gives each bad image its own error row, and a GPU asked for where there
is none is one clear refusal, not a failure in every task.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from patchwatch.anomaly.detectors import default_features, detector_config, with_input_size
from patchwatch.anomaly.engine import fit_detector
from patchwatch.anomaly.features import GPU_BATCH_SIZE, PatchFeatureExtractor, default_batch_size
from patchwatch.anomaly.runtime import DEVICE_ENV, MAP_TOLERANCE, resolve_device

NO_GPU = not torch.cuda.is_available()
SCORE_RELATIVE_TOLERANCE = 1e-4  # as between runtimes (tests/test_runtime.py)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PATCHWATCH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "runtime-cache"))


def textures(sizes, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    images = []
    for h, w in sizes:
        coarse = rng.random((h // 8 + 1, w // 8 + 1, 3))
        image = np.kron(coarse, np.ones((8, 8, 1)))[:h, :w] * 200 + rng.random((h, w, 3)) * 55
        images.append(image.astype(np.uint8))
    return images


# 288 x 128 and 286 x 130 share their network inputs (144 x 64 and 64 x 32): batched together, each
# keeps its own image_shape; 320 x 192 goes in its own batch; order interleaved on purpose
SIZES = [(288, 128), (320, 192), (286, 130), (288, 128), (320, 192), (288, 128), (288, 128)]


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_batched_features_equal_one_at_a_time_in_order(runtime):
    config = default_features("patchcore")  # its context scale: two input sizes per image
    images = textures(SIZES)
    alone = PatchFeatureExtractor(config, runtime=runtime, batch_size=1).extract(images)
    batched_extractor = PatchFeatureExtractor(config, runtime=runtime, batch_size=3)
    passes = []
    forward = batched_extractor.stages
    batched_extractor.stages = lambda inputs: passes.append(inputs.shape[0]) or forward(inputs)
    batched = batched_extractor.extract(images)
    # 5 images of the first input size in batches of 3 + 2, the two others in one: per scale
    assert sorted(passes) == sorted([3, 2, 2] * 2)
    for image, one, many in zip(images, alone, batched):
        assert many.image_shape == one.image_shape == image.shape[:2]
        assert many.grid == one.grid and many.input_shape == one.input_shape
        assert float(np.abs(many.vectors - one.vectors).max()) <= MAP_TOLERANCE


@pytest.mark.parametrize("detector", ["patchcore", "padim"])
def test_an_images_score_does_not_depend_on_its_batch(detector):
    config = with_input_size(detector, default_features(detector), [(288, 128)])  # PaDiM's, as a fit sets it
    settings = detector_config(detector)
    train, test = textures([(288, 128)] * 8, seed=1), textures([(288, 128)] * 4, seed=2)
    test[1][100:140, 40:90] = 255  # a bright defect
    alone = PatchFeatureExtractor(config, runtime="torch", batch_size=1)
    batched = PatchFeatureExtractor(config, runtime="torch", batch_size=4)
    model = fit_detector(detector, settings, batched.extract(train))
    together = model.scores(batched.extract(test))
    for image, (score, amap) in zip(test, together):
        expected_score, expected_map = model.score(alone.extract([image])[0])
        assert score == pytest.approx(expected_score, rel=SCORE_RELATIVE_TOLERANCE)
        assert float(np.abs(amap - expected_map).max()) <= SCORE_RELATIVE_TOLERANCE * float(expected_map.max())


@pytest.mark.skipif(NO_GPU, reason="no CUDA GPU here (bench/bench_gpu.py measured one: bench/results/gpu.md)")
def test_on_a_gpu_batched_features_equal_unbatched_and_the_cpus_in_full_float32():
    config = default_features("patchcore")
    images = textures(SIZES)
    on_cpu = PatchFeatureExtractor(config, runtime="torch").extract(images)
    alone = PatchFeatureExtractor(config, device="cuda", batch_size=1).extract(images)
    batched_extractor = PatchFeatureExtractor(config, device="cuda")
    assert batched_extractor.runtime == "torch" and batched_extractor.batch_size == GPU_BATCH_SIZE
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    batched = batched_extractor.extract(images)
    for cpu, one, many in zip(on_cpu, alone, batched):
        assert many.grid == one.grid == cpu.grid and many.image_shape == cpu.image_shape
        assert float(np.abs(many.vectors - one.vectors).max()) <= MAP_TOLERANCE
        assert float(np.abs(many.vectors - cpu.vectors).max()) <= MAP_TOLERANCE


def test_default_batch_size_is_one_on_cpus_and_larger_on_gpus():
    assert default_batch_size(torch.device("cpu")) == 1
    assert default_batch_size(torch.device("cuda")) == GPU_BATCH_SIZE > 1
    assert PatchFeatureExtractor(default_features("padim")).batch_size == 1
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        PatchFeatureExtractor(default_features("padim"), batch_size=0)


class BatchedFeaturesOf:
    """An extractor stand-in with GPU batching: each 'image' is its patch features, or an
    exception to raise; records how many images each call got."""

    batch_size = 4

    def __init__(self):
        self.calls = []

    def extract(self, images):
        self.calls.append(len(images))
        bad = [image for image in images if isinstance(image, Exception)]
        if bad:
            raise bad[0]
        return list(images)


def test_a_gpu_score_batch_extracts_together_and_still_gives_a_bad_image_its_own_error_row(tmp_path):
    from patchwatch.anomaly.features import PatchFeatures
    from patchwatch.anomaly.padim import Padim, PadimConfig
    from patchwatch.storage.images import ImageRecord
    from patchwatch.storage.results_store import MapDescription, ResultStore
    from patchwatch.tasks.scoring import ModelRef, score_images

    store = ResultStore(str(tmp_path / "results"))
    store.prepare()
    store.describe_maps("v0001", MapDescription(image_threshold=2.0, pixel_threshold=1.0, units="u"))
    rng = np.random.default_rng(3)
    grid = (5, 6)
    model = Padim.fit([rng.standard_normal((30, 24)).astype(np.float32) for _ in range(40)], grid,
                      PadimConfig(channels=16))
    ref = ModelRef(root="unused", version="v0001", fingerprint="f", threshold=6.0)

    def features():
        return PatchFeatures(rng.standard_normal((30, 24)).astype(np.float32), grid, (40, 48), (40, 48))

    good = [features(), features(), features()]
    extractor = BatchedFeaturesOf()
    rows, errors = score_images([ImageRecord(f"i{n}.png", f"/src/i{n}.png") for n in range(3)], good,
                                extractor, model, store, ref)
    assert extractor.calls == [3] and not errors and len(rows) == 3
    mixed = [features(), ValueError("an odd image"), features()]
    extractor = BatchedFeaturesOf()
    rows, errors = score_images([ImageRecord(f"i{n}.png", f"/src/i{n}.png") for n in range(3)], mixed,
                                extractor, model, store, ref)
    assert extractor.calls == [3, 1, 1, 1]  # the shared pass failed: each image on its own
    assert [row["image_id"] for row in rows] == ["i0.png", "i2.png"]
    assert [(e["image_id"], e["reason"]) for e in errors] == [("i1.png", "cannot score it (ValueError: an odd image)")]
    for row in rows:
        score, amap = model.score(mixed[int(row["image_id"][1])])
        assert row["score"] == pytest.approx(score, rel=1e-9)


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU: auto picks it")
def test_device_choice_without_a_gpu():
    assert resolve_device(None) == torch.device("cpu") == resolve_device("auto") == resolve_device("CPU")
    with pytest.raises(ValueError, match="torch sees no CUDA GPU here"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="unsupported device 'meta'|unknown device"):
        resolve_device("meta")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_device_option_refuses_a_missing_gpu_in_one_line_and_reaches_the_workers(monkeypatch, tmp_path, capsys):
    from patchwatch.cli import _prepare, build_parser, main
    from patchwatch.tasks.runtime import feature_extractor

    monkeypatch.delenv(DEVICE_ENV, raising=False)
    code = main(["score", "--images", str(tmp_path), "--root", str(tmp_path / "m"), "--out", str(tmp_path / "o"),
                 "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "no CUDA GPU" in err[0], err
    assert DEVICE_ENV not in os.environ
    args = build_parser().parse_args(["score", "--images", ".", "--root", ".", "--device", "cpu"])
    monkeypatch.setattr("patchwatch.storage.locations.check_store", lambda location: None)
    _prepare(args)
    assert os.environ[DEVICE_ENV] == "cpu"
    assert feature_extractor(default_features("padim")).device == torch.device("cpu")


def test_device_is_a_config_file_setting(tmp_path):
    from patchwatch.cli import parse_arguments

    config = tmp_path / "line.toml"
    config.write_text('device = "cpu"\nruntime = "torch"\n')
    args = parse_arguments(["fit", "--images", ".", "--root", ".", "--config", str(config)])
    assert args.device == "cpu" and args.runtime == "torch"
