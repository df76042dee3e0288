"""One fit per model root at a time (issue 14, case 1).

Two ``patchwatch fit`` on one root at once used to both exit 0 and both call their version v0001:
the bank index, plan and manifest held only the second's images, the first's were in no version,
and ``current.json`` read ``{"previous": "v0001", "version": "v0001"}``. Now a fit holds a lease
on the root (``storage/leases.py``): the second is refused with one line, and every image of the
one that ran is in its version. Checked on a folder and on the loopback S3 server, where the
lease rests on S3's conditional PUT (``If-None-Match: *``), which moto honours.
"""
from __future__ import annotations

import json
import socket
import subprocess
import threading
import time

import pytest

from .conftest import copy_mtd_images, mtd_available
from .local_dask import dask_cluster
from .servers import finish_patchwatch, patchwatch_env, start_patchwatch

N_EACH = 4  # images per fit: below the hold-out minimum, so no threshold (not what this tests)


# --------------------------------------------------------------------------- the lease itself


@pytest.fixture(params=["folder", "s3"])
def lease_root(request, tmp_path):
    if request.param == "folder":
        return str(tmp_path / "model")
    s3 = request.getfixturevalue("s3_environment")
    return s3.url(f"lease-{time.monotonic_ns()}", "model")


def test_a_second_holder_is_refused_until_the_first_releases(lease_root):
    from patchwatch.storage.leases import LeaseHeldError
    from patchwatch.storage.model_store import ModelRegistry

    registry = ModelRegistry(lease_root)
    first = registry.fit_lease().acquire()
    with pytest.raises(LeaseHeldError, match=r"is locked by another fit \(host .*, pid \d+"):
        registry.fit_lease().acquire()
    first.check()
    first.release()
    second = registry.fit_lease().acquire()  # free again
    second.release()


def test_racing_takers_get_exactly_one_lease(lease_root):
    """Eight threads ask at once: exactly one gets it (the exclusive create decides, not timing)."""
    from patchwatch.storage.leases import LeaseHeldError
    from patchwatch.storage.model_store import ModelRegistry

    registry, barrier, won, refused = ModelRegistry(lease_root), threading.Barrier(8), [], []

    def take():
        lease = registry.fit_lease()
        barrier.wait()
        try:
            won.append(lease.acquire())
        except LeaseHeldError:
            refused.append(lease)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(won) == 1 and len(refused) == 7
    won[0].release()


def test_an_expired_lease_is_taken_over_and_its_old_holder_cannot_commit(lease_root):
    from patchwatch.storage.leases import LeaseLostError
    from patchwatch.storage.model_store import ModelRegistry

    registry = ModelRegistry(lease_root)
    hung = registry.fit_lease(seconds=1.0).acquire()
    hung._stop.set()  # the holder hangs: no more renewals
    time.sleep(1.3)
    taker = registry.fit_lease().acquire()
    with pytest.raises(LeaseLostError, match="lost its lock"):
        hung.check()
    hung.release()  # does not free the taker's lease
    taker.check()
    taker.release()


def test_a_lease_of_a_killed_process_on_this_host_is_free_at_once(lease_root):
    from patchwatch.storage.leases import create_exclusively
    from patchwatch.storage.locations import join
    from patchwatch.storage.model_store import ModelRegistry

    dead = subprocess.Popen(["true"])
    dead.wait()
    record = {"holder": "x", "purpose": "fit", "host": socket.gethostname(), "pid": dead.pid,
              "expires": time.time() + 3600, "expires_at": "later"}
    create_exclusively(join(lease_root, "locks", "fit-00001.json"), json.dumps(record).encode())
    lease = ModelRegistry(lease_root).fit_lease().acquire()
    assert lease.number == 2
    lease.release()


# --------------------------------------------------------------------------- two fits through the CLI


@pytest.fixture(scope="module")
def fits(tmp_path_factory, prefect_server, s3_server):
    if not mtd_available():
        pytest.skip("MTD not available")
    work = tmp_path_factory.mktemp("concurrent-fits")
    sources = {"a": work / "a", "b": work / "b"}
    images = {"a": copy_mtd_images(sources["a"], "train", N_EACH, start=0),
              "b": copy_mtd_images(sources["b"], "train", N_EACH, start=N_EACH)}
    env = patchwatch_env(work / "prefect-home", api_url=prefect_server.api_url, s3=s3_server)
    with dask_cluster(work, env) as address:
        yield {"work": work, "env": env, "sources": sources, "images": images, "address": address}


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_two_fits_on_one_root_one_is_refused_and_the_other_is_whole(where, fits, request):
    from patchwatch.storage.locations import join, read_json
    from patchwatch.storage.model_store import ModelRegistry

    if where == "s3":
        root = request.getfixturevalue("s3_environment").url("concurrent", "model")
    else:
        root = str(fits["work"] / "model")
    processes = {name: start_patchwatch(["fit", "--images", fits["sources"][name], "--root", root, "--batch-size", "2",
                               "--dask-address", fits["address"]], fits["env"]) for name in ("a", "b")}
    outcomes = {name: finish_patchwatch(process) for name, process in processes.items()}

    finished = [name for name, (code, _) in outcomes.items() if code == 0]
    refused = [name for name, (code, _) in outcomes.items() if code != 0]
    assert len(finished) == 1 and len(refused) == 1, {n: o[-1500:] for n, (_, o) in outcomes.items()}
    (winner,), (loser,) = finished, refused
    last_line = outcomes[loser][1].strip().splitlines()[-1]
    assert last_line.startswith("patchwatch fit: LeaseHeldError: ") and "is locked by another fit" in last_line, \
        outcomes[loser][1][-3000:]

    registry = ModelRegistry(root)
    expected = sorted(str(p) for p in fits["images"][winner])
    assert registry.current() == "v0001" and registry.versions() == ["v0001"]
    assert read_json(join(root, "current.json"))["previous"] is None
    model = registry.model("v0001")
    manifest = model.read_manifest()
    assert manifest["images"] == str(fits["sources"][winner]) and manifest["n_images"] == N_EACH
    assert sorted(model.read_table("plan").uri) == expected
    assert sorted(registry.bank.index().uri) == expected
    assert sum(registry.bank.rows_per_batch(manifest["bank_batches"]).values()) == manifest["bank_rows"]
    # and the lease is free again: the next fit on the root runs
    lease = registry.fit_lease().acquire()
    lease.release()
