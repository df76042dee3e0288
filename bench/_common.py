"""Helpers shared by the benchmark scripts: machine description, fresh-process runs, peak memory,
image selection, synthetic (jittered) larger banks, exact covering radius, result tables."""
from __future__ import annotations

import concurrent.futures
import json
import math
import multiprocessing
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SPLIT = REPO.parent / "shared" / "datasets" / "mtd" / "split.csv"
DEFAULT_OUT = REPO / "bench" / "results"
# rows of one noise block: the jitter of a row depends only on (seed, copy, row), not on how the
# bank is cut into arrays, so the in-memory and the Zarr-streamed benchmarks build the same banks
NOISE_BLOCK_ROWS = 65536
MIB = 1024 * 1024

MEMORY_METHOD = ("each step runs in a fresh process (multiprocessing 'spawn'); just before the step (after "
                 "imports and loading its inputs) the kernel's peak-RSS mark is reset to the current RSS "
                 "(echo 5 > /proc/self/clear_refs) and that RSS is the 'baseline'; 'peak' = the process's "
                 "peak RSS (VmHWM in /proc/self/status) after the step, so 'step' = peak - baseline is the most "
                 "the step itself added; whole process: numpy, torch, faiss and BLAS buffers alike. "
                 "(getrusage(RUSAGE_SELF).ru_maxrss is not used: in a child started by fork + exec it also "
                 "keeps the pre-exec fork's RSS, i.e. the parent's, and the reset does not clear that part)")


# ---- machine, command line ---------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def total_memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def available_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_info() -> dict:
    import faiss
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_model": cpu_model(),
        "memory_gib": total_memory_gib(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
                       if k in os.environ},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "faiss": faiss.__version__,
        "platform": platform.platform(),
    }


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def as_on_the_workers() -> str:
    """Run this script with the Dask workers' glibc allocator settings
    (flows.runner.WORKER_ALLOCATOR_ENV), re-executing it with them if its environment lacks them:
    glibc reads them only at process start, and they change what a task's transient blocks cost
    (PatchCore's kNN took 2.6x the CPU under Dask's default: bench/results/workers.md). Returns
    the settings as text, for the report."""
    from patchwatch.flows.runner import WORKER_ALLOCATOR_ENV

    if any(os.environ.get(key) != value for key, value in WORKER_ALLOCATOR_ENV.items()):
        os.environ.update(WORKER_ALLOCATOR_ENV)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    return ", ".join(f"{key}={value}" for key, value in WORKER_ALLOCATOR_ENV.items())


# ---- fresh processes and memory ------------------------------------------------------------------
def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status: peak memory cannot be measured here")


def peak_rss_mib() -> float:
    """Peak resident set of this process (since start or the last :func:`mark_baseline`)."""
    return _status_mib("VmHWM")


def current_rss_mib() -> float:
    return _status_mib("VmRSS")


def mark_baseline() -> float:
    """Reset the peak-RSS mark to the current RSS and return it (MiB): :func:`peak_rss_mib` read
    later is then the peak since this call. Raises if the kernel does not allow the reset, rather
    than measure something else."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return current_rss_mib()


def run_fresh(function, *args, **kwargs):
    """``function(*args, **kwargs)`` in a new 'spawn' process, so its ru_maxrss is its own."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(function, *args, **kwargs).result()


# ---- images ---------------------------------------------------------------------------------------
def one_thread_patchcore_extractor(runtime_name: str | None = None):
    """(PatchCore's default feature extractor, its runtime) with one thread for torch, faiss and
    the runtime, as on a Dask worker; ``runtime_name`` None: PATCHWATCH_RUNTIME, else the CPU
    default."""
    import faiss
    import torch

    from patchwatch.anomaly.detectors import default_features
    from patchwatch.anomaly.features import PatchFeatureExtractor
    from patchwatch.anomaly.runtime import resolve_runtime

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    runtime = resolve_runtime(runtime_name or os.environ.get("PATCHWATCH_RUNTIME"))
    return PatchFeatureExtractor(default_features("patchcore"), runtime=runtime, threads=1), runtime


def fit_default_patchcore(extractor, uris: list[str]):
    """PatchCore with its default settings fitted in this process on these images' features."""
    from patchwatch.anomaly.detectors import default_features, detector_config, for_features
    from patchwatch.anomaly.patchcore import PatchCore
    from patchwatch.storage.images import read_image

    bank = np.concatenate([extractor.extract([read_image(uri)])[0].vectors for uri in uris])
    return PatchCore.fit(bank, for_features("patchcore", detector_config("patchcore"), default_features("patchcore")))


def spread(items: list, limit: int | None) -> list:
    """``limit`` items evenly spread over ``items`` (all if no limit): a split CSV is ordered by
    class / defect type, so its head would not be representative."""
    if not limit or limit >= len(items):
        return list(items)
    picks = np.linspace(0, len(items) - 1, limit).round().astype(int)
    return [items[i] for i in picks]


