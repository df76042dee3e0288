"""Patch-score grids to full-resolution anomaly maps.

A map is a score grid bilinearly upsampled, then Gaussian-smoothed. Both steps are linear and
separable, so along each axis they are one (pixels x grid cells) matrix, and the map is
``rows @ grid @ cols.T``: exactly the upsample-then-smooth result (to float32 rounding), without
ever filtering a full-resolution image. The matrices depend only on sizes and sigma, so they are
cached: images of one size share them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import correlate1d


# an axis of at most this many (pixels x cells) samples is filtered whole, without the windows'
# indexing. With the weights built once a sigma, MTD's axes (150-450 px of 5-14 cells, each new)
# took 0.18 against 0.22 ms (medians of 5 alternated runs); the limit itself was not tuned (at
# 512 x 16 the two ways measured within the noise)
WHOLE_AXIS_SAMPLES = 1 << 13


@functools.lru_cache(maxsize=64)
def _gaussian_weights(sigma: float) -> np.ndarray:
    """The correlation weights scipy's ``gaussian_filter1d`` builds (truncate 4): built once a
    sigma, not once an axis (an MTD map's sigma is its own: its sizes set it)."""
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 / (sigma * sigma) * x ** 2)
    return (weights / weights.sum())[::-1].copy()


def _smoothed(hats: np.ndarray, sigma: float, mode: str) -> np.ndarray:
    """Each column (one grid cell's upsampled hat) Gaussian-smoothed along the pixels, as
    scipy's ``gaussian_filter`` smooths an image along one axis (truncate 4, ``mode`` at the ends).

    A hat is non-zero on a few strides only, so on a long axis each column is filtered in a window
    of its support plus the kernel radius and a zero margin (there 'reflect' and 'nearest' read
    zeros, as the whole column would): the same numbers as filtering whole columns, ~30x fewer
    samples for an 8k image. A short axis is filtered whole (:data:`WHOLE_AXIS_SAMPLES`).
    """
    if sigma <= 0:
        return hats.astype(np.float32)
    weights = _gaussian_weights(float(sigma))
    pixels, cells = hats.shape
    if pixels * cells <= WHOLE_AXIS_SAMPLES:
        return correlate1d(hats, weights, axis=0, mode=mode).astype(np.float32)
    radius = len(weights) // 2
    used = hats != 0
    first = used.argmax(0)
    last = pixels - used[::-1].argmax(0)         # one past each column's last non-zero pixel
    length = int(min(pixels, (last - first).max() + 2 * radius + 2))
    starts = np.clip(first - radius - 1, 0, pixels - length)
    window_rows = starts[:, None] + np.arange(length)          # (cells, length)
    columns = np.arange(cells)[:, None]
    smoothed = correlate1d(hats[window_rows, columns], weights, axis=-1, mode=mode)
    out = np.zeros((pixels, cells), np.float32)
    out[window_rows, columns] = smoothed
    return out


def _product(rows: np.ndarray, grid: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """rows @ grid @ cols.T in float32, through torch: its thread count is the process's setting
    (one on the workers), while numpy's OpenBLAS, unless told otherwise, starts a thread per core,
    which on a busy 2-core machine made a 512 x 18 x 512 product ~100x slower (22 ms against 0.2-0.3)."""
    product = torch.from_numpy(rows) @ torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32))
    return (product @ torch.from_numpy(cols).T).numpy()


@functools.lru_cache(maxsize=256)
def image_axis(pixels: int, cells: int, sigma: float) -> np.ndarray:
    """(pixels, cells) float32: one axis of :func:`anomaly_map` (torch's bilinear resize,
    align_corners=False, then scipy's Gaussian with its default 'reflect' ends)."""
    identity = torch.eye(cells, dtype=torch.float64)[None]            # cell j as channel j
    hats = F.interpolate(identity, size=pixels, mode="linear", align_corners=False)[0].T.numpy()
    return _smoothed(hats, sigma, "reflect")


