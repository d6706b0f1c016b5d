"""Calibration: the monotone cubic (exact derivative check), isotonic, temperature, the scores
(hand-worked and scikit-learn), the choice between candidates, bad input, the engine applying a
calibrator per chunk with the digest, and (slow) a trained model's calibrator in MLflow."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from numpy.polynomial import Polynomial

from tasks.calibration.calibrator import CalibrationSample, Calibrator, fit_calibrator
from tasks.calibration.cubic import cubic_apply, derivative_coefficients, fit_monotone_cubic
from tasks.calibration.methods import apply_method, fit_method
from tasks.calibration.scores import CalibrationError, ReliabilityBins
from tasks.errors import ScanError


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _miscalibrated(n: int, seed: int, sharpen: float = 3.0):
    """Labels drawn from true probability q; the 'model' reports sigmoid(sharpen * logit q)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, n)
    y = (rng.random(n) < _sigmoid(z)).astype(np.int64)
    p = _sigmoid(sharpen * z)
    return np.stack([1 - p, p]).astype(np.float32), y


def _power_basis(coeffs) -> Polynomial:
    """The Bernstein cubic as a power-basis polynomial, built independently of cubic.py."""
    s, one_minus = Polynomial([0, 1]), Polynomial([1, -1])
    binom = [1, 3, 3, 1]
    return sum(c * b * s ** i * one_minus ** (3 - i) for i, (c, b) in enumerate(zip(coeffs, binom)))


# ---------------------------------------------------------------- the cubic


