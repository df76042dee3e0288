"""Fit flow: list -> new images only -> patch features on Dask workers -> Zarr bank -> coreset
-> index -> threshold from held-out nominal images -> a new model version, then ``current``."""
from __future__ import annotations

import hashlib
import time

import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from patchwatch.anomaly.detectors import default_features, for_features, needs_input_size, with_input_size
from patchwatch.anomaly.detectors import detector_config as detector_settings
from patchwatch.anomaly.features import FeatureConfig
from patchwatch.anomaly.tiling import TilingConfig, tile_grid
from patchwatch.storage.images import ImageReadError, ImageRecord, image_shape
from patchwatch.storage.model_store import HOLDOUT, TRAIN, ModelRegistry
from patchwatch.tasks.coreset import select_coreset_task
from patchwatch.tasks.detectors import fit_detector_task
from patchwatch.tasks.features import extract_features_task, from_outcome
from patchwatch.tasks.index import build_index_task
from patchwatch.tasks.listing import chunk, list_images_task, spread_sample
from patchwatch.tasks.threshold import calibrate_threshold_task
from patchwatch.tasks.tiles import extract_tile_features_task, remove_staged_copies, stage_large_images

from .defaults import HOLDOUT_FRACTION, THRESHOLD_QUANTILE
from .report import markdown_rows, markdown_table
from .root_settings import configuration_of, kept_input_size
from .runner import gather, run_name

# below this many listed images every one is needed for the memory: no hold-out, no threshold
MIN_IMAGES_FOR_HOLDOUT = 20
RECORD_FIELDS = ["image_id", "uri", "mask_uri", "label", "defect_type", "split"]
# nominal images whose headers set PaDiM's input size (spread over the listing): a median of this
# many is stable, and a listing of millions costs seconds, not a pass over every file
INPUT_SIZE_SAMPLE = 128


