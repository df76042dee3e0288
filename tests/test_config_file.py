"""``--config FILE.toml``: one file of fit settings that ``fit``, ``evaluate`` and ``deploy`` accept,
the command line over it, a bad file refused in one line before anything runs, the file recorded
in the version's manifest, and a deployed nightly re-fit that fits exactly as the tested fit did."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import uuid

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from patchwatch.cli import fit_parameters, parse_arguments
from tests.synthetic import SIDE, blob_mask, stripes

from .servers import patchwatch_command, patchwatch_env, run_patchwatch, stop_process_group
from .test_deploy import _wait_for

# enough images for a hold-out (flows.fit.MIN_IMAGES_FOR_HOLDOUT) and so a threshold
NOMINAL_IMAGES = 24
CONFIG = """\
# the line's tested settings
detector = "patchcore"
input-scale = 1.0
layers = [2, 3]
context_scales = ""
coreset_ratio = 0.05
holdout_fraction = 0.25
threshold_quantile = 0.9
batch_size = 6
runtime = "torch"
workers = 1
"""
RUN_TIMEOUT = 400


def write_config(folder, text: str = CONFIG, name: str = "line1.toml"):
    path = folder / name
    path.write_text(text)
    return path


def test_the_file_sets_the_options_and_the_command_line_overrides_it(tmp_path):
    config = write_config(tmp_path)
    args = parse_arguments(["fit", "--images", "in", "--root", "model", "--config", str(config),
                            "--threshold-quantile", "0.99"])
    assert (args.detector, args.input_scale, args.layers, args.coreset_ratio) == ("patchcore", 1.0, "2,3", 0.05)
    assert (args.holdout_fraction, args.batch_size, args.runtime) == (0.25, 6, "torch")
    assert args.threshold_quantile == 0.99  # given on the command line: over the file's 0.9
    parameters = fit_parameters(args)
    assert list(parameters["feature_config"]["layers"]) == [2, 3] and parameters["feature_config"]["input_scale"] == 1.0
    assert parameters["detector_config"]["coreset_ratio"] == 0.05
    assert parameters["config_file"]["sha256"] == hashlib.sha256(config.read_bytes()).hexdigest()
    assert parameters["config_file"]["values"]["threshold_quantile"] == 0.9  # the file as written
    assert parameters["settings"]["threshold_quantile"] == 0.99  # what the fit resolved


def test_evaluate_takes_the_same_file_and_the_threshold_options(tmp_path):
    config = write_config(tmp_path)
    from_file = fit_parameters(parse_arguments(["evaluate", "split.csv", "--config", str(config)]))
    fitted = fit_parameters(parse_arguments(["fit", "--images", "in", "--root", "model", "--config", str(config)]))
    assert from_file == fitted  # evaluate's fit is the fit the file describes
    given = fit_parameters(parse_arguments(["evaluate", "split.csv", "--holdout-fraction", "0.3",
                                            "--threshold-quantile", "0.8"]))
    assert (given["holdout_fraction"], given["threshold_quantile"]) == (0.3, 0.8)


def test_the_python_api_takes_the_file_too(tmp_path):
    from patchwatch.api import _fit_arguments
    from patchwatch.cli import build_parser

    config = write_config(tmp_path)
    args = _fit_arguments(build_parser(), "in", "model", {"config": config, "batch_size": 3})
    assert (args.threshold_quantile, args.layers, args.batch_size) == (0.9, "2,3", 3)  # the call's option wins
    assert args.config_file["path"] == str(config)


def test_evaluate_with_the_file_fits_its_model_with_the_file_s_settings(tmp_path):
    rng = np.random.default_rng(5)
    rows = []
    for number in range(NOMINAL_IMAGES + 4):
        image, mask = stripes(rng), np.zeros((SIDE, SIDE), np.uint8)
        defective = number >= NOMINAL_IMAGES + 2
        if defective:
            image[blob_mask()] = 255
            mask[blob_mask()] = 255
            Image.fromarray(mask).save(tmp_path / f"{number:03d}-mask.png")
        Image.fromarray(image).save(tmp_path / f"{number:03d}.png")
        rows.append({"image": f"{number:03d}.png", "mask": f"{number:03d}-mask.png" if defective else "",
                     "label": "defect" if defective else "good", "defect_type": "blob" if defective else "",
                     "split": "train" if number < NOMINAL_IMAGES else "test"})
    pd.DataFrame(rows).to_csv(tmp_path / "split.csv", index=False)
    config = write_config(tmp_path)
    out = tmp_path / "evaluation"
    run_patchwatch(["evaluate", tmp_path / "split.csv", "--out", out, "--config", config, "--holdout-fraction", "0.3"],
                   patchwatch_env(tmp_path / "home"), timeout=RUN_TIMEOUT)
    fitted = json.loads((out / "model" / "versions" / "v0001" / "manifest.json").read_text())
    assert fitted["threshold_quantile"] == 0.9 and fitted["holdout_fraction"] == 0.3  # file, then command line
    assert list(fitted["feature_config"]["layers"]) == [2, 3] and fitted["detector_config"]["coreset_ratio"] == 0.05
    assert fitted["config_file"]["sha256"] == hashlib.sha256(config.read_bytes()).hexdigest()
    assert fitted["settings"]["holdout_fraction"] == 0.3


@pytest.mark.parametrize("text, key, reason", [
    ('detectr = "padim"\n', "detectr", "unknown setting"),
    ('batch_size = "8"\n', "batch_size", "expected a whole number"),
    ('auto = 1\n', "auto", "expected true or false"),
    ('detector = "padin"\n', "detector", "expected one of padim, patchcore, spade"),
    ('layers = ["two"]\n', "layers", "expected a list of numbers"),
    ('images = "/data"\n', "images", "give it on the command line"),
])
def test_a_bad_key_or_value_is_refused_in_one_line_before_anything_runs(tmp_path, text, key, reason):
    config = write_config(tmp_path, text, "bad.toml")
    images = tmp_path / "images"
    images.mkdir()
    root = tmp_path / "model"
    run = subprocess.run(patchwatch_command() + ["fit", "--images", str(images), "--root", str(root),
                                                 "--config", str(config)],
                         capture_output=True, text=True, timeout=120, env=patchwatch_env(tmp_path / "home"))
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert str(config) in lines[0] and repr(key) in lines[0] and reason in lines[0]
    assert not root.exists()  # refused before anything ran


def test_a_file_that_is_not_toml_is_refused_naming_it(tmp_path):
    config = write_config(tmp_path, "detector = \n", "broken.toml")
    run = subprocess.run(patchwatch_command() + ["evaluate", str(tmp_path / "split.csv"), "--config", str(config)],
                         capture_output=True, text=True, timeout=120, env=patchwatch_env(tmp_path / "home"))
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert run.stderr.strip() == f"patchwatch evaluate: {config}: not a valid TOML file: " \
                                 "Invalid value (at line 1, column 12)"


def test_the_nightly_flows_start_their_workers_with_the_deployed_runtime(monkeypatch):
    from patchwatch.anomaly.runtime import RUNTIME_ENV
    from distributed import Client

    from patchwatch.flows.nightly import workers_environment
    from patchwatch.flows.runner import dask_cluster

    monkeypatch.setenv(RUNTIME_ENV, "onnxruntime")
    # no Prefect API to hand to the workers: without this the cluster would start a temporary server
    monkeypatch.setattr("patchwatch.flows.runner._current_api_url", lambda: None)
    with workers_environment("torch", None), dask_cluster(None, 1) as address, Client(address) as client:
        seen = set(client.run(lambda: os.environ.get("PATCHWATCH_RUNTIME")).values())
    assert seen == {"torch"}
    assert os.environ[RUNTIME_ENV] == "onnxruntime"  # the flow run's process is left as it was


async def _deployment(name: str):
    async with get_client() as client:
        return await client.read_deployment_by_name(name)


@pytest.fixture(scope="module")
def line(prefect_server, tmp_path_factory):
    """Nominal images, the line's config file, and ``deploy`` of both nightly flows with it."""
    work = tmp_path_factory.mktemp("config-file")
    rng = np.random.default_rng(11)
    (work / "nominal").mkdir()
    for number in range(NOMINAL_IMAGES):
        Image.fromarray(stripes(rng)).save(work / "nominal" / f"{number:03d}.png")
    config = write_config(work)
    env = patchwatch_env(work / "prefect-home", api_url=prefect_server.api_url)
    name = f"config-{uuid.uuid4().hex[:8]}"
    run_patchwatch(["deploy", "--images", work / "nominal", "--root", work / "nightly-model", "--name", name,
                    "--config", config], env, timeout=120)
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        refit = asyncio.run(_deployment(f"nightly-refit/{name}-refit"))
        score = asyncio.run(_deployment(f"nightly-score/{name}-score"))
    return {"work": work, "config": config, "env": env, "name": name, "refit": refit, "score": score,
            "api_url": prefect_server.api_url}


