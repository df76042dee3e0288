#!/usr/bin/env python
"""Scaling past one machine: exact vs approximate nearest-neighbour indexes, the coreset at
larger banks, and one 20-megapixel image end to end (the figures behind README "Scaling out").

Sections:

1. kNN index vs memory size. Memories of 0.1x (the default PatchCore memory on MTD: its 10 %
   coreset), 1x (MTD's whole train bank, ~80k x 256), 4x, 16x and 64x. faiss ``IndexFlatL2``
   (exact, what ``anomaly.patchcore.build_index`` builds) against ``IndexIVFFlat`` (nlist
   sqrt(N) and 4 sqrt(N), nprobe sweep) and ``IndexHNSWFlat`` (M 16 / 32, efSearch sweep):
   build seconds, memory (RSS added by the build), query ms per 1k queries, recall@1 of the
   exact nearest neighbour, relative error of the NN distance; on some sizes the image AUROC
   of MTD's test split when PatchCore's patch scores and eq. 7 come from that index.
2. Coreset vs bank size (1x, 4x by default): ``streaming_coreset`` direct (the whole bank at once, as
   ``select_coreset``) vs composable (greedy coresets of chunks, then greedy over their union,
   as the fit task runs it on big banks): time, peak memory, covering radius over the whole bank.
3. One 20-megapixel image (5472 x 3648) tiled with ``TilingConfig()``: tiles, backbone ms per
   512 x 512 tile, whole-image scoring time, map bytes written by ``ResultStore.write_map``,
   peak memory of the scoring process.

Memories beyond 1x: 4x = the 1x bank plus the features of each train image flipped
left-right, flipped up-down and rotated by 180 degrees (real features of real pixels); 16x and
64x = that 4x bank followed by 3 / 15 copies with Gaussian noise of ``--jitter`` x its
per-coordinate std (the noise definition of bench_engine / bench_pipeline).

    python bench/bench_scaling.py                       # everything (~25 min on 2 cores)
    python bench/bench_scaling.py --scales 0.1,1 --coreset-scales 1 --queries 500 --out /tmp/bench

Features are cached in ``--work``; each section's rows are cached there too (keyed by its
settings), so a rerun redoes only what changed (``--fresh`` ignores the row cache).
"""
from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

sys.path.insert(0, str(common.REPO))

AUGMENTS = ("fliplr", "flipud", "rot180")
IMAGE_20MP = (3648, 5472)  # height x width: a 20-megapixel 3:2 sensor (e.g. 1-inch 20 MP cameras)


def _threads_one() -> None:
    import faiss
    import torch

    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)


# ---- features --------------------------------------------------------------------------------------
def _augment(image: np.ndarray, how: str) -> np.ndarray:
    if how == "fliplr":
        return np.ascontiguousarray(image[:, ::-1])
    if how == "flipud":
        return np.ascontiguousarray(image[::-1])
    return np.ascontiguousarray(image[::-1, ::-1])


