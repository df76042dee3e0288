"""Score one batch of images with a fitted model; write maps (Zarr) and a score part (Parquet)."""
from __future__ import annotations

import errno
import functools
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import INPUTS, CacheKeyFnPolicy

from patchwatch.anomaly.features import FeatureConfig
from patchwatch.anomaly.padim import Padim
from patchwatch.anomaly.patchcore import PatchCore, PatchCoreConfig
from patchwatch.anomaly.spade import Spade
from patchwatch.anomaly.tiling import TilingConfig
from patchwatch.storage.images import ImageRecord
from patchwatch.storage.model_store import ModelStore, manifest_fingerprint
from patchwatch.storage.results_store import MapDescription, ResultStore, ResultsRootGoneError, part_name, source_stamp

from .features import drop_too_small, drop_too_small_large, load_images
from .runtime import feature_extractor
from .retries import retry_delay

SCORE_COLUMNS = ["image_id", "uri", "score", "is_anomalous", "height", "width", "map", "label", "defect_type",
                 "mask_uri", "model_version", "model"]
ERROR_COLUMNS = ["image_id", "uri", "reason", "model_version"]


@dataclass(frozen=True)
class ModelRef:
    """Which model a scoring run uses: enough for workers to load it and to label every row."""

    root: str                 # the version's folder
    version: str
    fingerprint: str
    threshold: float | None   # from held-out nominal images; None when there were none
    pixel_threshold: float | None = None  # on the maps' scale, from the same held-out images' maps
    map_units: str | None = None
    threshold_quantile: float | None = None

    @classmethod
    def of(cls, store: ModelStore, manifest: dict | None = None) -> "ModelRef":
        """The reference to the version in ``store`` (``manifest``: its manifest, if read already)."""
        manifest = manifest or store.read_manifest()
        quantile = manifest.get("threshold_quantile")
        pixel = manifest.get("pixel_threshold")
        if pixel is None and quantile is not None:  # versions whose manifest does not carry it
            pixel = pixel_threshold(store.read_table("holdout"), quantile)
        return cls(store.root, store.version, manifest_fingerprint(manifest), manifest.get("threshold"), pixel,
                   map_units(manifest.get("detector", "patchcore"), manifest.get("detector_config", {})), quantile)

    def map_description(self) -> MapDescription:
        return MapDescription(self.threshold, self.pixel_threshold, self.map_units, self.threshold_quantile)

    def flags(self, score: float) -> bool | None:
        return None if self.threshold is None else bool(score > self.threshold)


def pixel_threshold(holdout: pd.DataFrame | None, quantile: float) -> float | None:
    """The maps' threshold: the ``quantile`` of the held-out nominal images' map maxima, as the
    image threshold is that quantile of their image scores, so a held-out image's map crosses
    it as often as its score crosses the image threshold. None without hold-out maps (versions
    calibrated before map maxima were recorded)."""
    if holdout is None or "map_max" not in holdout or not holdout.map_max.notna().any():
        return None
    return float(np.quantile(holdout.map_max.dropna(), quantile))


def map_units(detector: str, config: dict) -> str:
    """What one map value is, for the maps' ``units`` attribute."""
    if detector == "padim":
        return ("Mahalanobis distance of the patch's features to its position's nominal Gaussian, upsampled and "
                "smoothed; the image score is the map's maximum (of a whole image): the same scale")
    if detector == "spade":
        return ("mean Euclidean feature distance of the patch to its nearest nominal patches, upsampled and "
                "smoothed; the image score is on another scale: compare a map with pixel_threshold")
    dims = config.get("map_dims") or 0
    which = f"the first {dims} feature dimensions (primary scale)" if dims else "all feature dimensions"
    return (f"Euclidean distance over {which} of the patch to its nearest memory patch, upsampled and smoothed; "
            "the image score (eq. 7 re-weighted maximum over whole vectors) is on another scale: compare a map "
            "with pixel_threshold, a score with image_threshold")


