"""Training on the catalog's labelled scans (patches straight from Zarr), tracked in MLflow."""