def extract_features(split_csv: str, work: Path) -> dict:
    """MTD train bank, its augmented views' banks, test vectors per image; cached in ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    done = work / "features.json"
    if done.exists():
        return json.loads(done.read_text())
    _threads_one()
    from patchwatch.anomaly.detectors import default_features
    from patchwatch.anomaly.features import PatchFeatureExtractor
    from patchwatch.storage.images import list_images, read_image

    records = list_images(split_csv)
    train = [r for r in records if r.split == "train" and r.label == "good"]
    test = [r for r in records if r.split == "test"]
    extractor = PatchFeatureExtractor(default_features("patchcore"), threads=1)
    info = {"runtime": extractor.runtime, "train_images": len(train), "test_images": len(test)}
    started = time.perf_counter()
    train_images = [read_image(r.uri) for r in train]
    for view in ("train",) + AUGMENTS:
        t0 = time.perf_counter()
        vectors = [extractor.extract([img if view == "train" else _augment(img, view)])[0].vectors
                   for img in train_images]
        np.save(work / f"bank-{view}.npy", np.concatenate(vectors).astype(np.float32))
        info[f"extract_{view}_s"] = time.perf_counter() - t0
        print(f"  {view}: {sum(len(v) for v in vectors):,} rows in {info[f'extract_{view}_s']:.0f} s", flush=True)
    del train_images
    test_vectors, offsets = [], [0]
    for record in test:
        vectors = extractor.extract([read_image(record.uri)])[0].vectors
        test_vectors.append(vectors)
        offsets.append(offsets[-1] + len(vectors))
    np.save(work / "test-vectors.npy", np.concatenate(test_vectors).astype(np.float32))
    np.save(work / "test-offsets.npy", np.array(offsets, np.int64))
    np.save(work / "test-labels.npy", np.array([r.label == "defect" for r in test]))
    info["extract_all_s"] = time.perf_counter() - started
    info["bank_rows"] = int(np.load(work / "bank-train.npy", mmap_mode="r").shape[0])
    info["test_rows"] = int(offsets[-1])
    done.write_text(json.dumps(info, indent=2))
    return info


def default_memory(work: Path) -> np.ndarray:
    """The default PatchCore memory on MTD: the 10 % coreset of the 1x bank (cached)."""
    path = work / "memory-default.npy"
    if not path.exists():
        from patchwatch.anomaly.patchcore import PatchCoreConfig, select_coreset

        bank = np.load(work / "bank-train.npy")
        np.save(path, bank[np.sort(select_coreset(bank, PatchCoreConfig()))])
    return np.load(path)


def build_memory(work: Path, scale: float, relative_jitter: float, seed: int = 0) -> tuple[np.ndarray, str]:
    """(memory, how it was built) of ``scale`` x MTD's train bank; 0.1 = the default coreset memory."""
    if scale < 1:
        return default_memory(work), "10 % greedy coreset of the 1x bank (PatchCore's default memory on MTD)"
    views = ("train",) + AUGMENTS
    base_rows, dim = common.bank_file_shape(work / "bank-train.npy")
    real = 1 if scale == 1 else 4
    rows = [common.bank_file_shape(work / f"bank-{v}.npy")[0] for v in views[:real]]
    real_rows = sum(rows)
    copies = int(round(scale / real))
    bank = np.empty((real_rows * copies, dim), np.float32)
    at = 0
    for view, count in zip(views[:real], rows):
        common.read_bank_into(work / f"bank-{view}.npy", bank[at:at + count])
        at += count
    if copies == 1:
        return bank, ("MTD train bank" if real == 1 else "MTD train bank + its fliplr, flipud, rot180 views' banks")
    sigma = common.jitter_sigma(bank[:real_rows], relative_jitter)
    for copy in range(1, copies):
        for lo in range(0, real_rows, common.NOISE_BLOCK_ROWS):
            hi = min(real_rows, lo + common.NOISE_BLOCK_ROWS)
            np.add(bank[lo:hi], common.jitter(copy, lo, hi, dim, sigma, seed),
                   out=bank[copy * real_rows + lo: copy * real_rows + hi])
    return bank, (f"4x bank + {copies - 1} copies with Gaussian noise (std {relative_jitter} x per-coordinate std "
                  f"= {sigma:.4g})")


# ---- section 1: indexes ----------------------------------------------------------------------------
def _search_timed(index, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray, float]:
    started = time.perf_counter()
    squared, ids = index.search(queries, k)
    return np.sqrt(np.maximum(squared[:, 0], 0)), ids[:, 0], time.perf_counter() - started


def image_auroc(index, memory: np.ndarray, work: Path) -> float:
    """MTD test image AUROC with PatchCore's scores (nearest distance + eq. 7) from ``index``."""
    from patchwatch.anomaly.metrics import image_auroc as auroc
    from patchwatch.anomaly.patchcore import PatchCoreConfig, reweight_image_score

    vectors = np.load(work / "test-vectors.npy")
    offsets = np.load(work / "test-offsets.npy")
    labels = np.load(work / "test-labels.npy")
    config = PatchCoreConfig()
    squared, nearest = index.search(vectors, 1)
    scores = np.sqrt(np.maximum(squared[:, 0], 0))
    nearest = nearest[:, 0]
    image_scores = np.array([reweight_image_score(vectors[lo:hi], scores[lo:hi], nearest[lo:hi], memory, index,
                                                  config.num_neighbors)
                             for lo, hi in zip(offsets[:-1], offsets[1:])])
    return float(auroc(labels, image_scores))