def select_records(split_csv: str, split: str, limit: int | None):
    from patchwatch.storage.images import list_images

    records = list_images(str(split_csv), split)
    if not records:
        raise SystemExit(f"no {split!r} rows in {split_csv}")
    return spread(records, limit)


# ---- banks ----------------------------------------------------------------------------------------
def save_bank(path: str | Path, bank: np.ndarray) -> None:
    np.save(path, np.ascontiguousarray(bank, dtype=np.float32))


def _npy_header(handle) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(handle)
    return np.lib.format.read_array_header_2_0(handle)


def bank_file_shape(path: str | Path) -> tuple[int, int]:
    with open(path, "rb") as handle:
        shape, _, _ = _npy_header(handle)
    return tuple(shape)


def read_bank_into(path: str | Path, out: np.ndarray) -> None:
    """Read a float32 .npy straight into ``out`` (no second copy, no mmap pages in the RSS)."""
    with open(path, "rb") as handle:
        shape, fortran, dtype = _npy_header(handle)
        if fortran or dtype != np.float32 or tuple(shape) != out.shape:
            raise ValueError(f"{path}: expected C-order float32 {out.shape}, got {dtype} {shape}")
        view = memoryview(out.reshape(-1).view(np.uint8))
        done = 0
        while done < len(view):
            got = handle.readinto(view[done:])
            if not got:
                raise ValueError(f"{path}: truncated")
            done += got


def jitter_step(rows: int) -> int:
    """Rows of the bank that estimate its spread: every 16th (every row of a bank under 16,000)."""
    return 16 if rows >= 16000 else 1


def sigma_of_sample(sample: np.ndarray, relative: float) -> float:
    return float(relative * math.sqrt(np.asarray(sample, dtype=np.float64).var(axis=0).mean()))


def jitter_sigma(bank_rows: np.ndarray, relative: float) -> float:
    """Noise standard deviation: ``relative`` times the bank's RMS per-coordinate std."""
    return sigma_of_sample(bank_rows[::jitter_step(len(bank_rows))], relative)


def jitter(copy: int, lo: int, hi: int, dim: int, sigma: float, seed: int = 0) -> np.ndarray:
    """Gaussian noise for rows ``lo:hi`` of jittered copy ``copy`` (copy 0 is the bank itself)."""
    if copy == 0 or sigma == 0:
        return np.zeros((hi - lo, dim), np.float32)
    parts = []
    for block in range(lo // NOISE_BLOCK_ROWS, (hi - 1) // NOISE_BLOCK_ROWS + 1):
        start = block * NOISE_BLOCK_ROWS
        rng = np.random.default_rng([seed, copy, block])
        noise = rng.standard_normal((NOISE_BLOCK_ROWS, dim), dtype=np.float32)
        parts.append(noise[max(lo, start) - start: min(hi, start + NOISE_BLOCK_ROWS) - start])
    noise = np.concatenate(parts) if len(parts) > 1 else parts[0]
    noise *= np.float32(sigma)
    return noise


def scaled_bank(path: str | Path, scale: int, relative_jitter: float, seed: int = 0) -> tuple[np.ndarray, float]:
    """The 1x bank at ``path`` followed by ``scale - 1`` jittered copies, built in place in one
    preallocated array (peak = the result, nothing more). Returns (bank, noise sigma)."""
    rows, dim = bank_file_shape(path)
    bank = np.empty((rows * scale, dim), np.float32)
    read_bank_into(path, bank[:rows])
    sigma = jitter_sigma(bank[:rows], relative_jitter)
    for copy in range(1, scale):
        for lo in range(0, rows, NOISE_BLOCK_ROWS):
            hi = min(rows, lo + NOISE_BLOCK_ROWS)
            target = bank[copy * rows + lo: copy * rows + hi]
            np.add(bank[lo:hi], jitter(copy, lo, hi, dim, sigma, seed), out=target)
    return bank, sigma


# ---- covering radius ------------------------------------------------------------------------------
def covering_radius(points: np.ndarray, centres: np.ndarray, block: int = 16384) -> float:
    """Exact max over ``points`` of the distance to the nearest of ``centres``.

    A brute-force pass costs rows x centres distances (minutes to hours for a multi-million-row
    bank); instead an HNSW graph over the centres gives every point an upper bound (its distance
    to *some* centre), then points are checked exactly (flat search) in decreasing order of their
    bound until the bound falls below the largest exact distance found. The answer is exact, and
    usually only the first block needs the exact check.
    """
    import faiss

    points = np.ascontiguousarray(points, dtype=np.float32)
    centres = np.ascontiguousarray(centres, dtype=np.float32)
    exact = faiss.IndexFlatL2(centres.shape[1])
    exact.add(centres)

    def exact_distances(rows: np.ndarray) -> np.ndarray:
        squared, _ = exact.search(rows, 1)
        return np.sqrt(np.maximum(squared[:, 0], 0))

    if len(centres) < 8192 or len(points) * len(centres) <= 2e9:  # brute force is cheaper
        return float(max(exact_distances(points[i:i + block]).max() for i in range(0, len(points), block)))
    graph = faiss.IndexHNSWFlat(centres.shape[1], 16)
    graph.hnsw.efConstruction = 40
    graph.add(centres)
    graph.hnsw.efSearch = 16
    upper = np.empty(len(points), np.float32)
    for i in range(0, len(points), 1 << 18):
        squared, found = graph.search(points[i:i + (1 << 18)], 1)
        bound = np.sqrt(np.maximum(squared[:, 0], 0))
        bound[found[:, 0] < 0] = np.inf  # nothing found: no bound
        upper[i:i + len(bound)] = bound
    order = np.argsort(-upper, kind="stable")
    radius = 0.0
    for i in range(0, len(order), block):
        # the graph and the flat index round differently: a small margin keeps the answer exact
        if upper[order[i]] <= radius * (1 - 1e-5):
            break
        radius = max(radius, float(exact_distances(points[np.sort(order[i:i + block])]).max()))
    return radius


# ---- output ---------------------------------------------------------------------------------------
def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value == 0:
            return "0"
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(none)"
    columns = list(dict.fromkeys(c for row in rows for c in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c)).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines)