def anomaly_map(patch_scores: np.ndarray, image_shape: tuple[int, int], sigma: float,
                input_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Bilinearly upsample a (grid_h, grid_w) score grid to ``image_shape`` and smooth it.

    ``sigma`` is in pixels of the network input (the paper's sigma = 4 at its input size); it is
    rescaled to the original image so the smoothing covers the same image content at any size.
    """
    if input_shape is not None:
        sigma = sigma * np.sqrt(image_shape[0] * image_shape[1] / (input_shape[0] * input_shape[1]))
    grid = np.asarray(patch_scores, dtype=np.float32)
    rows = image_axis(int(image_shape[0]), grid.shape[0], float(sigma))
    cols = image_axis(int(image_shape[1]), grid.shape[1], float(sigma))
    return _product(rows, grid, cols)


# an 8k axis is 8 MiB (8192 x 256 float32): a few kept, enough for the rows and columns of one size
@functools.lru_cache(maxsize=4)
def _stitched_axis(pixels: int, cells: int, stride: int, sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One axis of a stitched grid's map, as :func:`anomaly.tiling.render_block` renders it
    (pixel centres mapped to cells, clamped at the ends; Gaussian with 'nearest' ends): the
    (pixels, cells) matrix and, per pixel, the first and one-past-last cell it reads."""
    centres = np.clip((np.arange(pixels) + 0.5) / stride - 0.5, 0, cells - 1)
    low = np.floor(centres).astype(int)
    high = np.minimum(low + 1, cells - 1)
    weight = centres - low
    hats = np.zeros((pixels, cells))
    np.add.at(hats, (np.arange(pixels), low), 1 - weight)   # add: low == high at the clamped ends
    np.add.at(hats, (np.arange(pixels), high), weight)
    matrix = _smoothed(hats, sigma, "nearest")
    used = matrix != 0
    first = used.argmax(1)
    last = cells - used[:, ::-1].argmax(1)
    return matrix, first, last


@dataclass
class StitchedMap:
    """The full-resolution map of a stitched grid (``stride`` image pixels per cell), rendered one
    block at a time from the few grid cells the block reads: equal to
    :func:`anomaly.tiling.render_block`'s upsample-then-smooth within float32 rounding."""

    grid: np.ndarray
    stride: int
    image_shape: tuple[int, int]
    sigma: float

    def __post_init__(self):
        self.grid = np.asarray(self.grid, dtype=np.float32)
        self._rows = _stitched_axis(int(self.image_shape[0]), self.grid.shape[0], int(self.stride), float(self.sigma))
        self._cols = _stitched_axis(int(self.image_shape[1]), self.grid.shape[1], int(self.stride), float(self.sigma))

    def block(self, top: int, left: int, bottom: int, right: int) -> np.ndarray:
        (rows, row_first, row_last), (cols, col_first, col_last) = self._rows, self._cols
        r0, r1 = row_first[top:bottom].min(), row_last[top:bottom].max()
        c0, c1 = col_first[left:right].min(), col_last[left:right].max()
        return _product(rows[top:bottom, r0:r1], self.grid[r0:r1, c0:c1], cols[left:right, c0:c1])

    def whole(self, block_side: int = 512) -> np.ndarray:
        height, width = self.image_shape
        out = np.empty((height, width), np.float32)
        for top in range(0, height, block_side):
            for left in range(0, width, block_side):
                bottom, right = min(top + block_side, height), min(left + block_side, width)
                out[top:bottom, left:right] = self.block(top, left, bottom, right)
        return out


def heatmap_overlay(image: np.ndarray, amap: np.ndarray, low: float, high: float,
                    opacity: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8: the image in grey with the anomaly map blended on in a blue-to-red ramp.

    ``low``/``high`` fix the colour scale, so overlays of different images compare.
    """
    from .features import to_float_rgb

    grey = to_float_rgb(image).mean(axis=2, keepdims=True)
    level = np.clip((amap - low) / max(high - low, 1e-12), 0, 1)[..., None]
    ramp = np.concatenate([np.clip(2 * level, 0, 1), 1 - np.abs(2 * level - 1), np.clip(2 - 2 * level, 0, 1) * (level < 0.5)], axis=2)
    blended = (1 - opacity) * grey + opacity * ramp
    return (np.clip(blended, 0, 1) * 255).astype(np.uint8)
