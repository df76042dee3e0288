"""Cut large images into overlapping tiles and stitch their patch scores back together.

Tiles are scored independently; their patch-score grids are blended at grid resolution with
weights that ramp down towards each tile's edge (so no tile border dominates), and the
full-resolution map is rendered from the stitched grid one output block at a time. Memory is
bounded by one tile batch plus the stitched grid (1/stride^2 of the pixels), never the image.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from .settings import TilingConfig  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class Tile:
    top: int
    left: int
    bottom: int
    right: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.bottom - self.top, self.right - self.left


def _starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]  # the last tile is shifted to end at the border


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[Tile]:
    """Tiles of ``tile`` x ``tile`` pixels covering the image, neighbours sharing >= ``overlap``."""
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile): got tile={tile}, overlap={overlap}")
    stride = tile - overlap
    return [Tile(top, left, min(top + tile, height), min(left + tile, width))
            for top in _starts(height, tile, stride) for left in _starts(width, tile, stride)]


def edge_weights(grid_h: int, grid_w: int, ramp: int) -> np.ndarray:
    """(grid_h, grid_w) blending weights: 1 inside, ramping linearly to small values at edges.

    Border patches see the CNN's zero padding; weighting them down where a neighbouring tile
    covers the same place removes the seams such patches would leave.
    """
    def profile(n):
        distance = np.minimum(np.arange(n), np.arange(n)[::-1]) + 0.5
        return np.clip(distance / max(ramp, 1), 1e-3, 1.0)
    return np.outer(profile(grid_h), profile(grid_w)).astype(np.float32)


class GridStitcher:
    """Accumulates tiles' patch-score grids into one grid over the whole image."""

    def __init__(self, height: int, width: int, stride: int, ramp_patches: int):
        self.stride = stride
        self.shape = (height, width)
        self.grid_shape = (int(np.ceil(height / stride)), int(np.ceil(width / stride)))
        self.total = np.zeros(self.grid_shape, np.float64)
        self.weight = np.zeros(self.grid_shape, np.float64)
        self.ramp = ramp_patches

    def add(self, tile: Tile, scores: np.ndarray) -> None:
        """Add one tile's (gh, gw) patch scores, resampled onto the global grid cells it covers."""
        top, left = tile.top // self.stride, tile.left // self.stride
        bottom = min(int(np.ceil(tile.bottom / self.stride)), self.grid_shape[0])
        right = min(int(np.ceil(tile.right / self.stride)), self.grid_shape[1])
        target = (bottom - top, right - left)
        if scores.shape != target:
            scores = F.interpolate(torch.from_numpy(scores.astype(np.float32))[None, None], size=target,
                                   mode="bilinear", align_corners=False)[0, 0].numpy()
        weights = edge_weights(*target, self.ramp)
        self.total[top:bottom, left:right] += scores * weights
        self.weight[top:bottom, left:right] += weights

    def grid(self) -> np.ndarray:
        return (self.total / np.maximum(self.weight, 1e-12)).astype(np.float32)


def stitch_grids(shape: tuple[int, int], tiles: list[Tile], grids: list[np.ndarray], overlap: int) -> GridStitcher:
    """The tiles' patch-score grids blended into one grid over the whole image; the stride (image
    pixels per grid cell) is the first tile's, and edges ramp over half the overlap."""
    stride = tiles[0].shape[0] / grids[0].shape[0]
    stitcher = GridStitcher(shape[0], shape[1], int(round(stride)), ramp_patches=max(1, int(overlap / stride / 2)))
    for tile, grid in zip(tiles, grids):
        stitcher.add(tile, grid)
    return stitcher


def holding_the_largest(maxima: list[float]) -> int:
    """The tile whose score a tiled image takes, given each tile's largest grid value: the first
    holding the largest, or the first with a NaN one (NaN features score NaN, as a whole image's
    do). The same tile whether chosen among all the tiles or, first, among each task's."""
    return max(range(len(maxima)), key=lambda k: (bool(np.isnan(maxima[k])), maxima[k]))


def tile_sigma(sigma: float, tile_shape: tuple[int, int], input_shape: tuple[int, int]) -> float:
    """The map's smoothing in image pixels: ``sigma`` is in network-input pixels, and each tile
    reached the network resized to ``input_shape``."""
    return sigma * tile_shape[0] / input_shape[0]


def render_block(grid: np.ndarray, stride: int, image_shape: tuple[int, int], block: Tile,
                 sigma: float) -> np.ndarray:
    """One block of the full-resolution map: the grid bilinearly upsampled and smoothed (the
    reference that :class:`anomaly.maps.StitchedMap` equals; its two steps apart for the bench).

    The block is rendered with a margin of 4 sigma so the Gaussian sees its true neighbourhood:
    blocks rendered separately join without seams.
    """
    upsampled, window = upsample_block(grid, stride, image_shape, block, sigma)
    return smooth_block(upsampled, window, block, sigma)


def upsample_block(grid: np.ndarray, stride: int, image_shape: tuple[int, int], block: Tile,
                   sigma: float) -> tuple[np.ndarray, Tile]:
    """The grid bilinearly upsampled over ``block`` and a margin of 4 sigma (clipped to the
    image): the upsampled pixels and the window they cover."""
    margin = int(np.ceil(4 * sigma)) + stride
    top, left = max(block.top - margin, 0), max(block.left - margin, 0)
    bottom, right = min(block.bottom + margin, image_shape[0]), min(block.right + margin, image_shape[1])
    # pixel centres of [top, bottom) mapped into grid coordinates (align_corners=False convention)
    rows = (np.arange(top, bottom) + 0.5) / stride - 0.5
    cols = (np.arange(left, right) + 0.5) / stride - 0.5
    r0, c0 = int(max(np.floor(rows[0]), 0)), int(max(np.floor(cols[0]), 0))
    r1, c1 = int(min(np.ceil(rows[-1]) + 1, grid.shape[0])), int(min(np.ceil(cols[-1]) + 1, grid.shape[1]))
    patch = grid[r0:r1, c0:c1]
    ry = np.clip(rows - r0, 0, patch.shape[0] - 1)
    cx = np.clip(cols - c0, 0, patch.shape[1] - 1)
    y0, x0 = np.floor(ry).astype(int), np.floor(cx).astype(int)
    y1, x1 = np.minimum(y0 + 1, patch.shape[0] - 1), np.minimum(x0 + 1, patch.shape[1] - 1)
    wy, wx = (ry - y0)[:, None], (cx - x0)[None, :]
    upsampled = ((1 - wy) * ((1 - wx) * patch[np.ix_(y0, x0)] + wx * patch[np.ix_(y0, x1)])
                 + wy * ((1 - wx) * patch[np.ix_(y1, x0)] + wx * patch[np.ix_(y1, x1)]))
    return upsampled, Tile(top, left, bottom, right)


def smooth_block(upsampled: np.ndarray, window: Tile, block: Tile, sigma: float) -> np.ndarray:
    """:func:`upsample_block`'s pixels Gaussian-smoothed ('nearest' ends), cut to ``block``."""
    smoothed = gaussian_filter(upsampled.astype(np.float32), sigma=sigma, mode="nearest") if sigma > 0 else upsampled
    inner = smoothed[block.top - window.top: block.bottom - window.top, block.left - window.left: block.right - window.left]
    return inner.astype(np.float32)


def blocks(height: int, width: int, size: int) -> list[Tile]:
    """Non-overlapping output blocks (Zarr chunks) covering the image."""
    return [Tile(t, l, min(t + size, height), min(l + size, width))
            for t in range(0, height, size) for l in range(0, width, size)]
