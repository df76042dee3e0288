"""Data lost or wrong silently (issue 14, cases 2, 3, 4, 5, 7, 9; case 1 is test_concurrency.py).

Each test reproduces its case through the command line on a few real MTD images, against one
Dask worker and the session's Prefect and S3 servers:

2. two images with one file name in two folders got one map key, one row pointed at the other's map;
9. a 250-byte file name made a map key past the file system's limit: the task retried, the run failed;
3. nightly scoring twice in a night with a re-fit between double-counted every image, both rows
   of an image pointed at one map (the newer version's), and each new version rescored the archive;
4. float TIFFs: NaN/inf scored NaN, "not anomalous", no error row, and a fit took one into its
   memory; floats in 0-255 were read as if in 0-1;
7. an image replaced under the same name kept its old score and map (cache keyed by name);
5. a results bucket that vanished was re-created by s3fs and the run ended 0 with nothing scored.
"""
from __future__ import annotations

import io
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from PIL import Image

from .conftest import MTD, MTD_SPLIT, mtd_available
from .local_dask import dask_cluster
from .servers import finish_patchwatch, patchwatch_env, start_patchwatch

# MTD test-split rows with pairwise different sizes (a map of the wrong image shows in its shape)
SIZED = [2, 3, 4, 5, 6, 7, 8, 9]


def mtd_test_image(i: int) -> bytes:
    table = pd.read_csv(MTD_SPLIT, dtype=str, keep_default_na=False)
    return (MTD / table[table.split == "test"].image.iloc[i]).read_bytes()


