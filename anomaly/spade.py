"""SPADE (Cohen & Hoshen, 2020): image-level kNN, then patch-level kNN within the nearest images.

A test image is first matched to its K nearest nominal images by a global feature (here the
average of its patch vectors); its image score is the mean distance to those K. Each test patch
is then compared only with the patches of those K images: restricting the search to images that
look alike as a whole is what lets SPADE flag a patch that is nominal somewhere in the data set
but out of place in this kind of image.
"""
from __future__ import annotations

from dataclasses import fields

import faiss
import numpy as np

from .features import PatchFeatures
from .maps import anomaly_map
from .settings import SpadeConfig  # noqa: F401  (re-exported)


def global_feature(vectors: np.ndarray) -> np.ndarray:
    """Global average pool of an image's (patches, dim) vectors, float32 (dim,)."""
    return np.asarray(vectors, dtype=np.float64).mean(axis=0).astype(np.float32)


def _flat_index(vectors: np.ndarray) -> faiss.Index:
    index = faiss.IndexFlatL2(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def _mean_nearest_distance(index: faiss.Index, queries: np.ndarray, k: int) -> np.ndarray:
    """Mean Euclidean distance of each query to its k nearest vectors in ``index``."""
    squared, _ = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, index.ntotal))
    # the flat index computes |x|^2 + |y|^2 - 2xy: tiny negatives are rounding
    return np.sqrt(np.maximum(squared, 0)).mean(axis=1)


class SpadeFitter:
    """Collects the global feature and ALL patch vectors of each nominal image.

    SPADE has no training step to compress the data: the fitted model is the nominal patches
    themselves, so its memory (and the fitted model's size) grows linearly with the number of
    images and their size. That is the method; use PatchCore's coreset when it is too much.
    """

    def __init__(self, config: SpadeConfig = SpadeConfig()):
        self.config = config
        self.globals: list[np.ndarray] = []
        self.patches: list[np.ndarray] = []

    def update(self, vectors: np.ndarray) -> None:
        """Add the (patches, dim) vectors of one nominal image; images may have different grids."""
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(f"expected a non-empty (patches, dim) array, got shape {vectors.shape}")
        if self.patches and vectors.shape[1] != self.patches[0].shape[1]:
            raise ValueError(f"patch dimension {vectors.shape[1]} differs from the first image's "
                             f"{self.patches[0].shape[1]}")
        self.globals.append(global_feature(vectors))
        self.patches.append(np.asarray(vectors, dtype=np.float32))

    def finish(self) -> "Spade":
        if not self.patches:
            raise ValueError("SPADE needs at least 1 nominal image, got 0")
        offsets = np.cumsum([0] + [len(p) for p in self.patches]).astype(np.int64)
        return Spade(np.stack(self.globals), np.concatenate(self.patches), offsets, self.config)


class Spade:
    """A fitted SPADE model: per-image global features, every nominal patch, and image offsets.

    ``patches[offsets[i]:offsets[i + 1]]`` are the patch vectors of nominal image i.
    """

    def __init__(self, global_features: np.ndarray, patches: np.ndarray, offsets: np.ndarray,
                 config: SpadeConfig = SpadeConfig()):
        self.global_features = np.ascontiguousarray(global_features, dtype=np.float32)
        self.patches = np.ascontiguousarray(patches, dtype=np.float32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.config = config
        images = len(self.global_features)
        if (len(self.offsets) != images + 1 or self.offsets[0] != 0 or self.offsets[-1] != len(self.patches)
                or np.any(np.diff(self.offsets) <= 0)):
            raise ValueError(f"offsets must rise from 0 to {len(self.patches)} in {images} non-empty steps")
        if self.global_features.shape[1] != self.patches.shape[1]:
            raise ValueError("global features and patches differ in dimension")
        self.global_index = _flat_index(self.global_features)

    @classmethod
    def fit(cls, vectors: list[np.ndarray], config: SpadeConfig = SpadeConfig()) -> "Spade":
        fitter = SpadeFitter(config)
        for image_vectors in vectors:
            fitter.update(image_vectors)
        return fitter.finish()

    def nearest_images(self, vectors: np.ndarray) -> tuple[np.ndarray, float]:
        """Rows of the K nearest nominal images by global feature, and the image score (the mean
        distance to them, as in the paper)."""
        query = global_feature(vectors)[None]
        k = min(self.config.k_images, len(self.global_features))
        squared, rows = self.global_index.search(query, k)
        return rows[0], float(np.sqrt(np.maximum(squared[0], 0)).mean())

    def patch_scores(self, vectors: np.ndarray, images: np.ndarray) -> np.ndarray:
        """Mean distance of each patch to its ``kappa`` nearest patches among ``images``."""
        if vectors.shape[1] != self.patches.shape[1]:
            raise ValueError(f"patch dimension {vectors.shape[1]} differs from the model's {self.patches.shape[1]}")
        gallery = np.concatenate([self.patches[self.offsets[i]:self.offsets[i + 1]] for i in images])
        # built per test image: the K images differ from one test image to the next
        return _mean_nearest_distance(_flat_index(gallery), vectors, self.config.kappa)

    def score(self, features: PatchFeatures) -> tuple[float, np.ndarray]:
        """Image score (mean distance to the K nearest images, or the map's maximum: see
        ``SpadeConfig.image_score``) and the anomaly map at the original image size."""
        images, image_score = self.nearest_images(features.vectors)
        scores = self.patch_scores(features.vectors, images)
        amap = anomaly_map(scores.reshape(features.grid), features.image_shape, self.config.sigma,
                           features.input_shape)
        if self.config.image_score == "max_map":
            image_score = float(amap.max())
        return image_score, amap

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain numeric arrays (np.savez-able, no pickle), config included."""
        arrays = {"global_features": self.global_features, "patches": self.patches, "offsets": self.offsets}
        arrays.update({f"config_{k}": np.asarray(v) for k, v in self.config.to_dict().items()})
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "Spade":
        # a field missing from older arrays keeps its default
        config = SpadeConfig(**{f.name: np.asarray(arrays[f"config_{f.name}"]).item()
                                for f in fields(SpadeConfig) if f"config_{f.name}" in arrays})
        return cls(arrays["global_features"], arrays["patches"], arrays["offsets"], config)
