"""The drift warning (issue 19): a prediction whose foreground fraction is far outside what the
model's validation scans held is flagged by ``evaluate`` and the nightly summary, and recorded in MLflow."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flows.outcomes import ScanOutcome
from models.card import ModelCard
from tasks import storage
from tasks.engine.infer import EngineConfig, infer_scan
from tasks.engine.model_io import LoadedModel
from tasks.metrics.drift import foreground_drift, is_far, prediction_drift
from tests.test_evaluate import make_store, reference_volume, write_prediction

# what a building model's two validation chips held (SpaceNet Rio chips 52 and 53, roughly)
VALIDATION = {"chip52": {"reference": 0.086, "predicted": 0.08}, "chip53": {"reference": 0.28, "predicted": 0.30}}


@pytest.mark.parametrize("fraction, low, high, far", [
    (1.0, 0.08, 0.30, True),  # all foreground: the failure the warning is for
    (0.65, 0.08, 0.30, True),  # over twice the largest and 35 points above it
    (0.55, 0.08, 0.30, False),  # under twice the largest: scenes differ that much
    (0.0, 0.08, 0.30, False),  # a building-free scene is normal for this model
    (0.0, 0.40, 0.50, True),  # nothing found where every validation scan was 40-50 % foreground
    (0.25, 0.40, 0.50, False),  # under half of the smallest would be 0.2
    (0.008, 0.001, 0.002, False),  # 4x a rare class, but under 10 points: noise, not drift
])
def test_far_by_hand(fraction, low, high, far):
    assert is_far(fraction, low, high) is far


def test_foreground_drift_uses_reference_and_predicted_fractions():
    drift = foreground_drift(0.97, VALIDATION)
    assert (drift.low, drift.high, drift.far) == (0.08, 0.30, True)
    assert "97.0%" in drift.message and "8.0%-30.0%" in drift.message
    assert foreground_drift(0.2, VALIDATION).far is False
    assert foreground_drift(0.97, None) is None  # a model without recorded validation fractions: no check


class _Constant(torch.nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x):
        logits = torch.zeros((x.shape[0], 2, *x.shape[2:]))
        logits[:, self.k] = 4.0
        return logits


def test_the_engine_carries_the_validation_fractions_and_the_drift_is_read_from_the_prediction(tmp_path):
    ref = reference_volume()
    stores = {k: make_store(tmp_path, (ref > 0).astype(np.uint8), name=f"s{k}") for k in (0, 1)}
    card = ModelCard(classes=["background", "tumour"], validation_foreground=VALIDATION)
    for k, store in stores.items():  # one model predicting all background, one all foreground
        infer_scan(store, LoadedModel(_Constant(k), card, f"m{k}"), EngineConfig(tile=(8, 8, 8)))
        assert storage.read_record(f"{store}/prediction")["validation_foreground"] == VALIDATION
    assert prediction_drift(stores[1]).far and prediction_drift(stores[1]).fraction == 1.0
    assert prediction_drift(stores[0]).far is False  # nothing found: normal for a building model


def _drifted_store(tmp_path, name: str, everything: bool) -> str:
    ref = reference_volume()
    store = make_store(tmp_path, ref, name=name)
    write_prediction(store, np.full_like(ref, 2) if everything else ref)
    group = storage.open_group(f"{store}/prediction", mode="r+")
    group.attrs["tilewise"] = {**group.attrs["tilewise"], "validation_foreground": VALIDATION}
    return store


def test_evaluate_flags_drift_and_records_it_in_mlflow(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from models.registry import tracking_uri
    from tasks.reports import evaluate_and_report

    monkeypatch.setenv("TILEWISE_HOME", str(tmp_path / "home"))
    bad, good = _drifted_store(tmp_path, "bad", True), _drifted_store(tmp_path, "good", False)
    report, _, run_id = evaluate_and_report(bad)
    assert report.drift["far"] and report.drift["fraction"] == 1.0
    run = MlflowClient(tracking_uri()).get_run(run_id)
    assert "far outside" in run.data.tags["tilewise.drift"]
    assert run.data.metrics["drift"] == 1.0 and run.data.metrics["foreground_fraction"] == 1.0
    report, _, run_id = evaluate_and_report(good)
    foreground = float((reference_volume() > 0).mean())
    assert report.drift["far"] is False and report.drift["fraction"] == pytest.approx(foreground)
    assert MlflowClient(tracking_uri()).get_run(run_id).data.tags["tilewise.drift"] == "none"
    # the stored evaluation carries it too (what the nightly reads back)
    assert storage.read_record(f"{bad}/prediction")["evaluation"]["drift"]["far"] is True


def test_evaluate_cli_prints_the_warning(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.setenv("TILEWISE_HOME", str(tmp_path / "home"))
    store = _drifted_store(tmp_path, "bad", True)
    result = CliRunner().invoke(app, ["evaluate", "--store", store, "--no-mlflow"])
    assert result.exit_code == 0, result.output
    assert "drift warning" in result.output and "far outside" in result.output


def test_nightly_summary_lists_and_records_drift(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from flows import summary
    from models.registry import tracking_uri

    monkeypatch.setenv("TILEWISE_HOME", str(tmp_path / "home"))
    bad, good = _drifted_store(tmp_path, "bad", True), _drifted_store(tmp_path, "good", False)
    outcomes = [ScanOutcome("synthetic", name, "infer", "inferred", store, model="models:/x/1",
                            output=f"{store}/prediction") for name, store in (("bad", bad), ("good", good))]
    text = summary.markdown("nightly", outcomes)
    assert "## Drift warnings" in text
    warnings = text.split("## Drift warnings")[1]
    assert "synthetic/bad" in warnings and "synthetic/good" not in warnings
    run_id = summary.start_mlflow_run("synthetic", "nightly")
    summary.finish_mlflow_run(run_id, outcomes, "models:/x/1", 1.0)
    run = MlflowClient(tracking_uri()).get_run(run_id)
    assert run.data.tags["tilewise.drift"].startswith("bad: foreground on 100.0%")
    assert run.data.metrics["scans_drifted"] == 1.0
    assert run.data.metrics["bad.drift"] == 1.0 and run.data.metrics["good.drift"] == 0.0
    assert run.data.metrics["bad.foreground_fraction"] == 1.0