@pytest.mark.parametrize("seed", range(60))
def test_fitted_cubic_is_monotone_on_the_whole_interval(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    kind = seed % 4
    s = rng.random(n) ** rng.uniform(0.3, 3)
    if kind == 0:  # labels anti-correlated with the score: the fit must still not decrease
        y = (rng.random(n) < 1 - s).astype(float)
    elif kind == 1:  # steep: pushes c_3 above 1 and c_0 below 0 when unconstrained
        y = (s > rng.uniform(0.2, 0.8)).astype(float)
    elif kind == 2:
        y = (rng.random(n) < np.sin(6 * s) ** 2).astype(float)
    else:
        y = rng.integers(0, 2, n).astype(float)
    w = rng.uniform(0.1, 5, n) if seed % 3 == 0 else None
    c = fit_monotone_cubic(s, y, w)
    assert c.shape == (4,)
    # exact: the derivative's Bernstein coefficients are >= 0, the coefficients within [0, 1]
    assert (derivative_coefficients(c) >= 0).all(), c
    assert c[0] >= 0 and c[3] <= 1
    # independently: f' in power basis is a quadratic; its minimum on [0, 1] is at an end or its vertex
    d = _power_basis(c).deriv()
    points = [0.0, 1.0] + [float(r.real) for r in d.deriv().roots() if 0 <= r.real <= 1]
    assert min(d(x) for x in points) >= -1e-12
    f = _power_basis(c)
    ends = [0.0, 1.0] + [float(r.real) for r in d.roots() if abs(r.imag) < 1e-12 and 0 <= r.real <= 1]
    assert min(f(x) for x in ends) >= -1e-12 and max(f(x) for x in ends) <= 1 + 1e-12
    assert np.allclose(cubic_apply(c, s), f(s), atol=1e-12)


def test_cubic_is_the_constrained_least_squares_optimum():
    """Against scipy's SLSQP on the same problem written with explicit inequality constraints."""
    from scipy.optimize import minimize

    from tasks.calibration.cubic import bernstein_basis

    for seed in range(8):
        rng = np.random.default_rng(100 + seed)
        s = rng.random(300)
        y = (s > 0.5).astype(float) if seed % 2 else (rng.random(300) < s ** 2).astype(float)
        c = fit_monotone_cubic(s, y)
        b = bernstein_basis(s)
        cons = [{"type": "ineq", "fun": lambda x, i=i: x[i + 1] - x[i]} for i in range(3)]
        cons += [{"type": "ineq", "fun": lambda x: x[0]}, {"type": "ineq", "fun": lambda x: 1 - x[3]}]
        ref = minimize(lambda x: ((b @ x - y) ** 2).sum(), np.linspace(0.2, 0.8, 4), constraints=cons,
                       method="SLSQP", options={"ftol": 1e-14, "maxiter": 500}).x
        assert ((b @ c - y) ** 2).sum() <= ((b @ ref - y) ** 2).sum() + 1e-8


@pytest.mark.parametrize("seed", range(60))
def test_cubic_of_a_degenerate_model_is_exactly_monotone(seed):
    # A model that gives (nearly) the same score everywhere: the fit is (nearly) the base rate and
    # the solver sits on its bounds, where it may return -1e-17 (seen on a fresh clone, spacenet).
    rng = np.random.default_rng(seed)
    s = rng.random(2000) * 1e-3
    y = (rng.random(2000) < 0.11).astype(float)
    c = fit_monotone_cubic(s, y)
    assert (np.diff(c) >= 0).all() and c[0] >= 0 and c[3] <= 1, c


def test_cubic_recovers_an_exact_monotone_cubic():
    s = np.linspace(0, 1, 200)
    truth = np.array([0.05, 0.1, 0.7, 0.9])
    assert np.allclose(fit_monotone_cubic(s, cubic_apply(truth, s)), truth, atol=1e-9)


# ---------------------------------------------------------------- scores


def test_scores_hand_worked():
    # 4 pixels, 2 classes. top-label confidences 0.9 (right), 0.6 (wrong), 0.8 (right), 0.55 (right)
    probs = np.array([[0.1, 0.6, 0.8, 0.45], [0.9, 0.4, 0.2, 0.55]])
    labels = np.array([1, 1, 0, 1])
    s = ReliabilityBins(bins=15).update(probs, labels).scores()
    # bins: 0.9 -> 13 ([13/15, 14/15) = [0.8667, 0.9333)); 0.6 -> 9; 0.8 -> 12; 0.55 -> 8
    # each bin holds one pixel: ECE = (|1-0.9| + |0-0.6| + |1-0.8| + |1-0.55|) / 4
    assert s["ece"] == pytest.approx((0.1 + 0.6 + 0.2 + 0.45) / 4)
    # Brier: sum_k (p_k - y_k)^2 per pixel: 0.02, 0.72, 0.08, 0.405
    assert s["brier"] == pytest.approx((0.02 + 0.72 + 0.08 + 0.405) / 4)
    assert s["nll"] == pytest.approx(-(np.log(0.9) + np.log(0.4) + np.log(0.8) + np.log(0.55)) / 4)
    assert s["pixels"] == 4


def test_bin_edges_are_left_closed_and_the_last_bin_closed():
    bins = ReliabilityBins(15)
    conf = np.array([0.0, 1 / 15, 2 / 15 - 1e-12, 14 / 15, 1.0, 7 / 15])
    assert bins.bin_of(conf).tolist() == [0, 1, 1, 14, 14, 7]
    # two pixels in one bin: confidences 0.9 and 0.92 (both in bin 13), one right: |0.5 - 0.91|
    s = ReliabilityBins(15).update(np.array([[0.1, 0.92], [0.9, 0.08]]), np.array([1, 1])).scores()
    assert s["ece"] == pytest.approx(0.41)


def test_scores_match_sklearn_and_stream_exactly():
    from sklearn.metrics import brier_score_loss, log_loss

    rng = np.random.default_rng(3)
    for k in (2, 4):
        z = rng.normal(size=(k, 5000))
        p = np.exp(z) / np.exp(z).sum(0)
        y = rng.integers(0, k, 5000)
        whole = ReliabilityBins().update(p, y)
        s = whole.scores()
        assert s["nll"] == pytest.approx(log_loss(y, p.T, labels=list(range(k))), rel=1e-9)
        if k == 2:  # sklearn's binary Brier scores p_1 only: ours (sum over both classes) is twice it
            assert s["brier"] == pytest.approx(2 * brier_score_loss(y, p[1]), rel=1e-9)
        onehot = np.eye(k)[y].T
        assert s["brier"] == pytest.approx(((p - onehot) ** 2).sum(0).mean(), rel=1e-12)
        # ECE by an independent loop over bins
        conf, top = p.max(0), p.argmax(0)
        idx = np.minimum((conf * 15).astype(int), 14)  # no confidence here sits on an edge
        ece = sum(abs((top[idx == b] == y[idx == b]).mean() - conf[idx == b].mean()) * (idx == b).mean()
                  for b in range(15) if (idx == b).any())
        assert s["ece"] == pytest.approx(ece, rel=1e-9)
        streamed, merged = ReliabilityBins(), ReliabilityBins()
        for lo in range(0, 5000, 777):
            streamed.update(p[:, lo: lo + 777], y[lo: lo + 777])
            merged.merge(ReliabilityBins().update(p[:, lo: lo + 777], y[lo: lo + 777]))
        for other in (streamed, merged):
            o = other.scores()
            assert o["pixels"] == s["pixels"]
            for key in ("ece", "brier", "nll"):
                assert o[key] == pytest.approx(s[key], rel=1e-12)
            assert np.array_equal(other.count, whole.count)


def test_nan_probabilities_are_a_one_line_error():
    p = np.array([[0.5, np.nan], [0.5, 0.3]])
    with pytest.raises(ScanError, match="NaN") as err:
        ReliabilityBins().update(p, np.array([0, 1]))
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- methods and the choice


def test_ece_falls_on_a_miscalibrated_model():
    probs, y = _miscalibrated(40000, seed=1)
    tile = np.repeat(np.arange(40), 1000)
    cal = fit_calibrator(CalibrationSample(probs, y, ["bg", "fg"], tile=tile))
    chosen = cal.candidates[cal.method]
    assert cal.method != "identity"
    assert chosen["after"]["ece"] < 0.35 * chosen["before"]["ece"]
    assert chosen["after"]["nll"] < chosen["before"]["nll"]
    for name in ("cubic", "isotonic", "temperature", "identity"):
        assert "after" in cal.candidates[name]
    fresh_p, fresh_y = _miscalibrated(20000, seed=2)
    before = ReliabilityBins().update(fresh_p, fresh_y).scores()
    after = ReliabilityBins().update(cal.apply(fresh_p), fresh_y).scores()
    assert after["ece"] < 0.35 * before["ece"]
    # every pixel scored once, out of fold, by tile
    assert chosen["after"]["pixels"] == chosen["before"]["pixels"] == y.size
    assert cal.fitted_on["scored_by"] == "3-fold cross-validation by tile (40 tiles)"


def test_each_binary_method_output_in_unit_interval_and_monotone():
    probs, y = _miscalibrated(5000, seed=4)
    w = np.ones(y.size)
    grid = np.linspace(0, 1, 1001, dtype=np.float32)
    for method in ("cubic", "isotonic", "temperature"):
        params = fit_method(method, probs, y, w)
        out = apply_method(method, params, np.stack([1 - grid, grid]))
        assert out.dtype == np.float32 and out.shape == (2, grid.size)
        assert (out >= 0).all() and (out <= 1).all()
        assert np.allclose(out.sum(0), 1, atol=1e-6)
        assert (np.diff(out[1].astype(np.float64)) >= -1e-7).all(), method
    iso = fit_method("isotonic", probs, y, w)
    assert (np.diff(iso["y"]) >= 0).all() and (np.diff(iso["x"]) > 0).all()
    # K == 1 (a sigmoid output) uses p[0] as the score
    one = apply_method("cubic", fit_method("cubic", probs[1:], y, w), grid[None])
    assert one.shape == (1, grid.size)


def test_temperature_recovers_a_known_temperature():
    rng = np.random.default_rng(7)
    k, n = 4, 30000
    z = rng.normal(0, 2, (k, n))
    true_p = np.exp(z) / np.exp(z).sum(0)
    y = (rng.random(n)[None] > np.cumsum(true_p, 0)).sum(0)  # a draw from true_p per pixel
    over = np.exp(2.5 * z) / np.exp(2.5 * z).sum(0)  # over-confident: logits scaled by 2.5
    t = fit_method("temperature", over, y, np.ones(n))["temperature"]
    assert t == pytest.approx(2.5, rel=0.05)
    cal = fit_calibrator(CalibrationSample(over.astype(np.float32), y, list("abcd")), method="auto")
    assert cal.method in ("temperature", "ovr-cubic")
    assert set(cal.candidates) == {"temperature", "ovr-cubic", "identity"}
    out = cal.apply(over.reshape(k, 100, 300).astype(np.float32))
    assert out.shape == (k, 100, 300) and out.dtype == np.float32
    assert np.allclose(out.sum(0), 1, atol=1e-5)


def test_ovr_cubic_renormalises_and_json_round_trip():
    rng = np.random.default_rng(8)
    z = rng.normal(0, 2, (3, 6000))
    p = (np.exp(2 * z) / np.exp(2 * z).sum(0)).astype(np.float32)
    y = (rng.random(6000)[None] > np.cumsum(np.exp(z) / np.exp(z).sum(0), 0)).sum(0)
    cal = fit_calibrator(CalibrationSample(p, y, ["a", "b", "c"]), method="ovr-cubic")
    assert cal.method == "ovr-cubic"
    for coeffs in cal.params["coefficients"]:
        assert (np.diff(coeffs) >= 0).all()
    out = cal.apply(p.reshape(3, 60, 100))
    assert np.allclose(out.sum(0), 1, atol=1e-5)
    back = Calibrator.from_json(cal.to_json())
    assert back == cal and back.sha256 == cal.sha256
    assert np.array_equal(back.apply(p), cal.apply(p))
    assert json.loads(cal.to_json())["method"] == "ovr-cubic"


@pytest.mark.parametrize("case, problem", [
    ("constant", "scores are constant"),
    ("one class", "single class"),
    ("nan", "NaN"),
])
def test_bad_samples_give_one_line_errors(case, problem):
    probs, y = _miscalibrated(500, seed=5)
    if case == "constant":
        probs = np.full_like(probs, 0.5)
    elif case == "one class":
        y = np.zeros_like(y)
    else:
        probs[1, 17] = np.nan
    with pytest.raises(CalibrationError, match=problem) as err:
        fit_calibrator(CalibrationSample(probs, y, ["bg", "fg"]))
    assert "\n" not in str(err.value)
    assert isinstance(err.value, ScanError)


def test_binary_method_on_multiclass_is_refused():
    p = np.full((3, 10), 1 / 3, np.float32)
    p[0, :5] = 0.5
    p[1, :5] = 0.25
    p[2, :5] = 0.25
    with pytest.raises(CalibrationError, match="binary"):
        fit_calibrator(CalibrationSample(p, np.arange(10) % 3, ["a", "b", "c"]), method="cubic")


def test_reliability_diagram_writes_a_png(tmp_path):
    from PIL import Image

    from tasks.calibration.diagram import reliability_diagram

    probs, y = _miscalibrated(3000, seed=9)
    before = ReliabilityBins().update(probs, y)
    after = ReliabilityBins().update(fit_calibrator(CalibrationSample(probs, y, ["bg", "fg"])).apply(probs), y)
    path = reliability_diagram(before, after, tmp_path / "r.png", "test")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert not list(tmp_path.glob(".*tmp*"))


# ---------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def engine_scan(tmp_path_factory):
    from tests.test_engine import conv_net, make_scan

    tmp = tmp_path_factory.mktemp("calib-engine")
    rng = np.random.default_rng(0)
    store = make_scan(tmp, rng.normal(size=(1, 12, 20, 20)).astype(np.float32), (4, 8, 8))
    return store, conv_net(3, 1, 3, seed=1)


def test_engine_applies_the_calibrator_per_chunk_and_the_digest_follows_it(engine_scan):
    import zarr

    from tasks import storage
    from tasks.engine.infer import EngineConfig, infer_scan
    from tasks.engine.model_io import LoadedModel, ModelCard

    store, net = engine_scan
    config = EngineConfig(tile=(8, 8, 8), output_dtype="float32")
    model = LoadedModel(net, ModelCard(), "toy")

    def record():
        return storage.read_record(f"{store}/prediction")

    def probs():
        return zarr.open_array(f"{store}/prediction/probabilities", mode="r")[...]

    assert infer_scan(store, model, config).status == "inferred"
    raw, raw_digest = probs(), record()["digest"]
    assert record()["calibrator"] == "none"
    hot = Calibrator("temperature", {"temperature": 0.4}, ["a", "b", "c"])
    assert infer_scan(store, model, config, calibrator=hot).status == "inferred"  # replaced
    calibrated = probs()
    expected = hot.apply(raw)  # the whole map at once; the engine applied it chunk by chunk
    assert np.abs(calibrated - expected).max() < 1e-5
    assert np.allclose(calibrated.sum(0), 1, atol=1e-5)
    labels = zarr.open_array(f"{store}/prediction/labels", mode="r")[...]
    assert (labels == calibrated.argmax(0)).all()
    assert record()["calibrator"] == {"method": "temperature", "sha256": hot.sha256}
    assert record()["digest"] != raw_digest
    # the same calibrator again: nothing to do; given as the model version's own: the same map, no-op
    assert infer_scan(store, model, config, calibrator=hot).status == "unchanged"
    owned = LoadedModel(net, ModelCard(), "toy", calibrator=json.loads(hot.to_json()))
    assert infer_scan(store, owned, config).status == "unchanged"
    # another calibrator replaces; calibration=False gives back the raw prediction and its digest
    cool = Calibrator("temperature", {"temperature": 3.0}, ["a", "b", "c"])
    assert infer_scan(store, owned, config, calibrator=cool).status == "inferred"
    assert np.abs(probs() - cool.apply(raw)).max() < 1e-5
    assert infer_scan(store, owned, EngineConfig(tile=(8, 8, 8), output_dtype="float32", calibration=False)
                      ).status == "inferred"
    assert record()["digest"] == raw_digest and record()["calibrator"] == "none"
    assert np.array_equal(probs(), raw)
    # the model version's own calibrator is applied and named with its source
    assert infer_scan(store, owned, config).status == "inferred"
    assert record()["calibrator"] == {"method": "temperature", "sha256": hot.sha256, "uri": "toy"}
    assert np.abs(probs() - expected).max() < 1e-5


def test_engine_refuses_a_calibrator_for_other_classes(engine_scan):
    from tasks.engine.infer import EngineConfig, infer_scan
    from tasks.engine.model_io import LoadedModel, ModelCard

    store, net = engine_scan
    binary = Calibrator("cubic", {"coefficients": [0, 0.2, 0.8, 1]}, ["bg", "fg"])
    with pytest.raises(ScanError, match="calibrator is for 2 classes"):
        infer_scan(store, LoadedModel(net, ModelCard(), "toy-other"), EngineConfig(tile=(8, 8, 8)),
                   calibrator=binary)


# ---------------------------------------------------------------- trained, stored, loaded (slow)


@pytest.mark.slow
def test_training_stores_a_calibrator_with_the_version(tmp_path, monkeypatch):
    import mlflow
    import mlflow.models
    import torch

    from data_catalog import DEFAULT_CATALOG_DIR, find_entry
    from models import registry
    from tasks import storage
    from tasks.calibration.model_version import load_calibrator
    from tasks.engine.infer import EngineConfig, infer_scan
    from tasks.engine.model_io import load_model
    from tasks.ingest import discover_scans, ingest_scan
    from tasks.settings import scan_store
    from tasks.training.train import train_dataset

    # not mlflow.get_tracking_uri(): that returns MLflow's default (./mlflow.db), and setting it back
    # would export it and send every later test's runs into the repository
    original_uri = os.environ.get("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("TILEWISE_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("TILEWISE_STORE_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mlflow.models, "infer_pip_requirements",
                        lambda model_uri, flavor, fallback=None, **kw: list(fallback or []))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loaded = find_entry("spacenet_rio", DEFAULT_CATALOG_DIR)
        for spec in discover_scans(loaded):
            ingest_scan(spec, scan_store("spacenet_rio", spec.scan_id))
        # a 6-second model: the decision guard (tested above) could fall back to identity; this test
        # is about how the named method is stored and applied
        from tasks.calibration import calibrator as calibrator_module

        monkeypatch.setattr(calibrator_module, "DICE_TOLERANCE", 1.0)
        report = train_dataset(loaded, epochs=1, max_minutes=0.1)
        uri = f"models:/{report.registered}"
        assert report.calibration.startswith("cubic:"), report.calibration
        c = registry.client()
        version = c.get_model_version(*report.registered.split("/"))
        assert version.tags["calibrator.method"] == "cubic"
        assert "validation split (recorded at training)" in version.tags["calibrator.fitted_on"]
        for key in ("nll_before", "nll_after", "ece_before", "ece_after"):
            assert float(version.tags[f"calibrator.{key}"]) >= 0
        artifacts = {f.path for f in c.list_artifacts(version.run_id, "calibration")}
        assert "calibration/reliability.png" in artifacts
        cal = load_calibrator(uri)
        assert cal.method == "cubic" and version.tags["calibrator.sha256"] == cal.sha256
        assert (np.diff(cal.params["coefficients"]) >= 0).all()
        # the validation regions are the ones the split recorded (three chips: a slab of rows of
        # each), which the model never trained on
        scan_ids = [r["scan_id"] for r in cal.fitted_on["regions"]]
        assert len(scan_ids) == 3 and cal.fitted_on["regions_from"] == "recorded at training"
        assert all(r["box"][0][1] - r["box"][0][0] == 102 for r in cal.fitted_on["regions"])  # round(406 / 4)
        from models import calibrator_store
        from tasks.calibration.model_version import validation_regions

        recorded, how = validation_regions(uri, loaded)
        assert how == "recorded at training" and [r.box for r in recorded] == [
            tuple(slice(a, b) for a, b in r["box"]) for r in cal.fitted_on["regions"]]
        # versions trained before the split was recorded held out whole scans (one of three, chosen
        # by the run's seed): that split is recomputed for them, not today's
        monkeypatch.setattr(calibrator_store, "load_validation", lambda uri: None)
        recomputed, how = validation_regions(uri, loaded)
        assert how == "recomputed with the run's seed 0" and len(recomputed) == 1
        assert recomputed[0].box == (slice(0, 406), slice(0, 438))
        model = load_model(uri)
        assert model.calibrator is not None
        store = scan_store("spacenet_rio", scan_ids[0])
        infer_scan(store, model, EngineConfig(tile=(128, 128)))
        assert storage.read_record(f"{store}/prediction")["calibrator"] == {
            "method": "cubic", "sha256": cal.sha256, "uri": uri}
    finally:
        torch.set_num_threads(threads)
        monkeypatch.undo()
        mlflow.set_tracking_uri(original_uri)


def test_validation_sample_is_bounded_stratified_and_stays_in_its_region(tmp_path):
    """Labels outside the validation box are a sentinel class that must never be sampled; weighted
    class shares equal the box's class shares; at most ``per_class`` pixels per class."""
    import torch

    from tasks import storage
    from tasks.calibration.sample import sample_validation
    from tasks.engine.model_io import LoadedModel, ModelCard
    from tasks.training.data import Region
    from tests.test_engine import make_scan

    rng = np.random.default_rng(1)
    store = make_scan(tmp_path, rng.normal(size=(1, 60, 50)).astype(np.float32), (16, 16))
    labels = np.full((60, 50), 2, np.uint8)
    box = (slice(30, 60), slice(0, 50))
    inside = (rng.random((30, 50)) < 0.1).astype(np.uint8)
    labels[box] = inside
    group = storage.open_group(store, mode="r+")
    group.require_group("labels").create_array("reference", data=labels, chunks=(16, 16))
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 3, 3, padding=1).eval()
    sample = sample_validation(LoadedModel(net, ModelCard(), "toy"), [Region(store, box)], ["a", "b", "c"],
                               tiles=12, per_class=200, tile=(16, 16))
    assert 2 not in sample.labels
    counts = np.bincount(sample.labels, minlength=3)
    assert counts[0] == 200 and 0 < counts[1] <= 200
    share = np.bincount(sample.labels, weights=sample.weights, minlength=3) / sample.weights.sum()
    truth = np.bincount(inside.reshape(-1), minlength=3) / inside.size
    assert np.allclose(share, truth)
    assert sample.fitted_on["class_voxels_validation"] == {"a": int((inside == 0).sum()), "b": int(inside.sum()),
                                                          "c": 0}
    assert sample.probs.shape == (3, counts.sum()) and np.allclose(sample.probs.sum(0), 1, atol=1e-5)


def test_cli_calibrate_rejects_an_unknown_method():
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["calibrate", "isbi2012_em", "--method", "platt"])
    assert result.exit_code == 1
    assert "--method must be one of auto, cubic, isotonic, temperature, ovr-cubic" in result.output


