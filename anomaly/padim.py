"""PaDiM (Defard et al., ICPR 2020): a multivariate Gaussian of the patch features per position.

Every grid position (i, j) of the nominal images gets its own mean and covariance; a test patch
is scored by its Mahalanobis distance to the Gaussian of its position. That ties the model to
one feature grid, so every image must reach the network at the same size (``fixed_shape``, set
from the nominal images by :func:`anomaly.settings.with_input_size`, or ``square_side``).
"""
from __future__ import annotations

from dataclasses import fields

import numpy as np

from .features import PatchFeatures
from .maps import anomaly_map
from .settings import FIXED_GRID_HINT, PadimConfig  # noqa: F401  (PadimConfig re-exported)

def oas_shrunk(cov: np.ndarray, samples: int) -> np.ndarray:
    """(P, C, C) unbiased covariances from ``samples`` images, each shrunk by OAS: the amount
    sklearn.covariance.OAS gives (it works on the biased estimate, so that is what is shrunk; the
    result is rescaled back to unbiased)."""
    channels = cov.shape[-1]
    biased = cov * ((samples - 1) / samples)
    mu = np.trace(biased, axis1=1, axis2=2) / channels                        # (P,)
    alpha = np.einsum("pij,pij->p", biased, biased) / channels ** 2          # mean of squared entries
    numerator = alpha + mu ** 2
    denominator = (samples + 1) * (alpha - mu ** 2 / channels)
    # all the way to the scaled identity where the spread is already isotropic (denominator 0)
    shrinkage = np.minimum(np.divide(numerator, denominator, out=np.ones_like(numerator), where=denominator > 0), 1.0)
    shrunk = (1 - shrinkage)[:, None, None] * biased
    shrunk[:, np.arange(channels), np.arange(channels)] += (shrinkage * mu)[:, None]
    return shrunk * (samples / (samples - 1))


def channel_subset(dim: int, channels: int, seed: int) -> np.ndarray:
    """Sorted indices of ``channels`` random channels out of ``dim`` (all of them if channels <= 0
    or >= dim)."""
    if channels <= 0 or channels >= dim:
        return np.arange(dim, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(dim, size=channels, replace=False)).astype(np.int64)


class PadimFitter:
    """Streaming estimate of the per-position means and covariances, image by image.

    Keeps, per position, the sum of the vectors and the sum of their outer products (float64),
    so memory is P x C x C regardless of the number of images. Both sums are taken about the
    first image's vectors: the covariance is unchanged by the shift, and the sums stay small,
    which avoids the cancellation of the textbook E[xx'] - E[x]E[x]' formula.
    """

    def __init__(self, grid: tuple[int, int], dim: int, config: PadimConfig = PadimConfig()):
        self.grid = (int(grid[0]), int(grid[1]))
        self.dim = int(dim)
        self.config = config
        self.channel_index = channel_subset(self.dim, config.channels, config.seed)
        positions, channels = self.grid[0] * self.grid[1], len(self.channel_index)
        self.count = 0
        self.shift: np.ndarray | None = None
        self.sum = np.zeros((positions, channels), dtype=np.float64)
        self.outer = np.zeros((positions, channels, channels), dtype=np.float64)

    def update(self, vectors: np.ndarray, grid: tuple[int, int] | None = None) -> None:
        """Add the (grid_h * grid_w, dim) patch vectors of one nominal image, or a stack of them
        (images, grid_h * grid_w, dim): a stack is summed with one batched matrix product, ~10x
        faster per image than one outer product at a time.

        Pass the images' ``grid`` too where it is known: a different grid with the same number
        of positions cannot be told from the vectors alone.
        """
        expected = (self.grid[0] * self.grid[1], self.dim)
        stack = vectors[None] if vectors.ndim == 2 else vectors
        if (grid is not None and tuple(grid) != self.grid) or stack.ndim != 3 or stack.shape[1:] != expected:
            raise ValueError(f"expected patch vectors of shape {expected} (grid {self.grid}), got "
                             f"{vectors.shape} (grid {grid}); {FIXED_GRID_HINT}")
        x = np.asarray(stack)[:, :, self.channel_index].astype(np.float64)  # (N, P, C)
        if self.shift is None:
            self.shift = x[0].copy()
        x -= self.shift
        self.sum += x.sum(axis=0)
        # per position p: sum over images of x x^T, as (P, C, N) @ (P, N, C)
        self.outer += np.matmul(x.transpose(1, 2, 0), x.transpose(1, 0, 2))
        self.count += len(x)

    def mean_and_covariance(self) -> tuple[np.ndarray, np.ndarray]:
        """(P, C) means and (P, C, C) unbiased covariances (as np.cov), without the regulariser."""
        if self.count < 2:
            raise ValueError(f"PaDiM needs at least 2 nominal images, got {self.count}")
        n = self.count
        centred = self.sum / n
        cov = (self.outer - n * np.einsum("pi,pj->pij", centred, centred)) / (n - 1)
        return self.shift + centred, cov

    def finish(self) -> "Padim":
        mean, cov = self.mean_and_covariance()
        if self.config.shrinkage == "oas":
            cov = oas_shrunk(cov, self.count)
        cov += self.config.epsilon * np.eye(cov.shape[-1])[None]
        inv_cov = np.linalg.inv(cov)
        return Padim(mean, inv_cov, self.channel_index, self.grid, self.config, dim=self.dim)


