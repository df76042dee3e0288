"""Prefect flows: fit (list -> batches -> features on Dask -> Zarr -> coreset -> index),
score (list -> batches on Dask -> maps + score table) and evaluate (fit + score + metrics)."""
