"""Thin Prefect tasks: each adapts one engine step to storage and the Dask workers."""
