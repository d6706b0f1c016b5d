"""evaluate_scan end to end on small synthetic stores with a fake prediction; CLI; MLflow run."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import zarr
from sklearn.metrics import confusion_matrix
from typer.testing import CliRunner

from data_catalog.schema import CatalogEntry
from flows.cli import app
from tasks import storage
from tests.cli_output import without_home
from tasks.errors import ScanError
from tasks.ingest import ScanSpec, ingest_scan
from tasks.ingest.discover import LabelSpec
from tasks.ingest.to_zarr import COMPRESSOR
from tasks.metrics.evaluate import evaluate_scan
from tasks.metrics.semantic import fcn_scores
from tasks.metrics.surface import surface_scores

runner = CliRunner()

CLASSES = ["background", "core", "rim"]


def reference_volume(shape=(16, 24, 20)) -> np.ndarray:
    ref = np.zeros(shape, np.uint8)
    ref[4:12, 6:18, 5:15] = 2
    ref[6:10, 9:15, 8:12] = 1
    return ref


def make_store(tmp_path, ref: np.ndarray, name="scan", spacing=(2.0, 1.0, 1.0), chunks=(8, 8, 8)) -> str:
    """A complete MRI scan group (one channel) with labels/reference = ``ref``, via the real ingest."""
    rng = np.random.default_rng(0)
    image = (ref * 10 + rng.normal(0, 1, ref.shape)).astype(np.float32)
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])  # NIfTI (i, j, k) = (X, Y, Z)
    img_path, lab_path = tmp_path / f"{name}.nii.gz", tmp_path / f"{name}_labels.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(image), affine), img_path)
    nib.save(nib.Nifti1Image(np.transpose(ref), affine), lab_path)
    spec = ScanSpec(name, "mri", (img_path,), dataset="synthetic", chunks=chunks,
                    labels=LabelSpec((lab_path,), {0: 0, 1: 1, 2: 2}, tuple(CLASSES)))
    store = str(tmp_path / f"{name}.zarr")
    ingest_scan(spec, store)
    return store


def write_prediction(store: str, labels: np.ndarray, classes=CLASSES, complete=True, confidence=0.8) -> np.ndarray:
    """A fake prediction laid out as tasks/engine/infer.py writes it: probabilities putting
    ``confidence`` on ``labels`` and the rest spread evenly, argmax labels, done marks, attrs."""
    k = len(classes)
    chunks = tuple(zarr.open_array(f"{store}/image/0").chunks[1:])
    probs = np.full((k, *labels.shape), (1 - confidence) / (k - 1), np.float32)
    np.put_along_axis(probs, labels[None].astype(np.int64), confidence, axis=0)
    group = storage.open_group(f"{store}/prediction", mode="w")
    group.create_array("probabilities", shape=probs.shape, dtype="float16", chunks=(1, *chunks),
                       compressors=COMPRESSOR, fill_value=0)[...] = probs.astype(np.float16)
    group.create_array("labels", shape=labels.shape, dtype="uint8", chunks=chunks, compressors=COMPRESSOR,
                       fill_value=0)[...] = probs.argmax(0).astype(np.uint8)
    grid = tuple(-(-n // c) for n, c in zip(labels.shape, chunks))
    group.create_array("done", shape=grid, dtype="uint8", chunks=(1,) * len(grid), fill_value=0)[...] = 1
    group.attrs["tilewise"] = {"kind": "prediction", "digest": "d1g35t", "classes": list(classes),
                               "model": "models:/synthetic-unet/3", "params": {}}
    if complete:
        storage.mark_complete(group, {"at": "now"})
    return probs


def shifted(ref: np.ndarray) -> np.ndarray:
    pred = np.roll(ref, 2, axis=2)
    pred[:, :2, :3] = 1  # a false positive blob
    return pred


def test_evaluate_scan_end_to_end(tmp_path):
    ref = reference_volume()
    store = make_store(tmp_path, ref)
    pred = shifted(ref)
    write_prediction(store, pred)
    before = dict(zarr.open_group(f"{store}/prediction").attrs["tilewise"])
    report = evaluate_scan(store)

    cm = confusion_matrix(ref.ravel(), pred.ravel(), labels=range(3))  # independent reference
    assert report.semantic["confusion_matrix"] == cm.tolist()
    assert report.semantic["mean_iou"] == pytest.approx(fcn_scores(cm)["mean_iou"])
    assert report.pixels == ref.size and report.classes == CLASSES
    expected = surface_scores(ref, pred, [1, 2], spacing=(2.0, 1.0, 1.0), tolerance=1.0)
    assert report.surface["surface_level"] == 0 and report.surface["surface_spacing"] == [2.0, 1.0, 1.0]
    assert report.surface["per_class"]["rim"]["hd95"] == pytest.approx(expected[2]["hd95"])
    assert report.surface["per_class"]["core"]["surface_dice"] == pytest.approx(expected[1]["surface_dice"])
    # Every prediction puts 0.8 on its label: NLL = -log 0.8 where right, -log 0.1 where wrong.
    wrong = (ref != pred).mean()
    assert report.calibration["nll"] == pytest.approx(-(1 - wrong) * math.log(0.8) - wrong * math.log(0.1), rel=1e-3)

    after = dict(zarr.open_group(f"{store}/prediction").attrs["tilewise"])
    assert after["complete"] == before["complete"] and after["digest"] == before["digest"]
    stored = after["evaluation"]
    assert stored["semantic"]["per_class"]["core"]["dice"] == pytest.approx(report.semantic["per_class"]["core"]["dice"])
    json.dumps(stored, allow_nan=False)  # valid JSON: no NaN, no inf
    flat = report.flat_metrics()
    assert {"mean_iou", "dice_core", "hd95_rim", "surface_dice_core", "ece", "brier", "nll"} <= set(flat)


def test_large_volume_uses_a_pyramid_level_and_says_so(tmp_path):
    ref = reference_volume()
    store = make_store(tmp_path, ref, spacing=(1.0, 1.0, 1.0))
    write_prediction(store, ref)
    report = evaluate_scan(store, max_surface_voxels=ref.size // 4)
    s = report.surface
    assert s["surface_level"] == 1 and s["surface_spacing"] == [2.0, 2.0, 2.0]
    assert s["surface_shape"] == [8, 12, 10] and "pyramid level 1" in s["note"]
    expected = surface_scores(ref[::2, ::2, ::2], ref[::2, ::2, ::2], [1, 2], (2.0, 2.0, 2.0))
    assert s["per_class"]["rim"]["hd95"] == expected[2]["hd95"] == 0.0


def test_labels_from_a_file_with_the_catalog_mapping(tmp_path):
    ref = reference_volume()
    store = make_store(tmp_path, ref)
    write_prediction(store, ref)
    raw = np.choose(ref, [0, 10, 20]).astype(np.uint8)  # the file's own values
    path = tmp_path / "other_labels.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(raw), np.eye(4)), path)
    entry = CatalogEntry(name="synthetic", modality="mri", scans={"path": "x"},
                         labels={"path": "y", "mapping": {0: 0, 10: 1, 20: 2}, "classes": CLASSES})
    report = evaluate_scan(str(store), labels_path=path, entry=entry)
    assert report.semantic["pixel_accuracy"] == 1.0 and report.reference == str(path)
    with pytest.raises(ScanError, match=r"label values 10, 20 are outside the class indices 0..2"):
        evaluate_scan(str(store), labels_path=path)  # no catalog: values are class indices
    bad = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(np.where(raw == 20, 30, raw).astype(np.uint8)), np.eye(4)), bad)
    with pytest.raises(ScanError, match=r"label values 30 are not in the label mapping \(0, 10, 20\)"):
        evaluate_scan(str(store), labels_path=bad, entry=entry)


def test_bad_inputs(tmp_path):
    ref = reference_volume()
    store = make_store(tmp_path, ref)
    with pytest.raises(ScanError, match="has no complete prediction"):
        evaluate_scan(store)
    write_prediction(store, ref, complete=False)
    with pytest.raises(ScanError, match="has no complete prediction"):
        evaluate_scan(store)
    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 24, 15), np.uint8), np.eye(4)), small)
    write_prediction(store, ref)
    with pytest.raises(ScanError, match=r"labels of shape \(15, 24, 20\) do not match the prediction's shape "
                                        r"\(16, 24, 20\)"):
        evaluate_scan(store, labels_path=small)
    probs = zarr.open_array(f"{store}/prediction/probabilities", mode="r+")
    probs[1, 3, 3, 3] = np.nan
    with pytest.raises(ScanError, match="probabilities: contains NaN"):
        evaluate_scan(store)
    assert "evaluation" not in zarr.open_group(f"{store}/prediction").attrs["tilewise"]


def test_cli_json_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TILEWISE_HOME", str(tmp_path / "home"))
    ref = reference_volume()
    store = make_store(tmp_path, ref)
    write_prediction(store, shifted(ref))
    result = runner.invoke(app, ["evaluate", "--store", store, "--json", "--no-mlflow"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["classes"] == CLASSES and 0 < data["semantic"]["mean_iou"] < 1
    table = runner.invoke(app, ["evaluate", "--store", store, "--no-mlflow"])
    assert table.exit_code == 0 and "frequency_weighted_iou" in table.stdout and "background" in table.stdout

    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 24, 15), np.uint8), np.eye(4)), small)
    for args, message in (
        (["--labels", str(small)], "(15, 24, 20)"),
        (["--boundary-class", "membrane"], "boundary class 'membrane' is not one of the classes"),
    ):
        bad = runner.invoke(app, ["evaluate", "--store", store, "--no-mlflow", *args])
        assert bad.exit_code == 1 and message in bad.output and "Traceback" not in bad.output
        assert len(without_home(bad.output).splitlines()) == 1, bad.output
    other = make_store(tmp_path, ref, name="unpredicted")
    bad = runner.invoke(app, ["evaluate", "--store", other, "--json"])
    assert bad.exit_code == 1 and "has no complete prediction" in bad.output


def test_mlflow_run_with_metrics_and_images(tmp_path, monkeypatch):
    monkeypatch.setenv("TILEWISE_HOME", str(tmp_path / "home"))
    ref = reference_volume()
    store = make_store(tmp_path, ref)
    write_prediction(store, shifted(ref))
    from mlflow import MlflowClient

    from models.registry import tracking_uri
    from tasks.reports import evaluate_and_report

    report, images, run_id = evaluate_and_report(store)
    assert [p.name for p in images] == ["scan-overlay.png", "scan-reliability.png"]
    c = MlflowClient(tracking_uri())
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["mean_iou"] == pytest.approx(report.semantic["mean_iou"])
    assert run.data.metrics["dice_rim"] == pytest.approx(report.semantic["per_class"]["rim"]["dice"])
    assert run.data.tags["tilewise.scan"] == "scan" and run.data.tags["tilewise.model"] == "models:/synthetic-unet/3"
    assert c.get_experiment(run.info.experiment_id).name == "tilewise/synthetic"
    names = {f.path for f in c.list_artifacts(run_id, "evaluation")}
    assert {"evaluation/metrics.json", "evaluation/scan-overlay.png", "evaluation/scan-reliability.png"} <= names


def test_overlay_draws_both_contours(tmp_path):
    from PIL import Image

    from tasks.reports.overlay import PREDICTION_COLOUR, REFERENCE_COLOUR, overlay_png

    ref = reference_volume()
    store = make_store(tmp_path, ref)
    pred = shifted(ref)
    planes = [ref[8], ref[:, 12], ref[:, :, 10]], [pred[8], pred[:, 12], pred[:, :, 10]]
    path = overlay_png(store, 0, *planes, tmp_path / "o.png", title="t")
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    for colour in (REFERENCE_COLOUR, PREDICTION_COLOUR):
        target = np.round(np.array(colour) * 255)
        assert (np.abs(pixels - target).max(axis=1) <= 2).sum() > 50  # the contour's colour is drawn


def test_em_stack_isbi_scores(tmp_path):
    sections = np.zeros((2, 32, 32), np.uint8)  # 0 interior, 1 membrane: a grid of walls
    sections[:, ::8, :] = 1
    sections[:, :, ::8] = 1
    rng = np.random.default_rng(0)
    folder = tmp_path / "stack"
    folder.mkdir()
    from PIL import Image

    for z in range(2):
        Image.fromarray((sections[z] * 200 + rng.integers(0, 20, (32, 32))).astype(np.uint8)).save(folder / f"{z}.png")
    spec = ScanSpec("stack", "em", (folder,), dataset="em", chunks=(1, 32, 32), spacing=(50.0, 4.0, 4.0))
    store = str(tmp_path / "stack.zarr")
    ingest_scan(spec, store)
    write_prediction(store, sections, classes=["interior", "membrane"])
    report = evaluate_scan(store, labels_path=_write_label_folder(tmp_path, sections),
                           boundary_class="membrane")
    assert report.surface is None and report.isbi["sections"] == 2
    assert report.isbi["v_rand"] == pytest.approx(1.0) and report.isbi["pixel_error"] == 0.0


def _write_label_folder(tmp_path, sections):
    from PIL import Image

    folder = tmp_path / "labels"
    folder.mkdir()
    for z, s in enumerate(sections):
        Image.fromarray(s.astype(np.uint8)).save(folder / f"{z}.png")
    return folder


def test_evaluate_flow_over_a_dataset(prefect_server, tmp_path, monkeypatch):
    """Two scans: one with a prediction (evaluated), one without (skipped); one whose prediction
    has NaN probabilities fails alone and is named."""
    import textwrap

    from data_catalog import find_entry
    from flows.evaluate import evaluate_flow
    from tasks.ingest import discover_scans
    from tasks.settings import scan_store

    monkeypatch.setenv("TILEWISE_HOME", str(tmp_path / "home"))
    ref = reference_volume()
    for name in ("a", "b", "c"):
        folder = tmp_path / "scans" / name
        folder.mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.transpose(ref * 10.0).astype(np.float32), np.eye(4)), folder / "image.nii.gz")
        nib.save(nib.Nifti1Image(np.transpose(ref), np.eye(4)), folder / "labels.nii.gz")
    cat = tmp_path / "catalog"
    cat.mkdir()
    (cat / "synthetic.yaml").write_text(textwrap.dedent(f"""
        name: synthetic
        modality: mri
        scans: {{path: "{tmp_path}/scans/*", channels: [image.nii.gz], id: "{{name}}"}}
        labels: {{path: "{{scan}}/labels.nii.gz", mapping: {{0: 0, 1: 1, 2: 2}}, classes: {CLASSES}}}
        chunks: [8, 8, 8]
    """))
    root = tmp_path / "stores"
    for spec in discover_scans(find_entry("synthetic", cat)):
        ingest_scan(spec, scan_store("synthetic", spec.scan_id, str(root)))
    write_prediction(scan_store("synthetic", "a", str(root)), shifted(ref))
    write_prediction(scan_store("synthetic", "c", str(root)), ref)
    zarr.open_array(scan_store("synthetic", "c", str(root)) + "/prediction/probabilities", mode="r+")[0, 0, 0, 0] = np.nan
    state = evaluate_flow("synthetic", catalog=str(cat), store_root=str(root), log_mlflow=False, return_state=True)
    outcomes = {o.scan_id: o for o in state.result(raise_on_failure=False)}
    assert set(outcomes) == {"a", "c"} and outcomes["a"].status == "evaluated" and "mean_iou=" in outcomes["a"].message
    assert outcomes["c"].status == "failed" and "contains NaN" in outcomes["c"].message
    assert state.is_failed() and "synthetic/c" in state.message
    assert "evaluation" in zarr.open_group(scan_store("synthetic", "a", str(root)) + "/prediction").attrs["tilewise"]


def test_catalog_regions_are_scored_as_unions_of_classes(tmp_path):
    """``labels.regions`` (BraTS' whole tumour, tumour core): each region's Dice is the Dice of the
    voxels whose class is in it, counted here from the two volumes."""
    ref = reference_volume()
    pred = shifted(ref)
    store = make_store(tmp_path, ref)
    write_prediction(store, pred)
    entry = CatalogEntry(name="synthetic", modality="mri", scans={"path": "x"},
                         labels={"path": "y", "mapping": {0: 0, 1: 1, 2: 2}, "classes": CLASSES,
                                 "regions": {"tumour": ["core", "rim"], "inner": ["core"]}})
    report = evaluate_scan(store, entry=entry)
    for name, members in (("tumour", [1, 2]), ("inner", [1])):
        t, p = np.isin(ref, members), np.isin(pred, members)
        dice = 2 * (t & p).sum() / (t.sum() + p.sum())
        assert report.semantic["regions"][name]["dice"] == pytest.approx(dice)
        assert report.flat_metrics()[f"region_dice_{name}"] == pytest.approx(dice)
    assert report.settings["regions"] == {"tumour": ["core", "rim"], "inner": ["core"]}


def test_adding_regions_to_the_catalog_makes_the_evaluation_stale_and_a_new_one_current(tmp_path):
    """What the nightly asks before evaluating (flows/chain.py): an evaluation scored without the
    catalog's new ``labels.regions`` is not current; once scored with them it is, and without
    regions an evaluation from before they existed stays current (no recompute for nothing)."""
    from flows.chain import evaluation_is_current

    ref = reference_volume()
    store = make_store(tmp_path, ref)
    write_prediction(store, shifted(ref))
    labels = {"path": "y", "mapping": {0: 0, 1: 1, 2: 2}, "classes": CLASSES}
    plain = CatalogEntry(name="synthetic", modality="mri", scans={"path": "x"}, labels=labels)
    with_regions = CatalogEntry(name="synthetic", modality="mri", scans={"path": "x"},
                                labels={**labels, "regions": {"tumour": ["core", "rim"]}})
    evaluate_scan(store, entry=plain)
    assert evaluation_is_current(store, plain)
    assert not evaluation_is_current(store, with_regions)
    evaluate_scan(store, entry=with_regions)
    assert evaluation_is_current(store, with_regions) and not evaluation_is_current(store, plain)
