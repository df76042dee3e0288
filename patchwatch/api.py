"""The Python API: fit a model root and score single images in-process (a notebook, a script).

``load(root).score(image)`` runs in this process, with no Prefect run and no Dask cluster: it
reads the version's manifest and detector (``tasks.scoring``) and scores with the same in-memory
steps as the flows (``anomaly.engine``: one view, or tiles above the model's tiling threshold).
``fit(...)`` runs the real fit flow, exactly as ``patchwatch fit`` does.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Torch intra-op threads used while scoring. One, by default: a backbone pass with two intra-op
# threads ran ~40x slower than with one on a 2-core machine whose other core was busy (threads
# spin-wait on each other at every layer), and a notebook usually shares its cores (Dask workers, a
# browser, another kernel). On an idle many-core machine more threads help large images:
# load(threads=N) or this variable asks for N.
THREADS_ENV = "PATCHWATCH_TORCH_THREADS"


@dataclass(frozen=True, repr=False)
class Result:
    """One scored image."""

    score: float                  # the image's anomaly score (higher: more anomalous)
    map: np.ndarray = field(compare=False)  # (H, W) float32 anomaly map at the image's own size
    is_anomalous: bool | None     # score > threshold; None when the model has no threshold
    threshold: float | None       # the model version's threshold (held-out nominal images)
    version: str                  # the model version that scored it
    # the same quantile of the held-out images' map maxima: map pixels above it are anomalous
    # (map values are on another scale than image scores); None for versions fitted before it existed
    pixel_threshold: float | None = None

    @property
    def anomalous_pixels(self) -> np.ndarray | None:
        """(H, W) bool: where the map crosses the pixel threshold (None without one)."""
        return None if self.pixel_threshold is None else self.map > self.pixel_threshold

    def __repr__(self) -> str:
        flag = "no threshold" if self.is_anomalous is None else ("anomalous" if self.is_anomalous else "nominal")
        threshold = "" if self.threshold is None else f" (threshold {self.threshold:.4g})"
        return (f"Result(score={self.score:.4g}, {flag}{threshold}, map {self.map.shape[0]}x{self.map.shape[1]}, "
                f"version {self.version})")


class Model:
    """A fitted model version, loaded for in-process scoring (see :func:`load`)."""

    def __init__(self, root: str, store, manifest: dict, extractor, detector, threads: int):
        from patchwatch.anomaly.tiling import TilingConfig
        from patchwatch.tasks.scoring import ModelRef

        self.root = root                      # the model root (the folder 'patchwatch fit' wrote)
        self.manifest = manifest              # the version's manifest.json: configs, threshold, lineage
        self.detector = detector              # the fitted PatchCore / Padim / Spade
        self.extractor = extractor            # the backbone + patch features it was fitted with
        self.threads = threads
        self.ref = ModelRef.of(store, manifest)
        # the same tiling the flows use for this version (the settings its bank was made with)
        self.tiling = TilingConfig(**manifest.get("tiling_config", {}))

    @property
    def version(self) -> str:
        return self.ref.version

    @property
    def threshold(self) -> float | None:
        return self.ref.threshold

    def __repr__(self) -> str:
        name = self.manifest.get("detector", "patchcore")
        threshold = ("no threshold" if self.threshold is None else
                     f"threshold {self.threshold:.4g} ({self.manifest.get('threshold_quantile')} quantile of "
                     f"{self.manifest.get('holdout_images')} held-out nominal images)")
        return (f"<patchwatch.Model {self.version} of {self.root}: {name} on {self.manifest.get('backbone')}, "
                f"fitted on {self.manifest.get('n_images')} images, {threshold}>")

    def score(self, image) -> Result:
        """Score one image: a numpy array ((H, W) grey or (H, W, 3|4) RGB(A); any integer depth, or
        float in [0, 1]), a PIL image, or a path or URL (read as the pipeline reads files)."""
        from patchwatch.anomaly.engine import extract_views, score_features
        from patchwatch.tasks.features import min_image_side

        pixels = _pixels(image)
        height, width = pixels.shape[:2]
        floor = min_image_side(self.extractor)
        if min(height, width) < floor:
            raise ValueError(f"image too small ({width}x{height} px; the model needs {floor}x{floor})")
        with _torch_threads(self.threads):
            scored = score_features(self.detector, extract_views(self.extractor, pixels, self.tiling),
                                    (height, width), self.tiling)
        score = float(scored.score)
        return Result(score, scored.map, self.ref.flags(score), self.threshold, self.version, self.ref.pixel_threshold)


def load(root, version: str | None = None, threads: int | None = None, runtime: str | None = None) -> Model:
    """The model version ``version`` (default: the current one) of the model root ``root`` (a
    folder or URL written by ``patchwatch fit``), ready to score in this process.

    ``threads``: torch intra-op threads while scoring (default ``PATCHWATCH_TORCH_THREADS`` or 1;
    see :data:`THREADS_ENV`), also the backbone runtime's; your own torch setting is restored
    after each call. ``runtime``: what runs the backbone ("auto", "torch", "onnxruntime",
    "openvino"; default ``PATCHWATCH_RUNTIME``, else auto: ONNX Runtime on a CPU), whichever
    runtime the model was fitted with (see anomaly.runtime)."""
    from patchwatch.storage.locations import absolute
    from patchwatch.storage.model_store import ModelRegistry

    root = absolute(str(root)).rstrip("/")
    registry = ModelRegistry(root)
    if version is not None and version not in registry.versions():
        versions = registry.versions()
        raise LookupError(f"no such version {version} at {root}; "
                          + (f"its versions: {', '.join(versions)} (current {registry.current()})" if versions
                             else "it holds no versions: fit one first (patchwatch.fit or 'patchwatch fit')"))
    store = registry.resolve(version)  # no current version, an incomplete or unreadable one: one clear error
    manifest = store.read_manifest()
    threads = _threads(threads)
    with _torch_threads(threads):  # importing the task modules sets torch to one thread (their policy)
        from patchwatch.tasks.scoring import ModelRef, load_model
        extractor, detector = load_model(store.root, ModelRef.of(store, manifest).fingerprint)
        if runtime is not None or threads != 1:  # the workers' extractor runs the configured runtime on 1 thread
            from patchwatch.anomaly.features import PatchFeatureExtractor
            from patchwatch.anomaly.runtime import configured_runtime

            extractor = PatchFeatureExtractor(extractor.config, runtime=runtime or configured_runtime()[0],
                                              threads=threads)
    return Model(root, store, manifest, extractor, detector, threads)


def fit(images, root, **options) -> dict:
    """Fit (or re-fit) the model root ``root`` on nominal ``images``: the fit flow ``patchwatch fit``
    runs, on a local Dask cluster (one worker per core) unless ``dask_address`` is given. Returns
    the fit summary (version, images, threshold, timings, skipped files).

    ``images``: a folder, a split CSV, or a URL of either; or a list of numpy arrays / PIL images,
    written first to the folder ``ROOT-images`` beside the root (one lossless file per image, named
    by its content), which stays: Dask workers read it (remote workers too, when the root is a
    URL), and a later fit given more arrays finds the earlier ones already in the bank.
    ``options``: the command's options, underscored (``split``, ``detector``, ``full``, ``auto``,
    ``layers=(2, 3)``, ``coreset_ratio``, ``holdout_fraction``, ``batch_size``, ``workers``,
    ``dask_address``, ``allow_sources``, ``image_folder`` for the arrays' folder, ...); ``config``:
    a TOML file of settings, as ``--config`` (the other options override it; the manifest records it).
    """
    # what the command sets before Prefect and Dask are imported (patchwatch.cli.main): Dask's INFO
    # lines off, Prefect's INFO to its server only, no telemetry from the temporary server
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from patchwatch.flows.fit import fit_flow
    from patchwatch.flows.root_settings import nothing_to_fit
    from patchwatch.flows.runner import dask_cluster, install_log_sanitiser, prefect_api, run_and_link, run_on_dask

    from .cli import _prepare, build_parser, fit_parameters

    image_folder = options.pop("image_folder", None)
    if isinstance(images, (list, tuple)):
        images = write_images(images, image_folder or images_folder(root))
    args = _fit_arguments(build_parser(), str(images), str(root), options)
    install_log_sanitiser()
    _prepare(args)  # the command's checks: absolute paths, no credentials in URLs, stores probed
    parameters = dict(images=args.images, root=args.root, split=args.split, full=args.full, **fit_parameters(args))
    with prefect_api():
        if not args.dask_address and nothing_to_fit(**parameters):  # no cluster to start for nothing
            return run_and_link(fit_flow, **parameters)
        with dask_cluster(args.dask_address, args.workers) as address:
            return run_on_dask(fit_flow, address, **parameters)


def _fit_arguments(parser, images: str, root: str, options: dict):
    """The ``patchwatch fit`` arguments for these options: the command's defaults, a ``config``
    file's settings over them, then the options."""
    from .config_file import apply_config

    argv = ["fit", "--images", images, "--root", root]
    if options.get("config") is not None:
        argv += ["--config", os.fspath(options.pop("config"))]
    args = apply_config(parser, parser.command_parsers["fit"], argv, parser.parse_args(argv))
    fixed = {"command", "images", "root", "verbose", "debug", "config_file"}
    unknown = sorted(k for k in options if k in fixed or not hasattr(args, k))
    if unknown:
        known = sorted(k for k in vars(args) if k not in fixed)
        raise TypeError(f"fit() got unknown option(s) {', '.join(unknown)}; options: {', '.join(known)}, image_folder")
    for name, value in options.items():
        if name in ("layers", "context_scales", "mirrors") and value is not None and not isinstance(value, str):
            value = ",".join(str(v) for v in value)  # the command's comma-separated form
        setattr(args, name, value)
    from patchwatch.anomaly.detectors import CONFIGS
    if args.detector is not None and args.detector not in CONFIGS:
        raise ValueError(f"detector {args.detector!r}: choose one of {', '.join(sorted(CONFIGS))}")
    return args