def index_variants(rows: int, scale: float, args) -> list[dict]:
    root = math.sqrt(rows)
    variants = [{"kind": "flat", "blas_threshold": None}, {"kind": "flat", "blas_threshold": 20}]
    for factor in ((1, 4) if scale <= args.ivf4_max_scale else (1,)):
        nlist = int(2 ** round(math.log2(factor * root)))
        variants.append({"kind": "ivf", "nlist": nlist, "nprobe": [1, 4, 16, 64]})
    if scale <= args.hnsw_max_scale:
        for m in (16, 32):
            variants.append({"kind": "hnsw", "M": m, "efSearch": [16, 64, 256]})
    return variants


def build_index(variant: dict, memory: np.ndarray, train_per_list: int, seed: int):
    import faiss

    dim = memory.shape[1]
    if variant["kind"] == "flat":
        index = faiss.IndexFlatL2(dim)
        index.add(memory)
        return index
    if variant["kind"] == "ivf":
        quantizer = faiss.IndexFlatL2(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, variant["nlist"])
        index.own_fields = True
        quantizer.this.disown()
        sample = min(len(memory), train_per_list * variant["nlist"])
        picks = np.sort(np.random.default_rng(seed).choice(len(memory), sample, replace=False))
        index.cp.max_points_per_centroid = train_per_list
        index.train(memory[picks])
        index.add(memory)
        return index
    index = faiss.IndexHNSWFlat(dim, variant["M"])
    index.hnsw.efConstruction = 40
    index.add(memory)
    return index


def _tile_batches_timed(index, queries: np.ndarray, batch: int, batches: int) -> float:
    """Seconds per query, searching ``batches`` batches of ``batch`` queries one call each (as the
    score flow searches one tile's or one image's patches per call)."""
    index.search(queries[:batch], 1)  # warm-up
    started = time.perf_counter()
    for i in range(batches):
        index.search(queries[i * batch:(i + 1) * batch], 1)
    return (time.perf_counter() - started) / (batch * batches)


def index_section(work: Path, scale: float, args) -> list[dict]:
    import faiss

    _threads_one()
    default_threshold = faiss.cvar.distance_compute_blas_threshold
    memory, how = build_memory(work, scale, args.jitter)
    memory = np.ascontiguousarray(memory)
    rows = len(memory)
    test = np.load(work / "test-vectors.npy", mmap_mode="r")
    picks = np.random.default_rng(1).choice(len(test), min(args.queries, len(test)), replace=False)
    queries = np.ascontiguousarray(test[picks])
    with_auroc = scale in args.auroc_scales
    out, exact = [], None
    label = f"{scale:g}x"
    print(f"[index] {label}: {rows:,} rows ({how})", flush=True)
    for variant in index_variants(rows, scale, args):
        if variant["kind"] == "flat" and variant["blas_threshold"] is None and scale > args.slow_flat_max_scale:
            continue  # its per-tile timing would take many minutes; the exact answers come from the next one
        faiss.cvar.distance_compute_blas_threshold = variant.get("blas_threshold") or default_threshold
        before = common.current_rss_mib()
        started = time.perf_counter()
        index = build_index(variant, memory, args.train_per_list, 0)
        build_s = time.perf_counter() - started
        index_mib = common.current_rss_mib() - before
        settings = {"ivf": "nprobe", "hnsw": "efSearch"}.get(variant["kind"])
        for value in (variant[settings] if settings else [None]):
            if variant["kind"] == "ivf":
                index.nprobe = value
                name = f"IVF{variant['nlist']} nprobe {value}"
            elif variant["kind"] == "hnsw":
                index.hnsw.efSearch = value
                name = f"HNSW M{variant['M']} ef {value}"
            else:
                name = ("flat (exact)" if variant["blas_threshold"] is None
                        else f"flat (exact), BLAS threshold {variant['blas_threshold']}")
            # the recall pass: every query in one call (flat: the BLAS path, the fastest exact search)
            distances, ids, _ = _search_timed(index, queries)
            if exact is None:
                exact = (distances, ids)
            hit = (ids == exact[1]) | (distances <= exact[0] * (1 + 1e-5) + 1e-6)
            error = (distances - exact[0]) / np.maximum(exact[0], 1e-12)
            slow = variant["kind"] == "flat" and variant["blas_threshold"] is None
            batches = args.tile_batches if not slow else (1 if scale <= args.slow_flat_max_scale else 0)
            per_query = _tile_batches_timed(index, queries, args.tile_queries, batches) if batches else None
            row = {"memory": label, "rows": rows, "index": name, "build s": build_s, "index MiB": index_mib,
                   "ms / 1k queries": None if per_query is None else 1e6 * per_query,
                   "ms / tile (256 q)": None if per_query is None else 1000 * per_query * args.tile_queries,
                   "recall@1": float(hit.mean()),
                   "NN dist rel. err. mean": float(error.mean()), "NN dist rel. err. max": float(error.max())}
            if with_auroc and (variant["kind"] == "flat" and variant["blas_threshold"] or value in args.auroc_settings):
                faiss.cvar.distance_compute_blas_threshold = 20  # the AUROC pass is long; its time is not reported
                row["image AUROC"] = image_auroc(index, memory, work)
                faiss.cvar.distance_compute_blas_threshold = variant.get("blas_threshold") or default_threshold
            out.append(row)
            print(f"  {name}: build {build_s:.1f} s, {row['ms / 1k queries'] or float('nan'):.1f} ms/1k, "
                  f"recall {row['recall@1']:.3f}"
                  + (f", AUROC {row['image AUROC']:.4f}" if "image AUROC" in row else ""), flush=True)
        del index
    faiss.cvar.distance_compute_blas_threshold = default_threshold
    fast_flat = next(r for r in out if r["index"].startswith("flat (exact), BLAS"))
    flat_auroc = fast_flat.get("image AUROC")
    for row in out:
        row["time ÷ flat (BLAS 20)"] = common.ratio(row["ms / 1k queries"], fast_flat["ms / 1k queries"])
        if "image AUROC" in row and flat_auroc is not None:
            row["AUROC - flat"] = row["image AUROC"] - flat_auroc
    return [{**r, "built as": how, "default BLAS threshold": default_threshold} for r in out]


