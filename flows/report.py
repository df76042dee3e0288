"""Run summaries as Markdown (Prefect artifacts) and as a terminal table (rich)."""
from __future__ import annotations

import math
import shutil

from rich.console import Console
from rich.table import Table


def _format(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def markdown_table(values: dict) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {key} | {_format(value)} |" for key, value in values.items()]
    return "\n".join(lines)


def markdown_rows(rows: list[dict]) -> str:
    if not rows:
        return "(none)"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_format(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def print_summary(title: str, values: dict) -> None:
    table = Table(title=title, show_header=False)
    for key, value in values.items():
        if not isinstance(value, (list, dict)):
            table.add_row(key, _format(value))
    Console(stderr=True).print(table)


def print_versions(root: str) -> None:
    """The versions under a model root, oldest first, the current one marked."""
    from patchwatch.storage.model_store import ModelRegistry

    registry = ModelRegistry(root)
    current = registry.current()
    if not registry.versions():  # a mistyped root must not look like a model with no versions yet
        raise FileNotFoundError(f"no model versions at {root}: is it the --root given to 'patchwatch fit'?")
    columns = ["version", "state", "created", "parent", "detector", "images", "new", "incremental",
               "memory rows", "threshold", "image AUROC"]
    table = Table(title=f"model versions in {root}")
    for column in columns:
        table.add_column(column)
    for version in registry.versions():
        store = registry.model(version)
        if not store.is_complete():
            table.add_row(version, "unfinished", *[""] * (len(columns) - 2))
            continue
        manifest = store.read_manifest()
        metrics = store.read_metrics() or {}
        table.add_row(version, "current" if version == current else "complete", manifest.get("created", ""),
                      manifest.get("parent") or "", manifest.get("detector", ""), _format(manifest.get("n_images")),
                      _format(manifest.get("new_images")), _format(manifest.get("incremental")),
                      _format(manifest.get("memory_rows", "")), _format(manifest.get("threshold")),
                      _format(metrics.get("image_auroc", "")))
    Console(width=max(160, shutil.get_terminal_size().columns)).print(table)