class Padim:
    """A fitted PaDiM model: per-position mean and inverse covariance on a fixed grid."""

    def __init__(self, mean: np.ndarray, inv_cov: np.ndarray, channel_index: np.ndarray,
                 grid: tuple[int, int], config: PadimConfig = PadimConfig(), dim: int | None = None):
        self.grid = (int(grid[0]), int(grid[1]))
        positions = self.grid[0] * self.grid[1]
        self.mean = np.ascontiguousarray(mean, dtype=np.float64)
        self.inv_cov = np.ascontiguousarray(inv_cov, dtype=np.float64)
        self.channel_index = np.asarray(channel_index, dtype=np.int64)
        self.config = config
        self.dim = int(dim) if dim is not None else int(self.channel_index.max()) + 1
        channels = len(self.channel_index)
        if self.mean.shape != (positions, channels) or self.inv_cov.shape != (positions, channels, channels):
            raise ValueError(f"mean {self.mean.shape} / inv_cov {self.inv_cov.shape} do not match grid "
                             f"{self.grid} with {channels} channels")

    @classmethod
    def fit(cls, vectors: list[np.ndarray] | np.ndarray, grid: tuple[int, int],
            config: PadimConfig = PadimConfig()) -> "Padim":
        """Fit on the patch vectors of several nominal images (each (grid_h * grid_w, dim))."""
        fitter = None
        for image_vectors in vectors:
            if fitter is None:
                fitter = PadimFitter(grid, image_vectors.shape[1], config)
            fitter.update(image_vectors)
        if fitter is None:
            raise ValueError("PaDiM needs at least 2 nominal images, got 0")
        return fitter.finish()

    def patch_scores(self, vectors: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each patch to the Gaussian of its position, (P,)."""
        return self.patch_scores_many(vectors[None])[0]

    def patch_scores_many(self, stack: np.ndarray) -> np.ndarray:
        """:meth:`patch_scores` of several images' (images, P, dim) vectors at once, (images, P):
        each position's inverse covariance (C x C float64, 200 MB in all for 400 positions x 256
        channels) is read once for the stack, not once per image (an image's distances 4.6x faster
        at 16 on an idle core, 2x under load: bench/bench_score_profile.py)."""
        if stack.ndim != 3 or stack.shape[1] != len(self.mean) or stack.shape[2] != self.dim:
            raise ValueError(f"expected patch vectors of shape {(len(self.mean), self.dim)} (grid "
                             f"{self.grid}), got {stack.shape[1:]}; {FIXED_GRID_HINT}")
        diff = stack[:, :, self.channel_index].astype(np.float64) - self.mean   # (N, P, C)
        by_position = np.ascontiguousarray(diff.transpose(1, 2, 0))             # (P, C, N)
        weighted = np.matmul(self.inv_cov, by_position)
        return np.sqrt(np.maximum(np.einsum("pcn,pcn->np", by_position, weighted), 0.0))

    def _check_grid(self, features: PatchFeatures) -> None:
        if tuple(features.grid) != self.grid:
            raise ValueError(f"feature grid {tuple(features.grid)} differs from the fitted grid "
                             f"{self.grid}; {FIXED_GRID_HINT}")

    def render(self, grid: np.ndarray, features: PatchFeatures) -> np.ndarray:
        """The anomaly map of an image's patch scores, at the original image size."""
        return anomaly_map(np.asarray(grid).reshape(self.grid), features.image_shape, self.config.sigma,
                           features.input_shape)

    def scores(self, features: list[PatchFeatures]) -> list[tuple[float, np.ndarray]]:
        """:meth:`score` of each, from one stacked Mahalanobis pass (:meth:`patch_scores_many`)."""
        for item in features:
            self._check_grid(item)
        rows = self.patch_scores_many(np.stack([item.vectors for item in features]))
        return [self._scored(row, item) for row, item in zip(rows, features)]

    def score(self, features: PatchFeatures) -> tuple[float, np.ndarray]:
        """Image score (the maximum of the map, as in the paper) and the anomaly map at the
        original image size."""
        self._check_grid(features)
        return self._scored(self.patch_scores(features.vectors), features)

    def _scored(self, patch_scores: np.ndarray, features: PatchFeatures) -> tuple[float, np.ndarray]:
        amap = self.render(patch_scores, features)
        return float(amap.max()), amap

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain numeric arrays (np.savez-able, no pickle), config included."""
        arrays = {"mean": self.mean, "inv_cov": self.inv_cov, "channel_index": self.channel_index,
                  "grid": np.asarray(self.grid, dtype=np.int64), "dim": np.asarray(self.dim, dtype=np.int64)}
        arrays.update({f"config_{k}": np.asarray(v) for k, v in self.config.to_dict().items()})
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "Padim":
        # a model written before a setting existed was fitted with that setting's default
        config = PadimConfig(**{f.name: np.asarray(arrays[f"config_{f.name}"]).item()
                                for f in fields(PadimConfig) if f"config_{f.name}" in arrays})
        return cls(arrays["mean"], arrays["inv_cov"], arrays["channel_index"],
                   tuple(int(v) for v in arrays["grid"]), config, dim=int(arrays["dim"]))
