"""PatchCore (Roth et al., CVPR 2022): memory bank, coreset, nearest-neighbour scoring."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from .coreset import coreset_size, projection_matrix, streaming_coreset
from .features import PatchFeatures
from .maps import anomaly_map
from .settings import PatchCoreConfig  # noqa: F401  (re-exported)
from .tiling import holding_the_largest


def select_coreset(bank: np.ndarray, config: PatchCoreConfig) -> np.ndarray:
    """Row indices of the greedy k-center coreset of ``bank``, chosen on a random projection."""
    matrix = projection_matrix(bank.shape[1], config.projection_dim, config.seed)
    size = coreset_size(len(bank), config.coreset_ratio)
    return streaming_coreset([bank], len(bank), size, matrix, config.seed, chunk_rows=len(bank)).indices


def build_index(memory: np.ndarray) -> faiss.Index:
    index = faiss.IndexFlatL2(memory.shape[1])
    index.add(np.ascontiguousarray(memory, dtype=np.float32))
    return index


def reweight_image_score(patch_vectors: np.ndarray, patch_scores: np.ndarray, nearest: np.ndarray,
                         memory: np.ndarray, index: faiss.Index, num_neighbors: int,
                         support: np.ndarray | None = None) -> float:
    """Eq. 7: s = (1 - softmax over the b neighbours of m*) * max patch score.

    m_test* is the patch with the largest score, m* its nearest memory vector; the weight
    compares its distance to m* with its distances to m*'s b nearest memory vectors (m* among
    them), so an anomaly far from a dense memory region keeps its score and one next to a rare
    memory vector is down-weighted. ``support``: m*'s neighbours if already found (m* first),
    else a faiss search finds them.
    """
    worst = int(np.argmax(patch_scores))
    max_score = float(patch_scores[worst])
    neighbours = min(num_neighbors, index.ntotal)
    if neighbours < 2:
        return max_score
    if support is None:
        support = index.search(memory[nearest[worst]][None], neighbours)[1][0]
    distances = np.sqrt(((memory[support] - patch_vectors[worst]) ** 2).sum(1)).astype(np.float64)
    # m* itself is its own nearest neighbour; make sure it sits first
    distances[0] = patch_scores[worst]
    softmax = np.exp(distances - distances.max())
    softmax /= softmax.sum()
    return float((1.0 - softmax[0]) * max_score)


# query rows per distance block: _Format.query_block, fewer for a larger memory (the (memory x
# queries) matrix stays within BLOCK_BYTES)
BLOCK_BYTES = 64 << 20
# rows of a product padded to a multiple of this: oneDNN compiles a kernel for each new shape (~3 ms
# each with AMX at 8k memory rows, 6-27 ms for a process's first ones), so only a few shapes ever
# reach it: a block's rows are padded to the next of 1, 2, 3, 4, 6, 8, 12, ... times ROW_MULTIPLE
# below the block, or the block (query_rows: beyond 128 rows, at most half as many again as
# queries), and a model compiles those few shapes when it is made (PatchCore.warm_up), not in its
# first tasks
ROW_MULTIPLE = 64
# memory rows per chunk of a ranking's result matrix (_Results): 64 measured a little faster than
# 128 or 256 (MTD's memory, blocks of 256 queries); the operand's padding rows give every query
# PADDING_DISTANCE, far beyond any limit
CHUNK_ROWS = 64
PADDING_DISTANCE = 2.0 ** 100


def query_rows(count: int, block: int) -> int:
    """Rows of the product for ``count`` queries: for at most ``block``, the smallest of
    ROW_MULTIPLE x (1, 2, 3, 4, 6, 8, 12, ...) below ``block``, or ``block``, that holds them."""
    if count > block:
        return -(-count // ROW_MULTIPLE) * ROW_MULTIPLE
    power = 1
    while True:
        for rows in (power * ROW_MULTIPLE, 3 * power * ROW_MULTIPLE // 2):
            if rows >= count and rows % ROW_MULTIPLE == 0:
                return min(rows, block)
        power *= 2


def query_row_sizes(block: int) -> list[int]:
    """Every value :func:`query_rows` takes for 1..``block`` queries."""
    return sorted({query_rows(count, block) for count in range(1, block + 1)})


def default_precision() -> str:
    """'bfloat16' where the CPU multiplies it natively (AMX or AVX512-BF16: ~5x float32 there),
    else 'float32': torch emulates bfloat16 elsewhere (far slower than a float32 product)."""
    try:
        native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    except AttributeError:  # a torch without these probes
        native = False
    return "bfloat16" if native else "float32"


# unit roundoff of bfloat16 (8 significant bits) and of float32 (24)
BF16_ROUNDOFF = 2.0 ** -8
F32_ROUNDOFF = 2.0 ** -24


def _two_parts(values: np.ndarray) -> np.ndarray:
    """(2, n) float32: a high and a low bfloat16 part summing to ``values`` within u^2, relative."""
    high = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16).float().numpy()
    low = torch.from_numpy((values - high).astype(np.float32)).to(torch.bfloat16).float().numpy()
    return np.stack([high, low])


def _one_part(values: np.ndarray) -> np.ndarray:
    """(1, n) float32: ``values`` within float32's roundoff, relative."""
    return np.asarray(values, dtype=np.float32)[None]


