"""List an image source and cut it into work batches."""
from __future__ import annotations

from prefect import task

from storage.images import ImageRecord, list_images
from .retries import retry_delays


def chunk(records: list, batch_size: int) -> list[list]:
    return [records[i:i + batch_size] for i in range(0, len(records), batch_size)]


@task(name="list-images", retries=3, retry_delay_seconds=retry_delays(2, 10, 30))
def list_images_task(source: str, split: str | None = None) -> list[ImageRecord]:
    return list_images(source, split)