def open_detector(store: ModelStore, name: str, config: dict, manifest: dict | None = None) -> PatchCore | Padim | Spade:
    """The fitted detector. With ``manifest`` (a complete version: the scoring path), its arrays'
    shapes are checked against it before they are read; without (a fit calibrating the version it
    is writing, before its manifest exists), they are the fit's own."""
    if name == "patchcore":
        return PatchCore(store.read_memory(manifest), PatchCoreConfig.from_dict(config), index=store.read_index(manifest))
    if name in ("padim", "spade"):
        if manifest is not None:
            store.check_arrays(manifest)
        arrays = store.read_arrays("detector")
        return Padim.from_arrays(arrays) if name == "padim" else Spade.from_arrays(arrays)
    raise ValueError(f"model at {store.root} uses detector {name!r}, unknown to this patchwatch")


@functools.lru_cache(maxsize=2)
def load_model(model_root: str, fingerprint: str):
    """(feature extractor, detector) of the model version at ``model_root``; cached per worker process."""
    store = ModelStore(model_root)
    manifest = store.read_manifest()
    extractor = feature_extractor(FeatureConfig.from_dict(manifest["feature_config"]))
    return extractor, open_detector(store, manifest.get("detector", "patchcore"), manifest["detector_config"], manifest)


def score_row(record: ImageRecord, score: float, shape: tuple[int, int], map_url: str, model: ModelRef) -> dict:
    """One row of the score table (the same for whole and for tiled images)."""
    return {"image_id": record.image_id, "uri": record.uri, "score": score, "is_anomalous": model.flags(score),
            "height": shape[0], "width": shape[1], "map": map_url, "label": record.label,
            "defect_type": record.defect_type, "mask_uri": record.mask_uri, "model_version": model.version,
            "model": model.fingerprint}


def error_table(errors: list[dict], model: ModelRef) -> pd.DataFrame:
    return pd.DataFrame([{**e, "model_version": model.version} for e in errors], columns=ERROR_COLUMNS)


# an OSError with one of these, writing one image's map, is about that image (its key), not about
# the store: the image gets an error row and the batch goes on (a retry would fail the same way)
IMAGE_WRITE_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ, errno.ENOTDIR, errno.EISDIR})


class Unusable(Exception):
    """One image that cannot be scored, with the reason for its error row."""


def _unusable(error: Exception) -> Unusable:
    """A shape or value that only this image has: its row, not the batch."""
    return Unusable(f"cannot score it ({type(error).__name__}: {' '.join(str(error).split())[:60]})")


def scored_image(image, extractor, detector, features=None, scored: tuple[float, np.ndarray] | None = None
                 ) -> tuple[float, np.ndarray]:
    """(image score, map) of one decoded image; :class:`Unusable` if this image cannot be scored.
    ``features``, ``scored`` (its image score and map): already computed, see :func:`score_images`."""
    try:
        if scored is None:
            scored = detector.score(features if features is not None else extractor.extract([image])[0])
        score, amap = scored
    except MemoryError:
        raise
    except Exception as error:
        raise _unusable(error) from error
    if not np.isfinite(score) or not np.isfinite(amap).all():
        raise Unusable("its score is not finite (NaN or infinite values)")
    return score, amap


