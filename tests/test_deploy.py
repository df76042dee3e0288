"""``patchwatch deploy`` against a real Prefect server on loopback: both nightly deployments with
their cron schedules; ``patchwatch serve`` then executes one triggered run of each, and the test
checks what they wrote (a model version, tonight's partition) and the artifacts in the UI."""
from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid

import pandas as pd
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter,
                                            FlowRunFilterParentFlowRunId)
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from .conftest import copy_mtd_images, mtd_available
from .servers import patchwatch_command, patchwatch_env, run_patchwatch, stop_process_group

RUN_TIMEOUT = 400


async def _deployment(name: str):
    async with get_client() as client:
        return await client.read_deployment_by_name(name)


async def _wait_for(flow_run_id, timeout: float):
    async with get_client() as client:
        deadline = time.monotonic() + timeout
        while True:
            run = await client.read_flow_run(flow_run_id)
            if run.state and run.state.is_final():
                return run
            if time.monotonic() > deadline:
                return run
            await asyncio.sleep(2)


async def _artifacts_of(flow_run_id) -> dict:
    """Artifacts of a flow run and of the flows it ran (the nightly flows run their work as a
    sub-flow on Dask), by key."""
    async with get_client() as client:
        children = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        ids = [flow_run_id, *[c.id for c in children]]
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))
    return {a.key: a for a in artifacts}


@pytest.fixture(scope="module")
def deployed(prefect_server, tmp_path_factory):
    if not mtd_available():
        pytest.skip("MTD not available")
    work = tmp_path_factory.mktemp("deploy")
    copy_mtd_images(work / "nominal", "train", 8)
    copy_mtd_images(work / "archive", "test", 2, label="good")
    copy_mtd_images(work / "archive", "test", 2, label="defect", start=200)
    env = patchwatch_env(work / "prefect-home", api_url=prefect_server.api_url)
    name = f"test-{uuid.uuid4().hex[:8]}"
    root, results = work / "model", work / "results"
    output = run_patchwatch(["deploy", "--images", work / "nominal", "--root", root, "--archive", work / "archive",
                             "--results", results, "--name", name, "--workers", "1", "--score-cron", "30 2 * * *"],
                            env, timeout=120).stdout
    return {"work": work, "env": env, "name": name, "root": root, "results": results, "output": output,
            "api_url": prefect_server.api_url}


def test_deploy_registers_both_deployments_with_cron_schedules(deployed):
    with temporary_settings(updates={PREFECT_API_URL: deployed["api_url"]}):
        refit = asyncio.run(_deployment(f"nightly-refit/{deployed['name']}-refit"))
        score = asyncio.run(_deployment(f"nightly-score/{deployed['name']}-score"))
    for deployment, cron in ((refit, "0 1 * * *"), (score, "30 2 * * *")):
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules] == [(cron, "UTC", True)]
        assert not deployment.paused
    assert refit.parameters["images"] == str(deployed["work"] / "nominal")
    assert refit.parameters["root"] == str(deployed["root"]) and refit.parameters["workers"] == 1
    assert score.parameters["archive"] == str(deployed["work"] / "archive")
    assert score.parameters["results"] == str(deployed["results"])
    assert f"patchwatch serve --name {deployed['name']}" in deployed["output"]


def test_serve_runs_a_triggered_refit_and_scoring(deployed):
    env = {**deployed["env"], "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    log = (deployed["work"] / "serve.log").open("w")
    serve = subprocess.Popen(patchwatch_command() + ["serve", "--name", deployed["name"]], env=env,
                             start_new_session=True, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        with temporary_settings(updates={PREFECT_API_URL: deployed["api_url"]}):
            finished = {}
            for flow in ("nightly-refit", "nightly-score"):
                triggered = run_deployment(f"{flow}/{deployed['name']}-{flow.rsplit('-', 1)[1]}", timeout=0)
                run = asyncio.run(_wait_for(triggered.id, RUN_TIMEOUT))
                assert run.state.is_completed(), (
                    f"{flow}: {run.state}\n" + (deployed["work"] / "serve.log").read_text()[-6000:])
                finished[flow] = run
            refit_artifacts = asyncio.run(_artifacts_of(finished["nightly-refit"].id))
            score_artifacts = asyncio.run(_artifacts_of(finished["nightly-score"].id))
    finally:
        stop_process_group(serve, grace=30)
        log.close()

    # the re-fit made the first version; the scoring run wrote tonight's partition with it
    root, results = deployed["root"], deployed["results"]
    assert json.loads((root / "current.json").read_text())["version"] == "v0001"
    nights = sorted(p.name for p in (results / "nights").iterdir())
    assert len(nights) == 1
    table = pd.read_parquet(results / "nights" / nights[0] / "scores.parquet")
    assert len(table) == 4 and set(table.model_version) == {"v0001"}
    assert len(pd.read_parquet(results / "history" / f"{nights[0]}.parquet")) == 1

    assert "fit-summary" in refit_artifacts and "version v0001" in refit_artifacts["fit-summary"].data
    for key in ("most-anomalous", "score-summary", "flagged-trend", "flagged-trend-chart"):
        assert key in score_artifacts, sorted(score_artifacts)
    top = score_artifacts["most-anomalous"].data
    rows = json.loads(top) if isinstance(top, str) else top
    assert len(rows) == 4 and all(row["map"].startswith(str(results / "nights" / nights[0])) for row in rows)
    assert nights[0] in score_artifacts["flagged-trend-chart"].data
