"""Task runner and progress helpers shared by the flows."""
from __future__ import annotations

import contextlib
import os

from prefect.futures import as_completed
from prefect_dask import DaskTaskRunner
from tqdm.auto import tqdm


@contextlib.contextmanager
def dask_cluster(address: str | None = None, workers: int | None = None):
    """Address of the Dask cluster to use: ``address`` if given, else a local cluster with one
    single-threaded worker process per core (each runs the backbone on one batch at a time)."""
    if address:
        yield address
        return
    from distributed import LocalCluster

    env = {}
    api_url = _current_api_url()
    if api_url:  # workers report their task runs to the same Prefect API as the flow
        env["PREFECT_API_URL"] = api_url
    workers = workers or max(1, os.cpu_count() or 1)
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      env=env) as cluster:
        yield cluster.scheduler_address


def _current_api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    configured = PREFECT_API_URL.value()
    if configured:
        return configured
    try:  # inside a flow run in ephemeral mode: the temporary server it started
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return str(client.api_url)
    except Exception:
        return None


def run_on_dask(flow_function, address: str, **parameters):
    """Run ``flow_function`` with its tasks on the Dask cluster at ``address``."""
    return flow_function.with_options(task_runner=DaskTaskRunner(address=address))(**parameters)


def gather(futures: list, description: str) -> list:
    """Results of ``futures`` in submission order, with a progress bar as they finish."""
    results = {}
    index_of = {id(f): i for i, f in enumerate(futures)}
    with tqdm(total=len(futures), desc=description, unit="batch", disable=not futures) as bar:
        for future in as_completed(futures):
            results[index_of[id(future)]] = future.result()
            bar.update(1)
    return [results[i] for i in range(len(futures))]
