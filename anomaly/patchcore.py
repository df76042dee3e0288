"""PatchCore (Roth et al., CVPR 2022): memory bank, coreset, nearest-neighbour scoring."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import faiss
import numpy as np
import torch

from .coreset import coreset_size, projection_matrix, streaming_coreset
from .features import PatchFeatures
from .maps import anomaly_map


@dataclass(frozen=True)
class PatchCoreConfig:
    # the paper's range is 1-25 %; at half-size inputs the bank is small (80k patches on MTD)
    # and 10 % covers rare nominal patches better (192 px squares: image AUROC 0.944 against
    # 0.924 at 1 %)
    coreset_ratio: float = 0.1
    projection_dim: int = 128
    num_neighbors: int = 9     # b of eq. 7
    sigma: float = 4.0
    seed: int = 0
    # > 0: the anomaly map's patch scores use only the first map_dims dimensions of each vector
    # (the primary scale's features): context scales sharpen the image score but blur the map
    # (MTD AUPRO 0.624 from whole vectors, 0.689 from the primary half: README, "Choosing defaults")
    map_dims: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PatchCoreConfig":
        return cls(**data)


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
                         memory: np.ndarray, index: faiss.Index, num_neighbors: int) -> float:
    """Eq. 7: s = (1 - softmax over the b neighbours of m*) * max patch score.

    m_test* is the patch with the largest score, m* its nearest memory vector; the weight
    compares its distance to m* with its distances to m*'s b nearest memory vectors (m* among
    them), so an anomaly far from a dense memory region keeps its score and one next to a rare
    memory vector is down-weighted.
    """
    worst = int(np.argmax(patch_scores))
    max_score = float(patch_scores[worst])
    neighbours = min(num_neighbors, index.ntotal)
    if neighbours < 2:
        return max_score
    _, support = index.search(memory[nearest[worst]][None], neighbours)
    distances = np.sqrt(((memory[support[0]] - patch_vectors[worst]) ** 2).sum(1)).astype(np.float64)
    # m* itself is its own nearest neighbour; make sure it sits first
    distances[0] = patch_scores[worst]
    softmax = np.exp(distances - distances.max())
    softmax /= softmax.sum()
    return float((1.0 - softmax[0]) * max_score)


# query rows per distance block: bounds the (queries x memory) matrix (1024 x 8k rows: 32 MiB)
QUERY_BLOCK = 1024


class PatchCore:
    """A fitted PatchCore model: the coreset memory and its faiss index.

    Patch scores come from one exact nearest-neighbour pass (:meth:`nearest`) that serves both the
    image score and the map: squared distances split over the vector's halves, ||q - m||^2 =
    ||q_h - m_h||^2 + ||q_t - m_t||^2, so the map's (primary ``map_dims``) distances are the first
    term and the full ones add the second: one matrix product, not two faiss flat searches. At MTD's
    full memory (8,021 rows) that pass took 1/8 of the two searches' time for whole images and for
    the 256-patch tiles of an 8k image (bench/results/score_profile.md); the faiss index still
    serves eq. 7's neighbourhood search.
    """

    def __init__(self, memory: np.ndarray, config: PatchCoreConfig = PatchCoreConfig(),
                 index: faiss.Index | None = None):
        self.memory = np.ascontiguousarray(memory, dtype=np.float32)
        self.config = config
        self.index = index if index is not None else build_index(self.memory)
        if self.index.ntotal != len(self.memory):
            raise ValueError(f"index holds {self.index.ntotal} vectors but the memory {len(self.memory)}")
        dims = self.memory.shape[1]
        self.map_split = config.map_dims if 0 < config.map_dims < dims else None
        split = self.map_split or dims
        # each half transposed into its own contiguous (dims, rows) GEMM operand, and its squared norms
        self._head_t = torch.from_numpy(np.ascontiguousarray(self.memory[:, :split].T))
        self._tail_t = torch.from_numpy(np.ascontiguousarray(self.memory[:, split:].T))
        self._head_sq = (self._head_t.double() ** 2).sum(0).float()
        self._tail_sq = (self._tail_t.double() ** 2).sum(0).float()

    @classmethod
    def fit(cls, bank: np.ndarray, config: PatchCoreConfig = PatchCoreConfig()) -> "PatchCore":
        return cls(bank[np.sort(select_coreset(bank, config))], config)

    def nearest(self, vectors: np.ndarray, with_map: bool = True
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(distance of each patch to its nearest memory vector, that vector's row, the map's
        distance: over the primary ``map_dims`` only, or the same distance without them; None
        unless ``with_map``).

        Exact nearest neighbours: candidates are ranked by ||m||^2 - 2 q.m from the matrix
        product, and the winner's distance is then computed directly as sum((q - m)^2), so a score
        differs from a brute-force float64 search only where two memory vectors are tied within
        the product's float32 rounding (then by less than that rounding).
        """
        queries = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
        split = self._head_t.shape[0]
        rows = np.empty(len(queries), np.int64)
        map_rows = np.empty(len(queries), np.int64) if with_map and self.map_split else None
        for start in range(0, len(queries), QUERY_BLOCK):
            block = queries[start:start + QUERY_BLOCK]
            done = slice(start, start + len(block))
            # ||m_h||^2 - 2 q_h.m_h ranks the memory by the primary half (||q_h||^2 is common to all m)
            ranking = torch.addmm(self._head_sq, block[:, :split].contiguous(), self._head_t, alpha=-2.0)
            if map_rows is not None:
                map_rows[done] = ranking.min(1).indices.numpy()  # min(1): ~2.5x faster than argmin(1)
            if self._tail_t.shape[0]:
                ranking.add_(self._tail_sq).addmm_(block[:, split:].contiguous(), self._tail_t, alpha=-2.0)
            rows[done] = ranking.min(1).indices.numpy()
        vectors = queries.numpy()
        scores = np.sqrt(((vectors - self.memory[rows]) ** 2).sum(1, dtype=np.float32))
        if not with_map:
            return scores, rows, None
        if map_rows is None:
            return scores, rows, scores
        head = vectors[:, :split]
        map_scores = np.sqrt(((head - self.memory[map_rows, :split]) ** 2).sum(1, dtype=np.float32))
        return scores, rows, map_scores

    def patch_scores(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distance of each patch to its nearest memory vector, and that vector's row."""
        scores, rows, _ = self.nearest(vectors, with_map=False)
        return scores, rows

    def image_score_and_grid(self, features: PatchFeatures) -> tuple[float, np.ndarray]:
        """Image score (eq. 7) and the patch-score grid of the map."""
        scores, nearest, map_scores = self.nearest(features.vectors)
        image_score = reweight_image_score(features.vectors, scores, nearest, self.memory, self.index,
                                           self.config.num_neighbors)
        return image_score, map_scores.reshape(features.grid)

    def score(self, features: PatchFeatures) -> tuple[float, np.ndarray]:
        """Image score (eq. 7) and the anomaly map at the original image size."""
        image_score, grid = self.image_score_and_grid(features)
        return image_score, anomaly_map(grid, features.image_shape, self.config.sigma, features.input_shape)