def images_folder(root) -> str:
    """Where :func:`fit` writes images given as arrays: ``ROOT-images`` beside the root."""
    from patchwatch.storage.locations import absolute, location

    root = absolute(str(root)).rstrip("/")
    if "://" in root and "/" not in location(root)[1]:  # s3://bucket: a sibling would be another bucket
        raise ValueError(f"root {root} is a whole bucket: give fit(..., image_folder=URL) for the images")
    return root + "-images"


def write_images(images: list, folder: str) -> str:
    """Write ``images`` (numpy arrays or PIL images) into ``folder``, losslessly, each named by its
    content (the same image is one file, and a re-fit finds it in the bank); returns ``folder``.
    8-bit grey/RGB/RGBA and 16-bit grey go to PNG, anything else to TIFF, so that the pipeline reads
    back the pixels :meth:`Model.score` would see in the array."""
    from PIL import Image

    from patchwatch.storage.locations import absolute, join, write_bytes_atomically

    if not images:
        raise ValueError("fit() got an empty list of images")
    folder = absolute(str(folder)).rstrip("/")
    for number, image in enumerate(images):
        if not isinstance(image, (np.ndarray, Image.Image)):
            raise TypeError(f"images[{number}]: expected a numpy array or a PIL image, got {type(image).__name__};"
                            " give a folder, CSV or URL instead of a list of paths")
        pixels = _pixels(image, f"images[{number}]")
        buffer = io.BytesIO()
        if pixels.dtype == np.uint8 and (pixels.ndim == 2 or pixels.shape[2] in (1, 3, 4)):
            Image.fromarray(pixels.squeeze(2) if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels).save(
                buffer, format="PNG")
            suffix = "png"
        elif pixels.dtype == np.uint16 and pixels.ndim == 2:
            Image.fromarray(pixels).save(buffer, format="PNG")
            suffix = "png"
        else:
            import tifffile
            rgb = pixels.ndim == 3 and pixels.shape[2] in (3, 4)
            tifffile.imwrite(buffer, pixels, photometric="rgb" if rgb else "minisblack")
            suffix = "tif"
        data = buffer.getvalue()
        write_bytes_atomically(join(folder, f"{hashlib.sha256(data).hexdigest()[:20]}.{suffix}"), data)
    return folder


