"""`patchwatch evaluate` end to end on a small slice of the real MTD data."""
import json
import subprocess
import sys

import pandas as pd
import pytest
import zarr
from PIL import Image


@pytest.fixture(scope="module")
def evaluation(mtd_slice, tmp_path_factory):
    table = pd.read_csv(mtd_slice, dtype=str, keep_default_na=False)
    # one row whose image does not exist: it must be reported and skipped, the rest goes on
    broken = table[table.split == "test"].iloc[:1].copy()
    broken["image"] = broken["image"].str.replace(".jpg", "-missing.jpg")
    csv = tmp_path_factory.mktemp("cli") / "split.csv"
    pd.concat([table, broken]).to_csv(csv, index=False)
    out = tmp_path_factory.mktemp("evaluate")
    run = subprocess.run([sys.executable, "-m", "patchwatch.cli", "evaluate", str(csv), "--out", str(out),
                          "--batch-size", "8", "--workers", "1"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return out, table, run


def test_metrics_json_has_the_promised_figures(evaluation):
    out, table, _ = evaluation
    metrics = json.loads((out / "results" / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "f1_threshold"):
        assert 0.0 <= metrics[key] <= 1.0 or key == "f1_threshold"
    assert set(metrics["per_defect_type"]) == set(table[table.label == "defect"].defect_type)
    assert metrics["timings"]["fit_s"] > 0 and metrics["timings"]["score_s"] > 0
    counts = metrics["counts"]
    assert counts["train_images"] + (counts["holdout_images"] or 0) == int((table.split == "train").sum())


def test_score_table_and_maps_cover_every_readable_test_image(evaluation):
    out, table, _ = evaluation
    scores = pd.read_csv(out / "results" / "scores.csv")
    assert len(scores) == int((table.split == "test").sum())
    for row in scores.itertuples():
        amap = zarr.open_array(row.map, mode="r")
        with Image.open(row.uri) as image:
            assert amap.shape == (image.height, image.width)


def test_a_missing_file_is_named_with_its_reason_and_the_run_goes_on(evaluation):
    out, _, run = evaluation
    errors = pd.read_parquet(out / "results" / "errors.parquet")
    assert len(errors) == 1
    assert errors.uri.iloc[0].endswith("-missing.jpg") and "not found" in errors.reason.iloc[0]
    assert "-missing.jpg" in run.stderr


def test_overlays_are_written_for_the_worst_scored_images(evaluation):
    out, _, _ = evaluation
    overlays = sorted((out / "results" / "overlays").glob("*.png"))
    assert any(p.name.startswith("most-anomalous") for p in overlays)
    with Image.open(overlays[0]) as image:
        assert image.mode == "RGB"


def test_the_run_ends_without_prefect_errors_about_its_own_server(evaluation):
    # the run's own Prefect server stops with it: logs still queued must have been sent before
    _, _, run = evaluation
    assert "Error logging to API" not in run.stderr + run.stdout