@dataclass(frozen=True)
class _Format:
    """The number format of a ranking's product: its operands and its result."""

    dtype: torch.dtype          # the operands' and the result's
    bits: torch.dtype           # the result read as integers of its width: they order positive floats as the floats
    roundoff: float             # unit roundoff of the operands and of the result
    norm_residue: float         # relative error of a squared norm as the operand holds it
    norm_parts: "Callable[[np.ndarray], np.ndarray]"  # a squared norm as the operand's columns
    projection_by_query: bool   # the principal-axes pass's product queries by memory rows (else transposed)
    compiles_shapes: bool       # the product compiles a kernel per shape (oneDNN, bfloat16): warm up
    query_block: int            # most queries in one product (at 8k memory rows; fewer for more rows)


# bfloat16 where the CPU multiplies it natively (default_precision); float32 elsewhere: a bounded
# ranking there too, so both find the exact nearest rows, and both rank on principal axes
# (float32: MKL compiles nothing; warming up cost 0.4-0.5 s a model of 8k rows, its first task no faster).
# Query blocks: bfloat16 512 (8k rows x 512: 8 MiB), measured a little faster than 256 or 1024 for a
# task's 16 tiles or MTD images; float32 256 (8 MiB too): MKL's product of 8,021 x 66 rows by queries
# took 0.88x the time a query in blocks of 256 as in blocks of 512 (medians of 5 alternated rounds),
# worst_patches on 100 MTD images 3.80 against 3.99 ms an image (AVX2 host, 2026-12-03, medians of 6
# alternated rounds)
FORMATS = {"bfloat16": _Format(dtype=torch.bfloat16, bits=torch.int16, roundoff=BF16_ROUNDOFF,
                               norm_residue=BF16_ROUNDOFF ** 2, norm_parts=_two_parts,
                               projection_by_query=True, compiles_shapes=True, query_block=512),
           "float32": _Format(dtype=torch.float32, bits=torch.int32, roundoff=F32_ROUNDOFF,
                              norm_residue=F32_ROUNDOFF, norm_parts=_one_part,
                              projection_by_query=False, compiles_shapes=False, query_block=256)}