def held_out(image_id: str, fraction: float) -> bool:
    """Whether an image is held out of the memory to calibrate the threshold: decided by a hash
    of its id, so the choice never changes between fits and needs no stored state."""
    return int(hashlib.sha256(image_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def plan_batches(new: list[ImageRecord], first: int, batch_size: int, holdout_fraction: float,
                 hold: bool) -> pd.DataFrame:
    """(batch, kind, record fields) rows: the new images cut into work batches, held-out
    images in batches of their own."""
    held = [r for r in new if hold and held_out(r.image_id, holdout_fraction)]
    train = [r for r in new if not (hold and held_out(r.image_id, holdout_fraction))]
    rows, batch = [], first
    for kind, records in ((TRAIN, train), (HOLDOUT, held)):
        for group in chunk(records, batch_size):
            rows += [{"batch": batch, "kind": kind, **{f: getattr(r, f) for f in RECORD_FIELDS}} for r in group]
            batch += 1
    return pd.DataFrame(rows, columns=["batch", "kind", *RECORD_FIELDS])


def planned_batches(plan: pd.DataFrame) -> list[tuple[int, str, list[ImageRecord]]]:
    plan = plan.astype(object).where(plan.notna(), None)
    return [(int(batch), rows.kind.iloc[0],
             [ImageRecord(**{f: row[f] for f in RECORD_FIELDS}) for _, row in rows.iterrows()])
            for batch, rows in plan.groupby("batch", sort=True)]


def listing_digest(records: list[ImageRecord]) -> str:
    return hashlib.sha256("\n".join(sorted(r.uri for r in records)).encode()).hexdigest()[:16]


@flow(name="fit", flow_run_name=run_name("fit {root}"), log_prints=True)
def fit_flow(images: str, root: str, split: str | None = None, feature_config: dict | None = None,
             detector: str = "patchcore", detector_config: dict | None = None, batch_size: int = 32,
             tiling_config: dict | None = None, coreset_chunk_rows: int = 1 << 20, tiles_per_task: int = 16,
             holdout_fraction: float = HOLDOUT_FRACTION, threshold_quantile: float = THRESHOLD_QUANTILE,
             full: bool = False, auto: bool = False, settings: dict | None = None,
             config_file: dict | None = None) -> dict:
    """Fit or re-fit the model under ``root`` on the nominal images of ``images``.

    Only images the bank does not hold yet are featurised. A PatchCore re-fit with unchanged
    settings extends the current version's coreset over the new rows (``full``: select afresh
    from the whole bank). Nothing new and nothing changed: no new version.

    ``auto``: the first fit of a root compares candidate configurations on the nominal images
    with synthetic defects pasted in and keeps the best (flows/choice.py); later fits keep it.

    One fit per root at a time: two would plan the same bank batches into the same version
    folder. A second fit is refused (LeaseHeldError, one line naming the holder).

    ``settings`` (the options the command resolved) and ``config_file`` (its --config file's
    path, SHA-256 and values) are recorded in the new version's manifest as they are.
    """
    provenance = {key: value for key, value in (("settings", settings), ("config_file", config_file)) if value}
    with ModelRegistry(root).fit_lease() as lease:
        return _fit(images, root, split, feature_config, detector, detector_config, batch_size, tiling_config,
                    coreset_chunk_rows, tiles_per_task, holdout_fraction, threshold_quantile, full, lease, auto,
                    provenance)


def _fit(images, root, split, feature_config, detector, detector_config, batch_size, tiling_config,
         coreset_chunk_rows, tiles_per_task, holdout_fraction, threshold_quantile, full, lease, auto,
         provenance) -> dict:
    logger = get_run_logger()
    features = FeatureConfig.from_dict(feature_config) if feature_config else default_features(detector)
    settings = for_features(detector, detector_settings(detector, detector_config), features)
    tiling = TilingConfig(**tiling_config) if tiling_config else TilingConfig()
    registry = ModelRegistry(root)
    started = time.perf_counter()
    records = list_images_task(images, split)
    if not records:
        raise ValueError(f"no images found in {images}" + (f" (split {split!r})" if split else ""))
    choice = None
    if auto:
        features, detector, settings, choice = _auto_configuration(registry, records, tiling, logger, root)
    features = _input_size(registry, records, detector, features, tiling, logger)
    registry.bank.claim({"feature_config": features.to_dict(), "tiling_config": tiling.to_dict()})
    extract_started = time.perf_counter()  # after --auto's probe, which the summary times on its own
    parent_version = registry.current()
    parent = registry.model(parent_version).read_manifest() if parent_version else None
    recipe = {"detector": detector, "detector_config": settings.to_dict(), "threshold_quantile": threshold_quantile,
              "holdout_fraction": holdout_fraction}
    unchanged = parent is not None and not full and all(parent.get(k) == v for k, v in recipe.items())

    model = registry.new_version()
    plan = model.read_table("plan")  # a killed fit's plan: resumed as it was, whatever arrived since
    if plan is None or not len(plan):
        known = set(registry.bank.index().uri)
        new = [r for r in records if r.uri not in known]
        if not new and unchanged:
            return _nothing_new(logger, root, images, parent_version, len(records), started)
        plan = plan_batches(new, registry.bank.next_batch(), batch_size, holdout_fraction,
                            hold=len(records) >= MIN_IMAGES_FOR_HOLDOUT)
        model.write_table("plan", plan)
    batches = planned_batches(plan)
    logger.info("%s: %d listed images, %d new in %d batches -> %s", images, len(records), len(plan), len(batches),
                model.root)

    # a batch a killed run finished is not run again: its outcome is read back from the bank
    written = set(registry.bank.batches(TRAIN)) | set(registry.bank.batches(HOLDOUT))

    def run_or_recall(jobs: list, submit, kind_of, description: str) -> list[dict]:
        recalled = {n: registry.bank.outcome(n, kind_of(job)) if n in written else None for n, job in jobs}
        futures = [submit(n, job) for n, job in jobs if recalled[n] is None]
        ran = iter(gather(futures, description))
        return [from_outcome(recalled[n]) if recalled[n] is not None else next(ran) for n, _ in jobs]

    extracted = run_or_recall(
        [(number, (kind, group)) for number, kind, group in batches],
        lambda n, job: extract_features_task.submit(root, n, job[1], features, tiling, job[0]),
        lambda job: job[0], "features")
    # large nominal images feed the bank tile by tile, spread over the workers
    large = [item for result in extracted for item in result["large"]]
    next_batch = max(number for number, _, _ in batches) + 1 if batches else registry.bank.next_batch()
    tile_jobs = []
    for record, shape in large:
        for group in chunk(tile_grid(*shape, tiling.tile, tiling.overlap), tiles_per_task):
            tile_jobs.append((next_batch, (record, group)))
            next_batch += 1
    # a PNG/JPEG with tiles left to featurise is decoded once, into a scratch Zarr copy under the root
    pending = {job[0].image_id for n, job in tile_jobs if n not in written}
    staged, unreadable = stage_large_images([(r, shape) for r, shape in large if r.image_id in pending], root)
    failed = {e["image_id"] for e in unreadable}
    try:
        extracted += run_or_recall(
            [(n, job) for n, job in tile_jobs if job[0].image_id not in failed],
            lambda n, job: extract_tile_features_task.submit(root, n, job[0].image_id, job[0].uri, job[1],
                                                               features, staged=staged.get(job[0].image_id)),
            lambda job: TRAIN, "tile features")
    finally:
        remove_staged_copies(staged)
    extract_s = time.perf_counter() - extract_started
    errors = [e for result in extracted for e in result["errors"]] + unreadable
    for error in errors:
        logger.error("skipped %s: %s", error["uri"], error["reason"])
    added_rows = sum(r["rows"] for r in extracted)
    if not added_rows and unchanged:
        model.write_table("plan", plan.iloc[:0])  # done with (nothing usable): the next fit plans afresh
        return _nothing_new(logger, root, images, parent_version, len(records), started, errors)

    incremental = unchanged and parent is not None
    if detector == "patchcore":
        parent_info = ({"root": registry.model(parent_version).root, "bank_batches": parent["bank_batches"],
                        "covering_radius": parent["covering_radius"]} if incremental else None)
        coreset = select_coreset_task.submit(root, model.root, settings, coreset_chunk_rows, parent_info).result()
        index = build_index_task.submit(model.root).result()
        fitted = {"bank_batches": coreset["bank_batches"], "memory_rows": coreset["memory_rows"],
                  "covering_radius": coreset["covering_radius"], "incremental": coreset["incremental"],
                  "coreset_s": coreset["seconds"], "index_s": index["seconds"]}
    else:
        result = fit_detector_task.submit(root, model.root, detector, settings).result()
        fitted = {"bank_batches": result["bank_batches"], "incremental": False, "coreset_s": 0.0,
                  "index_s": result["seconds"]}
    calibration = calibrate_threshold_task.submit(root, model.root, detector, settings.to_dict(),
                                                  threshold_quantile).result()
    if calibration["threshold"] is None:
        logger.warning("no held-out nominal images (fewer than %d listed): version %s has no threshold and "
                       "flags nothing", MIN_IMAGES_FOR_HOLDOUT, model.version)
    train_index = registry.bank.index(TRAIN)
    manifest = {"version": model.version, "parent": parent_version, **recipe, "backbone": features.backbone,
                "feature_config": features.to_dict(), "tiling_config": tiling.to_dict(),
                "images": images, "split": split,
                "source_listing": {"images": len(records), "sha256": listing_digest(records)},
                "n_images": int(train_index.uri.nunique()), "new_images": int(len(plan)),
                "holdout_images": calibration["holdout_images"], "threshold": calibration["threshold"],
                # the same quantile of the held-out images' map maxima: the maps' own threshold
                "pixel_threshold": calibration.get("pixel_threshold"),
                "bank_batches": fitted["bank_batches"],
                "bank_rows": int(sum(registry.bank.rows_per_batch(fitted["bank_batches"]).values())),
                "incremental": fitted["incremental"],
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for key in ("memory_rows", "covering_radius"):
        if key in fitted:
            manifest[key] = fitted[key]
    if choice:
        manifest["auto"] = choice
    manifest.update(provenance)
    lease.check()  # a fit whose lease expired and was taken over must not commit a version
    model.write_manifest(manifest)  # written last: the version is complete
    registry.promote(model.version)  # and only then current, in one atomic write
    summary = {"root": root, "version": model.version, "parent": parent_version, "refit": True,
               "incremental": fitted["incremental"], "detector": detector,
               **({"configuration": choice["chosen"], "auto_s": choice.get("seconds", 0.0)} if choice else {}),
               "images": manifest["n_images"],
               "new_images": manifest["new_images"], "skipped": len(errors), "batches": len(batches),
               "bank_rows": manifest["bank_rows"], "memory_rows": fitted.get("memory_rows"),
               "covering_radius": fitted.get("covering_radius"), "holdout_images": calibration["holdout_images"],
               "threshold": calibration["threshold"], "extract_s": extract_s, "coreset_s": fitted["coreset_s"],
               "index_s": fitted["index_s"], "fit_s": time.perf_counter() - started}
    create_markdown_artifact(
        key="fit-summary",
        markdown=f"# Fit: version {model.version}\n\n" + markdown_table(summary)
        + ("\n\n## Skipped files\n\n" + markdown_rows(errors) if errors else ""),
        description=f"fit of {root}")
    return {**summary, "errors": errors, **({"auto": choice} if choice else {})}


def _input_size(registry: ModelRegistry, records: list[ImageRecord], detector: str, features: FeatureConfig,
                tiling: TilingConfig, logger) -> FeatureConfig:
    """``features`` with the one input size ``detector`` needs (PaDiM, unless square_side or
    fixed_shape is given): the size this root's bank was featurised with, else the nominal images'
    own (:func:`anomaly.settings.native_shape` of the sizes in a spread sample's headers)."""
    if not needs_input_size(detector, features):
        return features
    kept = kept_input_size(registry.bank.settings(), detector, features)
    if kept is not None:
        return kept
    uris = spread_sample(records, INPUT_SIZE_SAMPLE)
    sizes = []
    for uri in uris:
        try:
            sizes.append(image_shape(uri))
        except ImageReadError:
            continue  # the extraction reports unusable files
    if not sizes:
        raise ValueError(f"none of the {len(uris)} sampled images has a readable header: no input size for {detector}")
    resolved = with_input_size(detector, features, sizes, tiling)
    tiled = sum(tiling.needs_tiling(*size) for size in sizes)
    logger.info("%s input size %dx%d (height x width), from %d nominal images%s (%dx%d to %dx%d): their median "
                "area, at most 512x512, a short side of at least 320 where that allows, at their shared aspect, "
                "else square",
                detector, *resolved.fixed_shape, len(sizes), f" ({tiled} large: their tiles)" if tiled else "",
                *min(sizes), *max(sizes))
    return resolved


def _auto_configuration(registry: ModelRegistry, records: list[ImageRecord], tiling: TilingConfig, logger,
                        root: str):
    """(features, detector, settings, record) for ``--auto``: chosen by the probe on a root's first
    fit; a root whose bank holds features already keeps the configuration they were made with
    (choosing again would mean featurising every image again: start a new root for that)."""
    current = registry.current()
    if registry.bank.settings() is None or current is None:
        from .choice import choose_configuration  # sklearn and the probe: only a first fit needs them
        candidate, record = choose_configuration(records, tiling, logger, root)
        return candidate.features, candidate.detector, candidate.settings, record
    manifest = registry.model(current).read_manifest()
    features, detector, settings = configuration_of(manifest)
    kept = manifest.get("auto", {}).get("chosen", "the configuration")
    logger.info("--auto: keeping %s of %s (this root's bank was featurised with it)", kept, current)
    return features, detector, settings, {**manifest.get("auto", {}), "kept_from": current, "seconds": 0.0}


def _nothing_new(logger, root: str, images: str, version: str, listed: int, started: float,
                 errors: list[dict] | None = None) -> dict:
    message = (f"nothing new in {images}: the bank holds all {listed - len(errors or [])} usable images; "
               f"version {version} stays current")
    logger.info(message)
    summary = {"root": root, "version": version, "refit": False, "new_images": 0, "listed": listed,
               "skipped": len(errors or []), "message": message, "fit_s": time.perf_counter() - started}
    create_markdown_artifact(key="fit-summary", markdown="# Fit: nothing new\n\n" + markdown_table(summary),
                             description=f"fit of {root}")
    return {**summary, "errors": errors or []}
