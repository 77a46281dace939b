"""Batch execution: per-slide jobs with failure isolation and status.csv, and the Dask archive pipeline."""
