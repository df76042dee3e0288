"""patchwatch: nightly visual anomaly detection on image archives."""
__version__ = "0.1.0"