def _rare_tumour_sample() -> CalibrationSample:
    """Background sampled at 1/400 of its frequency (weight 400), two rare classes whose raw scores
    separate them fairly well. Weighted, background outnumbers each class 400:1, so its calibrated
    posterior is ~0.99 almost everywhere: the argmax of any well-calibrated map calls no tumour."""
    rng = np.random.default_rng(0)
    n = 6000
    labels = np.repeat([0, 1, 2], n)
    z = rng.normal(0, 1, (3, 3 * n))
    z[labels, np.arange(3 * n)] += 1.6
    p = np.exp(z) / np.exp(z).sum(0)
    return CalibrationSample(p.astype(np.float32), labels, ["background", "a", "b"], np.repeat([400.0, 1.0, 1.0], n))


def test_auto_rules_out_a_map_that_erases_the_rare_classes():
    cal = fit_calibrator(_rare_tumour_sample())
    cubic = cal.candidates["ovr-cubic"]
    assert cubic["after"]["nll"] < cal.candidates["identity"]["after"]["nll"]  # it would win on NLL alone
    assert cubic["after"]["dice"] < 0.01 < cubic["before"]["dice"]
    assert "ruled_out" in cubic and cal.method == "temperature"
    assert "ruled out for worse decisions: ovr-cubic" in cal.chosen_because
    # temperature scaling keeps every argmax, so its decisions equal the raw ones
    assert cal.candidates["temperature"]["after"]["dice"] == pytest.approx(cubic["before"]["dice"])