def _pixels(image: Any, name: str = "image") -> np.ndarray:
    """The pixels of an array, PIL image or path/URL, converted by the pipeline's own image reader
    rules (16-bit, palette, CMYK and alpha images converted; float scaled to [0, 1]; NaN refused)."""
    from PIL import Image

    from patchwatch.storage.images import _check_array, _pil_to_array, read_image
    from patchwatch.storage.locations import absolute

    if isinstance(image, (str, os.PathLike)):
        return read_image(absolute(os.fspath(image)))
    if isinstance(image, Image.Image):
        return _check_array(_pil_to_array(image), f"{name} (PIL {image.mode})")
    if isinstance(image, np.ndarray):
        return _check_array(image, f"{name} (array {image.dtype} {image.shape})")
    raise TypeError(f"{name}: expected a numpy array, a PIL image or a path/URL, got {type(image).__name__}")


def _threads(threads: int | None) -> int:
    if threads is None:
        text = os.environ.get(THREADS_ENV, "").strip()
        try:
            threads = int(text) if text else 1
        except ValueError:
            raise ValueError(f"{THREADS_ENV}={text!r}: expected a whole number of threads") from None
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    return threads


@contextlib.contextmanager
def _torch_threads(threads: int):
    """Torch at ``threads`` intra-op threads for the block; the caller's setting restored after."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
