"""List an image source and cut it into work batches."""
from __future__ import annotations

from prefect import get_run_logger, task

from patchwatch.storage.images import ImageRecord, scan_source
from .retries import retry_delay, transient


def chunk(records: list, batch_size: int) -> list[list]:
    return [records[i:i + batch_size] for i in range(0, len(records), batch_size)]


def spread_sample(records: list[ImageRecord], count: int) -> list[str]:
    """The URIs of ``count`` records evenly spread over the listing sorted by URI (all of them if
    there are no more): the same source gives the same sample on every machine."""
    uris = sorted(r.uri for r in records)
    if len(uris) <= count:
        return uris
    step = (len(uris) - 1) / max(count - 1, 1)  # one: the first
    return [uris[round(i * step)] for i in range(count)]


@task(name="list-images", task_run_name="list-images", retries=3, retry_delay_seconds=retry_delay(10), retry_condition_fn=transient)
def list_images_task(source: str, split: str | None = None) -> list[ImageRecord]:
    listing = scan_source(source, split)
    logger = get_run_logger()
    for line in listing.warnings:
        logger.warning(line)
    for line in listing.refused:
        logger.error(line)
    return listing.records
