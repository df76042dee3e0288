#!/usr/bin/env python
"""How much of PatchCore's score time on MTD is the kNN's matrix products, and how much is the
work around them (issue 15, item 2: the backbone >= 80 % of score time).

MTD test images are scored whole, as the score-batch task scores them (tasks of 16 images, one
thread, the Dask workers' allocator settings): the backbone, ``PatchCore.worst_patches`` (the
kNN), eq. 7 (``PatchCore._weighted``: m*'s neighbourhoods and the re-weighting), the map's render
(``anomaly.maps.anomaly_map``) and the task's Zarr writes (``ResultStore.write_maps``). Inside the
kNN and eq. 7, every ranking product is timed where it runs (``_Ranking.distances`` and
``distances_by_query``: the query operand and the matrix product), so each splits into its
products and everything else (chunk minima, the candidates' search and exact comparison, the
principal axes' embedding, the worst patches' bookkeeping).

From these: the backbone's share of score time as scored, and the share it would have if the
kNN's and eq. 7's work other than their products took no time at all, the most that any rewrite of
that work (in numpy, torch or compiled code) could reach with exact products of this size.

    python bench/bench_knn_floor.py                          # all 763 train images, 100 test images
    python bench/bench_knn_floor.py --limit 100 --test-limit 32 --out /tmp/bench
"""
from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"
os.environ.setdefault("PATCHWATCH_ALLOW_SOURCES", "/work/shared")

import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

sys.path.insert(0, str(common.REPO))

from bench_score_profile import TASK_BATCH  # noqa: E402  (a score-batch task's images)

TARGET_SHARE = 0.80