def print_table(title: str, rows: list[dict]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text
        print(f"\n{title}\n{markdown_table(rows)}")
        return
    table = Table(title=title, title_justify="left")
    columns = list(dict.fromkeys(c for row in rows for c in row))
    for column in columns:
        text = isinstance(rows[0].get(column), str) and column == columns[0]
        table.add_column(column, justify="left" if text else "right", overflow="fold")
    for row in rows:
        table.add_row(*[fmt(row.get(c)) for c in columns])
    console = Console()
    if not console.is_terminal:  # piped to a file or a log: do not squeeze the table to 80 columns
        console = Console(width=240)
    console.print(table)


def write_results(out_dir: str | Path, name: str, title: str, meta: dict, sections: list[dict]) -> tuple[Path, Path]:
    """``sections``: [{"title", "rows", "notes": [...]}] -> OUT/NAME.md (tables) and OUT/NAME.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = meta["machine"]
    lines = [f"# {title}", "",
             f"- command: `{meta['command']}`",
             f"- date (UTC): {meta['date']}",
             f"- machine: {machine['cpu_model']}, {machine['cpu_count']} CPUs ({machine['cpus_usable']} usable), "
             f"{machine['memory_gib']} GiB RAM, torch threads {machine['torch_threads']}, "
             f"load average at start {machine['load_average_at_start']}",
             f"- versions: python {machine['python']}, torch {machine['torch']}, numpy {machine['numpy']}, "
             f"faiss {machine['faiss']}",
             *([f"- memory: {MEMORY_METHOD}"] if meta.get("measures_memory", True) else []),
             f"- total wall time: {meta['wall_s']:.1f} s"]
    for key, value in meta.get("parameters", {}).items():
        lines.append(f"- {key}: {fmt(value) if not isinstance(value, (list, dict)) else value}")
    for section in sections:
        lines += ["", f"## {section['title']}", "", markdown_table(section["rows"])]
        notes = section.get("notes") or []
        if notes:
            lines.append("")
            lines += [f"- {note}" for note in notes]
    md_path, json_path = out_dir / f"{name}.md", out_dir / f"{name}.json"
    md_path.write_text("\n".join(lines) + "\n")
    json_path.write_text(json.dumps({**meta, "memory_method": MEMORY_METHOD, "sections": sections},
                                    indent=2, default=_json_default) + "\n")
    return md_path, json_path


def base_parser(description: str, name: str):
    """The options every benchmark shares: --split, --limit, --out, --name."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default=str(DEFAULT_SPLIT), help="split CSV (default %(default)s)")
    parser.add_argument("--limit", type=int, default=None,
                        help="use only N train images, evenly spread over the train rows (default: all)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="results folder (default %(default)s)")
    parser.add_argument("--name", default=name, help="results file name: OUT/NAME.md and .json (default %(default)s)")
    return parser


def report(out_dir: str | Path, name: str, title: str, meta: dict, sections: list[dict]) -> None:
    """Print every section's table and notes, then write them with :func:`write_results`."""
    for section in sections:
        print_table(section["title"], section["rows"])
        for note in section.get("notes", []):
            print(f"  - {note}")
    md, js = write_results(out_dir, name, title, meta, sections)
    print(f"\nwrote {md} and {js} ({meta['wall_s']:.0f} s)")


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def ratio(value, reference):
    if value is None or reference in (None, 0):
        return None
    return value / reference