def test_a_named_method_that_erases_the_rare_classes_falls_back_to_the_raw_probabilities():
    cal = fit_calibrator(_rare_tumour_sample(), method="ovr-cubic")
    assert cal.method == "identity" and "ruled_out" in cal.candidates["ovr-cubic"]
    assert cal.chosen_because.startswith("ovr-cubic requested, raw probabilities kept")
    assert apply_method(cal.method, cal.params, _rare_tumour_sample().probs[:, :5]) == pytest.approx(
        _rare_tumour_sample().probs[:, :5])


def test_a_named_method_is_kept_when_its_decisions_hold_even_if_identity_scores_a_lower_nll():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 4000)
    p1 = np.clip(np.where(labels == 1, 0.7, 0.3) + rng.normal(0, 0.1, 4000), 0.01, 0.99)
    sample = CalibrationSample(np.stack([1 - p1, p1]).astype(np.float32), labels, ["bg", "fg"])
    cal = fit_calibrator(sample, method="temperature")
    assert cal.method == "temperature" and set(cal.candidates) == {"temperature", "identity"}


def test_decision_dice_matches_scikit_learn_weighted_f1():
    from sklearn.metrics import f1_score

    from tasks.calibration.calibrator import DecisionCounts

    rng = np.random.default_rng(3)
    probs = rng.dirichlet([1, 1, 1, 1], 500).T
    labels = rng.integers(0, 4, 500)
    weights = rng.uniform(0.5, 3, 500)
    got = DecisionCounts().update(probs[:, :250], labels[:250], weights[:250]) \
        .update(probs[:, 250:], labels[250:], weights[250:]).foreground_dice()
    want = f1_score(labels, probs.argmax(0), labels=[1, 2, 3], average="macro", sample_weight=weights)
    assert got == pytest.approx(want)
