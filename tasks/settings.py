"""Where tilewise keeps its state: ``TILEWISE_HOME`` (default ``./.tilewise``).

    $TILEWISE_HOME/stores/<dataset>/<scan>.zarr   scan groups
    $TILEWISE_HOME/mlflow.db, mlflow-artifacts/  embedded MLflow (unless MLFLOW_TRACKING_URI is set)
    $TILEWISE_HOME/prefect/                      embedded Prefect database (unless PREFECT_API_URL is set)
"""

from __future__ import annotations

import os
from pathlib import Path


def tilewise_home() -> Path:
    return Path(os.environ.get("TILEWISE_HOME", ".tilewise")).resolve()


def store_root() -> str:
    """Root of the scan stores: a local folder or an fsspec URL (``TILEWISE_STORE_ROOT``)."""
    return os.environ.get("TILEWISE_STORE_ROOT") or str(tilewise_home() / "stores")


def scan_store(dataset: str, scan_id: str, root: str | None = None) -> str:
    return f"{(root or store_root()).rstrip('/')}/{dataset}/{scan_id}.zarr"
