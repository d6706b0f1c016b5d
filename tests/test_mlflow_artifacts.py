"""A tracking URI the user set to a SQLite file: the experiments tilewise creates keep their
artifacts next to that database, never in ``./mlruns`` of the folder the command ran in, and the
CLI says where they went."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    import mlflow

    original = os.environ.get("MLFLOW_TRACKING_URI")
    (tmp_path / "db").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.setenv("TILEWISE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path / "work")
    yield tmp_path
    mlflow.set_tracking_uri(original)  # registry.client() sets MLflow's global URI
    mlflow.set_registry_uri(original)


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_artifacts_go_next_to_the_users_sqlite_database(elsewhere, capsys):
    import mlflow

    from flows.cli import _print_artifacts
    from models import registry

    experiment = registry.experiment_id("toy")
    # as training logs (the fluent API in tasks/training/train.py) and evaluation logs (the client)
    with mlflow.start_run(experiment_id=experiment, run_name="train toy") as run:
        mlflow.log_dict({"a": 1}, "tilewise/card_at_start.json")
    c = registry.client()
    other = c.create_run(experiment).info.run_id
    c.log_dict(other, {"b": 2}, "evaluation/metrics.json")
    c.set_terminated(other)

    assert not (elsewhere / "work" / "mlruns").exists()
    assert _files(elsewhere / "work") == []
    expected = elsewhere / "db" / "mlflow-artifacts" / "toy"
    written = {p.relative_to(expected).as_posix() for p in _files(expected)}
    assert {f"{run.info.run_id}/artifacts/tilewise/card_at_start.json",
            f"{other}/artifacts/evaluation/metrics.json"} <= written
    assert json.loads((expected / other / "artifacts/evaluation/metrics.json").read_text()) == {"b": 2}

    _print_artifacts(other)
    printed = capsys.readouterr().out
    assert f"MLflow artifacts: {(expected / other / 'artifacts').as_uri()}" in printed.replace("\n", "")