# ---- section 2: coreset ----------------------------------------------------------------------------
def coreset_step(work: str, scale: float, jitter: float, mode: str, chunk_rows: int) -> dict:
    _threads_one()
    from patchwatch.anomaly.coreset import coreset_size, project, projection_matrix, streaming_coreset
    from patchwatch.anomaly.patchcore import PatchCoreConfig

    work = Path(work)
    bank, how = build_memory(work, scale, jitter)
    config = PatchCoreConfig()
    matrix = projection_matrix(bank.shape[1], config.projection_dim, config.seed)
    size = coreset_size(len(bank), config.coreset_ratio)
    baseline = common.mark_baseline()
    started = time.perf_counter()
    if mode == "direct":
        result = streaming_coreset([bank], len(bank), size, matrix, config.seed, chunk_rows=len(bank))
    else:
        chunks = (bank[lo:lo + chunk_rows] for lo in range(0, len(bank), chunk_rows))
        result = streaming_coreset(chunks, len(bank), size, matrix, config.seed, chunk_rows=chunk_rows)
    seconds = time.perf_counter() - started
    peak = common.peak_rss_mib()
    started = time.perf_counter()
    radius = common.covering_radius(project(bank, matrix), project(bank[np.sort(result.indices)], matrix))
    return {"bank": f"{scale:g}x", "rows": len(bank), "coreset": size, "mode": mode,
            "chunk rows": chunk_rows if mode != "direct" else len(bank),
            "groups": 1 if mode == "direct" else math.ceil(len(bank) / chunk_rows),
            "seconds": seconds, "baseline MiB": baseline, "peak MiB": peak, "step MiB": peak - baseline,
            "covering radius": radius, "radius check s": time.perf_counter() - started, "built as": how}


