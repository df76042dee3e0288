"""Probe one candidate configuration on a sample of the nominal images (``fit --auto``)."""
from __future__ import annotations

from prefect import task

from patchwatch.anomaly.selection import Candidate, make_probe_set, probe_candidate
from patchwatch.anomaly.tiling import TilingConfig
from patchwatch.storage.images import ImageReadError, read_image

from .runtime import feature_extractor


@task(name="probe-configuration", task_run_name="probe-{candidate.name}")
def probe_candidate_task(candidate: Candidate, uris: list[str], seed: int, tiling: TilingConfig) -> dict:
    """Every worker builds the same probe set from ``uris`` and ``seed`` (the synthetic defects
    are drawn from the seed), so the candidates are compared on identical images."""
    images = []
    for uri in uris:
        try:
            images.append(read_image(uri))
        except ImageReadError:
            continue  # the fit proper reports unusable files; the probe just does without them
    probe = make_probe_set(images, seed=seed, tiling=tiling)
    result = probe_candidate(candidate, probe, feature_extractor)  # the worker's runtime and threads
    return {"result": result, "train_images": len(probe.train), "probe_images": len(probe.clean)}
