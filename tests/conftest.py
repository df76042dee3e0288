import os
from pathlib import Path

import pandas as pd
import pytest

# loopback S3 and Prefect servers, started by the tests and stopped by PID
pytest_plugins = ["tests.servers"]

REPO = Path(__file__).resolve().parents[1]
MTD = REPO.parent / "shared" / "datasets" / "mtd"
MTD_SPLIT = MTD / "split.csv"

# tests run offline: never wait on a model hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the tests' split CSVs live in temporary folders and name MTD's images where they are (read in
# place): allow that location, as a user would with --allow-sources (tests/test_trust.py unsets it)
os.environ.setdefault("PATCHWATCH_ALLOW_SOURCES", str(MTD))
# a plain fit compares candidate configurations first (--auto, the default); the tests that are
# about something else fit PatchCore's fixed defaults, as PATCHWATCH_AUTO=0 makes them (the
# default itself: tests/test_auto.py, which unsets it)
os.environ.setdefault("PATCHWATCH_AUTO", "0")


def mtd_available() -> bool:
    return MTD_SPLIT.exists()


@pytest.fixture(scope="session")
def mtd_slice(tmp_path_factory) -> Path:
    """A small split CSV over the real MTD images (absolute paths; MTD is read in place)."""
    if not mtd_available():
        pytest.skip(f"MTD not found at {MTD}")
    table = pd.read_csv(MTD_SPLIT, dtype=str, keep_default_na=False)
    train = table[table.split == "train"].iloc[::48]
    test = pd.concat([table[table.split == "test"].groupby("defect_type").head(2)])
    rows = pd.concat([train, test]).copy()
    rows["image"] = [str(MTD / p) for p in rows.image]
    rows["mask"] = [str(MTD / p) if p else "" for p in rows["mask"]]
    path = tmp_path_factory.mktemp("mtd") / "slice.csv"
    rows.to_csv(path, index=False)
    return path


def copy_mtd_images(folder: Path, split: str, count: int, start: int = 0, label: str | None = None) -> list[Path]:
    """Copy ``count`` MTD images of one split (rows ``start``... of the split CSV) into ``folder``,
    for tests that watch a folder grow."""
    table = pd.read_csv(MTD_SPLIT, dtype=str, keep_default_na=False)
    rows = table[(table.split == split) & ((table.label == label) if label else True)].iloc[start:start + count]
    folder.mkdir(parents=True, exist_ok=True)
    copied = []
    for image in rows.image:
        target = folder / Path(image).name
        target.write_bytes((MTD / image).read_bytes())
        copied.append(target)
    return copied


@pytest.fixture
def writes_die_half_way(monkeypatch):
    """Call it to make every local file write stop half way with "No space left on device" (a
    writer killed mid-write); call ``monkeypatch.undo()`` to end it."""
    import fsspec.implementations.local as local

    real_write = local.LocalFileOpener.write

    def dies_half_way(self, data):
        real_write(self, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    return lambda: monkeypatch.setattr(local.LocalFileOpener, "write", dies_half_way)


@pytest.fixture
def map_name_too_long(monkeypatch):
    """Call it with an image id: writing that image's map (``ResultStore.write_map``) then fails
    with ENAMETOOLONG, as for a key its store refuses; other maps are written as usual."""
    import errno

    from patchwatch.storage.results_store import ResultStore

    real_write = ResultStore.write_map

    def refuse(refused_id: str) -> None:
        def write_map(self, image_id, uri, version, anomaly_map):
            if image_id == refused_id:
                raise OSError(errno.ENAMETOOLONG, "File name too long", uri)
            return real_write(self, image_id, uri, version, anomaly_map)

        monkeypatch.setattr(ResultStore, "write_map", write_map)

    return refuse


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """Logs and events that flows run in this process queued for a Prefect server are sent while
    the servers are still up (before session fixtures stop them): Prefect's own exit-time drain
    would retry a stopped server for as long as items remain."""
    import sys

    if "prefect" in sys.modules:
        from patchwatch.flows.runner import send_queued_logs_and_events

        send_queued_logs_and_events()


# Test files by their measured time, slowest first (`make test` with --durations=0, each file's
# setup + call + teardown summed, 2026-12-02: 224 s for test_nightly.py down to 16 s). `make test`
# hands whole files to its two processes in collection order (--dist loadfile
# --no-loadscope-reorder): started last, the soak test (one test, 206 s) ran alone at the end,
# as xdist's own order (most tests first) put it. Files not listed keep their order, after these.
SLOWEST_FILES_FIRST = (
    "test_nightly.py", "test_soak.py", "test_faults.py", "test_integrity.py", "test_trust.py",
    "test_config_file.py", "test_auto.py", "test_tiling.py", "test_security.py", "test_input_size.py",
    "test_pictures.py", "test_deploy.py", "test_pipeline_s3.py", "test_bad_inputs.py", "test_resume.py",
    "test_concurrency.py", "test_quality.py", "test_gpu_batching.py", "test_cli.py",
    "test_prefect_server.py", "test_cli_messages.py", "test_api.py", "test_mirrors.py",
    "test_maps_product.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: position for position, name in enumerate(SLOWEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order kept
