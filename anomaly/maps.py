"""Patch-score grids to full-resolution anomaly maps."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter


def anomaly_map(patch_scores: np.ndarray, image_shape: tuple[int, int], sigma: float,
                input_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Bilinearly upsample a (grid_h, grid_w) score grid to ``image_shape`` and smooth it.

    ``sigma`` is in pixels of the network input (the paper's sigma = 4 at its input size); it is
    rescaled to the original image so the smoothing covers the same image content at any size.
    """
    grid = torch.from_numpy(np.ascontiguousarray(patch_scores, dtype=np.float32))[None, None]
    upsampled = F.interpolate(grid, size=tuple(image_shape), mode="bilinear", align_corners=False)[0, 0].numpy()
    if input_shape is not None:
        sigma = sigma * np.sqrt(image_shape[0] * image_shape[1] / (input_shape[0] * input_shape[1]))
    return gaussian_filter(upsampled, sigma=sigma) if sigma > 0 else upsampled


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