def shape_of(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.height, image.width


@pytest.fixture(scope="module")
def work(tmp_path_factory, prefect_server, s3_server):
    if not mtd_available():
        pytest.skip("MTD not available")
    folder = tmp_path_factory.mktemp("integrity")
    env = patchwatch_env(folder / "prefect-home", api_url=prefect_server.api_url, s3=s3_server)
    env["PATCHWATCH_RETRY_DELAY"] = "0.2"
    env["PATCHWATCH_ALLOW_SOURCES"] = str(folder)  # split CSVs here may name ../ paths
    table = pd.read_csv(MTD_SPLIT, dtype=str, keep_default_na=False)
    nominal = folder / "nominal"
    nominal.mkdir()
    for image in table[table.split == "train"].image.iloc[:6]:
        (nominal / Path(image).name).write_bytes((MTD / image).read_bytes())
    with dask_cluster(folder, env) as address:
        work = {"folder": folder, "env": env, "address": address, "root": folder / "model", "nominal": nominal,
                "s3": s3_server}
        code, output = cli(work, "fit", "--images", nominal, "--root", work["root"])
        assert code == 0, output[-4000:]
        yield work


def start(work: dict, *args) -> subprocess.Popen:
    return start_patchwatch([*args, "--dask-address", work["address"]], work["env"])


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    return finish_patchwatch(process, timeout)


def cli(work: dict, *args) -> tuple[int, str]:
    return finish(start(work, *args))


def results_of(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    scores = pd.read_parquet(out / "scores.parquet") if (out / "scores.parquet").exists() else pd.DataFrame()
    errors = pd.read_parquet(out / "errors.parquet") if (out / "errors.parquet").exists() else pd.DataFrame()
    return scores, errors


# --------------------------------------------------------------------------- cases 2 and 9: names


@pytest.fixture(scope="module")
def odd_names(work):
    """A split CSV naming ``y.jpg`` and ``../y.jpg`` (two different images) and a 250-byte name."""
    base = work["folder"] / "names"
    (base / "csv").mkdir(parents=True)
    long_name = "n" * 246 + ".jpg"
    files = {"y.jpg": base / "csv" / "y.jpg", "../y.jpg": base / "y.jpg", long_name: base / "csv" / long_name,
             "good.jpg": base / "csv" / "good.jpg"}
    for i, path in zip(SIZED, files.values()):
        path.write_bytes(mtd_test_image(i))
    pd.DataFrame({"image": list(files)}).to_csv(base / "csv" / "split.csv", index=False)
    out = work["folder"] / "results-names"
    code, output = cli(work, "score", "--images", base / "csv" / "split.csv", "--root", work["root"], "--out", out,
                       "--batch-size", "4")
    return {"files": files, "long": long_name, "out": out, "code": code, "output": output}


def test_images_sharing_a_file_name_get_their_own_maps(odd_names):
    assert odd_names["code"] == 0, odd_names["output"][-4000:]
    scores, _ = results_of(odd_names["out"])
    rows = scores.set_index("image_id").loc[["y.jpg", "../y.jpg"]]
    assert rows["map"].nunique() == 2, list(rows["map"])
    for image_id, row in rows.iterrows():
        expected = shape_of(odd_names["files"][image_id])
        assert (row.height, row.width) == expected
        assert zarr.open_array(row["map"], mode="r").shape == expected, f"{image_id} points at another image's map"


def test_a_250_byte_file_name_is_scored_and_the_batch_goes_on(odd_names):
    assert odd_names["code"] == 0, odd_names["output"][-4000:]
    scores, errors = results_of(odd_names["out"])
    assert len(errors) == 0 and sorted(scores.image_id) == sorted(odd_names["files"])
    row = scores.set_index("image_id").loc[odd_names["long"]]
    assert zarr.open_array(row["map"], mode="r").shape == shape_of(odd_names["files"][odd_names["long"]])
    relative = row["map"][len(str(odd_names["out"])):]
    assert len(relative.encode()) < 200 and all(len(p.encode()) < 100 for p in relative.split("/"))


def test_a_map_write_failing_for_one_image_is_one_error_row_not_a_failed_batch(work, tmp_path, map_name_too_long):
    """Any image-level failure, ENAMETOOLONG on its map included, is that image's error row."""
    from patchwatch.storage.images import ImageRecord
    from patchwatch.storage.model_store import ModelRegistry
    from patchwatch.storage.results_store import ResultStore
    from patchwatch.tasks.scoring import ModelRef, score_batch_task

    folder = tmp_path / "images"
    folder.mkdir()
    records = []
    for i in SIZED[:3]:
        (folder / f"img{i}.jpg").write_bytes(mtd_test_image(i))
        records.append(ImageRecord(image_id=f"img{i}.jpg", uri=str(folder / f"img{i}.jpg")))
    map_name_too_long("img3.jpg")
    model = ModelRef.of(ModelRegistry(str(work["root"])).resolve())
    out = ResultStore(str(tmp_path / "results"))
    out.prepare()
    result = score_batch_task.fn(model, out.root, 0, records)
    assert result["images"] == 2
    assert result["errors"] == [{"image_id": "img3.jpg", "uri": str(folder / "img3.jpg"),
                                 "reason": "cannot write its map (File name too long)"}]
    assert sorted(out.scores().image_id) == ["img2.jpg", "img4.jpg"] and list(out.errors().image_id) == ["img3.jpg"]


def test_a_run_where_no_image_could_be_scored_exits_non_zero(work):
    folder = work["folder"] / "all-bad"
    folder.mkdir()
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_bytes(b"not an image\n")
    out = work["folder"] / "results-all-bad"
    code, output = cli(work, "score", "--images", folder, "--root", work["root"], "--out", out)
    assert code == 1, output[-3000:]
    assert output.strip().splitlines()[-1].startswith("patchwatch score: NothingScoredError: none of the 2 images")
    _, errors = results_of(out)
    assert sorted(errors.image_id) == ["empty.png", "text.png"]  # the rows are kept


# --------------------------------------------------------------------------- case 3: nightly with a re-fit


def test_nightly_twice_with_a_refit_between_counts_each_image_once_and_keeps_both_versions(work):
    archive, results, night = work["folder"] / "archive", work["folder"] / "results-nightly", "2026-12-01"
    archive.mkdir()
    for i in SIZED[:3]:
        (archive / f"a{i}.jpg").write_bytes(mtd_test_image(i))
    first_version = json.loads((work["root"] / "current.json").read_text())["version"]
    args = ["score-new", "--archive", archive, "--root", work["root"], "--results", results, "--night", night]
    code, output = cli(work, *args)
    assert code == 0, output[-3000:]
    table = pd.read_parquet(results / "nights" / night / "scores.parquet")
    first_maps = {row.uri: zarr.open_array(row.map, mode="r")[...] for row in table.itertuples()}

    # a re-fit (two nominal images arrive) makes a new version
    extra = work["folder"] / "nominal"
    train = pd.read_csv(MTD_SPLIT, dtype=str, keep_default_na=False).query("split == 'train'").image
    for image in train.iloc[6:8]:
        (extra / Path(image).name).write_bytes((MTD / image).read_bytes())
    code, output = cli(work, "fit", "--images", extra, "--root", work["root"])
    assert code == 0, output[-3000:]
    second_version = json.loads((work["root"] / "current.json").read_text())["version"]
    assert second_version != first_version

    # by default the new version scores only what no version has scored: nothing here
    code, output = cli(work, *args)
    assert code == 0, output[-3000:]
    table = pd.read_parquet(results / "nights" / night / "scores.parquet")
    history = pd.read_parquet(results / "history" / f"{night}.parquet")
    assert len(table) == 3 and set(table.model_version) == {first_version}
    assert history.images.item() == 3

    # asked to, it rescores the archive: both versions' rows, each with its own map; counted once
    code, output = cli(work, *args, "--rescore")
    assert code == 0, output[-3000:]
    table = pd.read_parquet(results / "nights" / night / "scores.parquet")
    history = pd.read_parquet(results / "history" / f"{night}.parquet")
    assert len(table) == 6 and table.groupby("model_version").uri.nunique().to_dict() == {first_version: 3,
                                                                                         second_version: 3}
    assert table["map"].nunique() == 6
    assert history.images.item() == 3 and history.rows.item() == 6
    for row in table[table.model_version == first_version].itertuples():
        np.testing.assert_array_equal(zarr.open_array(row.map, mode="r")[...], first_maps[row.uri])


# --------------------------------------------------------------------------- case 4: float TIFFs


def _tiff(path: Path, array: np.ndarray) -> None:
    import tifffile

    tifffile.imwrite(path, array)


def _grey(i: int) -> np.ndarray:
    with Image.open(io.BytesIO(mtd_test_image(i))) as image:
        return np.asarray(image.convert("L"))


def test_float_tiffs_nan_is_an_error_row_and_0_255_scores_as_uint8(work):
    folder = work["folder"] / "floats"
    folder.mkdir()
    grey = _grey(SIZED[0])
    Image.fromarray(grey).save(folder / "uint8.png")
    _tiff(folder / "float255.tif", grey.astype(np.float32))
    nan, inf = grey.astype(np.float32), grey.astype(np.float32) / 255
    nan[10:20, 10:20] = np.nan
    inf[5, 5] = np.inf
    _tiff(folder / "nan.tif", nan)
    _tiff(folder / "inf.tif", inf)
    out = work["folder"] / "results-floats"
    code, output = cli(work, "score", "--images", folder, "--root", work["root"], "--out", out)
    assert code == 0, output[-3000:]
    scores, errors = results_of(out)
    reasons = dict(zip(errors.image_id, errors.reason))
    assert sorted(reasons) == ["inf.tif", "nan.tif"], errors
    assert "NaN" in reasons["nan.tif"] and "infinite" in reasons["inf.tif"]
    assert f"{folder / 'nan.tif'}: {reasons['nan.tif']}" in output
    by_id = scores.set_index("image_id").score
    assert sorted(by_id.index) == ["float255.tif", "uint8.png"]
    assert by_id["float255.tif"] == pytest.approx(by_id["uint8.png"], rel=1e-5)


def test_a_fit_refuses_a_nan_tiff_among_the_nominal_images(work):
    folder = work["folder"] / "nominal-with-nan"
    folder.mkdir()
    for image in sorted(work["nominal"].iterdir())[:4]:
        (folder / image.name).write_bytes(image.read_bytes())
    nan = _grey(SIZED[1]).astype(np.float32)
    nan[0, 0] = np.nan
    _tiff(folder / "nan.tif", nan)
    root = work["folder"] / "model-nan"
    code, output = cli(work, "fit", "--images", folder, "--root", root)
    assert code == 0, output[-3000:]
    assert "nan.tif: NaN pixel values" in output
    manifest = json.loads((root / "versions" / "v0001" / "manifest.json").read_text())
    assert manifest["n_images"] == 4
    memory = zarr.open_array(str(root / "versions" / "v0001" / "memory"), mode="r")[...]
    assert np.isfinite(memory).all() and np.isfinite(manifest["covering_radius"])


# --------------------------------------------------------------------------- case 7: content changed


def test_an_image_replaced_under_the_same_name_is_scored_again(work):
    """``ref.jpg`` holds what ``tile.jpg`` will hold: its row is what tile.jpg's must become."""
    folder, out = work["folder"] / "changing", work["folder"] / "results-changing"
    folder.mkdir()
    tile = folder / "tile.jpg"
    tile.write_bytes(mtd_test_image(SIZED[2]))
    (folder / "ref.jpg").write_bytes(mtd_test_image(SIZED[3]))
    code, output = cli(work, "score", "--images", folder, "--root", work["root"], "--out", out)
    assert code == 0, output[-3000:]
    before = results_of(out)[0].set_index("image_id")

    tile.write_bytes(mtd_test_image(SIZED[3]))  # new content, same name
    code, output = cli(work, "score", "--images", folder, "--root", work["root"], "--out", out)
    assert code == 0, output[-3000:]
    after = results_of(out)[0].set_index("image_id")

    assert (before.height["tile.jpg"], before.width["tile.jpg"]) != shape_of(tile)
    assert (after.height["tile.jpg"], after.width["tile.jpg"]) == shape_of(tile)
    assert after.score["tile.jpg"] == pytest.approx(after.score["ref.jpg"], rel=1e-6)
    assert zarr.open_array(after.loc["tile.jpg", "map"], mode="r").shape == shape_of(tile)


# --------------------------------------------------------------------------- case 5: a vanished bucket


def _bucket_exists(s3, bucket: str) -> bool:
    return s3.filesystem().exists(bucket)


def _delete_bucket(s3, bucket: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    for _ in range(50):  # workers may add objects while it is emptied
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                client.delete_object(Bucket=bucket, Key=item["Key"])
        try:
            client.delete_bucket(Bucket=bucket)
            return
        except client.exceptions.ClientError:
            time.sleep(0.05)
    raise AssertionError(f"could not delete bucket {bucket}")


def test_a_missing_results_bucket_fails_the_run_and_is_not_created(work, s3_environment):
    s3 = s3_environment
    bucket = f"absent-{time.monotonic_ns()}"
    images = work["folder"] / "bucket-images"
    images.mkdir()
    (images / "a.jpg").write_bytes(mtd_test_image(SIZED[0]))
    code, output = cli(work, "score", "--images", images, "--root", work["root"], "--out", f"s3://{bucket}/results")
    assert code == 1, output[-3000:]
    assert f"bucket {bucket} does not exist" in output.strip().splitlines()[-1]
    assert not _bucket_exists(s3, bucket)


def test_a_results_bucket_that_vanishes_mid_run_fails_the_run_and_is_not_recreated(work, s3_environment):
    s3 = s3_environment
    bucket = f"vanishing-{time.monotonic_ns()}"
    s3.create_bucket(bucket)
    fs = s3.filesystem()
    for n, i in enumerate(SIZED * 2):  # the images live in the bucket too: they vanish with it
        fs.pipe_file(f"{bucket}/images/v{n:02d}.jpg", mtd_test_image(i))
    process = start(work, "score", "--images", f"s3://{bucket}/images", "--root", work["root"],
                    "--out", f"s3://{bucket}/results", "--batch-size", "1")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        fs.invalidate_cache()
        if fs.exists(f"{bucket}/results/scores/part-00001.parquet"):
            break
        time.sleep(0.1)
    assert process.poll() is None, "the run ended before the bucket could be deleted"
    _delete_bucket(s3, bucket)
    code, output = finish(process)
    assert code == 1, output[-3000:]
    assert "vanished during the run" in output.strip().splitlines()[-1], output[-3000:]
    assert not _bucket_exists(s3, bucket), "the deleted bucket was re-created"