# ---- section 3: one 20-megapixel image -------------------------------------------------------------
def tile_step(work: str, split_csv: str, tiles_timed: int) -> dict:
    _threads_one()
    import tempfile

    from patchwatch.anomaly.detectors import default_features, detector_config, for_features
    from patchwatch.anomaly.engine import score_image
    from patchwatch.anomaly.features import PatchFeatureExtractor
    from patchwatch.anomaly.patchcore import PatchCore
    from patchwatch.anomaly.tiling import TilingConfig, tile_grid
    from patchwatch.storage.images import list_images, read_image
    from patchwatch.storage.results_store import ResultStore

    work = Path(work)
    features = default_features("patchcore")
    settings = for_features("patchcore", detector_config("patchcore"), features)
    model = PatchCore(default_memory(work), settings)
    extractor = PatchFeatureExtractor(features, threads=1)
    tiling = TilingConfig()
    height, width = IMAGE_20MP
    # mirrored MTD train texture, repeated to 20 MP (the benches' large-image recipe)
    record = next(r for r in list_images(split_csv, "train"))
    texture = read_image(record.uri)
    if texture.ndim == 2:
        texture = np.repeat(texture[:, :, None], 3, axis=2)
    texture = np.concatenate([texture, texture[::-1]], axis=0)
    texture = np.concatenate([texture, texture[:, ::-1]], axis=1)
    image = np.tile(texture, (height // texture.shape[0] + 1, width // texture.shape[1] + 1, 1))[:height, :width]
    image = np.ascontiguousarray(image)
    tiles = tile_grid(height, width, tiling.tile, tiling.overlap)
    extractor.extract([image[:tiling.tile, :tiling.tile]])  # warm-up (session compile)
    times = []
    patches = None
    for tile in tiles[:tiles_timed]:
        started = time.perf_counter()
        out = extractor.extract([image[tile.top:tile.bottom, tile.left:tile.right]])[0]
        times.append(time.perf_counter() - started)
        patches = len(out.vectors)
    knn = []
    for tile in tiles[:tiles_timed]:
        vectors = extractor.extract([image[tile.top:tile.bottom, tile.left:tile.right]])[0].vectors
        started = time.perf_counter()
        model.patch_scores(vectors)
        knn.append(time.perf_counter() - started)
    baseline = common.mark_baseline()
    started = time.perf_counter()
    scored = score_image(extractor, model, image, tiling)
    score_s = time.perf_counter() - started
    peak = common.peak_rss_mib()
    with tempfile.TemporaryDirectory(dir=work) as folder:
        store = ResultStore(folder)
        store.prepare()
        started = time.perf_counter()
        url = store.write_map("night/x.png", "s3://bucket/night/x.png", "v0001", scored.map)
        write_s = time.perf_counter() - started
        map_bytes = sum(p.stat().st_size for p in Path(url).rglob("*") if p.is_file())
    return {"image": f"{width} x {height}", "megapixels": height * width / 1e6, "tiles": len(tiles),
            "patches / tile": patches, "runtime": extractor.runtime, "tiles timed": len(times),
            "backbone ms / tile (median)": 1000 * float(np.median(times)),
            "kNN ms / tile (median, default memory)": 1000 * float(np.median(knn)),
            "default memory rows": len(model.memory),
            "score image s": score_s, "s / tile (whole image)": score_s / len(tiles),
            "baseline MiB": baseline, "peak MiB": peak, "step MiB": peak - baseline,
            "map write s": write_s, "map MiB (float32 raw)": height * width * 4 / common.MIB,
            "map MiB written": map_bytes / common.MIB, "map compression": height * width * 4 / map_bytes,
            "image MiB (8-bit RGB raw)": height * width * 3 / common.MIB,
            "anomaly/ sources": _source_state()}


def _source_state() -> str:
    """sha1 of the anomaly/ sources this process ran, and whether git saw them modified (others
    change them while benches run: the row says which code it measured)."""
    import subprocess

    digest = hashlib.sha1(b"".join(p.read_bytes() for p in sorted((common.REPO / "anomaly").glob("*.py"))))
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "anomaly"], cwd=common.REPO,
                               capture_output=True, text=True, timeout=30).stdout.strip()
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=common.REPO,
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        dirty, head = "", "?"
    return f"{digest.hexdigest()[:12]} (HEAD {head}{', uncommitted changes' if dirty else ''})"


# ---- driver ------------------------------------------------------------------------------------------
MEASURED: dict[str, list[str]] = {}  # section -> when its rows were measured (UTC), cached or not


def cached(work: Path, key: dict, fresh: bool, compute):
    path = work / f"rows-{hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}.json"
    if not path.exists() or fresh:
        value = compute()
        path.write_text(json.dumps(value, default=common._json_default))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(path.stat().st_mtime))
    MEASURED.setdefault(key["section"], []).append(stamp)
    return json.loads(path.read_text())


