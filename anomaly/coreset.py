"""Greedy k-center (farthest-first) coreset selection, PatchCore section 3.2.

The textbook loop reads the whole bank once per selected centre: a 1 % coreset of a
~10^6-vector bank is ~10^4 passes over hundreds of MB, bound by memory bandwidth. Here the bank
is cut into cache-sized blocks that are updated lazily: each block keeps an upper bound of its
largest distance to the coreset (distances only shrink as centres are added), and only the block
with the largest bound is brought up to date, with all centres added since its last update in
one matrix product. A block that is still the largest after its update holds the next centre.
The selection is exactly the textbook greedy's (same centres, same order); blocks far from the
frontier are touched rarely, and the work that remains runs as cache-resident GEMMs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class CoresetResult:
    indices: np.ndarray         # selected rows of the bank, in selection order
    covering_radius: float      # largest distance (in the projected space) of any row to the coreset
    distance_evaluations: int   # point-centre distances computed: the work actually done


def random_projection(features: np.ndarray, dim: int, seed: int = 0) -> np.ndarray:
    """Johnson-Lindenstrauss projection to ``dim`` dimensions (identity if already that small)."""
    return project(features, projection_matrix(features.shape[1], dim, seed))


def _distances_to(points: np.ndarray, centre: np.ndarray) -> np.ndarray:
    diff = points - centre
    return np.sqrt(np.einsum("ij,ij->i", diff, diff))


def greedy_coreset_exhaustive(points: np.ndarray, size: int, start: int = 0) -> CoresetResult:
    """Reference farthest-first traversal: one full pass over ``points`` per centre."""
    points = np.ascontiguousarray(points, dtype=np.float32)
    size = min(size, len(points))
    selected = [start]
    nearest = _distances_to(points, points[start])
    for _ in range(size - 1):
        chosen = int(np.argmax(nearest))
        selected.append(chosen)
        np.minimum(nearest, _distances_to(points, points[chosen]), out=nearest)
    return CoresetResult(np.array(selected, dtype=np.int64), float(nearest.max()), len(points) * size)


def greedy_coreset(points: np.ndarray, size: int, start: int = 0, block_rows: int = 4096,
                   covered_by: np.ndarray | None = None) -> CoresetResult:
    """Farthest-first traversal of ``points`` to ``size`` centres, with lazy blocked updates.

    Same centres, same order as :func:`greedy_coreset_exhaustive`. With ``covered_by`` (centres
    chosen before, e.g. a previous model's coreset), the traversal continues from those: every
    point starts at its distance to them and the first new centre is the farthest point, so the
    result extends an existing coreset to cover newly arrived points.
    """
    points = np.ascontiguousarray(points, dtype=np.float32)
    count, dim = points.shape
    size = min(size, count)
    starts = np.arange(0, count, block_rows)
    blocks = [(lo, min(lo + block_rows, count)) for lo in starts]
    nearest = np.full(count, np.inf, np.float32)
    bound = np.full(len(blocks), np.inf)              # upper bound of each block's largest distance
    if covered_by is not None and len(covered_by) and count:
        nearest[:] = _distance_to_nearest(points, covered_by)
        bound[:] = [nearest[lo:hi].max() for lo, hi in blocks]
        start = int(np.argmax(nearest))
    if size <= 0:
        return CoresetResult(np.zeros(0, dtype=np.int64), float(nearest.max()) if count else float("inf"), 0)
    norms = np.einsum("ij,ij->i", points, points)
    centres = np.empty((size, dim), np.float32)
    centre_norms = np.empty(size, np.float32)
    applied = np.zeros(len(blocks), np.int64)         # centres already folded into each block
    selected = np.empty(size, np.int64)
    evaluations = 0

    def bring_up_to_date(block: int, known: int) -> None:
        nonlocal evaluations
        lo, hi = blocks[block]
        pending = slice(applied[block], known)
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2, for all pending centres at once (a cache-resident GEMM)
        squared = points[lo:hi] @ (-2.0 * centres[pending].T)
        squared += norms[lo:hi, None]
        squared += centre_norms[None, pending]
        closest = np.sqrt(np.maximum(squared.min(axis=1), 0))
        np.minimum(nearest[lo:hi], closest, out=nearest[lo:hi])
        evaluations += (hi - lo) * (known - applied[block])
        applied[block] = known
        bound[block] = nearest[lo:hi].max()

    chosen = start
    for step in range(size):
        selected[step] = chosen
        centres[step] = points[chosen]
        centre_norms[step] = norms[chosen]
        known = step + 1
        while True:
            # distances only shrink, so a stale bound is an upper bound: the block with the
            # largest bound, once up to date and still the largest, holds the farthest point
            block = int(np.argmax(bound))
            if applied[block] == known:
                lo, hi = blocks[block]
                chosen = lo + int(np.argmax(nearest[lo:hi]))
                break
            bring_up_to_date(block, known)
    # after the last centre, ``chosen`` is the farthest point: its distance is the covering radius
    return CoresetResult(selected, float(nearest[chosen]), evaluations)


def _distance_to_nearest(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    import faiss

    index = faiss.IndexFlatL2(centres.shape[1])
    index.add(np.ascontiguousarray(centres, dtype=np.float32))
    squared, _ = index.search(points, 1)
    return np.sqrt(np.maximum(squared[:, 0], 0))


def coreset_size(bank_size: int, ratio: float) -> int:
    return max(1, min(bank_size, int(round(bank_size * ratio))))


def projection_matrix(in_dim: int, out_dim: int, seed: int = 0) -> np.ndarray | None:
    """The Johnson-Lindenstrauss matrix of :func:`random_projection` (None: no projection)."""
    if out_dim <= 0 or in_dim <= out_dim:
        return None
    rng = np.random.default_rng(seed)
    # float32 throughout: a float64 matrix would double the projected bank's memory
    return (rng.standard_normal((in_dim, out_dim)) / np.sqrt(out_dim)).astype(np.float32)


def project(vectors: np.ndarray, matrix: np.ndarray | None) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return vectors if matrix is None else vectors @ matrix


def start_index(total_rows: int, seed: int) -> int:
    return int(np.random.default_rng(seed).integers(total_rows))


def streaming_coreset(chunks, total_rows: int, size: int, matrix: np.ndarray | None, seed: int = 0,
                      chunk_rows: int = 1 << 20, oversample: float = 2.0) -> CoresetResult:
    """Greedy k-center over a bank that arrives in pieces, in bounded memory.

    ``chunks`` yields consecutive row blocks of the bank. A bank of at most ``chunk_rows`` rows is
    gathered (projected) and selected exactly. A larger one is selected composably: each group of
    about ``chunk_rows`` rows contributes its own greedy coreset of ``oversample`` times its share,
    and a final greedy pass over the union picks ``size`` centres. Memory then holds one group
    plus the union, whatever the bank's size. Indices are global row numbers.
    """
    size = min(size, total_rows)
    if total_rows <= chunk_rows:
        pieces = [project(c, matrix) for c in chunks]
        projected = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        del pieces
        return greedy_coreset(projected, size, start=start_index(total_rows, seed))

    candidates, candidate_rows, pending, pending_rows, offset = [], [], [], 0, 0

    def select_pending():
        nonlocal pending, pending_rows, offset
        group = np.concatenate(pending)
        share = int(np.ceil(oversample * size * len(group) / total_rows))
        local = greedy_coreset(group, share, start=start_index(len(group), seed + offset))
        candidates.append(group[local.indices])
        candidate_rows.append(local.indices + offset)
        offset += len(group)
        pending, pending_rows = [], 0

    for chunk in chunks:
        pending.append(project(chunk, matrix))
        pending_rows += len(chunk)
        if pending_rows >= chunk_rows:
            select_pending()
    if pending:
        select_pending()
    union = np.concatenate(candidates)
    rows = np.concatenate(candidate_rows)
    final = greedy_coreset(union, size, start=0)
    # the final pass saw only the candidates, so its radius understates the bank's: NaN here,
    # and :func:`bank_covering_radius` measures the true one with another pass over the bank
    return CoresetResult(rows[final.indices], float("nan"), final.distance_evaluations)


def bank_covering_radius(chunks, centres: np.ndarray, matrix: np.ndarray | None) -> float:
    """Largest distance of any bank row to its nearest centre, in the projected space.

    ``chunks`` yields the bank's rows (unprojected); ``centres`` are the coreset's rows
    (unprojected). One faiss search per chunk, so memory stays at one chunk.
    """
    projected_centres = project(centres, matrix)
    largest = 0.0
    for chunk in chunks:
        if len(chunk):
            largest = max(largest, float(_distance_to_nearest(project(chunk, matrix), projected_centres).max()))
    return largest