@dataclass
class _Ranking:
    """Squared distances to the memory over some of its dimensions, as one matrix product in a
    :class:`_Format` (bfloat16 or float32) with a bounded error (:meth:`error`): [m, 1, ||m||^2] .
    [-2 q, ||q||^2, 1] (centred vectors; in bfloat16 the squared norms each as a high and a low
    part), memory rows by queries: oneDNN then packs only the queries' small operand for AMX, not
    the memory's (25-30 % less time than queries by memory rows, measured at 8k rows). The
    product's result is a distance, read as its integer bit patterns (which order positive floats
    as the floats); the memory's rows are padded to whole chunks (:class:`_Results`), whose minima
    are the only pass over the (memory x queries) matrix: that pass and the product are the cost."""

    columns: slice
    operand: torch.Tensor     # (rows padded to CHUNK_ROWS, dims + 2 x norm columns) in the format's dtype
    norms: np.ndarray         # ||m|| of the centred rows (not the padding's)
    dims: int
    block: int                # most queries in one product (the model's query block)
    format: _Format

    @classmethod
    def of(cls, centred: np.ndarray, columns: slice, block: int | None = None,
           precision: str = "bfloat16") -> "_Ranking":
        """``block``: the model's (None: the format's own)."""
        number_format = FORMATS[precision]
        part = centred[:, columns]
        squared = (part ** 2).sum(1)
        parts = number_format.norm_parts(squared)
        # rows padded to whole chunks (_Results) by rows whose every result is PADDING_DISTANCE
        padded = -(-len(part) // CHUNK_ROWS) * CHUNK_ROWS
        operand = np.zeros((padded, part.shape[1] + 2 * len(parts)), np.float32)
        operand[:len(part)] = np.concatenate([part, np.ones((len(part), len(parts))), parts.T], axis=1)
        operand[len(part):, part.shape[1] + len(parts)] = PADDING_DISTANCE
        return cls(columns, torch.from_numpy(operand).to(number_format.dtype), np.sqrt(squared).astype(np.float32),
                   part.shape[1], block or number_format.query_block, number_format)

    def distances(self, centred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the squared distances' bit patterns as integers, memory rows by queries, ||q||)
        for centred queries; the matrix has a column for each of the product's query rows (padded
        where the format compiles shapes), its first ``len(centred)`` those of the queries, and a
        row for each of the operand's padded rows, its first ``len(self.norms)`` the memory's."""
        query, norms = self._query_operand(centred[:, self.columns])
        return (self.operand @ query.t()).view(self.format.bits).numpy(), norms

    def distances_by_query(self, part: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`distances` transposed, padded query rows by memory rows, for queries already
        reduced to the ranking's dimensions: each query's smallest is then found along a
        contiguous row (numpy's argmin along the other axis is ~50x slower)."""
        query, norms = self._query_operand(part)
        return (query @ self.operand.t()).view(self.format.bits).numpy(), norms

    def _query_operand(self, part: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """[-2 q, ||q||^2, 1] in the format, padded to :func:`query_rows` rows where the product
        compiles a kernel per shape (else not: MKL's float32 product of 8k memory rows by a task's 16
        eq. 7 queries took 0.27x the time of 64 padded rows, 1.2 against 4.4 ms); ||q||."""
        count, dims = len(part), self.dims
        squared = np.einsum("ij,ij->i", part, part, dtype=np.float64)
        parts = self.format.norm_parts(squared)
        rows = query_rows(count, self.block) if self.format.compiles_shapes else count
        query = np.empty((rows, self.operand.shape[1]), np.float32)  # in place: no temporaries
        np.multiply(part, -2, out=query[:count, :dims], casting="unsafe")
        query[:count, dims:dims + len(parts)] = parts.T
        query[:count, dims + len(parts):] = 1
        query[count:] = 0
        return torch.from_numpy(query).to(self.format.dtype), np.sqrt(squared)

    def warm_up(self, by_query: bool = False) -> None:
        """One product of each shape :meth:`distances` (or :meth:`distances_by_query`) can use
        (oneDNN compiles each once a process); nothing in a format that compiles nothing."""
        if not self.format.compiles_shapes:
            return
        for rows in query_row_sizes(self.block):
            query = torch.zeros((rows, self.operand.shape[1]), dtype=self.format.dtype)
            if by_query:
                query @ self.operand.t()
            else:
                self.operand @ query.t()

    def error(self, query_norms: np.ndarray, memory_norms: np.ndarray) -> np.ndarray:
        """A bound on |computed - exact| squared distance, less the result's own rounding (at most
        u |computed| / (1 - u)): q and m rounded to the format (||q - q~|| <= u ||q||, in -2 q.m:
        2 (2u + u^2) ||q|| ||m||), the norms' residue (bfloat16's two parts: u^2 each; float32: u)
        and float32 summation in any order ((terms) 2^-24 times the sum of the terms' sizes); u
        the format's roundoff. A quarter more as a margin: it costs only a few candidates (the
        result's rounding, measured in bfloat16, never exceeded u)."""
        u, residue, q, m = self.format.roundoff, self.format.norm_residue, query_norms, memory_norms
        cross = 2 * q * m
        sizes = (1 + u) ** 2 * cross + (1 + u) * (q * q + m * m)
        terms = self.operand.shape[1]
        return 1.25 * ((2 * u + u * u) * cross + residue * (q * q + m * m) + terms * F32_ROUNDOFF * sizes)


# Scoring's nearest-neighbour passes (the map's over every patch, the full vectors' over the patches
# that can hold their image's score) rank the memory on the centred memory's leading principal axes,
# 1/PROJECTION_SHARE of the pass's dimensions: a product that many times smaller, whose distances
# bound the true ones from below, then the few rows that bound keeps, exactly (MTD, 8k rows: 4.5 and
# 3.9 a patch, worst_patches in 0.76x the time; bench/results/score_profile.md). Not where those
# axes hold less than PROJECTION_VARIANCE of the memory's variance (the bound would keep too many
# rows), nor below PROJECTION_MIN_DIMS dimensions or PROJECTION_MIN_ROWS rows (the extra steps cost
# more than the product saves: a one-off script on random subsets of MTD's memory measured
# 1.04-1.26x the time at 500-1500 rows, 0.88-0.92x at 2000-4000).
PROJECTION_SHARE = 2
PROJECTION_VARIANCE = 0.9
PROJECTION_MIN_DIMS = 32
PROJECTION_MIN_ROWS = 2048


@dataclass
class _Projection:
    """A nearest-neighbour pass over ``columns`` ranked on k principal axes B of the centred memory
    and the norm of what they leave: each vector x seen as E(x) = (B^T x, ||x - B B^T x||).

    For any vectors, ||E(q) - E(m)|| <= S ||q - m|| (two residuals' norms differ by at most their
    difference's; S is 1 but for B's float32 rounding), so no row whose embedded distance, less its
    bounds, exceeds S times the true distance to some row can be the nearest. That row, per query:
    the nearest in the embedding, its distance computed exactly. The rows kept are then compared
    exactly, as :meth:`PatchCore._nearest_over` compares its candidates: the same nearest rows and
    distances as the unprojected ranking. The residual's norm, one more column of the product,
    keeps fewer candidates than the axes alone (MTD's images 3.30 against 4.00 a patch, tiles of a
    2048 px MTD mosaic 8.5 against 11.7); a query's comes from norms (||x||^2 - ||B^T x||^2, in
    float64) with a bound on its error: from its residual vector it had cost what it saved."""

    columns: slice
    basis: np.ndarray      # (dims, k) float32
    ranking: _Ranking      # the embedded centred memory, every column
    stretch: float         # S
    axis_stretch: float    # s: ||B^T x|| <= s ||x||
    excess: float          # the largest eigenvalue of B^T B - I, at least 0
    deviation: float       # ||B^T B - I||, its largest eigenvalue in size
    rounding: float        # a bound on the axes' float32 error, per unit of ||q|| (+ ||m||)
    largest_norm: float    # the largest ||m|| over ``columns`` (centred)
    variance_share: float  # of the memory's variance over ``columns``, on the k axes

    @classmethod
    def of(cls, centred: np.ndarray, columns: slice, block: int, precision: str = "bfloat16") -> "_Projection | None":
        # float64, through torch (the process's threads, as everywhere in scoring)
        part = torch.from_numpy(np.ascontiguousarray(centred[:, columns], dtype=np.float64))
        dims = part.shape[1]
        kept = dims // PROJECTION_SHARE
        if dims < PROJECTION_MIN_DIMS or len(part) < max(dims, PROJECTION_MIN_ROWS):
            return None
        variances, axes = torch.linalg.eigh(part.T @ part)   # ascending; centred: the covariance's axes
        share = float(variances[-kept:].sum() / variances.sum())
        if not share >= PROJECTION_VARIANCE:   # NaN too: a memory of one repeated vector
            return None
        basis = axes.flip(1)[:, :kept].float().contiguous()
        exact = basis.double()                  # the float32 basis B, exactly
        gram = exact.T @ exact
        axis_stretch = float(torch.linalg.matrix_norm(gram, ord=2).sqrt())
        # ||E(x)||^2 <= ||B^T x||^2 + ||x - B B^T x||^2 = ||x||^2 + y^T (B^T B - I) y, y = B^T x
        eigenvalues = torch.linalg.eigvalsh(gram - torch.eye(kept, dtype=gram.dtype))
        excess, deviation = max(float(eigenvalues.max()), 0.0), float(eigenvalues.abs().max())
        stretch = float(np.sqrt(1 + excess * axis_stretch ** 2))
        # a float32 product over dims terms errs by at most (dims + 2) 2^-24 ||x|| s per coordinate;
        # the query's centring by 2^-24 ||x|| s more; doubled as a margin
        rounding = 2 * axis_stretch * (np.sqrt(kept) * (dims + 2) + 2) * 2.0 ** -24
        projected = part @ exact
        residual = (part - projected @ exact.T).norm(dim=1, keepdim=True)
        embedded = torch.cat([projected, residual], dim=1).numpy()
        return cls(columns, basis.numpy(), _Ranking.of(embedded, slice(None), block, precision), stretch,
                   axis_stretch, excess, deviation, float(rounding), float(part.norm(dim=1).max()), share)

    def embedded(self, part: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(E(q) of each centred query over ``columns``, in float32; each query's margin: its
        embedded distance to any memory row errs by at most that, from float32 rounding)."""
        count, kept = part.shape[0], self.basis.shape[1]
        embedded = np.empty((count, kept + 1), np.float32)
        # through torch: its thread count is the process's (one on the workers; anomaly.maps._product)
        projected = (torch.from_numpy(part) @ torch.from_numpy(self.basis)).numpy()
        embedded[:, :kept] = projected
        squared = np.einsum("ij,ij->i", part, part, dtype=np.float64)
        on_axes = np.einsum("ij,ij->i", projected, projected, dtype=np.float64)
        norms = np.sqrt(squared)
        axes_error = self.rounding * norms      # ||computed - exact B^T q||
        # ||q - B B^T q||^2 = ||q||^2 - ||B^T q||^2 + y^T (B^T B - I) y: the computed difference errs
        # by the axes' error e (e (2 ||y~|| + e)), that last term (at most ||B^T B - I|| ||y||^2)
        # and float64's sums and difference (2^-53 each a term: at most 2^-40 of the norms)
        on_axes_norm = np.sqrt(on_axes)
        spread = (axes_error * (2 * on_axes_norm + axes_error) + self.deviation * (on_axes_norm + axes_error) ** 2
                  + 2.0 ** -40 * (squared + on_axes))
        difference = squared - on_axes
        residual = np.sqrt(np.maximum(difference, 0))
        residual_error = np.maximum(np.sqrt(difference + spread) - residual,
                                    residual - np.sqrt(np.maximum(difference - spread, 0)))
        embedded[:, kept] = residual
        # the centring's error moves the residual by at most (1 + s^2) 2^-24 ||q||; float32's rounding
        # of the residual, 2^-24 of it; then the axes' error against any row (as before the residual)
        margin = (self.rounding * (norms + self.largest_norm) + residual_error
                  + (1 + self.axis_stretch ** 2) * 2.0 ** -24 * norms + 2.0 ** -24 * residual)
        return embedded, margin

    def warm_up(self) -> None:
        self.ranking.warm_up(by_query=True)

    def candidates(self, queries: np.ndarray, centred: np.ndarray, memory: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
        """(query, row) pairs: every row that can be each query's nearest over ``columns``."""
        count, ranking = len(queries), self.ranking
        u = ranking.format.roundoff
        part = np.ascontiguousarray(centred[:, self.columns], dtype=np.float32)
        embedded, margin = self.embedded(part)
        by_query = ranking.format.projection_by_query
        bits, query_norms = (ranking.distances_by_query if by_query else ranking.distances)(embedded)
        results = _Results(bits, by_query, len(ranking.norms))
        best = results.a_smallest_row(count)   # any row will do: its distance is an upper bound
        known = np.sqrt(((queries[:, self.columns] - memory[best, self.columns]) ** 2).sum(1, dtype=np.float32))
        # the float32 distance errs by at most (dims + 2) 2^-24 relative: 2^-12 is ample
        ceiling = (self.stretch * known * (1 + 2.0 ** -12) + margin) ** 2
        widest = ranking.error(query_norms, ranking.norms.max())
        line, row, value = results.within((ceiling + widest) / (1 - 2 * u))
        slack = np.abs(value) * u / (1 - u) + ranking.error(query_norms[line], ranking.norms[row])
        kept = value - slack <= ceiling[line]
        return line[kept], row[kept]


class _Results:
    """A ranking's result matrix (bit patterns: memory rows, padded to whole chunks, by padded
    queries; ``by_query`` transposed) as chunks of CHUNK_ROWS memory rows, and each chunk's smallest
    result for each query: one pass over the matrix. A query's smallest result, and its results
    within a limit, then lie only in the chunks whose smallest reaches them (a few of MTD's 126),
    read there alone: the matrix's other passes (a search for each column's minimum, a test of
    every result against a limit) had taken half the product's time after it (the minimum's row
    alone 1.26 ms a block of 256 MTD queries, 0.34 through chunks)."""

    def __init__(self, bits: np.ndarray, by_query: bool, rows: int):
        self.by_query, self.rows, self.dtype = by_query, rows, bits.dtype
        # torch's minimum over the chunks' rows: ~2x numpy's over the middle axis
        if by_query:
            self.chunks = bits.reshape(bits.shape[0], -1, CHUNK_ROWS)          # query, chunk, row
            self.minima = torch.from_numpy(self.chunks).amin(2).numpy()
        else:
            self.chunks = bits.reshape(-1, CHUNK_ROWS, bits.shape[1])          # chunk, row, query
            self.minima = np.ascontiguousarray(torch.from_numpy(self.chunks).amin(1).numpy().T)  # query, chunk

    def _blocks(self, query: np.ndarray, chunk: np.ndarray) -> np.ndarray:
        """(len(query), CHUNK_ROWS): chunk ``chunk[i]``'s results for query ``query[i]``."""
        return self.chunks[query, chunk] if self.by_query else self.chunks[chunk, :, query]

    def smallest(self, count: int) -> np.ndarray:
        """The bit pattern of each of the first ``count`` queries' smallest result (negative
        results, rounding of 0, are the smallest bit patterns: negative integers)."""
        return self.minima[:count].min(1)

    def a_smallest_row(self, count: int) -> np.ndarray:
        """A memory row holding each of the first ``count`` queries' smallest result (among
        negative results, any)."""
        chunk = self.minima[:count].argmin(1)
        row = chunk * CHUNK_ROWS + self._blocks(np.arange(count), chunk).argmin(1)
        # a query of NaN features may end on a padding row: any row will do for it
        return np.minimum(row, self.rows - 1)

    def within(self, loose: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query, memory row, computed distance) of every result at most its query's ``loose``
        (one for each of the first ``len(loose)`` queries); queries whose ``loose`` is not finite
        (NaN features) have none but -0.0."""
        limit = np.full(len(loose), np.iinfo(self.dtype).min, self.dtype)
        finite = np.flatnonzero(np.isfinite(loose))
        limit[finite] = _bits_at_least(np.maximum(loose[finite], 2.0 ** -100), self.dtype)
        # flat places, then divided: numpy's nonzero of a 2-d mask took 4-5x the time
        query, chunk = np.divmod(np.flatnonzero(self.minima[:len(loose)] <= limit[:, None]), self.minima.shape[1])
        blocks = self._blocks(query, chunk)
        at, offset = np.divmod(np.flatnonzero(blocks <= limit[query][:, None]), CHUNK_ROWS)
        row = chunk[at] * CHUNK_ROWS + offset
        kept = row < self.rows   # padding rows only for an absurd limit
        return query[at][kept], row[kept], _as_float(blocks[at, offset][kept])


def _as_float(bits: np.ndarray) -> np.ndarray:
    """Bit patterns as float32 values: bfloat16's (int16) or float32's (int32)."""
    if bits.dtype == np.int32:
        return bits.view(np.float32)
    return (bits.astype(np.int32) << 16).view(np.float32)


def _bits_at_least(values: np.ndarray, dtype) -> np.ndarray:
    """Bit patterns of the smallest bfloat16 (``dtype`` int16) or float32 (int32) values >=
    ``values`` (all positive)."""
    values = np.asarray(values)
    single = values.astype(np.float32)
    single = np.where(single < values, np.nextafter(single, np.float32(np.inf)), single)  # rounded up
    bits = np.ascontiguousarray(single).view(np.int32)
    if np.dtype(dtype) == np.int32:
        return bits
    return ((bits + 0xFFFF) >> 16).astype(np.int16)


def _stacked(features: list[PatchFeatures]) -> tuple[np.ndarray, np.ndarray]:
    """Every image's patch vectors in one array, and where each image's start (and the last ends)."""
    return np.concatenate([f.vectors for f in features]), np.cumsum([0] + [len(item.vectors) for item in features])


# patches per image whose full-vector nearest neighbour PatchCore.worst_patches finds first
FIRST_ROUND = 8


@dataclass
class WorstPatches:
    """:meth:`PatchCore.worst_patches`: per image, its worst patch (an index into the vectors),
    that patch's distance to its nearest memory vector and that vector's row; every patch's map
    distance."""

    map_scores: np.ndarray
    patches: np.ndarray
    scores: np.ndarray
    rows: np.ndarray


class PatchCore:
    """A fitted PatchCore model: the coreset memory and its faiss index.

    Patch scores come from exact nearest-neighbour passes (:meth:`nearest`: every patch's distance
    over the full vectors and over the map's primary ``map_dims``). Candidates are ranked by bfloat16
    matrix products (on CPUs with AMX ~5x a float32 one; float32 ones on CPUs without native
    bfloat16, :func:`default_precision`) whose error is bounded, so every memory
    vector that could be the nearest stays a candidate (~2 per patch on MTD) and the candidates'
    distances are then computed exactly. Where the memory's variance lies on a few axes (CNN
    features: MTD's 128 map dimensions hold 97 % of it on 64), the products run on the leading half
    of its principal axes (:class:`_Projection`): half the product, the same rows and distances.
    Scoring images (:meth:`image_scores_and_grids`) needs the
    full vectors' distance only of each image's worst patch: :meth:`worst_patches` runs that pass
    only on patches that can be it (~8 % on MTD). A model compiles its product shapes when made
    (:meth:`warm_up`). The faiss index still serves eq. 7's neighbourhood search for a single
    image (:meth:`image_score_and_grid`).
    """

    def __init__(self, memory: np.ndarray, config: PatchCoreConfig = PatchCoreConfig(),
                 index: faiss.Index | None = None, precision: str | None = None, principal_axes: bool = True):
        self.memory = np.ascontiguousarray(memory, dtype=np.float32)
        self.config = config
        self.index = index if index is not None else build_index(self.memory)
        if self.index.ntotal != len(self.memory):
            raise ValueError(f"index holds {self.index.ntotal} vectors but the memory {len(self.memory)}")
        dims = self.memory.shape[1]
        self.map_split = config.map_dims if 0 < config.map_dims < dims else None
        # the map's columns, contiguous: the exact distances' row gathers (_closest)
        self._map_memory = np.ascontiguousarray(self.memory[:, :self.map_split]) if self.map_split else self.memory
        # distances do not change when both sides move, but centred norms (the ranking's error
        # scale) are smaller: ReLU features all lie on one side of the origin
        self._centre = self.memory.mean(0, dtype=np.float64)
        centred = self.memory - self._centre
        # the ranking products' number format: bounded either way, candidates re-ranked exactly
        self.precision = precision or default_precision()
        if self.precision not in FORMATS:
            raise ValueError(f"precision {self.precision!r} is not one of {sorted(FORMATS)}")
        block = min(FORMATS[self.precision].query_block, BLOCK_BYTES // (4 * len(self.memory)))
        self._block = max(ROW_MULTIPLE, block // ROW_MULTIPLE * ROW_MULTIPLE)
        self._full = _Ranking.of(centred, slice(None), self._block, self.precision)
        self._head = (_Ranking.of(centred, slice(0, self.map_split), self._block, self.precision)
                      if self.map_split else None)
        # nearest-neighbour passes on the memory's principal axes where they hold it (else None:
        # the rankings above); eq. 7's neighbourhoods stay on the full ranking
        # (``principal_axes=False``: never; the same results, for comparisons)
        self._full_projection = (_Projection.of(centred, slice(None), self._block, self.precision)
                                 if principal_axes else None)
        self._map_projection = (_Projection.of(centred, slice(0, self.map_split), self._block, self.precision)
                                if self.map_split and principal_axes else None)
        self.warm_up()

    def warm_up(self) -> None:
        """Compile the few product shapes scoring uses (:func:`query_rows`), once a process: ~40 ms
        for a model of 8k memory rows (12 shapes; more in a process's first bfloat16 product). A
        model is made once per worker (tasks.scoring.load_model), so its first tasks no longer pay
        them: they had been about half the kNN time of a fresh model's first 20 MTD images."""
        for ranking in (self._full, self._head, self._full_projection, self._map_projection):
            if ranking is not None:
                ranking.warm_up()

    @classmethod
    def fit(cls, bank: np.ndarray, config: PatchCoreConfig = PatchCoreConfig()) -> "PatchCore":
        return cls(bank[np.sort(select_coreset(bank, config))], config)

    def nearest(self, vectors: np.ndarray, with_map: bool = True
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(distance of each patch to its nearest memory vector, that vector's row, the map's
        distance: over the primary ``map_dims`` only, or the same distance without them; None
        unless ``with_map``).

        Exact nearest neighbours: a memory vector is a candidate unless its ranked squared
        distance, less its error bound, exceeds the best one's plus its bound; the winner is the
        candidate with the smallest sum((q - m)^2) in float32 (ties: the lower row). A score thus
        differs from a float64 search only where two memory vectors tie within float32 rounding.
        """
        queries = np.ascontiguousarray(vectors, dtype=np.float32)
        centred = queries - self._centre
        wants_map = with_map and self._head is not None
        rows = np.empty(len(queries), np.int64)
        scores = np.empty(len(queries), np.float32)
        map_scores = np.empty(len(queries), np.float32) if wants_map else None
        for start in range(0, len(queries), self._block):
            done = slice(start, start + self._block)
            if wants_map:
                map_scores[done], _ = self._nearest_over(self._map_pass(), queries[done], centred[done])
            scores[done], rows[done] = self._nearest_over(self._full_pass(), queries[done], centred[done])
        if not with_map:
            return scores, rows, None
        return scores, rows, (map_scores if wants_map else scores)

    def _full_pass(self) -> "_Ranking | _Projection":
        return self._full_projection or self._full

    def _map_pass(self) -> "_Ranking | _Projection":
        """The map's pass: the full vectors' where the map takes every dimension."""
        return self._map_projection or self._head or self._full_pass()

    def _nearest_over(self, ranking: "_Ranking | _Projection", queries: np.ndarray, centred: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
        """(distance, row) of each query's nearest memory vector over ``ranking``'s dimensions."""
        if isinstance(ranking, _Projection):
            line, row = ranking.candidates(queries, centred, self.memory)
            return self._closest(queries, line, row, ranking.columns)
        bits, query_norms = ranking.distances(centred)
        results = _Results(bits, False, len(ranking.norms))
        u, count = ranking.format.roundoff, len(queries)
        # any vector's computed distance plus its bound is at least the nearest one's true distance:
        # so is each query's smallest result plus the largest norm's bound
        found = _as_float(results.smallest(count))
        widest = ranking.error(query_norms, ranking.norms.max())
        ceiling = found + np.abs(found) * u / (1 - u) + widest
        # a vector is a candidate unless its distance less its bound exceeds that: first the whole
        # matrix against the largest norm's bound (in bit patterns), then those few exactly, against
        # the smallest distance plus bound among them (at most the ceiling: fewer candidates)
        line, row, value = results.within((ceiling + widest) / (1 - 2 * u))
        slack = np.abs(value) * u / (1 - u) + ranking.error(query_norms[line], ranking.norms[row])
        tight = np.full(count, np.inf, np.float32)
        np.minimum.at(tight, line, value + slack)
        kept = value - slack <= tight[line]
        return self._closest(queries, line[kept], row[kept], ranking.columns)

    def _closest(self, queries: np.ndarray, line: np.ndarray, row: np.ndarray, columns: slice
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(distance, row) of each query's nearest among its candidates (``row[i]`` of query
        ``line[i]``), computed exactly over ``columns``; ties: the lower row."""
        # a query without candidates (NaN features) gets row 0, so its (NaN) score in its own place
        lost = np.flatnonzero(np.bincount(line, minlength=len(queries)) == 0)
        if len(lost):
            line, row = np.concatenate([line, lost]), np.concatenate([row, np.zeros_like(lost)])
        if len(lost) or (line[1:] < line[:-1]).any():   # the rankings give them by query already
            order = np.argsort(line, kind="stable")
            line, row = line[order], row[order]
        # contiguous operands for the row gathers (the same numbers: the same subtraction, squares
        # and float32 sum over each contiguous row)
        part = np.ascontiguousarray(queries[:, columns])
        memory = (self._map_memory if self.map_split and columns == slice(0, self.map_split)
                  else np.ascontiguousarray(self.memory[:, columns]))
        squared = ((np.take(part, line, axis=0) - np.take(memory, row, axis=0)) ** 2).sum(1, dtype=np.float32)
        # per query (line sorted: one segment each), its smallest squared distance, then the lowest
        # row holding it (a query of NaN features: NaN everywhere, the lowest row); a sort of every
        # candidate by (query, distance, row) had taken more time than the distances
        start = np.flatnonzero(np.r_[True, line[1:] != line[:-1]])
        segment = np.repeat(np.arange(len(start)), np.diff(np.r_[start, len(line)]))
        least = np.minimum.reduceat(squared, start)
        holds = np.flatnonzero((squared == least[segment]) | np.isnan(least[segment]))
        lowest = np.full(len(start), np.iinfo(np.int64).max, np.int64)
        np.minimum.at(lowest, segment[holds], row[holds])
        return np.sqrt(least), lowest

    def patch_scores(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distance of each patch to its nearest memory vector, and that vector's row."""
        scores, rows, _ = self.nearest(vectors, with_map=False)
        return scores, rows

    def worst_patches(self, vectors: np.ndarray, bounds) -> "WorstPatches":
        """Each image's worst patch (the first with the largest distance to its nearest memory
        vector; image ``k`` holds ``vectors[bounds[k]:bounds[k + 1]]``), that distance and row, and
        every patch's map distance, as from :meth:`nearest` over every patch.

        With a map over the primary ``map_dims``, only the map's nearest-neighbour
        pass covers every patch; a patch's full distance to its map-nearest row is at least its own
        score, so the full vectors' exact pass runs on each image's FIRST_ROUND patches with the
        largest such bounds, then on any other whose bound reaches the largest score found (MTD:
        ~8 % of the patches in all)."""
        queries, centred, map_scores, map_rows = self._map_distances(vectors)
        return WorstPatches(map_scores, *self._worst_given_map(queries, centred, np.asarray(bounds, np.int64),
                                                               map_scores, map_rows))

    def _map_distances(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(the queries in float32, centred, every patch's map distance, its map-nearest row)."""
        queries = np.ascontiguousarray(vectors, dtype=np.float32)
        centred = queries - self._centre
        return (queries, centred) + self._nearest_blocks(self._map_pass(), queries, centred)

    def _worst_given_map(self, queries: np.ndarray, centred: np.ndarray, bounds: np.ndarray, map_scores: np.ndarray,
                         map_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`worst_patches`' (patches, scores, rows) given every patch's map distance and row."""
        if self._head is None:   # the map's distances are the full vectors'
            worst = np.array([start + int(np.argmax(map_scores[start:stop]))
                              for start, stop in zip(bounds[:-1], bounds[1:])], np.int64)
            return worst, map_scores[worst], map_rows[worst]
        upper = np.sqrt(((queries - self.memory[map_rows]) ** 2).sum(1, dtype=np.float32))
        image = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
        # by image, then the largest bound first (non-finite ones, NaN features, before all)
        order = np.lexsort((np.where(np.isfinite(upper), -upper, -np.inf), image))
        rank = np.empty(len(order), np.int64)
        rank[order] = np.arange(len(order)) - bounds[image[order]]
        scores = np.full(len(queries), -np.inf, np.float32)
        rows = np.zeros(len(queries), np.int64)
        first = np.flatnonzero((rank < FIRST_ROUND) | ~np.isfinite(upper))
        scores[first], rows[first] = self._nearest_blocks(self._full_pass(), queries[first], centred[first])
        largest = np.full(len(bounds) - 1, -np.inf, np.float32)
        with np.errstate(invalid="ignore"):  # NaN features: NaN scores, all found in the first round
            np.maximum.at(largest, image[first], scores[first])
        # a patch's float32 bound is below its own float32 score by rounding at most (its map-nearest
        # row, if not a candidate, is farther than the ceiling by more than the ranking's bound); the
        # largest score found only grows, so one more round leaves no patch that could exceed it
        second = np.flatnonzero((scores == -np.inf) & (upper >= largest[image] * (1 - 2.0 ** -16)))
        if len(second):
            scores[second], rows[second] = self._nearest_blocks(self._full_pass(), queries[second], centred[second])
        worst = np.array([start + int(np.argmax(scores[start:stop])) for start, stop in zip(bounds[:-1], bounds[1:])],
                         np.int64)
        return worst, scores[worst], rows[worst]

    def _nearest_blocks(self, ranking: _Ranking, queries: np.ndarray, centred: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_nearest_over` in query blocks."""
        scores = np.empty(len(queries), np.float32)
        rows = np.empty(len(queries), np.int64)
        for start in range(0, len(queries), self._block):
            done = slice(start, start + self._block)
            scores[done], rows[done] = self._nearest_over(ranking, queries[done], centred[done])
        return scores, rows

    def image_score_and_grid(self, features: PatchFeatures) -> tuple[float, np.ndarray]:
        """Image score (eq. 7) and the patch-score grid of the map."""
        found = self.worst_patches(features.vectors, [0, len(features.vectors)])
        worst = found.patches[:1]
        image_score = reweight_image_score(features.vectors[worst], found.scores, found.rows, self.memory,
                                           self.index, self.config.num_neighbors)
        return image_score, found.map_scores.reshape(features.grid)

    def image_scores_and_grids(self, features: list[PatchFeatures]) -> list[tuple[float, np.ndarray]]:
        """:meth:`image_score_and_grid` of each, from one nearest-neighbour pass over all their
        patches (:meth:`worst_patches`): the matrix product is several times faster per row on a
        few hundred rows than on one MTD image's ~100 (bench/results/score_profile.md)."""
        if not features:
            return []
        vectors, bounds = _stacked(features)
        found = self.worst_patches(vectors, bounds)
        return [(score, found.map_scores[bounds[k]:bounds[k + 1]].reshape(item.grid))
                for k, (score, item) in enumerate(zip(self._weighted(vectors, found.patches, found.scores, found.rows),
                                                      features))]

    def _weighted(self, vectors: np.ndarray, patches: np.ndarray, scores: np.ndarray, rows: np.ndarray) -> list[float]:
        """Eq. 7's score of each image given its worst patch (an index into ``vectors``), that
        patch's distance and nearest row: the rows' neighbourhoods in one ranked pass (a faiss
        search each took ~0.6 ms)."""
        count = min(self.config.num_neighbors, len(self.memory))
        supports = self.neighbourhoods(rows, count) if count >= 2 else [None] * len(rows)
        return [reweight_image_score(vectors[patches[k:k + 1]], scores[k:k + 1], rows[k:k + 1], self.memory,
                                     self.index, self.config.num_neighbors, supports[k]) for k in range(len(rows))]

    def tile_scores_and_grids(self, features: list[PatchFeatures]) -> list[tuple[float | None, np.ndarray]]:
        """The patch-score grids of some tiles of one image, and the image score (eq. 7) of only
        the tile :func:`anomaly.tiling.holding_the_largest` picks among them (None for the
        others): a tiled image's score is that of the tile it picks among all (``tasks.tiles``,
        ``engine.score_features``), so no other of these can give it. The full vectors' pass
        then runs on that tile's patches alone (MTD tiles of 512 px: ~15 % of the kNN time had gone
        to every tile's)."""
        if not features:
            return []
        vectors, bounds = _stacked(features)
        queries, centred, map_scores, map_rows = self._map_distances(vectors)
        grids = [map_scores[bounds[k]:bounds[k + 1]].reshape(item.grid) for k, item in enumerate(features)]
        best = holding_the_largest([float(grid.max()) for grid in grids])
        tile = slice(bounds[best], bounds[best + 1])
        found = self._worst_given_map(queries[tile], centred[tile], np.array([0, tile.stop - tile.start]),
                                      map_scores[tile], map_rows[tile])
        weighted = self._weighted(vectors[tile], *found)[0]
        return [(weighted if k == best else None, grid) for k, grid in enumerate(grids)]

    def neighbourhoods(self, rows: np.ndarray, count: int) -> np.ndarray:
        """(len(rows), count): the ``count`` nearest memory rows of each memory row in ``rows``,
        nearest first (itself, at distance 0; ties: the lower row), as faiss's flat search finds
        them but for ties within float32 rounding. Candidates: every vector the ranking's
        bound cannot place beyond the count-th nearest; their distances computed exactly."""
        vectors = self.memory[rows]
        bits, query_norms = self._full.distances(vectors - self._centre)
        bits = np.ascontiguousarray(bits[:, :len(rows)].T)  # queries by memory rows: a partition along each
        u, norms = self._full.format.roundoff, self._full.norms
        # the count smallest results (negative ones, rounding of 0, first in integer order) each have a
        # true distance at most their result plus its bound: so has the count-th nearest vector
        kth = np.maximum(_as_float(np.partition(bits, count - 1, axis=1)[:, count - 1]), 0)
        ceiling = kth / (1 - u) + self._full.error(query_norms, norms.max())
        ceiling += np.abs(ceiling) * 2.0 ** -20 + 2.0 ** -20
        loose = (ceiling + self._full.error(query_norms, norms.max())) / (1 - 2 * u)
        flat = np.flatnonzero(bits <= _bits_at_least(loose, bits.dtype)[:, None])
        line, row = np.divmod(flat, bits.shape[1])
        real = row < len(norms)   # padding rows only for an absurd limit
        flat, line, row = flat[real], line[real], row[real]
        value = _as_float(bits.ravel()[flat])
        kept = value - np.abs(value) * u / (1 - u) - self._full.error(query_norms[line], norms[row]) <= ceiling[line]
        line, row = line[kept], row[kept]
        squared = ((vectors[line] - self.memory[row]) ** 2).sum(1, dtype=np.float32)
        order = np.lexsort((row, squared, line))  # by query, distance, row
        line, row = line[order], row[order]
        rank = np.arange(len(line)) - np.searchsorted(line, line)  # place within its query's candidates
        support = np.empty((len(rows), count), np.int64)
        support[line[rank < count], rank[rank < count]] = row[rank < count]
        return support

    def render(self, grid: np.ndarray, features: PatchFeatures) -> np.ndarray:
        """The anomaly map of an image's patch-score grid, at the original image size."""
        return anomaly_map(grid, features.image_shape, self.config.sigma, features.input_shape)

    def scores(self, features: list[PatchFeatures]) -> list[tuple[float, np.ndarray]]:
        """:meth:`score` of each, from one nearest-neighbour pass (see :meth:`image_scores_and_grids`)."""
        return [(score, self.render(grid, item))
                for (score, grid), item in zip(self.image_scores_and_grids(features), features)]

    def score(self, features: PatchFeatures) -> tuple[float, np.ndarray]:
        """Image score (eq. 7) and the anomaly map at the original image size."""
        image_score, grid = self.image_score_and_grid(features)
        return image_score, self.render(grid, features)
