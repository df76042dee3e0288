"""What a model root was fitted with, and whether a fit would change anything: read from the root
and the listing alone, without Prefect or torch (seconds of imports), so that the command decides
a fit with nothing new in its own process and ends (bench/results/throughput.md, the no-op fit)."""
from __future__ import annotations

import json
from dataclasses import replace

from patchwatch.anomaly.settings import (FeatureConfig, TilingConfig, default_features, for_features,
                                         needs_input_size)
from patchwatch.anomaly.settings import detector_config as detector_settings
from patchwatch.storage.model_store import ModelRegistry

from .defaults import HOLDOUT_FRACTION, THRESHOLD_QUANTILE


def nothing_to_fit(images: str, root: str, split: str | None = None, feature_config: dict | None = None,
                   detector: str = "patchcore", detector_config: dict | None = None, tiling_config: dict | None = None,
                   holdout_fraction: float = HOLDOUT_FRACTION, threshold_quantile: float = THRESHOLD_QUANTILE,
                   full: bool = False, auto: bool = False, **_) -> bool:
    """Whether :func:`flows.fit.fit_flow` with these arguments would find nothing new and change nothing,
    decided by reading the root and listing the source, in the calling process: the CLI then runs
    the flow without starting a Dask cluster (a no-op fit took 33-41 s, mostly the cluster's start).
    Only a sure answer is True: any doubt (no current version, a killed fit's plan, other settings,
    a listing that fails) is False and the fit runs as ever; the flow decides again in any case."""
    from patchwatch.storage.images import list_images

    if full:
        return False
    registry = ModelRegistry(root)
    try:
        current = registry.current()
        recorded = registry.bank.settings()  # read once: a zarr group's attributes (round trips on S3)
        if current is None or recorded is None:
            return False
        parent = registry.model(current).read_manifest()
        if auto:  # a root with a bank keeps the configuration it was made with (flows.fit._auto_configuration)
            features, detector, settings = configuration_of(parent)
        else:
            features = FeatureConfig.from_dict(feature_config) if feature_config else default_features(detector)
            features = kept_input_size(recorded, detector, features) or features
            settings = for_features(detector, detector_settings(detector, detector_config), features)
        tiling = TilingConfig(**tiling_config) if tiling_config else TilingConfig()
        recipe = {"detector": detector, "detector_config": settings.to_dict(), "threshold_quantile": threshold_quantile,
                  "holdout_fraction": holdout_fraction}
        if any(parent.get(k) != v for k, v in recipe.items()):
            return False
        asked = json.loads(json.dumps({"feature_config": features.to_dict(), "tiling_config": tiling.to_dict()}))
        if recorded != asked:
            return False
        plan = registry.new_version().read_table("plan")
        if plan is not None and len(plan):
            return False
        records = list_images(images, split)
        known = set(registry.bank.index().uri)
        return bool(records) and all(r.uri in known for r in records)
    except Exception:  # the flow, run as ever, reports it properly
        return False


def kept_input_size(bank_settings: dict | None, detector: str, features: FeatureConfig) -> FeatureConfig | None:
    """The features a root's bank was made with (``bank_settings``, as the bank records them),
    where they are ``features`` with an input size set: a re-fit keeps it (new images of another
    size would otherwise change every vector), and so does a root made when PaDiM's default was a
    320 x 320 square (square_side)."""
    if not needs_input_size(detector, features):
        return None
    recorded = (bank_settings or {}).get("feature_config")
    if not recorded:
        return None
    fitted = FeatureConfig.from_dict(recorded)
    sized = fitted.fixed_shape or fitted.square_side
    return fitted if sized and replace(fitted, fixed_shape=(), square_side=0) == features else None


def configuration_of(manifest: dict):
    """(features, detector, detector settings) a version was fitted with."""
    detector = manifest.get("detector", "patchcore")
    return (FeatureConfig.from_dict(manifest["feature_config"]), detector,
            detector_settings(detector, manifest["detector_config"]))
