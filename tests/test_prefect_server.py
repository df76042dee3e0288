"""The flows report to a real Prefect server: ``prefect server start`` on loopback (own
PREFECT_HOME, SQLite), a tiny ``patchwatch fit`` + ``patchwatch score`` run as subprocesses with
PREFECT_API_URL pointing at it, then the Prefect client checks what the server recorded: both
flow runs COMPLETED, the task runs of every step (those that ran on the Dask workers included),
and the summary artifacts.
"""
from __future__ import annotations

import asyncio
import importlib
import json
import time

import pandas as pd
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey, FlowFilter,
                                            FlowFilterName, FlowRunFilter, FlowRunFilterId, LogFilter,
                                            LogFilterFlowRunId)
from prefect.settings import PREFECT_API_URL, temporary_settings

# the server fixtures (session-scoped) as a plugin: registered once however many modules ask, so
# the whole session shares one S3 endpoint and one Prefect server. Named, not imported here, so
# that pytest imports it itself (and rewrites its asserts).


def patchwatch_env(*args, **kwargs):
    return importlib.import_module("tests.servers").patchwatch_env(*args, **kwargs)


def run_patchwatch(*args, **kwargs):
    return importlib.import_module("tests.servers").run_patchwatch(*args, **kwargs)


CLI_TIMEOUT = 300
FIT_TASKS = {"list-images", "extract-features", "select-coreset", "build-index"}
SCORE_TASKS = {"list-images", "score-batch"}
ARTIFACT_KEYS = {"fit-summary", "score-summary", "most-anomalous"}
# task runs reach the database through the server's event pipeline (task-run recorder): allow it
# a moment after the flow run has finished
RECORD_TIMEOUT = 90


@pytest.fixture(scope="module")
def server_run(prefect_server, mtd_slice, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("prefect-run")
    table = pd.read_csv(mtd_slice, dtype=str, keep_default_na=False)
    tiny = pd.concat([table[table.split == "train"].head(3), table[table.split == "test"].groupby("label").head(1)])
    images = work / "tiny.csv"
    tiny.to_csv(images, index=False)
    root, results = work / "model", work / "results"
    env = patchwatch_env(work / "client-home", api_url=prefect_server.api_url)
    timings, output = {}, {}
    started = time.monotonic()
    output["fit"] = run_patchwatch(["fit", "--images", images, "--split", "train", "--root", root, "--workers", "1"], env,
                   timeout=CLI_TIMEOUT).stdout
    timings["fit_s"] = time.monotonic() - started
    started = time.monotonic()
    output["score"] = run_patchwatch(["score", "--images", images, "--split", "test", "--root", root, "--out",
                                      results, "--workers", "1"], env, timeout=CLI_TIMEOUT).stdout
    timings["score_s"] = time.monotonic() - started
    print(f"fit {timings['fit_s']:.1f}s, score {timings['score_s']:.1f}s against {prefect_server.api_url}")
    return {"api_url": prefect_server.api_url, "root": str(root), "results": str(results), "output": output,
            "work": work, "images": str(images),
            "n_train": int((tiny.split == "train").sum()),
            "n_test": int((tiny.split == "test").sum()), "timings": timings}


def _task_name(run_name: str) -> str:
    """A task run's name is ``<task name>`` or ``<task name> <what it works on>`` (a batch, a part)."""
    return run_name.split(" ", 1)[0]


async def _recorded(api_url: str, root: str) -> dict:
    """Flow runs, task runs and artifacts of this module's fit + score (the server is shared by
    the session: other tests' runs are told apart by their model root)."""
    async with get_client() as client:
        assert str(client.api_url).rstrip("/") == api_url.rstrip("/"), client.api_url
        flows = {f.id: f.name for f in await client.read_flows(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["fit", "score"])))}
        runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["fit", "score"])))
        runs = [r for r in runs if str(r.parameters.get("root")) == root]
        by_flow: dict[str, list] = {}
        for run in runs:
            by_flow.setdefault(flows[run.flow_id], []).append(run)
        deadline = time.monotonic() + RECORD_TIMEOUT
        while True:
            tasks = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in runs])))
            tasks_by_flow = {name: [t for t in tasks if t.flow_run_id in {r.id for r in flow_runs}]
                             for name, flow_runs in by_flow.items()}
            complete = (set(by_flow) == {"fit", "score"}
                        and FIT_TASKS <= {_task_name(t.name) for t in tasks_by_flow["fit"]}
                        and SCORE_TASKS <= {_task_name(t.name) for t in tasks_by_flow["score"]}
                        and all(t.state_type is not None and t.state_type.value == "COMPLETED" for t in tasks))
            if complete or time.monotonic() > deadline:
                break
            await asyncio.sleep(2)
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in runs])))
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=sorted(ARTIFACT_KEYS)),
                                           flow_run_id=ArtifactFilterFlowRunId(any_=[r.id for r in runs])))
    return {"flow_runs": by_flow, "task_runs": tasks_by_flow, "artifacts": artifacts, "logs": logs}


@pytest.fixture(scope="module")
def recorded(server_run) -> dict:
    with temporary_settings(updates={PREFECT_API_URL: server_run["api_url"]}):
        return asyncio.run(_recorded(server_run["api_url"], server_run["root"]))


