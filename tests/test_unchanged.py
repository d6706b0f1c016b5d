""""Unchanged" is a promise (tasks/identity.py): change what made an output and the step recomputes,
change nothing and it says ``unchanged``. Each case goes through the CLI a user runs: the order of a
scan's channels, the same bytes under another folder, the card beside a TorchScript file, and the
code version of every step (a change of the code recomputes the outputs it alters, and only those)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from flows.cli import app
from tasks import identity, storage

runner = CliRunner()


def nifti(path: Path, volume: np.ndarray) -> Path:
    """``volume`` (Z, Y, X) as a NIfTI file (i, j, k = X, Y, Z)."""
    nib.save(nib.Nifti1Image(np.transpose(volume, (2, 1, 0)), np.eye(4)), path)
    return path


def ingest(*args: str) -> str:
    result = runner.invoke(app, ["ingest", *args])
    assert result.exit_code == 0, result.output
    return result.output


def status(output: str) -> str:
    for word in ("unchanged", "ingested", "inferred", "resumed", "exported"):
        if word in output:
            return word
    raise AssertionError(f"no status in: {output}")


def channels(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    a = nifti(tmp_path / "flair.nii.gz", rng.random((6, 10, 12), dtype=np.float32))
    b = nifti(tmp_path / "t1c.nii.gz", rng.random((6, 10, 12), dtype=np.float32) + 5)
    return a, b


def test_channel_order_is_part_of_the_scan(tmp_path):
    a, b = channels(tmp_path)
    store = str(tmp_path / "scan.zarr")
    assert status(ingest(str(a), str(b), "--store", store)) == "ingested"
    assert status(ingest(str(a), str(b), "--store", store)) == "unchanged"
    assert status(ingest(str(b), str(a), "--store", store)) == "ingested"
    first = zarr.open_array(f"{store}/image/0")[0]
    np.testing.assert_array_equal(first, np.transpose(nib.load(b).get_fdata(dtype=np.float32), (2, 1, 0)))
    assert status(ingest(str(b), str(a), "--store", store)) == "unchanged"


def test_the_same_bytes_under_another_folder_are_the_same_scan(tmp_path):
    a, b = channels(tmp_path)
    store = str(tmp_path / "scan.zarr")
    assert status(ingest(str(a), str(b), "--store", store)) == "ingested"
    mark = storage.read_record(store)["complete"]["at"]
    moved = tmp_path / "another" / "checkout"
    moved.mkdir(parents=True)
    copies = [Path(shutil.copy2(p, moved / p.name)) for p in (a, b)]
    assert status(ingest(*map(str, copies), "--store", store)) == "unchanged"
    record = storage.read_record(store)
    assert record["complete"]["at"] == mark  # not rewritten
    assert [f["path"] for f in record["source"]["files"]] == [str(p.resolve()) for p in copies]  # where they are now
    assert [f["name"] for f in record["source"]["files"]] == ["flair.nii.gz", "t1c.nii.gz"]
    # other bytes under the same names are another scan
    nifti(copies[1], np.zeros((6, 10, 12), dtype=np.float32))
    assert status(ingest(*map(str, copies), "--store", store)) == "ingested"


def test_a_float_scan_is_ingested_again_after_the_pyramid_change_an_integer_one_is_not(tmp_path):
    """Version 2 of ingest sums float pyramids in float64: a float scan ingested by version 1 is
    ingested again, an integer scan (whose pyramid did not change) stays."""
    rng = np.random.default_rng(1)
    floats = nifti(tmp_path / "f.nii", rng.random((4, 8, 8), dtype=np.float32))
    ints = nifti(tmp_path / "i.nii", rng.integers(0, 255, (4, 8, 8), dtype=np.uint8))
    for src in (floats, ints):
        store = str(tmp_path / f"{src.stem}.zarr")
        assert status(ingest(str(src), "--store", store)) == "ingested"
        assert storage.read_record(store)[identity.VERSION_KEY] == identity.code_version("ingest") >= 2
        _as_if_written_by_version_1(store)
        assert status(ingest(str(src), "--store", store)) == ("ingested" if src is floats else "unchanged")


def _as_if_written_by_version_1(url: str) -> None:
    """Take the code version out of a group's record, as code from before versions wrote it."""
    group = zarr.open_group(url, mode="r+")
    attrs = dict(group.attrs["tilewise"])
    attrs.pop(identity.VERSION_KEY, None)
    group.attrs["tilewise"] = attrs


# --------------------------------------------------------------------------- a TorchScript file and its card

def scripted(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(4, 2, 1)).eval()
    torch.jit.script(net).save(str(path))
    return path


def raster(tmp_path: Path, name: str = "scene", nodata=None) -> str:
    import rasterio

    array = np.random.default_rng(2).random((1, 40, 40), dtype=np.float32) * 10
    if nodata is not None:
        array[:, :, :12] = nodata
    src = tmp_path / f"{name}.tif"
    with rasterio.open(src, "w", driver="GTiff", width=40, height=40, count=1, dtype="float32",
                       nodata=nodata) as dst:
        dst.write(array)
    store = str(tmp_path / f"{name}.zarr")
    ingest(str(src), "--store", store, "--chunks", "16,16", "--modality", "satellite")
    return store


def infer(store: str, model: Path, *extra: str) -> str:
    result = runner.invoke(app, ["infer", "--store", store, "--model", str(model), "--tile", "16,16",
                                 "--dtype", "float32", *extra])
    assert result.exit_code == 0, result.output
    return result.output