def test_deploy_passes_every_fit_setting_of_the_file_to_the_nightly_flows(line):
    refit, score = line["refit"].parameters, line["score"].parameters
    assert refit["holdout_fraction"] == 0.25 and refit["threshold_quantile"] == 0.9
    assert refit["feature_config"]["layers"] == [2, 3] and refit["detector_config"]["coreset_ratio"] == 0.05
    assert refit["config_file"]["sha256"] == hashlib.sha256(line["config"].read_bytes()).hexdigest()
    # deploy's batch size, runtime and workers reach the scoring as well as the re-fit
    for parameters in (refit, score):
        assert (parameters["batch_size"], parameters["runtime"], parameters["workers"]) == (6, "torch", 1)


def test_deploy_options_given_on_the_command_line_override_the_file(line):
    name = f"override-{uuid.uuid4().hex[:8]}"
    run_patchwatch(["deploy", "--images", line["work"] / "nominal", "--root", line["work"] / "other-model",
                    "--name", name, "--config", line["config"], "--batch-size", "3", "--threshold-quantile", "0.97",
                    "--runtime", "onnxruntime"], line["env"], timeout=120)
    with temporary_settings(updates={PREFECT_API_URL: line["api_url"]}):
        refit = asyncio.run(_deployment(f"nightly-refit/{name}-refit")).parameters
        score = asyncio.run(_deployment(f"nightly-score/{name}-score")).parameters
    assert refit["threshold_quantile"] == 0.97 and refit["holdout_fraction"] == 0.25
    assert (refit["batch_size"], score["batch_size"]) == (3, 3)
    assert (refit["runtime"], score["runtime"]) == ("onnxruntime", "onnxruntime")