def test_flow_runs_completed(recorded):
    runs = recorded["flow_runs"]
    assert set(runs) == {"fit", "score"}, runs
    for name, flow_runs in runs.items():
        assert len(flow_runs) == 1, (name, [r.name for r in flow_runs])
        run = flow_runs[0]
        assert run.state_type.value == "COMPLETED", (name, run.state)
        assert run.state_name == "Completed"


def test_task_runs_recorded(recorded, server_run):
    tasks = recorded["task_runs"]
    fit = [_task_name(t.name) for t in tasks["fit"]]
    score = [_task_name(t.name) for t in tasks["score"]]
    assert FIT_TASKS <= set(fit), fit
    assert SCORE_TASKS <= set(score), score
    # --batch-size default (32/16): one extract and one score batch for this tiny slice
    assert fit.count("extract-features") == 1 and fit.count("select-coreset") == 1 and fit.count("build-index") == 1
    assert score.count("score-batch") == 1
    for run in tasks["fit"] + tasks["score"]:
        assert run.state_type.value == "COMPLETED", (run.name, run.state)
    fit_run, score_run = recorded["flow_runs"]["fit"][0], recorded["flow_runs"]["score"][0]
    assert fit_run.parameters["split"] == "train" and score_run.parameters["split"] == "test"


def test_artifacts(recorded, server_run):
    artifacts = recorded["artifacts"]
    by_key = {a.key: a for a in artifacts}
    assert ARTIFACT_KEYS <= set(by_key), sorted(by_key)
    fit_run, score_run = recorded["flow_runs"]["fit"][0], recorded["flow_runs"]["score"][0]
    assert by_key["fit-summary"].flow_run_id == fit_run.id
    assert by_key["score-summary"].flow_run_id == score_run.id
    assert by_key["most-anomalous"].flow_run_id == score_run.id
    assert by_key["fit-summary"].type == "markdown" and "# Fit" in by_key["fit-summary"].data
    assert by_key["score-summary"].type == "markdown" and "# Scoring" in by_key["score-summary"].data
    assert by_key["most-anomalous"].type == "table"
    assert f"| images | {server_run['n_train']} |" in by_key["fit-summary"].data
    assert f"| images | {server_run['n_test']} |" in by_key["score-summary"].data
    table = by_key["most-anomalous"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert len(rows) == server_run["n_test"] and {"image_id", "score", "map"} <= set(rows[0])


def test_info_logs_reach_the_server(recorded, server_run):
    """The runs' INFO logs are in the UI (flow and worker task runs alike), though the terminal
    showed warnings only."""
    fit_run, score_run = recorded["flow_runs"]["fit"][0], recorded["flow_runs"]["score"][0]
    logs = recorded["logs"]
    info = [log for log in logs if log.level == 20]
    fit_messages = [log.message for log in info if log.flow_run_id == fit_run.id]
    assert any("listed images" in m and "1 batches" in m for m in fit_messages), fit_messages
    # written on the Dask worker, by the score-batch task run
    score_tasks = {t.id for t in recorded["task_runs"]["score"] if _task_name(t.name) == "score-batch"}
    assert any(log.task_run_id in score_tasks and log.flow_run_id == score_run.id for log in info), \
        [(log.task_run_id, log.message) for log in info if log.flow_run_id == score_run.id]
    for command in ("fit", "score"):
        assert " INFO " not in server_run["output"][command], server_run["output"][command]


def test_runs_and_task_runs_are_named_for_their_work(recorded, server_run):
    from patchwatch.flows.runner import location_name

    fit_run, score_run = recorded["flow_runs"]["fit"][0], recorded["flow_runs"]["score"][0]
    assert fit_run.name == f"fit {location_name(server_run['root'])}", fit_run.name
    assert score_run.name == f"score {location_name(server_run['results'])}", score_run.name
    fit_tasks = {t.name for t in recorded["task_runs"]["fit"]}
    score_tasks = {t.name for t in recorded["task_runs"]["score"]}
    assert {"list-images", "extract-features batch 00000", "select-coreset", "build-index"} <= fit_tasks, fit_tasks
    assert {"list-images", "score-batch part 00000"} <= score_tasks, score_tasks
    # each command says where its run is in the UI
    base = server_run["api_url"].removesuffix("/api")
    assert f"fit run: {base}/runs/flow-run/{fit_run.id}" in server_run["output"]["fit"], server_run["output"]["fit"]
    assert f"score run: {base}/runs/flow-run/{score_run.id}" in server_run["output"]["score"]


def test_a_fit_with_nothing_new_is_quiet(server_run):
    """Dask's INFO lines stay off the terminal: the output is the summary, the message and the
    run's URL."""
    env = patchwatch_env(server_run["work"] / "client-home", api_url=server_run["api_url"])
    output = run_patchwatch(["fit", "--images", server_run["images"], "--split", "train", "--root",
                             server_run["root"], "--workers", "1"], env, timeout=CLI_TIMEOUT).stdout
    assert "nothing new" in output and "distributed." not in output, output
    for command, text in server_run["output"].items():
        assert not [line for line in text.splitlines() if "distributed." in line and "WARNING" not in line], \
            (command, text)