def test_the_card_beside_a_torchscript_file_is_part_of_the_model_and_its_folder_is_not(tmp_path):
    store = raster(tmp_path)
    folder = tmp_path / "models"
    folder.mkdir()
    model = scripted(folder / "net.pt")
    card = folder / "net.pt.json"
    card.write_text(json.dumps({"classes": ["bg", "building"], "normalization": {"kind": "zscore", "mean": [5.0],
                                                                                  "std": [3.0]}}))
    assert status(infer(store, model)) == "inferred"
    assert status(infer(store, model)) == "unchanged"
    before = zarr.open_array(f"{store}/prediction/probabilities")[:]
    card.write_text(json.dumps({"classes": ["bg", "building"], "normalization": {"kind": "zscore", "mean": [2.0],
                                                                                  "std": [3.0]}}))
    assert status(infer(store, model)) == "inferred"
    assert np.abs(zarr.open_array(f"{store}/prediction/probabilities")[:] - before).max() > 1e-3
    moved = tmp_path / "elsewhere"
    shutil.copytree(folder, moved)
    assert status(infer(store, moved / "net.pt")) == "unchanged"
    (moved / "net.pt.json").unlink()
    assert status(infer(store, moved / "net.pt")) == "inferred"  # no card: another model


# --------------------------------------------------------------------------- code versions

@pytest.fixture
def code_change(monkeypatch):
    """``code_change(step, applies)``: a new version of ``step``'s code, as a commit would add it."""
    def change(step: str, applies=lambda record: True) -> None:
        history = identity.HISTORY[step] + (identity.Change(identity.code_version(step) + 1, "test", applies),)
        monkeypatch.setitem(identity.HISTORY, step, history)
    return change


def test_a_new_infer_version_recomputes_the_predictions_it_alters_only(tmp_path, code_change):
    model = scripted(tmp_path / "net.pt")
    plain, nodata = raster(tmp_path, "plain"), raster(tmp_path, "with-nodata", nodata=-9999.0)
    for store in (plain, nodata):
        assert status(infer(store, model)) == "inferred"
        assert storage.read_record(f"{store}/prediction")[identity.VERSION_KEY] == identity.code_version("infer")
        assert status(infer(store, model)) == "unchanged"
    # the empty-tile fix of version 2 alters predictions that skipped empty tiles, no others
    for store in (plain, nodata):
        _as_if_written_by_version_1(f"{store}/prediction")
    assert status(infer(store=plain, model=model)) == "unchanged"
    assert status(infer(store=nodata, model=model)) == "inferred"
    code_change("infer", lambda record: record.get("skip_empty", "off") == "off")
    assert status(infer(plain, model)) == "inferred"
    assert status(infer(nodata, model)) == "unchanged"


def test_a_new_export_version_rewrites_the_export(tmp_path, code_change):
    store = raster(tmp_path)
    infer(store, scripted(tmp_path / "net.pt"))
    out = str(tmp_path / "mask.tif")

    def export() -> str:
        result = runner.invoke(app, ["export", "--store", store, "--format", "tiff", "--out", out])
        assert result.exit_code == 0, result.output
        return status(result.output)

    assert export() == "exported"
    assert export() == "unchanged"
    code_change("export")
    assert export() == "exported"
    assert export() == "unchanged"


def test_a_tiff_export_from_before_the_content_uuid_is_rewritten_other_formats_are_not(tmp_path):
    """Export version 2 names an OME-TIFF's UUID after its content: a TIFF exported by version 1
    (a time-based UUID) is written again; the other formats (no OME UUID) did not change."""
    store = raster(tmp_path)
    infer(store, scripted(tmp_path / "net.pt"))
    out = tmp_path / "mask.ome.tif"

    def export() -> str:
        result = runner.invoke(app, ["export", "--store", store, "--format", "tiff", "--out", str(out)])
        assert result.exit_code == 0, result.output
        return status(result.output)

    assert export() == "exported"
    sidecar = Path(f"{out}.tilewise.json")
    record = json.loads(sidecar.read_text())
    assert record[identity.VERSION_KEY] == identity.code_version("export") >= 2
    record.pop(identity.VERSION_KEY)  # as version 1 wrote it
    sidecar.write_text(json.dumps(record))
    assert export() == "exported"
    assert export() == "unchanged"
    for fmt in ("nifti", "geotiff", "geojson", "gpkg"):
        assert identity.outdated("export", {"format": fmt}) == []


def test_outputs_labels_writes_no_probabilities_and_is_part_of_the_prediction(tmp_path):
    """``--outputs labels``: the same labels as the default run, no probability array, recorded in
    the digest (switching recomputes, repeating says unchanged); what needs probabilities says so."""
    model = scripted(tmp_path / "net.pt")
    full = raster(tmp_path, "full")
    assert status(infer(full, model)) == "inferred"
    store = raster(tmp_path, "lean")
    assert status(infer(store, model, "--outputs", "labels")) == "inferred"
    group = zarr.open_group(f"{store}/prediction", mode="r")
    assert "probabilities" not in group and storage.is_complete(f"{store}/prediction")
    np.testing.assert_array_equal(group["labels"][...], zarr.open_array(f"{full}/prediction/labels")[...])
    assert status(infer(store, model, "--outputs", "labels")) == "unchanged"
    result = runner.invoke(app, ["export", "--store", store, "--format", "tiff", "--what", "probabilities",
                                 "--out", str(tmp_path / "p.ome.tif")])
    assert result.exit_code == 1
    assert "no probabilities (inferred with --outputs labels)" in result.output
    assert "Traceback" not in result.output
    assert status(infer(store, model)) == "inferred"  # the default writes probabilities: another prediction
    assert "probabilities" in zarr.open_group(f"{store}/prediction", mode="r")
    assert status(infer(full, model)) == "unchanged"
