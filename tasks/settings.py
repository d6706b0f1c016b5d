"""Where tilewise keeps its state and its stores.

The home folder is resolved in one place, :mod:`models.home` (``TILEWISE_HOME``, then the project
``.tilewise`` found from the current folder, then the checkout tilewise is installed from, then the
user's data folder); it is re-exported here for tasks/ and flows/.

    <home>/stores/<dataset>/<scan>.zarr   scan groups
    <home>/mlflow.db, mlflow-artifacts/  embedded MLflow (unless MLFLOW_TRACKING_URI is set)
    <home>/prefect/                      embedded Prefect database (unless PREFECT_API_URL is set)
"""

from __future__ import annotations

import os

from models.home import home_line, is_new, resolve_home, tilewise_home

__all__ = ["home_line", "is_new", "resolve_home", "scan_store", "store_root", "tilewise_home"]


def store_root() -> str:
    """Root of the scan stores: a local folder or an fsspec URL (``TILEWISE_STORE_ROOT``)."""
    return os.environ.get("TILEWISE_STORE_ROOT") or str(tilewise_home() / "stores")


def scan_store(dataset: str, scan_id: str, root: str | None = None) -> str:
    return f"{(root or store_root()).rstrip('/')}/{dataset}/{scan_id}.zarr"
