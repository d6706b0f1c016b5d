"""A model version's calibrator, validation split and tuned post-processing in MLflow, beside its weights.

In the run that logged the version:
    tilewise/calibrator.json        the calibrator (tasks.calibration.calibrator.Calibrator as JSON)
    tilewise/validation.json        the validation regions the model did not train on (training writes it)
    tilewise/watershed.json         EM: the watershed settings tuned on those regions (tasks/instances/tuning.py)
    calibration/reliability.png     the reliability diagram, before and after
    metrics calibration_{ece,brier,nll}_{before,after}
On the model version, tags ``calibrator.method``, ``calibrator.fitted_on``, ``calibrator.sha256``,
``calibrator.{nll,ece,brier}_{before,after}``.

JSON text and dicts only: this layer does not know the calibrator's class (tasks/ sits above it).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from models.registry import ARTIFACT_DIR, CALIBRATOR_FILE, RegistryError, _resolve, client

VALIDATION_FILE = "validation.json"


def _version(uri: str):
    """(MlflowClient, ModelVersion, run id) of a ``models:/`` URI."""
    c, version = _resolve(uri)
    run_id = version.run_id or version.tags.get("run_id")
    if not run_id:
        raise RegistryError(f"{uri}: the model version has no run to store its calibrator in")
    return c, version, run_id


def store_calibrator(uri: str, calibrator_json: str, tags: dict[str, str], metrics: dict[str, float],
                     diagram: str | Path | None = None) -> str:
    """Log the calibrator (JSON text) to the version's run, tag the version; returns ``models:/NAME/VERSION``."""
    c, version, run_id = _version(uri)
    c.log_text(run_id, calibrator_json, f"{ARTIFACT_DIR}/{CALIBRATOR_FILE}")
    if diagram is not None:
        c.log_artifact(run_id, str(diagram), "calibration")
    for key, value in metrics.items():
        if value is not None and value == value:
            c.log_metric(run_id, f"calibration_{key}", float(value))
    for key, value in tags.items():
        c.set_model_version_tag(version.name, version.version, f"calibrator.{key}", str(value)[:5000])
    c.set_tag(run_id, "tilewise.calibrator", tags.get("method", "?"))
    return f"models:/{version.name}/{version.version}"


def _read_artifact(uri: str, name: str) -> dict | None:
    c, version, run_id = _version(uri)
    listing = {Path(f.path).name for f in c.list_artifacts(run_id, ARTIFACT_DIR)}
    if name not in listing:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = c.download_artifacts(run_id, f"{ARTIFACT_DIR}/{name}", tmp)
        try:
            return json.loads(Path(path).read_text())
        except ValueError as exc:
            raise RegistryError(f"{uri}: unreadable {ARTIFACT_DIR}/{name} ({exc})") from None


def store_tuning(uri: str, name: str, record: dict, tags: dict) -> str:
    """Log a post-processing setting tuned on the version's validation split (``tilewise/<name>``),
    tag the version with ``<stem>.<key>``; returns ``models:/NAME/VERSION``."""
    c, version, run_id = _version(uri)
    c.log_text(run_id, json.dumps(record, indent=1), f"{ARTIFACT_DIR}/{name}")
    stem = Path(name).stem
    for key, value in tags.items():
        c.set_model_version_tag(version.name, version.version, f"{stem}.{key}", str(value)[:5000])
    return f"models:/{version.name}/{version.version}"


def load_tuning(uri: str, name: str) -> dict | None:
    """What :func:`store_tuning` stored as ``name``, or None."""
    return _read_artifact(uri, name)


def load_calibrator_dict(uri: str) -> dict | None:
    """The version's calibrator as a dict, or None when it has none."""
    return _read_artifact(uri, CALIBRATOR_FILE)


def load_validation(uri: str) -> dict | None:
    """The validation split recorded at training time, or None (versions trained before it was
    recorded: the caller recomputes it from ``run_params``' seed)."""
    return _read_artifact(uri, VALIDATION_FILE)


def run_params(uri: str) -> dict:
    """The training run's parameters (strings, as MLflow stores them)."""
    c, _, run_id = _version(uri)
    return dict(c.get_run(run_id).data.params)


def identity(uri: str) -> str:
    """``models:/NAME/VERSION`` for any ``models:/`` URI (an alias resolved)."""
    _, version = _resolve(uri)
    return f"models:/{version.name}/{version.version}"


__all__ = ["store_calibrator", "load_calibrator_dict", "load_validation", "run_params", "identity", "client"]