@contextmanager
def products_timed(clock: dict):
    """Every ranking product run inside adds its seconds to ``clock['products']``."""
    from patchwatch.anomaly.patchcore import _Ranking

    originals = {name: getattr(_Ranking, name) for name in ("distances", "distances_by_query")}

    def timed(original):
        def wrapper(self, *args, **kwargs):
            started = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                clock["products"] += time.perf_counter() - started
        return wrapper

    for name, original in originals.items():
        setattr(_Ranking, name, timed(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(_Ranking, name, original)


def split_timed(clocks: dict, stage: str, function, *args):
    """``function(*args)``; its seconds into ``clocks[stage]``, its products' into
    ``clocks[stage + ' products']``."""
    inner = defaultdict(float)
    with products_timed(inner):
        started = time.perf_counter()
        result = function(*args)
        elapsed = time.perf_counter() - started
    clocks[stage + " products"] += inner["products"]
    clocks[stage] += elapsed
    return result


def score_round(extractor, model, images: list[np.ndarray], store, clocks: dict, round_number: int) -> None:
    from patchwatch.anomaly.maps import anomaly_map
    from patchwatch.anomaly.patchcore import _stacked

    for first in range(0, len(images), TASK_BATCH):
        features = []
        for image in images[first:first + TASK_BATCH]:
            started = time.perf_counter()
            features.append(extractor.extract([image])[0])
            clocks["backbone"] += time.perf_counter() - started
        vectors, bounds = _stacked(features)
        found = split_timed(clocks, "kNN", model.worst_patches, vectors, bounds)
        split_timed(clocks, "eq. 7", model._weighted, vectors, found.patches, found.scores, found.rows)
        maps = []
        for k, item in enumerate(features):
            started = time.perf_counter()
            maps.append(anomaly_map(found.map_scores[bounds[k]:bounds[k + 1]].reshape(item.grid), item.image_shape,
                                    model.config.sigma, item.input_shape))
            clocks["render"] += time.perf_counter() - started
        started = time.perf_counter()
        store.write_maps([(f"r{round_number}-{first + k}", f"r{round_number}-{first + k}", "v", amap)
                          for k, amap in enumerate(maps)])
        clocks["write"] += time.perf_counter() - started


def stage_rows(clocks: dict, images: int) -> tuple[list[dict], dict]:
    ms = {key: 1e3 * value / images for key, value in clocks.items()}
    parts = {"backbone": ms["backbone"],
             "kNN: ranking products": ms["kNN products"], "kNN: everything else": ms["kNN"] - ms["kNN products"],
             "eq. 7: ranking product": ms["eq. 7 products"], "eq. 7: everything else": ms["eq. 7"] - ms["eq. 7 products"],
             "render (upsample + smooth)": ms["render"], "Zarr write": ms["write"]}
    total = sum(parts.values())
    rows = [{"stage": name, "ms per image": round(value, 3), "share of score time": round(value / total, 3)}
            for name, value in parts.items()]
    rows.append({"stage": "score time (sum)", "ms per image": round(total, 3), "share of score time": 1.0})
    free = total - parts["kNN: everything else"] - parts["eq. 7: everything else"]
    shares = {"as scored": ms["backbone"] / total,
              "the kNN's and eq. 7's work other than their products at zero": ms["backbone"] / free,
              "the kNN at zero (products too)": ms["backbone"] / (total - ms["kNN"])}
    allowed = ms["backbone"] * (1 - TARGET_SHARE) / TARGET_SHARE
    return rows, {"ms": ms, "shares": shares, "allowed_ms": allowed, "around_ms": total - ms["backbone"]}


def main() -> None:
    parser = common.base_parser(__doc__, "knn_floor")
    parser.add_argument("--test-limit", type=int, default=100, help="MTD test images scored whole (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the test images (default %(default)s)")
    parser.add_argument("--tmp", default=None, help="folder for the Zarr maps (default: a temporary one)")
    args = parser.parse_args()
    allocator = common.as_on_the_workers()

    from patchwatch.storage.images import read_image
    from patchwatch.storage.results_store import ResultStore

    wall = time.perf_counter()
    extractor, runtime = common.one_thread_patchcore_extractor()
    machine = common.machine_info()
    train = common.select_records(args.split, "train", args.limit)
    model = common.fit_default_patchcore(extractor, [record.uri for record in train])
    images = [read_image(record.uri) for record in common.select_records(args.split, "test", args.test_limit)]
    folder = Path(tempfile.mkdtemp(prefix="knn-floor-", dir=args.tmp))
    try:
        store = ResultStore(str(folder / "results"))
        store.prepare()
        warm = defaultdict(float)
        score_round(extractor, model, images[:TASK_BATCH], store, warm, -1)   # sessions, caches, first imports
        clocks = defaultdict(float)
        for round_number in range(args.rounds):
            score_round(extractor, model, images, store, clocks, round_number)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    rows, figures = stage_rows(clocks, args.rounds * len(images))
    share_rows = [{"backbone share of score time": case, "share": round(share, 3),
                   f"meets >= {TARGET_SHARE:.0%}": "yes" if share >= TARGET_SHARE else "NO"}
                  for case, share in figures["shares"].items()]
    source = f"from `{common.command_line()}`"
    sections = [
        {"title": f"PatchCore score time by stage on MTD, memory of {len(model.memory):,} rows ({len(train)} train images)",
         "rows": rows,
         "notes": [f"{len(images)} MTD test images scored whole in tasks of {TASK_BATCH}, {args.rounds} rounds, per image; "
                   f"one thread; ranking in {model.precision}; runtime {runtime}",
                   "ranking products: every _Ranking.distances / distances_by_query call (its query operand and the "
                   "matrix product) inside PatchCore.worst_patches (kNN) and PatchCore._weighted (eq. 7)",
                   f"for the backbone to hold {TARGET_SHARE:.0%}, everything around it may take "
                   f"{figures['allowed_ms']:.2f} ms an image; it takes {figures['around_ms']:.2f}",
                   source]},
        {"title": "Backbone share of score time, as scored and with parts of the kNN taken away",
         "rows": share_rows,
         "notes": ["'other than their products at zero': the most any rewrite of the kNN's bookkeeping (chunk minima, "
                   "candidate search, exact comparison, embedding) could reach with exact products of this size",
                   source]},
    ]
    meta = {"command": common.command_line(), "date": common.utc_now(), "machine": machine, "measures_memory": False,
            "wall_s": time.perf_counter() - wall,
            "parameters": {"allocator": allocator, "train images": len(train), "memory rows": len(model.memory),
                           "test images": len(images), "rounds": args.rounds},
            "ms_per_image": figures["ms"], "shares": figures["shares"]}
    common.report(args.out, args.name, "PatchCore's kNN: its products and the work around them (MTD)", meta, sections)


if __name__ == "__main__":
    main()
