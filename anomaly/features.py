"""Locally aware patch features (PatchCore, Roth et al. 2022, section 3.1)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .backbone import create_backbone, normalisation
from .runtime import backbone_stages, cached_export, exported_stages, record_export, resolve_runtime
# the settings live in a module without torch; imported from here as ever
from .settings import FeatureConfig, native_shape  # noqa: F401


@dataclass
class PatchFeatures:
    """The patch vectors of one image, row-major over a grid of ``grid`` positions."""

    vectors: np.ndarray          # (grid_h * grid_w, embed_dim) float32
    grid: tuple[int, int]        # (grid_h, grid_w)
    image_shape: tuple[int, int]  # (height, width) of the original image
    input_shape: tuple[int, int]  # (height, width) the network saw


def input_shape_for(height: int, width: int, scale: float, multiple: int) -> tuple[int, int]:
    """Network input size: the image scaled by ``scale``, each side rounded to ``multiple``."""
    return (max(multiple, round(height * scale / multiple) * multiple),
            max(multiple, round(width * scale / multiple) * multiple))


def to_float_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] from grey, grey+alpha, RGB or RGBA arrays of any integer depth."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise ValueError(f"expected a 2-D or 3-D image array, got shape {image.shape}")
    if np.issubdtype(image.dtype, np.integer):
        scaled = image.astype(np.float32) / np.float32(np.iinfo(image.dtype).max)
    else:
        scaled = image.astype(np.float32)
    channels = scaled.shape[2]
    if channels in (2, 4):  # drop alpha: nominal appearance is what counts
        scaled = scaled[:, :, : channels - 1]
    if scaled.shape[2] == 1:
        scaled = np.repeat(scaled, 3, axis=2)
    if scaled.shape[2] != 3:
        raise ValueError(f"unsupported number of channels: {image.shape[2]}")
    return scaled


class PatchFeatureExtractor:
    """Backbone + local neighbourhood aggregation + adaptive pooling to a fixed dimension."""

    def __init__(self, config: FeatureConfig = FeatureConfig(), device: str | torch.device = "cpu",
                 runtime: str | None = None, threads: int = 1, shapes: str = "fixed",
                 batch_size: int | None = None):
        """``runtime``: what runs the backbone's forward pass (anomaly.runtime; None: the default
        for ``device``), with ``threads`` intra-op threads and the ``shapes`` policy. Not part of
        ``config``: features from every runtime are the same within anomaly.runtime.MAP_TOLERANCE.
        ``batch_size``: images of one input size per forward pass (None: :func:`default_batch_size`)."""
        self.config = config
        self.device = torch.device(device)
        if self.device.type == "cuda":
            strict_float32_on_gpus()
        self.batch_size = default_batch_size(self.device) if batch_size is None else int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        runtime = resolve_runtime(runtime, self.device)
        cached = None if runtime == "torch" else cached_export(config.backbone, config.layers)
        if cached is not None:  # an exported runtime needs no model once its export is cached
            self.model, (path, description) = None, cached
            self.stages = exported_stages(runtime, path, threads, shapes)
        else:
            self.model = create_backbone(config.backbone, features_only=True, out_indices=config.layers)
            self.model.to(self.device)
            self.stages = backbone_stages(self.model, config.backbone, config.layers, runtime, self.device,
                                          threads, shapes)
            mean, std = normalisation(config.backbone)
            description = {"mean": mean, "std": std, "reductions": list(self.model.feature_info.reduction())}
            if runtime != "torch":
                record_export(self.stages.onnx_path, config.backbone, config.layers, description)
        self.runtime = self.stages.name
        self.mean = torch.tensor(description["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(description["std"], device=self.device).view(1, 3, 1, 1)
        self.reduction = min(description["reductions"])
        self.min_side = max(description["reductions"])

    def input_shape(self, height: int, width: int, scale: float | None = None) -> tuple[int, int]:
        """The network input size at ``scale`` (default: the primary ``input_scale``)."""
        scale = self.config.input_scale if scale is None else scale
        if self.config.fixed_shape:
            factor = scale / self.config.input_scale
            return tuple(max(1, round(side * factor)) for side in self.config.fixed_shape)
        if self.config.square_side:
            side = round(self.config.square_side * scale / self.config.input_scale)
            return (side, side)
        return input_shape_for(height, width, scale, self.config.size_multiple)

    def preprocess(self, images: list[np.ndarray], shape: tuple[int, int]) -> torch.Tensor:
        batch = []
        for image in images:
            # resized where the network runs: on a GPU the host would otherwise resize each image
            rgb = torch.from_numpy(to_float_rgb(image)).permute(2, 0, 1)[None].to(self.device)
            batch.append(F.interpolate(rgb, size=shape, mode="bilinear", align_corners=False, antialias=True))
        tensor = torch.cat(batch)
        return (tensor - self.mean) / self.std

    @torch.inference_mode()
    def local_maps(self, inputs: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, h, w) normalised inputs -> the chosen stages' maps, each position averaged over
        its p x p neighbourhood (stride 1): locally aware features."""
        pad = self.config.patch_size // 2
        return [F.avg_pool2d(m, self.config.patch_size, stride=1, padding=pad, count_include_pad=False)
                for m in self.stages(inputs)]

    @torch.inference_mode()
    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) normalised inputs -> (B, embed_dim, h/r, w/r) patch features."""
        return self.combine(self.local_maps(inputs))

    @torch.inference_mode()
    def combine(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Stage maps, scale by scale (the primary scale's first: its first stage's grid is the
        patch grid) -> (B, embed_dim, grid) patch features: one block per scale, primary first."""
        grid = maps[0].shape[-2:]
        maps = [m if m.shape[-2:] == grid else F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
                for m in maps]
        batch, (grid_h, grid_w) = maps[0].shape[0], grid
        layers = len(self.config.layers)
        blocks = []
        for scale, dim in enumerate(self.config.block_dims):
            per_layer = []
            for m in maps[scale * layers:(scale + 1) * layers]:
                vectors = m.permute(0, 2, 3, 1).reshape(-1, 1, m.shape[1])
                # adaptive pooling equalises the layers' widths so neither dominates the distance
                per_layer.append(F.adaptive_avg_pool1d(vectors, self.config.layer_dim))
            stacked = torch.cat(per_layer, dim=1).reshape(-1, 1, layers * self.config.layer_dim)
            blocks.append(F.adaptive_avg_pool1d(stacked, dim))
        embedded = torch.cat(blocks, dim=2)
        return embedded.reshape(batch, grid_h, grid_w, -1).permute(0, 3, 1, 2)

    def extract(self, images: list[np.ndarray]) -> list[PatchFeatures]:
        """Patch features of each image, in order.

        Images whose network inputs have the same size go through the network together,
        ``batch_size`` at a time. On a CPU the default is one at a time: batching gains little
        there, and convolution results depend slightly on the batch they are computed in. On a
        GPU batches are what fills the device; an image's features then differ from its
        unbatched ones by float32 rounding only (tests/test_gpu_batching.py, bench/bench_gpu.py).
        """
        results: list[PatchFeatures | None] = [None] * len(images)
        by_inputs: dict[tuple, list[int]] = {}
        for index, image in enumerate(images):
            height, width = image.shape[:2]
            shapes = tuple(self.input_shape(height, width, scale)
                           for scale in (self.config.input_scale, *self.config.context_scales))
            by_inputs.setdefault(shapes, []).append(index)
        for shapes, indices in by_inputs.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                batch = [images[i] for i in chunk]
                for index, features in zip(chunk, self._extract_batch(batch, shapes)):
                    results[index] = features
        return results

    def _extract_batch(self, images: list[np.ndarray], shapes: tuple) -> list[PatchFeatures]:
        """Features of images that share the network input ``shapes`` (primary scale first)."""
        maps = []
        for shape in shapes:
            maps += self.local_maps(self.preprocess(images, shape))
        fmaps = self.combine(maps).cpu()
        grid = (fmaps.shape[2], fmaps.shape[3])
        return [PatchFeatures(fmap.permute(1, 2, 0).reshape(-1, fmap.shape[0]).numpy().astype(np.float32),
                              grid, tuple(image.shape[:2]), shapes[0])
                for image, fmap in zip(images, fmaps)]


# images per forward pass on a GPU (bench/bench_gpu.py measures batch sizes 1 to 64)
GPU_BATCH_SIZE = 32


def default_batch_size(device: torch.device) -> int:
    """1 on CPUs (one image at a time, as the workers' single thread runs best), GPU_BATCH_SIZE
    on GPUs."""
    return 1 if device.type == "cpu" else GPU_BATCH_SIZE


def strict_float32_on_gpus() -> None:
    """Convolutions and products in full float32 on GPUs: PyTorch lets cuDNN use TF32 by default,
    whose 10-bit mantissa moves the maps ~1e-3 relative, far past what the CPU runtimes agree to
    (anomaly.runtime.MAP_TOLERANCE); a map must not depend on which machine computed it."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
