"""A model that holds up on scenes unlike its training scenes (issue 19): per-scan percentile
normalisation (card, statistics, engine, training), photometric augmentation, and the end-of-training
check that refuses to promote a model predicting one class everywhere on a validation scan."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import zarr
from monai.inferers import sliding_window_inference

from models.card import ModelCard, Normalization
from tasks import storage
from tasks.engine.infer import EngineConfig, infer_scan
from tasks.engine.model_io import LoadedModel
from tasks.engine.scan_stats import scan_percentiles
from tasks.ingest import ScanSpec, ingest_scan
from tasks.ingest.discover import LabelSpec

PERCENTILE = Normalization(kind="scan_percentile", percentiles=[1.0, 99.0])


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def geotiff_store(tmp_path: Path, array: np.ndarray, name: str, nodata: float | None = None,
                  labels: np.ndarray | None = None, chunks=(32, 32)) -> str:
    """A complete satellite scan group of ``array`` (C, Y, X), through the real ingest."""
    src = tmp_path / f"{name}.tif"
    with rasterio.open(src, "w", driver="GTiff", width=array.shape[2], height=array.shape[1], count=array.shape[0],
                       dtype=array.dtype, nodata=nodata) as dst:
        dst.write(array)
    label_spec = None
    if labels is not None:
        lab = tmp_path / f"{name}_labels.tif"
        with rasterio.open(lab, "w", driver="GTiff", width=labels.shape[1], height=labels.shape[0], count=1,
                           dtype="uint8") as dst:
            dst.write(labels[None].astype(np.uint8))
        label_spec = LabelSpec((lab,), {0: 0, 1: 1}, ("background", "building"))
    store = str(tmp_path / f"{name}.zarr")
    with pytest.warns(UserWarning):  # no CRS: a plain raster
        ingest_scan(ScanSpec(name, "satellite", (src,), dataset="synthetic", chunks=chunks, labels=label_spec), store)
    return store


# ------------------------------------------------------------------------------------ the card


def test_scan_percentile_needs_the_scans_statistics_and_resolves_to_minmax():
    batch = np.array([[[[0.0, 50.0]], [[10.0, 30.0]]]], np.float32)  # (1, 2, 1, 2)
    with pytest.raises(ValueError, match="per-scan"):
        PERCENTILE.apply(batch.copy())
    resolved = PERCENTILE.for_scan([0.0, 10.0], [100.0, 30.0])
    np.testing.assert_allclose(resolved.apply(batch.copy()), [[[[0.0, 0.5]], [[0.0, 1.0]]]])
    # a constant channel (a scan all nodata) keeps a unit range instead of dividing by zero
    flat = PERCENTILE.for_scan([7.0], [7.0])
    np.testing.assert_allclose(flat.apply(np.full((1, 1, 2, 2), 7.0, np.float32)), 0.0)
    # the card round-trips (what the registry stores)
    stored = ModelCard(normalization=PERCENTILE).model_dump_json()
    assert ModelCard.model_validate_json(stored).normalization == PERCENTILE


# ------------------------------------------------------------------------------------ statistics


def test_scan_percentiles_leave_declared_nodata_out(tmp_path):
    # band 0 holds 1..100 on the valid pixels, band 1 twice that; the rest is the declared nodata 0
    image = np.zeros((2, 20, 20), np.uint8)
    values = np.arange(1, 101, dtype=np.uint8).reshape(10, 10)
    image[0, :10, :10], image[1, :10, :10] = values, values * 2
    store = geotiff_store(tmp_path, image, "swath", nodata=0)
    low, high, level = scan_percentiles(store, [1.0, 99.0])
    # numpy's linear percentiles of 1..100: 1.99 and 99.01 (of the 100 valid values, not the 400 pixels)
    np.testing.assert_allclose(low, [1.99, 3.98])
    np.testing.assert_allclose(high, [99.01, 198.02])
    assert level == 0
    # undeclared, all bands 0 in an unsigned-integer image is fill too (SpaceNet chip 57)
    np.testing.assert_allclose(scan_percentiles(geotiff_store(tmp_path, image, "plain"), [1.0, 99.0])[0], [1.99, 3.98])
    # but a float image's zeros are values: the empty three quarters count and the 1st percentile is 0
    floats = geotiff_store(tmp_path, image.astype(np.float32), "floats")
    assert scan_percentiles(floats, [1.0, 99.0])[0] == [0.0, 0.0]


# ------------------------------------------------------------------------------------ the engine


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Tanh(),
                               torch.nn.Conv2d(4, 2, 3, padding=1)).eval()


def test_engine_normalises_each_scan_with_its_own_percentiles(tmp_path):
    rng = np.random.default_rng(3)
    dark = rng.integers(20, 120, (3, 48, 40)).astype(np.uint8)
    bright = (dark.astype(np.int16) * 3 // 2 + 40).astype(np.uint8)  # the same ground, other gain and offset
    net = _net()
    model = LoadedModel(net, ModelCard(normalization=PERCENTILE, classes=["background", "building"]), "m")
    config = EngineConfig(tile=(32, 32), overlap=0.5, output_dtype="float32", placement="monai", pad="reflect")
    stores = [geotiff_store(tmp_path, a, n) for a, n in ((dark, "dark"), (bright, "bright"))]
    for store in stores:
        infer_scan(store, model, config)
    # what the engine must have fed the network: the scan minus its 1st percentile over the 1st-99th range
    lo, hi = np.percentile(dark.reshape(3, -1).astype(np.float64), [1, 99], axis=1)
    x = (dark - lo[:, None, None]) / (hi - lo)[:, None, None]
    with torch.no_grad():
        ref = torch.softmax(sliding_window_inference(torch.from_numpy(x.astype(np.float32))[None], (32, 32), 4, net,
                                                     overlap=0.5, mode="gaussian", padding_mode="reflect"), 1)[0]
    dark_p = zarr.open_array(f"{stores[0]}/prediction/probabilities")[:]
    assert np.abs(dark_p - ref.numpy()).max() <= 1e-4
    # an affine brightness change of the scene leaves the prediction as it was (up to uint8 rounding)
    assert np.abs(zarr.open_array(f"{stores[1]}/prediction/probabilities")[:] - dark_p).max() <= 0.05
    # the scan's statistics are in the prediction's parameters (and so in its digest)
    params = storage.read_record(f"{stores[0]}/prediction")["params"]["scan_normalization"]
    np.testing.assert_allclose(params["low"], lo)
    np.testing.assert_allclose(params["high"], hi)


def test_a_zscore_card_keeps_its_digest_and_records_no_scan_statistics(tmp_path):
    """Old models keep their predictions: nothing per scan enters the parameters of a z-score card."""
    from tasks import identity

    store = geotiff_store(tmp_path, np.full((3, 32, 32), 9, np.uint8), "old")
    card = ModelCard(normalization=Normalization(kind="zscore", mean=[1.0] * 3, std=[2.0] * 3))
    config = EngineConfig(tile=(32, 32), output_dtype="float32")
    infer_scan(store, LoadedModel(_net(), card, "old-model"), config)
    record = storage.read_record(f"{store}/prediction")
    assert "scan_normalization" not in record["params"]
    assert record["digest"] == identity.prediction_digest("old-model", config.result_fields(), [32, 32], "none", None)


# ------------------------------------------------------------------------------------ training


def test_training_patches_are_normalised_as_the_engine_normalises_their_scan(tmp_path):
    from tasks.training.data import PatchSampler, Region, ScanArrays, open_training_scan, per_scan_normalised

    rng = np.random.default_rng(1)
    arrays = {}
    for name, gain in (("a", 1), ("b", 2)):
        image = (rng.integers(0, 100, (3, 40, 40)) * gain).astype(np.uint8)
        store = geotiff_store(tmp_path, image, name, labels=np.zeros((40, 40), np.uint8))
        scan = per_scan_normalised([open_training_scan(store, 2)], PERCENTILE)[0]
        assert isinstance(scan, ScanArrays)
        arrays[store] = (scan, image)
    for store, (scan, image) in arrays.items():
        sampler = PatchSampler([Region(store, (slice(0, 40), slice(0, 40)))], {store: scan}, (16, 16), seed=0)
        patch, _ = sampler.read(Region(store, (slice(0, 40), slice(0, 40))), (4, 8))
        lo, hi = np.percentile(image.reshape(3, -1).astype(np.float64), [1, 99], axis=1)
        expected = (image[:, 4:20, 8:24] - lo[:, None, None]) / (hi - lo)[:, None, None]
        np.testing.assert_allclose(patch, expected, rtol=1e-5, atol=1e-5)
        # constant padding beyond the scan: the normalised value of the engine's raw 0
        sampler.pad = "constant"
        padded, _ = sampler.read(Region(store, (slice(0, 40), slice(0, 40))), (30, 30))
        np.testing.assert_allclose(padded[:, -1, -1], -lo / (hi - lo), rtol=1e-5)


def test_photometric_augmentation_changes_each_band_on_its_own():
    from tasks.training.loop import TrainConfig, _augment

    image = np.ones((3, 32, 32), np.float32)
    ratios = []
    for photometric in (False, True):
        config = TrainConfig("deeplab", 2, (32, 32), 3, ("background", "building"), photometric=photometric)
        augment = _augment(config)
        augment.set_random_state(seed=0)
        out = [np.asarray(augment({"image": image.copy(), "label": np.zeros((1, 32, 32), np.float32)})["image"])
               for _ in range(40)]
        # band 0 over band 1: 1 unless the bands were changed differently (colour balance)
        ratios.append(np.array([o[0].mean() / o[1].mean() for o in out]))
    assert np.allclose(ratios[0], 1.0)  # the geometric and whole-patch jitter keep the bands together
    assert ratios[1].std() > 0.1 and (np.abs(ratios[1] - 1) > 0.1).mean() > 0.3


def test_catalog_auto_chooses_per_scan_normalisation_for_satellite_and_photometric_only_when_asked():
    from data_catalog.schema import CatalogEntry
    from tasks.training.train import _per_scan_normalization, _photometric

    def entry(modality, **training):
        return CatalogEntry.model_validate({"name": "x", "modality": modality, "scans": {"path": "*.tif"},
                                            "training": training})

    assert _per_scan_normalization(entry("satellite"), "deeplab") == PERCENTILE
    assert _per_scan_normalization(entry("satellite"), "maskrcnn") is None  # its detector applies the card per tile
    assert _per_scan_normalization(entry("em"), "unet") is None
    assert _per_scan_normalization(entry("satellite", normalization="zscore"), "deeplab") is None
    assert _photometric(entry("satellite", photometric="on"), "deeplab")
    assert not _photometric(entry("satellite"), "deeplab")  # off unless asked for (it cost held-out IoU)


# ------------------------------------------------------------------------------------ end of training


def test_degenerate_scans_by_hand():
    from tasks.training.champion_check import degenerate_scans, foreground_fractions

    fractions = {
        "all_building": {"reference": [0.8, 0.2], "predicted": [0.0, 1.0]},
        "nearly_all": {"reference": [0.7, 0.3], "predicted": [0.0005, 0.9995]},
        "building_free_scene": {"reference": [1.0, 0.0], "predicted": [1.0, 0.0]},  # right to be one class
        "fine": {"reference": [0.7, 0.3], "predicted": [0.75, 0.25]},
        "nothing_found": {"reference": [0.9, 0.1], "predicted": [1.0, 0.0]},
    }
    found = degenerate_scans(fractions, ["background", "building"])
    assert [f.split(":")[0] for f in found] == ["all_building", "nearly_all", "nothing_found"]
    assert "building" in found[0]
    assert foreground_fractions({"s": {"reference": [0.75, 0.25], "predicted": [0.5, 0.5]}}) == \
        {"s": {"reference": 0.25, "predicted": 0.5}}


class _AllBuilding(torch.nn.Module):
    """A degenerate network: building everywhere, whatever it sees."""

    def forward(self, x):
        logits = torch.zeros((x.shape[0], 2, *x.shape[2:]))
        logits[:, 1] = 5.0
        return logits


@pytest.fixture
def own_home(tmp_path, monkeypatch):
    import os

    import mlflow

    original = os.environ.get("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("TILEWISE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("TILEWISE_STORE_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    monkeypatch.undo()
    mlflow.set_tracking_uri(original)


def _chips_catalog(tmp_path: Path) -> Path:
    """Three small synthetic RGB chips with square buildings, as a catalog entry."""
    rng = np.random.default_rng(0)
    (tmp_path / "chips/images").mkdir(parents=True)
    (tmp_path / "chips/masks").mkdir(parents=True)
    for i in range(3):
        mask = np.zeros((48, 48), np.uint8)
        mask[8:20, 10:24] = mask[30:42, 28:40] = 255
        image = (rng.integers(30, 90, (3, 48, 48)) + (mask > 0) * 80).astype(np.uint8)
        for folder, array in (("images", image), ("masks", mask[None])):
            with rasterio.open(tmp_path / f"chips/{folder}/c{i}.tif", "w", driver="GTiff", width=48, height=48,
                               count=array.shape[0], dtype="uint8") as dst:
                dst.write(array)
    (tmp_path / "catalog").mkdir()
    (tmp_path / "catalog/chips.yaml").write_text(f"""name: chips