def score_images(records: list[ImageRecord], images: list, extractor, detector, out: ResultStore,
                 model: ModelRef) -> tuple[list[dict], list[dict]]:
    """(score rows, error rows) of the decoded images, in order: each scored
    (:func:`scored_image`), the batch by the detector's ``scores`` where it has one, then their
    maps written together (``ResultStore.write_maps``: on an object store their requests go out at
    once). PatchCore finds the nearest memory vectors of all the batch's patches in one pass: its
    matrix product is several times faster per row on a batch's ~1,500 rows than on one MTD
    image's ~100; PaDiM reads each position's inverse covariance once for the batch. A map that
    cannot be written for its own name (IMAGE_WRITE_ERRNOS) is that image's error row; any other
    storage trouble propagates to the task's retries."""
    features: dict[int, object] = {}
    outcomes: dict[int, dict | Unusable] = {}
    if getattr(extractor, "batch_size", 1) > 1:  # a GPU: the batch's images in shared forward passes
        features = _shared_pass(lambda: extractor.extract(list(images)), range(len(images)))
    for number, image in enumerate(images):
        if number in features:
            continue
        try:
            features[number] = extractor.extract([image])[0]
        except MemoryError:
            raise
        except Exception as error:
            outcomes[number] = _unusable(error)
    batch: dict[int, tuple[float, np.ndarray]] = {}
    if isinstance(detector, (PatchCore, Padim)) and len(features) > 1:
        batch = _shared_pass(lambda: detector.scores(list(features.values())), list(features))
    scored: dict[int, tuple[float, np.ndarray]] = {}
    for number, item in features.items():
        try:
            scored[number] = scored_image(images[number], extractor, detector, features=item,
                                          scored=batch.get(number))
        except Unusable as unusable:
            outcomes[number] = unusable
    numbers = sorted(scored)
    written = out.write_maps([(records[n].image_id, records[n].uri, model.version, scored[n][1]) for n in numbers])
    for number, url_or_error in zip(numbers, written):
        if isinstance(url_or_error, OSError):
            if url_or_error.errno not in IMAGE_WRITE_ERRNOS:
                raise url_or_error
            outcomes[number] = Unusable(f"cannot write its map ({os.strerror(url_or_error.errno)})")
        else:
            score, amap = scored[number]
            outcomes[number] = score_row(records[number], score, amap.shape, url_or_error, model)
    rows, errors = [], []
    for number in sorted(outcomes):
        outcome = outcomes[number]
        if isinstance(outcome, Unusable):
            errors.append({"image_id": records[number].image_id, "uri": records[number].uri, "reason": str(outcome)})
        else:
            rows.append(outcome)
    return rows, errors


def _shared_pass(compute, keys) -> dict:
    """{key: result} of one computation over a batch (``compute()`` gives a result per key, in
    order), or {} if it fails (e.g. one image's odd input): each item is then done on its own,
    for its own error row."""
    try:
        return dict(zip(keys, compute()))
    except MemoryError:
        raise
    except Exception:
        return {}


def _content(context, parameters: dict) -> str:
    """The sources' sizes and modification times: a cached result is reused only for the same content."""
    records = parameters.get("records")
    return source_stamp([r.uri for r in records] if records is not None else [parameters["uri"]])


# inputs (model, results root, part, records) and the images' content: never the names alone
CONTENT_CACHE = INPUTS + CacheKeyFnPolicy(cache_key_fn=_content)


def retry_unless_root_gone(task, task_run, state) -> bool:
    """A vanished results root is not transient: retrying would only wait, then fail the same way."""
    return not isinstance(state.result(raise_on_failure=False), ResultsRootGoneError)


@task(name="score-batch", task_run_name="score-batch part {part:05d}", retries=3, retry_delay_seconds=retry_delay(10), cache_policy=CONTENT_CACHE,
      persist_result=True, retry_condition_fn=retry_unless_root_gone)
def score_batch_task(model: ModelRef, results: str, part: int, records: list[ImageRecord],
                     tiling: TilingConfig | None = None) -> dict:
    out = ResultStore(results)
    out.require()
    out.describe_maps(model.version, model.map_description())
    extractor, detector = load_model(model.root, model.fingerprint)
    good, images, errors, large = load_images(records, tiling)
    good, images = drop_too_small(extractor, good, images, errors)
    large = drop_too_small_large(extractor, large, errors)
    rows, unusable = score_images(good, images, extractor, detector, out, model)
    errors.extend(unusable)
    # the parts are written after every map of the batch (the score part marks it complete), and
    # only into a root that still exists: a deleted bucket is a failed run, not one re-created
    out.require()
    out.write_errors(part_name(part), error_table(errors, model))
    out.write_scores(part_name(part), pd.DataFrame(rows, columns=SCORE_COLUMNS))
    return {"part": part, "images": len(rows), "errors": errors, "large": large}