def test_the_nightly_refit_deployed_with_the_file_fits_as_the_tested_fit_did(line):
    work = line["work"]
    run_patchwatch(["fit", "--images", work / "nominal", "--root", work / "tested-model", "--config", line["config"]],
                   line["env"], timeout=RUN_TIMEOUT)
    serve = subprocess.Popen(patchwatch_command() + ["serve", "--name", line["name"]],
                             env={**line["env"], "PREFECT_RUNNER_POLL_FREQUENCY": "2"}, start_new_session=True,
                             stdout=(work / "serve.log").open("w"), stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
    try:
        with temporary_settings(updates={PREFECT_API_URL: line["api_url"]}):
            triggered = run_deployment(f"nightly-refit/{line['name']}-refit", timeout=0)
            run = asyncio.run(_wait_for(triggered.id, RUN_TIMEOUT))
        assert run.state.is_completed(), f"{run.state}\n" + (work / "serve.log").read_text()[-6000:]
    finally:
        stop_process_group(serve, grace=30)

    def manifest(root):
        return json.loads((root / "versions" / "v0001" / "manifest.json").read_text())

    tested, nightly = manifest(work / "tested-model"), manifest(work / "nightly-model")
    for key in ("detector", "feature_config", "detector_config", "tiling_config", "holdout_fraction",
                "threshold_quantile", "settings", "config_file"):
        assert nightly[key] == tested[key], key
    assert tested["config_file"]["path"] == str(line["config"])
    assert tested["config_file"]["sha256"] == hashlib.sha256(line["config"].read_bytes()).hexdigest()
    assert tested["settings"]["batch_size"] == 6 and tested["settings"]["runtime"] == "torch"
    assert tested["threshold_quantile"] == 0.9 and tested["detector_config"]["coreset_ratio"] == 0.05
    # the same images, the same settings: the same hold-out, hence the same threshold
    assert nightly["holdout_images"] == tested["holdout_images"] > 0
    assert nightly["threshold"] == pytest.approx(tested["threshold"], rel=1e-5)
