"""Prefect flows end to end: one bad scan fails only itself; the end state names it; retries are
for transient I/O only; the nightly job and its CLI over the bundled catalog."""

from __future__ import annotations

import re
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr
from typer.testing import CliRunner

from tasks import storage
from tasks.errors import ScanError

pytestmark = pytest.mark.slow

CHIPS = "satellite/spacenet1_rio/images"


def make_catalog(tmp_path: Path, samples: Path) -> Path:
    """A catalog with one clean dataset (EM) and one whose folder holds a good chip, a text file
    named .tif and a truncated chip."""
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    good = samples / CHIPS / "3band_013022223130_Public_img53.tif"
    shutil.copy(good, scenes / "a_good.tif")
    (scenes / "b_not_a_tiff.tif").write_text("this is not a TIFF\n")
    data = good.read_bytes()
    (scenes / "c_truncated.tif").write_bytes(data[: len(data) // 3])
    cat = tmp_path / "catalog"
    cat.mkdir()
    (cat / "em.yaml").write_text(textwrap.dedent(f"""
        name: em_ok
        modality: em
        scans: {{path: "{samples}/em/isbi2012_train/image", id: "{{parent}}"}}
        reader: {{spacing: [50, 4, 4], unit: nanometer}}
    """))
    (cat / "sat.yaml").write_text(textwrap.dedent(f"""
        name: scenes
        modality: satellite
        scans: {{path: "{scenes}/*.tif"}}
    """))
    return cat


def test_ingest_flow_isolates_bad_scans_and_names_them(prefect_server, samples, tmp_path):
    from flows.ingest import ingest_flow

    cat = make_catalog(tmp_path, samples)
    root = tmp_path / "stores"
    state = ingest_flow("scenes", catalog=str(cat), store_root=str(root), return_state=True)
    assert state.is_failed()
    assert "2 of 3 scans failed" in state.message
    assert "b_not_a_tiff.tif: not a readable GeoTIFF" in state.message
    assert "c_truncated.tif: cannot read rows" in state.message
    outcomes = {o.scan_id: o for o in state.result(raise_on_failure=False)}
    assert outcomes["a_good"].status == "ingested"
    assert storage.is_complete(outcomes["a_good"].store)
    with rasterio.open(samples / CHIPS / "3band_013022223130_Public_img53.tif") as src:
        np.testing.assert_array_equal(zarr.open_array(f"{outcomes['a_good'].store}/image/0")[:], src.read())
    for bad in ("b_not_a_tiff", "c_truncated"):
        assert outcomes[bad].status == "failed"
        assert not storage.is_complete(outcomes[bad].store)

    again = ingest_flow("scenes", catalog=str(cat), store_root=str(root), return_state=True)
    statuses = {o.scan_id: o.status for o in again.result(raise_on_failure=False)}
    assert statuses == {"a_good": "unchanged", "b_not_a_tiff": "failed", "c_truncated": "failed"}


def test_nightly_finishes_other_datasets_when_one_scan_fails(prefect_server, samples, tmp_path):
    from flows.nightly import nightly_flow

    cat = make_catalog(tmp_path, samples)
    state = nightly_flow(catalog=str(cat), store_root=str(tmp_path / "stores"), return_state=True)
    assert state.is_failed()
    outcomes = state.result(raise_on_failure=False)
    by_scan = {(o.dataset, o.scan_id): o.status for o in outcomes}
    assert by_scan[("em_ok", "isbi2012_train")] == "ingested"
    assert by_scan[("scenes", "a_good")] == "ingested"
    assert by_scan[("scenes", "b_not_a_tiff")] == "failed"
    assert "scenes/c_truncated (ingest)" in state.message


def test_retries_transient_io_errors_but_not_bad_input(prefect_server, samples, monkeypatch, tmp_path):
    import flows.ingest as ingest_module
    from tasks.ingest import ScanSpec

    calls = {"n": 0}
    real = ingest_module.ingest_scan

    def flaky(spec, store, force=False):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(5, "Input/output error (simulated)")
        return real(spec, store, force=force)

    monkeypatch.setattr(ingest_module, "ingest_scan", flaky)
    task = ingest_module.ingest_scan_task.with_options(retry_delay_seconds=0)
    spec = ScanSpec("chip", "satellite", (samples / CHIPS / "3band_013022223130_Public_img54.tif",))
    state = task(spec, str(tmp_path / "chip.zarr"), return_state=True)
    assert state.is_completed() and calls["n"] == 2

    calls["n"] = 0

    def bad(spec, store, force=False):
        calls["n"] += 1
        raise ScanError("x.tif", "not a readable GeoTIFF")

    monkeypatch.setattr(ingest_module, "ingest_scan", bad)
    state = task(spec, str(tmp_path / "chip2.zarr"), return_state=True)
    assert state.is_failed() and calls["n"] == 1


def test_run_nightly_cli_on_bundled_catalog(prefect_server, tmp_path, monkeypatch):
    from flows.cli import app

    monkeypatch.setenv("TILEWISE_STORE_ROOT", str(tmp_path / "stores"))
    result = CliRunner().invoke(app, ["run", "nightly", "--no-train"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "nightly: 6 scans ok, " in result.output, result.output[-600:]
    worked, steps = map(int, re.search(r"6 scans ok, (\d+) of (\d+) steps did work", result.output).groups())
    assert 0 < worked < steps, result.output[-600:]  # with no model, inference did nothing
    assert result.output.count("run: tilewise train") == 3  # no model registered: infer says how to get one
    # what a log of the run reads: progress lines and one line per scan, not Prefect's INFO chatter
    # (that is in the home's log file), and the catalog's description is the experiment's
    assert "progress: ingest 6/6" in result.output and "Beginning flow run" not in result.output
    from models.registry import NOTE_TAG, client
    from tasks.settings import tilewise_home

    assert "Beginning flow run" in (tilewise_home() / "logs" / "tilewise.log").read_text()
    experiment = client().get_experiment_by_name("tilewise/brats2015_mri")
    assert experiment.tags[NOTE_TAG].startswith("Glioma MRI")
    stores = sorted((tmp_path / "stores").glob("*/*.zarr"))
    assert len(stores) == 6 and all(storage.is_complete(str(s)) for s in stores)
    mri = zarr.open_group(str(tmp_path / "stores/brats2015_mri/brats_2013_pat0003_1.zarr"))
    assert mri["image/0"].shape[0] == 2  # FLAIR + T1c as channels
    assert mri.attrs["tilewise"]["channel_names"] == ["Flair_subtrMeanDivStd", "T1c_subtrMeanDivStd"]
    # --no-infer alone would still train the missing models; --no-train too: ingest only
    second = CliRunner().invoke(app, ["run", "nightly", "--no-infer", "--no-train"], env={"COLUMNS": "200"})
    assert second.exit_code == 0, second.output
    assert sum(line.endswith(": unchanged") for line in second.output.splitlines()) == 6, second.output
    assert "nightly: nothing new; 6 scans up to date" in second.output
