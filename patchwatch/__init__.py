"""patchwatch: nightly visual anomaly detection on image archives.

The Python API (see patchwatch.api and README "Python API")::

    model = patchwatch.load("models/line1")       # the current version of a model root
    result = model.score("part.png")             # .score, .map, .is_anomalous, .threshold, .version
    summary = patchwatch.fit("data/nominal", "models/line1")   # what 'patchwatch fit' runs
"""
__version__ = "0.1.0"
__all__ = ["Model", "Result", "fit", "load", "__version__"]


def __getattr__(name):
    # imported on first use: the command ('patchwatch --version', '--help') must not pay for torch
    if name in ("Model", "Result", "fit", "load"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'patchwatch' has no attribute {name!r}")
