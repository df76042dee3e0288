"""The nightly deployments: registered on the Prefect server by ``patchwatch deploy``, executed
by the long-running ``patchwatch serve`` process (a Prefect runner) on their cron schedules."""
from __future__ import annotations

from prefect.deployments.runner import RunnerDeployment
from prefect.flows import EntrypointType
from prefect.schedules import Cron

from .nightly import nightly_refit_flow, nightly_score_flow

FLOWS = {"refit": nightly_refit_flow, "score": nightly_score_flow}


def deployment_name(name: str, kind: str) -> str:
    """A deployment's own name says its role: the UI's deployment list shows this name first
    (``nightly-refit/patchwatch-refit``, ``nightly-score/patchwatch-score``)."""
    return f"{name}-{kind}"


class NoServerError(RuntimeError):
    """Deployments live on a Prefect server: PREFECT_API_URL must name one."""


def require_server() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise NoServerError("PREFECT_API_URL is not set: deployments are registered on, and served from, a "
                            "Prefect server (e.g. export PREFECT_API_URL=http://127.0.0.1:4200/api)")
    return url


def build(name: str, parameters: dict[str, dict], crons: dict[str, str], timezone: str = "UTC") -> list[RunnerDeployment]:
    """One deployment per nightly flow, each with its parameters and cron schedule."""
    return [FLOWS[kind].to_deployment(
        deployment_name(name, kind), schedules=[Cron(crons[kind], timezone=timezone)], parameters=parameters[kind], paused=False,
        tags=["patchwatch", "nightly"], entrypoint_type=EntrypointType.MODULE_PATH,
        description=f"patchwatch nightly {kind} ({crons[kind]} {timezone})") for kind in FLOWS]


def deploy(name: str, parameters: dict[str, dict], crons: dict[str, str], timezone: str = "UTC") -> list[dict]:
    from prefect.client.orchestration import get_client

    from .nightly import concurrency_limit_name

    require_server()
    # one slot per model root, shared by both flows: a re-fit and a scoring run never overlap
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(concurrency_limit_name(parameters["refit"]["root"]), 1)
    deployments = build(name, parameters, crons, timezone)
    return [{"deployment": f"{FLOWS[kind].name}/{deployment_name(name, kind)}", "id": str(d.apply()), "cron": crons[kind],
             "timezone": timezone} for kind, d in zip(FLOWS, deployments)]


def registered(name: str) -> list[RunnerDeployment]:
    """The deployments ``deploy`` registered under ``name``, as the server has them now
    (parameters and schedules, including edits made in the UI)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    require_server()
    deployments = []
    with get_client(sync_client=True) as client:
        for kind, flow in FLOWS.items():
            try:
                found = client.read_deployment_by_name(f"{flow.name}/{deployment_name(name, kind)}")
            except ObjectNotFound:
                raise LookupError(f"no deployment {flow.name}/{deployment_name(name, kind)} on the Prefect server: "
                                  f"run 'patchwatch deploy --name {name} ...' first") from None
            schedules = [Cron(s.schedule.cron, timezone=s.schedule.timezone, day_or=s.schedule.day_or)
                         for s in found.schedules if getattr(s.schedule, "cron", None)]
            deployments.append(flow.to_deployment(
                deployment_name(name, kind), schedules=schedules, parameters=found.parameters, paused=False, tags=found.tags,
                entrypoint_type=EntrypointType.MODULE_PATH, description=found.description))
    return deployments


def serve_registered(name: str, limit: int | None = None) -> None:
    """Run the registered deployments' scheduled (and manually triggered) runs until stopped."""
    from prefect import serve

    serve(*registered(name), limit=limit)
