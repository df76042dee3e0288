"""Pictures people look at instead of reading: overlays (title, colour bar with the threshold,
ground-truth outline), the previews that score writes, and report.html rendered in a real
headless Chromium with every image loaded."""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from patchwatch.anomaly.pictures import MapScale, overlay_png, title_lines
from patchwatch.storage.results_store import ResultStore, picture_name
from tests.synthetic import SIDE, blob_mask, stripes

from .browser import image_states
from .servers import patchwatch_env, run_patchwatch

THRESHOLD = 1.0


def decoded(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def cyan(pixels: np.ndarray) -> np.ndarray:
    """Pixels of the outline colour (pure cyan, as drawn; the heat ramp never comes near it)."""
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return (r < 90) & (g > 190) & (b > 190)


def blob_scene():
    """A stripe image with a bright blob, its mask, and a map that peaks on the blob."""
    image = stripes(np.random.default_rng(0))
    mask = blob_mask()
    image[mask] = 255
    y, x = np.mgrid[:SIDE, :SIDE]
    centre = np.argwhere(mask).mean(axis=0)
    amap = 0.7 + 1.0 * np.exp(-((y - centre[0]) ** 2 + (x - centre[1]) ** 2) / 400.0)
    return image, mask, amap


# ------------------------------------------------------------------ overlays (pure rendering)

def test_overlay_outlines_the_defect_and_shows_a_colour_bar():
    image, mask, amap = blob_scene()
    with_mask = decoded(overlay_png(image, amap, MapScale.around(THRESHOLD), name="line1/part_001.png",
                                    score=float(amap.max()), flagged=True, mask=mask))
    without = decoded(overlay_png(image, amap, MapScale.around(THRESHOLD), name="line1/part_001.png",
                                  score=float(amap.max()), flagged=True))
    # the outline is there with the mask, and only then
    assert cyan(with_mask).sum() > 100 and cyan(without).sum() == 0
    # the outline is where the mask's border is: the cyan pixels' bounding box has the mask's
    # aspect and lies in the picture where the blob lies (left half, lower half)
    rows, cols = np.nonzero(cyan(with_mask))
    assert abs((rows.max() - rows.min()) / (cols.max() - cols.min()) - 1.0) < 0.15
    height, width = with_mask.shape[:2]
    assert cols.mean() < width / 2 and rows.mean() > height / 2
    # the colour bar: the whole inferno ramp (its pale yellow top, its near-black bottom) right of the picture
    right = with_mask[:, int(width * 0.8):]
    assert ((right[..., 0] > 240) & (right[..., 1] > 240) & (right[..., 2] < 190)).sum() > 50
    assert ((right.sum(axis=2) < 40)).sum() > 50


def test_a_missed_defect_shows_the_photo_not_a_plain_sheet_and_says_below_threshold():
    image, mask, amap = blob_scene()
    low = amap * 0.6  # every pixel below the threshold: a miss
    pixels = decoded(overlay_png(image, low, MapScale.around(THRESHOLD), name="part_002.png",
                                 score=float(low.max()), flagged=False, mask=mask))
    # the stripes stay visible under a below-threshold map (fixed scale, faint heat), not one flat colour
    height, width = pixels.shape[:2]
    picture = pixels[int(height * 0.3):int(height * 0.9), int(width * 0.1):int(width * 0.6)].mean(axis=2)
    assert picture.std() > 20
    title = title_lines("part_002.png", float(low.max()), THRESHOLD, False, "defect (blob)")
    assert "below threshold 1" in title and "not flagged" in title and "score 1.02" in title


def test_the_title_names_the_image_its_score_the_threshold_and_the_flag():
    title = title_lines("line1/part_001.png", 1.23456789, 0.98765, True, outlined=True)
    assert title.splitlines()[0] == "line1/part_001.png"
    assert "score 1.235" in title and "FLAGGED" in title and "0.9877" in title and "outline" in title
    assert "no threshold" in title_lines("a.png", 1.0, None, None)


def test_the_colour_scale_is_fixed_by_the_threshold_not_by_each_image():
    assert MapScale.around(2.0) == MapScale(1.0, 3.0, 2.0, 2.0)
    assert MapScale.around(None, [0.5, 2.5, 1.0]) == MapScale(0.5, 2.5, None)


def test_the_colour_bar_marks_the_maps_own_threshold_and_the_flag_follows_the_image_threshold():
    # map values and image scores are on different scales: the bar is centred on the pixel threshold
    scale = MapScale.around(30.0, pixel_threshold=20.0)
    assert (scale.low, scale.high, scale.threshold) == (10.0, 30.0, 20.0)
    assert scale.flag_threshold == 30.0 and "pixel threshold 20" in scale.describe()
    amap = np.zeros((64, 64), np.float32)
    amap[20:30, 20:30] = 25.0  # above the pixel threshold: drawn hot; the image score decides the flag
    png = overlay_png(np.full((64, 64), 128, np.uint8), amap, scale, name="a.png", score=29.0,
                      flagged=bool(29.0 > scale.flag_threshold))
    assert png.startswith(b"\x89PNG")
    assert "below threshold 30" in title_lines("a.png", 29.0, scale.flag_threshold, False)


# ------------------------------------------------------------------ names and storage

def test_picture_names_have_one_extension_and_same_named_sources_do_not_collide():
    first = picture_name("most-anomalous-00", "line1/part_001.jpg", "/data/line1/part_001.jpg")
    assert re.fullmatch(r"most-anomalous-00-part_001-[0-9a-f]{8}\.png", first)
    assert ".jpg" not in first
    assert picture_name("x", "a/a.png", "/d/a/a.png") != picture_name("x", "b/a.png", "/d/b/a.png")


def test_writing_pictures_replaces_what_an_earlier_run_left(tmp_path):
    store = ResultStore(str(tmp_path))
    store.write_pictures("overlays", {"old.png": b"1", "kept.png": b"2"})
    store.write_pictures("overlays", {"kept.png": b"3", "new.png": b"4"})
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == ["kept.png", "new.png"]
    assert store.link(str(tmp_path / "x.png")) == f"file://{tmp_path}/x.png"


# ------------------------------------------------------------------ runs: evaluate and score

@pytest.fixture(scope="module")
def runs(tmp_path_factory, prefect_server):
    """A synthetic split (stripe images; test defects are bright blobs with masks; two test images
    named a.png in different folders), evaluated, then its test folder scored, and scored as one night."""
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(1)
    rows = []
    for i in range(24):
        path = folder / "train" / f"nominal_{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(stripes(rng)).save(path)
        rows.append({"image": str(path), "mask": "", "label": "good", "defect_type": "", "split": "train"})
    for i, (sub, defective) in enumerate([("x", False), ("y", True), ("z", True), ("z", False), ("z", True)]):
        name = "a.png" if i < 2 else f"part_{i}.png"  # x/a.png (good) and y/a.png (defect)
        path = folder / "test" / sub / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image = stripes(rng)
        mask_path = ""
        if defective:
            image[blob_mask()] = 255
            mask_path = folder / "masks" / sub / name
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((blob_mask() * 255).astype(np.uint8)).save(mask_path)
        Image.fromarray(image).save(path)
        rows.append({"image": str(path), "mask": str(mask_path), "label": "defect" if defective else "good",
                     "defect_type": "blob" if defective else "", "split": "test"})
    csv = folder / "split.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    env = patchwatch_env(folder / "prefect-home", api_url=prefect_server.api_url)
    env["PATCHWATCH_ALLOW_SOURCES"] = str(folder)
    evaluated = run_patchwatch(["evaluate", csv, "--out", folder / "eval", "--workers", "1", "--batch-size", "8"],
                               env, timeout=400)
    scored = run_patchwatch(["score", "--images", folder / "test", "--root", folder / "eval" / "model",
                             "--out", folder / "scored", "--workers", "1"], env, timeout=300)
    nightly = run_patchwatch(["score-new", "--archive", folder / "test", "--root", folder / "eval" / "model",
                              "--results", folder / "nightly", "--night", "2024-05-01", "--workers", "1"], env,
                             timeout=300)
    return {"folder": folder, "evaluate": evaluated.stdout, "score": scored.stdout, "nightly": nightly.stdout}


def test_score_writes_readable_previews_of_the_most_anomalous_images(runs):
    scored = runs["folder"] / "scored"
    table = pd.read_parquet(scored / "scores.parquet")
    previews = sorted((scored / "overlays").glob("*.png"))
    assert len(previews) == len(table) == 5  # fewer images than the default of 12: all of them
    assert not any(".jpg" in p.name or p.name.count(".png") > 1 for p in previews)
    # ranked by score: the first preview is the highest-scored image's
    best = table.nlargest(1, "score").iloc[0]
    assert previews[0].name == picture_name("most-anomalous-00", best.image_id, best.uri)
    # the two a.png (x/a.png, y/a.png) got one preview each
    assert len([p for p in previews if "-a-" in p.name]) == 2
    for preview in previews:
        with Image.open(preview) as image:
            image.load()
            assert image.width >= 400 and image.height >= 200
    assert (scored / "report.html").exists()
    assert f"open {scored / 'report.html'}" in runs["score"]


def test_evaluate_writes_a_report_and_names_it_first(runs):
    results = runs["folder"] / "eval" / "results"
    page = (results / "report.html").read_text()
    for heading in ("Summary", "Curves", "Per defect type", "Most anomalous", "Highest-scored good images",
                    "Lowest-scored defective images"):
        assert f"<h2>{heading}</h2>" in page
    assert "<td>blob</td>" in page
    overlays = sorted(p.name for p in (results / "overlays").glob("*.png"))
    assert any(n.startswith("missed-00-") for n in overlays) and any(n.startswith("false-alarm-00-") for n in overlays)
    assert f"open {results / 'report.html'} first" in runs["evaluate"]


def test_a_night_gets_its_report_with_the_trend_chart(runs):
    night = runs["folder"] / "nightly" / "nights" / "2024-05-01"
    assert len(list((night / "overlays").glob("*.png"))) == 5
    with Image.open(runs["folder"] / "nightly" / "trend.png") as chart:
        chart.load()
    page = (night / "report.html").read_text()
    assert "<h2>Trend</h2>" in page and "<h2>Most anomalous</h2>" in page
    assert f"open {night / 'report.html'} first" in runs["nightly"]


@pytest.mark.parametrize("report", ["eval/results/report.html", "scored/report.html",
                                    "nightly/nights/2024-05-01/report.html"])
def test_the_report_renders_in_headless_chromium_with_every_image_loaded(runs, report):
    states = image_states(runs["folder"] / report)
    # evaluate: 2 curves + overlays of 3 kinds; score: one overlay per image; a night: those and its trend
    assert len(states) >= {"eval": 2 + 5, "scored": 5, "nightly": 6}[report.split("/")[0]]
    assert all(state["complete"] and state["naturalWidth"] > 0 for state in states), states
