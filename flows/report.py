"""Run summaries as Markdown (Prefect artifacts) and as a terminal table (rich)."""
from __future__ import annotations

import math

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