def main() -> None:
    parser = common.base_parser(__doc__, "scaling")
    parser.add_argument("--work", default="/tmp/patchwatch-scaling", help="feature and row cache (default %(default)s)")
    parser.add_argument("--scales", default="0.1,1,4,16,64", help="memory sizes for the index section")
    parser.add_argument("--auroc-scales", default="0.1,1,4", help="sizes whose image AUROC is measured per index")
    parser.add_argument("--auroc-settings", default="4,16", help="nprobe / efSearch values whose AUROC is measured")
    parser.add_argument("--hnsw-max-scale", type=float, default=4, help="largest size with HNSW (build is slow)")
    parser.add_argument("--ivf4-max-scale", type=float, default=16, help="largest size with nlist = 4 sqrt(N)")
    parser.add_argument("--slow-flat-max-scale", type=float, default=16,
                        help="largest size whose flat index is timed with faiss's default BLAS threshold")
    parser.add_argument("--tile-queries", type=int, default=256, help="queries per search call (one tile's patches)")
    parser.add_argument("--tile-batches", type=int, default=4, help="search calls timed per index")
    parser.add_argument("--queries", type=int, default=2000, help="test patch vectors queried per index")
    parser.add_argument("--train-per-list", type=int, default=64, help="IVF k-means training points per list")
    parser.add_argument("--coreset-scales", default="1,4")
    parser.add_argument("--chunk-rows", type=int, default=0, help="composable coreset group rows (0: 1x bank / 2)")
    parser.add_argument("--tiles-timed", type=int, default=20)
    parser.add_argument("--jitter", type=float, default=0.05)
    parser.add_argument("--sections", default="index,coreset,tile")
    parser.add_argument("--fresh", action="store_true", help="recompute cached rows")
    args = parser.parse_args()
    args.auroc_scales = [float(s) for s in args.auroc_scales.split(",") if s]
    args.auroc_settings = [int(s) for s in args.auroc_settings.split(",") if s]
    sections_wanted = args.sections.split(",")
    work = Path(args.work)
    started = time.perf_counter()
    info = extract_features(args.split, work)
    print(f"features: {info}", flush=True)
    sections = []
    if "index" in sections_wanted:
        rows = []
        for scale in [float(s) for s in args.scales.split(",")]:
            key = {"section": "index", "scale": scale, "queries": args.queries, "jitter": args.jitter,
                   "auroc": scale in args.auroc_scales, "settings": args.auroc_settings,
                   "hnsw": scale <= args.hnsw_max_scale, "train_per_list": args.train_per_list, "v": 2,
                   "ivf4": scale <= args.ivf4_max_scale, "slow": scale <= args.slow_flat_max_scale,
                   "tile": [args.tile_queries, args.tile_batches]}
            rows += cached(work, key, args.fresh, lambda: common.run_fresh(index_section, work, scale, args))
        built = {r["memory"]: r.pop("built as") for r in rows}
        threshold = [r.pop("default BLAS threshold") for r in rows][0]
        sections.append({"title": "kNN index vs memory size (k = 1, 1 thread)", "rows": rows, "notes": [
            f"recall: {args.queries} patch vectors of MTD's test images (random, seed 1), the same for every index, "
            "searched in one call; recall@1 = share whose returned neighbour is the exact one (or at the exact "
            "distance); NN dist rel. err. = (returned distance - exact) / exact",
            f"time: {args.tile_batches} search calls of {args.tile_queries} queries each (one 512 x 512 tile's patches "
            "per call, as the score flow searches), after one warm-up call; ms / tile = per call",
            f"flat (exact): faiss's default distance_compute_blas_threshold ({threshold}); faiss then takes its "
            "BLAS path only when queries x dim >= that (500 queries at 256 dims), so a tile's 256 queries take the "
            "slow per-pair path, which is what PatchCore.patch_scores runs today; 'BLAS threshold 20': the same "
            f"index with faiss.cvar.distance_compute_blas_threshold = 20 (the default-threshold flat: timed with "
            f"1 call, and not run above {args.slow_flat_max_scale:g}x)",
            "index MiB: resident memory added by building the index (the memory array itself is held apart)",
            f"IVF: IndexIVFFlat, nlist = the power of two nearest sqrt(N) and 4 sqrt(N) (4 sqrt(N) up to "
            f"{args.ivf4_max_scale:g}x), k-means on {args.train_per_list} x nlist random rows; HNSW: IndexHNSWFlat, "
            f"efConstruction 40, up to {args.hnsw_max_scale:g}x (its single-thread build grows too slow beyond)",
            "image AUROC: all 581 MTD test images, PatchCore's image score (nearest distance, eq. 7 re-weighting "
            "with its 9 neighbours searched in the same index), the memory = that size's rows; "
            f"measured for {', '.join(f'{s:g}x' for s in args.auroc_scales)}, nprobe / efSearch in {args.auroc_settings}",
            *[f"{k}: {v}" for k, v in built.items()]]})
    if "coreset" in sections_wanted:
        base_rows = common.bank_file_shape(work / "bank-train.npy")[0]
        chunk = args.chunk_rows or base_rows // 2
        rows = []
        for scale in [float(s) for s in args.coreset_scales.split(",")]:
            for mode in ("direct", "composable"):
                key = {"section": "coreset", "scale": scale, "mode": mode, "chunk": chunk, "jitter": args.jitter}
                rows.append(cached(work, key, args.fresh,
                                   lambda: common.run_fresh(coreset_step, str(work), scale, args.jitter, mode, chunk)))
        for row in rows:
            row.pop("built as")
            direct = next(r for r in rows if r["bank"] == row["bank"] and r["mode"] == "direct")
            first = next(r for r in rows if r["mode"] == row["mode"])
            row["time ÷ direct"] = common.ratio(row["seconds"], direct["seconds"])
            row["step ÷ direct"] = common.ratio(row["step MiB"], direct["step MiB"])
            row["radius ÷ direct"] = common.ratio(row["covering radius"], direct["covering radius"])
            row["time ÷ 1x (same mode)"] = common.ratio(row["seconds"], first["seconds"])
        sections.append({"title": "Coreset (10 %) vs bank size: direct vs composable", "rows": rows, "notes": [
            "direct: streaming_coreset over the whole bank in one group (= select_coreset); composable: "
            f"groups of {chunk:,} rows (half the 1x bank) each give a greedy coreset of 2 x their share, then greedy "
            "over the union picks the coreset (the form the fit task uses when the bank exceeds chunk_rows)",
            "each in a fresh process, the bank built before the baseline mark; step MiB = peak - baseline",
            "covering radius: exact largest distance of any bank row to the coreset, in the 128-d projected "
            "space (_common.covering_radius), measured after the timed step",
            "banks: as in the index section (4x real augmented views, 16x = 4x + jittered copies)"]})
    if "tile" in sections_wanted:
        row = cached(work, {"section": "tile", "tiles": args.tiles_timed, "v": 1}, args.fresh,
                     lambda: common.run_fresh(tile_step, str(work), args.split, args.tiles_timed))
        sections.append({"title": "One 20-megapixel image, tiled (defaults, 1 thread)", "rows": [row], "notes": [
            "image: one MTD train texture mirrored and repeated to 5472 x 3648, RGB uint8, in memory",
            "backbone ms / tile: PatchFeatureExtractor.extract of one 512 x 512 tile (primary input 256 x 256 plus "
            "the 0.25 context scale), median over the first tiles, after one warm-up",
            "kNN ms / tile: PatchCore.patch_scores of one tile's vectors against the default memory (flat index)",
            "score image s: anomaly.engine.score_image (every tile's features, kNN, eq. 7, stitching, full-size map)",
            "step MiB: peak RSS added by score_image (fresh process; model and extractor loaded before)",
            "map: ResultStore.write_map to a local folder (Zarr v3, float32, 512 x 512 chunks, zarr's default codec)"]})
    meta = {"command": common.command_line(), "date": common.utc_now(), "machine": common.machine_info(),
            "wall_s": time.perf_counter() - started,
            "parameters": {"split": args.split, "features": info, "jitter": args.jitter,
                           "rows measured (UTC, from the row cache in --work when before this run)":
                               {k: f"{min(v)} .. {max(v)}" for k, v in MEASURED.items()}}}
    common.report(args.out, args.name, "Scaling: approximate kNN, coreset at larger banks, a 20 MP image", meta,
                  sections)


if __name__ == "__main__":
    main()