modality: satellite
scans: {{path: "{tmp_path}/chips/images/*.tif"}}
labels: {{path: "{{dir}}/../masks/{{name}}", mapping: {{0: 0, 255: 1}}, classes: [background, building]}}
model: {{name: chips-deeplab, architecture: deeplab}}
tiling: {{tile: [32, 32], overlap: 0.5}}
calibration: {{method: none}}
""")
    return tmp_path / "catalog"


def test_train_refuses_to_promote_a_model_that_paints_a_validation_scan_one_class(own_home, monkeypatch, caplog):
    import mlflow.models
    from mlflow import MlflowClient

    import tasks.training.train as train
    from data_catalog import find_entry
    from models import registry
    from tasks.training.loop import TrainOutcome

    monkeypatch.setattr(mlflow.models, "infer_pip_requirements",
                        lambda model_uri, flavor, fallback=None, **kw: list(fallback or []))
    catalog = _chips_catalog(own_home)
    loaded = find_entry("chips", catalog)
    from tasks.ingest import discover_scans
    from tasks.settings import scan_store

    for spec in discover_scans(loaded):
        with pytest.warns(UserWarning):
            ingest_scan(spec, scan_store("chips", spec.scan_id))

    def degenerate(config, sampler, validation, arrays, normalise, on_epoch=None, network=None, frozen=None):
        real = network  # the registry stores the DeepLab's weights; the check sees what it predicts
        real.forward = _AllBuilding().forward
        return TrainOutcome(real, "val_dice", 0.9, 0, [{"epoch": 0, "train_loss": 0.1, "val_dice": 0.9}],
                            "epochs done", 1.0)

    monkeypatch.setattr(train, "train_semantic", degenerate)
    with caplog.at_level(logging.WARNING, logger="tasks.training.train"):
        report = train.train_dataset(loaded, epochs=1, max_minutes=1)
    assert report.alias == "challenger" and report.decision.startswith("not promoted")
    assert "one class everywhere" in report.decision and "building" in report.decision
    assert any("not promoted" in r.getMessage() for r in caplog.records)
    c = MlflowClient(registry.tracking_uri())
    assert not (c.get_registered_model("chips-deeplab").aliases or {}).get("champion")
    # the card records what each validation scan held and what the model predicted there
    card = registry.registered_weights("models:/chips-deeplab/1")[0]
    # three chips: each validates on a slab of 12 of its 48 rows holding nearest a quarter of its
    # 12 * 14 + 12 * 12 building pixels (78): 72 or 84 tie at 6, the last such slab is rows 36-47
    # (rows 36-41 of the second building, 12 pixels each): 72 of 12 * 48 pixels
    assert sorted(card.validation_foreground) == ["c0", "c1", "c2"]
    for fractions in card.validation_foreground.values():
        assert fractions["predicted"] == 1.0
        assert fractions["reference"] == pytest.approx(72 / (12 * 48), abs=1e-6)
    assert card.normalization.kind == "scan_percentile"


def test_a_nightly_whose_first_model_is_refused_ingests_warns_and_infers_nothing(own_home, monkeypatch,
                                                                                  prefect_server):
    """make run on a slow machine: the 1.5-minute bootstrap model painted every validation chip one
    class, was registered but not promoted, and the nightly failed with "@champion does not
    resolve". Now the dataset's inference is skipped with the reason and what to do, nothing is
    predicted, and the run still succeeds."""
    import mlflow.models
    from typer.testing import CliRunner

    import tasks.training.train as train
    from flows.cli import app
    from tasks.settings import scan_store
    from tasks.training.loop import TrainOutcome

    monkeypatch.setattr(mlflow.models, "infer_pip_requirements",
                        lambda model_uri, flavor, fallback=None, **kw: list(fallback or []))
    catalog = _chips_catalog(own_home)

    def degenerate(config, sampler, validation, arrays, normalise, on_epoch=None, network=None, frozen=None):
        network.forward = _AllBuilding().forward
        return TrainOutcome(network, "val_dice", 0.9, 0, [{"epoch": 0, "train_loss": 0.1, "val_dice": 0.9}],
                            "epochs done", 1.0)

    monkeypatch.setattr(train, "train_semantic", degenerate)
    result = CliRunner().invoke(app, ["run", "nightly", "--catalog", str(catalog)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "does not resolve" not in result.output
    assert "chips: infer skipped: no model at models:/chips-deeplab@champion" in result.output, result.output
    assert "not promoted" in result.output and "tilewise train chips" in result.output
    for chip in ("c0", "c1", "c2"):
        assert storage.is_complete(scan_store("chips", chip)) and not storage.exists(scan_store("chips", chip)
                                                                                       + "/prediction")
