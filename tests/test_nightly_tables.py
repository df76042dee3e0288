"""What score-new reads of earlier nights (storage only, on a local folder and on S3): an image
counts as scored once a night's merged table holds it, and a night is published once its history
row counts those tables. The flows around it: tests/test_nightly.py, tests/test_soak.py."""
from __future__ import annotations

import pandas as pd
import pytest

from patchwatch.storage.results_store import NightlyResults


@pytest.fixture(params=["local", "s3"])
def nightly(request, tmp_path):
    if request.param == "local":
        return NightlyResults(str(tmp_path / "results"))
    return NightlyResults(request.getfixturevalue("s3_environment").url(f"nightly-{request.node.name}"))


def _rows(*uris: str, version: str = "v0001") -> pd.DataFrame:
    return pd.DataFrame({"uri": list(uris), "model_version": version})


def test_parts_a_run_left_unmerged_do_not_count_as_scored(nightly):
    night = nightly.night("2026-12-01")
    night.write_scores("part-00000", _rows("a.png", "b.png"))
    night.write_errors("part-00000", _rows("bad.png"))
    night.write_scores("part-00001", _rows("c.png"))   # a killed run's, never merged
    assert nightly.done() == set()
    night.write_table("scores", _rows("a.png", "b.png"))
    night.write_table("errors", _rows("bad.png"))
    assert nightly.done() == {"a.png", "b.png", "bad.png"}
    assert nightly.done("v0002") == set()


def test_a_night_is_published_once_its_history_row_counts_its_merged_tables(nightly):
    date = "2026-12-01"
    assert nightly.published(date)   # nothing merged: nothing to publish
    night = nightly.night(date)
    night.write_table("scores", _rows("a.png", "b.png"))
    night.write_table("errors", _rows("bad.png"))
    assert not nightly.published(date)   # merged, no history row yet
    nightly.write_history(date, {"night": date, "images": 2, "rows": 1, "errors": 1})
    assert not nightly.published(date)   # a row from before the last merge
    nightly.write_history(date, {"night": date, "images": 2, "rows": 2, "errors": 1})
    assert nightly.published(date)
