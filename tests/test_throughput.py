"""Throughput (issue 15): worker allocator settings, large non-TIFF images decoded once per run,
a fit with nothing new starting no Dask cluster. Timings live in bench/, not here."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr
from PIL import Image


def _worker_environment() -> dict:
    """Runs on a worker: its os.environ, and the environment its process was started with (what
    glibc read its malloc settings from), where /proc tells."""
    started = Path("/proc/self/environ")
    at_start = dict(item.split("=", 1) for item in started.read_bytes().decode(errors="replace").split("\0")
                    if "=" in item) if started.exists() else None
    return {"environ": dict(os.environ), "at_start": at_start}


def test_local_cluster_workers_start_with_the_allocator_settings():
    from distributed import Client

    from patchwatch.flows.runner import WORKER_ALLOCATOR_ENV, dask_cluster

    with dask_cluster(None, 1) as address, Client(address) as client:
        seen = client.submit(_worker_environment, pure=False).result()
    for key, value in WORKER_ALLOCATOR_ENV.items():
        assert seen["environ"].get(key) == value
        if seen["at_start"] is not None:  # set before the process started, not by the worker later
            assert seen["at_start"].get(key) == value


def _texture(side: int) -> np.ndarray:
    """A smooth, seamless-looking grey texture (deterministic)."""
    rng = np.random.default_rng(15)
    coarse = rng.random((side // 32 + 2, side // 32 + 2))
    image = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC))
    return np.clip(image.astype(np.int16) + rng.integers(-12, 13, (side, side)), 0, 255).astype(np.uint8)


@pytest.fixture
def in_process_prefect(prefect_server, tmp_path):
    """Flows called directly (tasks on threads in this process, so a monkeypatch sees every decode)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url,
                                     PREFECT_LOCAL_STORAGE_PATH: str(tmp_path / "prefect-results")}):
        yield


def test_a_large_png_is_decoded_once_per_run_and_maps_as_its_tiff(tmp_path, monkeypatch, in_process_prefect):
    import patchwatch.storage.images as images_module
    from patchwatch.flows.fit import fit_flow
    from patchwatch.flows.score import score_flow

    decoded = []
    original = images_module.decode_image

    def counting(data, uri):
        decoded.append(Path(uri).name)
        return original(data, uri)

    monkeypatch.setattr(images_module, "decode_image", counting)
    pixels = _texture(1536)  # 16 tiles of 512 px, 4 tile tasks of 4
    nominal, images = tmp_path / "nominal", tmp_path / "images"
    nominal.mkdir(), images.mkdir()
    Image.fromarray(pixels).save(nominal / "large.png")
    Image.fromarray(pixels).save(images / "same.png")
    tifffile.imwrite(images / "same.tif", pixels, tile=(256, 256))
    root, results = tmp_path / "model", tmp_path / "results"

    summary = fit_flow(images=str(nominal), root=str(root), tiles_per_task=4)
    assert summary["refit"] and summary["images"] == 1
    assert decoded.count("large.png") == 1  # by the staging task; not by the batch, not per tile task
    decoded.clear()
    summary = score_flow(images=str(images), root=str(root), results=str(results), tiles_per_task=4)
    assert summary["images"] == 2 and not summary["errors"]
    # once, to stage it: every tile task reads its regions and its preview overlay (the two most
    # anomalous images of the run get one) every 2nd pixel from that copy
    assert decoded.count("same.png") == 1
    previews = sorted((results / "overlays").glob("most-anomalous-*-same-*.png"))  # same.png's and same.tif's
    assert len(previews) == 2 and Image.open(previews[0]).size == Image.open(previews[1]).size
    decoded.clear()
    score_flow(images=str(images), root=str(root), results=str(tmp_path / "no-previews"), tiles_per_task=4,
               previews=0)
    assert decoded.count("same.png") == 1
    maps = pd.read_parquet(results / "scores.parquet").set_index("image_id")["map"]
    png, tif = (zarr.open_array(maps[name], mode="r")[...] for name in ("same.png", "same.tif"))
    assert png.shape == pixels.shape
    np.testing.assert_array_equal(png, tif)
    for scratch in (root / "scratch", results / "scratch"):  # the staged copies are gone
        assert not scratch.exists() or not any(scratch.rglob("*.json"))


def test_a_fit_with_nothing_new_starts_no_dask_cluster(tmp_path, monkeypatch, in_process_prefect):
    import distributed

    import patchwatch.flows.runner as runner_module
    from patchwatch.flows.fit import fit_flow
    from patchwatch.flows.root_settings import nothing_to_fit
    from patchwatch.cli import main
    from patchwatch.storage.model_store import ModelRegistry

    images, root = tmp_path / "nominal", tmp_path / "model"
    images.mkdir()
    texture = _texture(512)
    for i in range(3):
        Image.fromarray(np.roll(texture, 100 * i, axis=1)[:256, :256]).save(images / f"{i}.png")
    fit_flow(images=str(images), root=str(root))
    assert nothing_to_fit(str(images), str(root))

    def no_cluster(*args, **kwargs):
        raise AssertionError("a fit with nothing new started a Dask cluster")

    monkeypatch.setattr(runner_module, "dask_cluster", no_cluster)
    monkeypatch.setattr(distributed, "LocalCluster", no_cluster)
    for name, value in (("PREFECT_LOGGING_LEVEL", "INFO"), ("DASK_LOGGING__DISTRIBUTED", "warning")):
        monkeypatch.setenv(name, value)  # main() sets these defaults: restored after the test
    assert main(["fit", "--images", str(images), "--root", str(root)]) == 0
    assert ModelRegistry(str(root)).versions() == ["v0001"]
    # the command's own process decides it without loading torch or Prefect (seconds of imports:
    # a no-op fit took 5.5-6.8 s on a slow host, bench/results/throughput.md)
    code = ("import sys; from patchwatch.cli import main; "
            f"code = main(['fit', '--images', {str(images)!r}, '--root', {str(root)!r}]); "
            "print('exit', code, 'loaded', *sorted({'torch', 'prefect'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
    assert done.stdout.splitlines()[-1] == "exit 0 loaded", done.stdout + done.stderr
    assert "nothing new" in done.stdout
    # anything to do, or any doubt, and the fit runs as ever (on a cluster)
    Image.fromarray(texture[256:, 256:]).save(images / "new.png")
    assert not nothing_to_fit(str(images), str(root))
    (images / "new.png").unlink()
    assert not nothing_to_fit(str(images), str(root), full=True)
    assert not nothing_to_fit(str(images), str(root), detector="padim")
