"""The nightly and backfill chains (ingest -> infer -> evaluate -> export) through their flows and
CLI: a second run does no work; backfill --force recomputes exactly the selected scans; the alias
is resolved once per run (a promotion during a run is seen by the next run only); a corrupt scan
fails alone and is named; a nightly killed with SIGKILL during inference completes on the next run
without recomputing finished chunks; training when no model exists (slow)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from tasks import storage
from tests.compare import assert_labels_equal_where_decided

EM = "em/isbi2012_train"
NAME = "em_nightly"
MODEL = f"{NAME}-unet"
runner = CliRunner()


# ------------------------------------------------------------------------------------------ set-up

@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A TILEWISE_HOME (stores, exports, embedded MLflow) of this module's own."""
    import mlflow
    import mlflow.models

    original_uri = os.environ.get("MLFLOW_TRACKING_URI")
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("nightly-home").resolve()
    mp.setenv("TILEWISE_HOME", str(home))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.delenv("TILEWISE_STORE_ROOT", raising=False)
    mp.chdir(home)  # MLflow's cwd-relative defaults must not land in the repository
    mp.setattr(mlflow.models, "infer_pip_requirements",  # speed only (no subprocess per logged model)
               lambda model_uri, flavor, fallback=None, **kw: list(fallback or []))
    yield home
    mp.undo()
    mlflow.set_tracking_uri(original_uri)


def copy_stack(samples: Path, dest: Path, slices: list[int]) -> Path:
    for kind in ("image", "label"):
        (dest / kind).mkdir(parents=True)
        for i in slices:
            shutil.copy(samples / EM / kind / f"{i}.png", dest / kind / f"{i}.png")
    return dest


def write_catalog(folder: Path, name: str, stacks: Path, chunks: str = "[2, 256, 256]", model: str = "",
                  extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(textwrap.dedent(f"""
        name: {name}
        modality: em
        scans: {{path: "{stacks}/*/image", id: "{{parent}}"}}
        labels: {{path: "{{dir}}/label", mapping: {{255: 0, 0: 1}}, classes: [interior, membrane]}}
        reader: {{spacing: [50, 4, 4], unit: nanometer}}
        chunks: {chunks}
        model: {{architecture: unet{model}}}
        tiling: {{tile: [128, 128], overlap: 0.25, batch: 4}}
        calibration: {{method: none}}
        export: {{format: tiff}}
    """) + extra)
    return folder


def register(name: str, channels=(4, 8), seed: int = 0, champion: bool = True) -> str:
    """A small U-Net registered straight in MLflow (no training): card + safetensors under the
    run's ``tilewise/``, which is all tilewise loads. Returns ``models:/NAME/VERSION``."""
    import mlflow
    import torch
    from safetensors.torch import save_file

    from models import registry
    from models.card import ModelCard, Normalization
    from models.zoo import build

    torch.manual_seed(seed)
    args = {"channels": list(channels), "num_res_units": 1}
    card = ModelCard(architecture="unet", architecture_args=args, in_channels=1, classes=["interior", "membrane"],
                     label_mapping={255: 0, 0: 1}, spatial_dims=2, tile=[128, 128],
                     normalization=Normalization(kind="zscore", mean=[125.0], std=[45.0]), dataset=name)
    net = build("unet", 2, 1, 2, **args).eval()
    c = registry.client()
    with mlflow.start_run(experiment_id=registry.experiment_id(name.rsplit("-", 1)[0])) as run:
        with tempfile.TemporaryDirectory() as tmp:
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, f"{tmp}/weights.safetensors")
            Path(tmp, "card.json").write_text(card.model_dump_json())
            mlflow.log_artifacts(tmp, artifact_path=registry.ARTIFACT_DIR)
    try:
        c.get_registered_model(name)
    except Exception:
        c.create_registered_model(name)
    version = c.create_model_version(name, source=f"{run.info.artifact_uri}/tilewise", run_id=run.info.run_id).version
    if champion:
        c.set_registered_model_alias(name, "champion", version)
    return f"models:/{name}/{version}"


@pytest.fixture(scope="module")
def em(home, samples, prefect_server):
    """Three two-section stacks (a, b, c) in one dataset, and a champion for it."""
    stacks = home / "stacks"
    for i, scan in enumerate("abc"):
        copy_stack(samples, stacks / scan, [2 * i, 2 * i + 1])
    catalog = write_catalog(home / "catalog", NAME, stacks)
    version = register(MODEL)
    return {"catalog": str(catalog), "stacks": stacks, "v1": version}


def by_step(outcomes) -> dict:
    return {(o.scan_id, o.step): o for o in outcomes}


def statuses(outcomes) -> dict:
    return {(o.scan_id, o.step): o.status for o in outcomes}


def store(scan: str, dataset: str = NAME) -> str:
    from tasks.settings import scan_store

    return scan_store(dataset, scan)


def fingerprint(scan: str, dataset: str = NAME) -> dict:
    """What a recomputation would change: the prediction's completion record and every file's mtime
    under prediction/, and the export with its sidecar."""
    from tasks.settings import tilewise_home

    pred = Path(store(scan, dataset)) / "prediction"
    files = {str(p.relative_to(pred)): p.stat().st_mtime_ns for p in pred.rglob("*") if p.is_file()
             and p.name != "zarr.json"}
    export = tilewise_home() / "exports" / dataset / f"{scan}.ome.tif"
    sidecar = export.with_name(export.name + ".tilewise.json")
    return {"complete": storage.read_record(str(pred))["complete"], "files": files,
            "export": export.stat().st_mtime_ns, "sidecar": sidecar.read_text()}


# ------------------------------------------------------------------------------------------ tests

def test_unknown_dataset_fails_naming_it(home):
    from flows.cli import app

    result = runner.invoke(app, ["run", "nightly", "--dataset", "UNKNOWN"])
    assert result.exit_code == 1
    assert "unknown dataset UNKNOWN" in result.output and "isbi2012_em" in result.output
    result = runner.invoke(app, ["backfill", "NOPE"])
    assert result.exit_code == 1 and "unknown dataset NOPE" in result.output


def test_nightly_chain_then_a_second_run_does_no_work(em):
    import tifffile
    from mlflow import MlflowClient

    from flows.nightly import nightly_flow
    from models import registry

    state = nightly_flow(catalog=em["catalog"], return_state=True)
    assert state.is_completed(), state.message
    outcomes = state.result()
    got = statuses(outcomes)
    for scan in "abc":
        assert [got[(scan, s)] for s in ("ingest", "infer", "evaluate", "export")] == \
            ["ingested", "inferred", "evaluated", "exported"]
        record = storage.read_record(store(scan) + "/prediction")
        assert record["model"] == em["v1"]  # the version, not the alias
        assert record["evaluation"]["prediction_digest"] == record["digest"]
        out = by_step(outcomes)[(scan, "export")].output
        with tifffile.TiffFile(out) as tif:  # the mask equals the prediction's labels
            np.testing.assert_array_equal(tif.asarray(), zarr.open_array(store(scan) + "/prediction/labels")[:])
        assert json.loads(Path(out + ".tilewise.json").read_text())["model"] == em["v1"]
        assert all(o.model == em["v1"] for o in outcomes if o.scan_id == scan and o.step != "ingest")
        assert "mean_dice" in by_step(outcomes)[(scan, "evaluate")].metrics

    # MLflow: one nightly run for the dataset, no per-scan runs (the catalog does not ask for them);
    # every scan a row of its table, the worst scans' overlays on it
    c = MlflowClient(tracking_uri=registry.tracking_uri())
    runs = c.search_runs([registry.experiment_id(NAME)], "tags.`tilewise.kind` = 'nightly'")
    assert len(runs) == 1
    parent = runs[0]
    assert parent.info.status == "FINISHED" and parent.info.run_name == f"nightly {datetime.utcnow():%Y-%m-%d}"
    assert parent.data.metrics["scans_ok"] == 3 and parent.data.metrics["scans_failed"] == 0
    assert parent.data.tags["tilewise.model"] == em["v1"]
    assert c.search_runs([registry.experiment_id(NAME)], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'") == []
    assert c.search_runs([registry.experiment_id(NAME)], "tags.`tilewise.step` = 'evaluate'") == []
    folder = tempfile.mkdtemp()
    summary = json.loads(Path(c.download_artifacts(parent.info.run_id, "summary/run.json", folder)).read_text())
    assert {r["scan"]: r["export"] for r in summary["scans"]} == dict.fromkeys("abc", "exported")
    table = json.loads(Path(c.download_artifacts(parent.info.run_id, "summary/scans.json", folder)).read_text())
    rows = [dict(zip(table["columns"], values)) for values in table["data"]]
    dice = {scan: by_step(outcomes)[(scan, "evaluate")].metrics["mean_dice"] for scan in "abc"}
    assert {r["scan"]: (r["result"], r["evaluate"], r["mean_dice"]) for r in rows} == \
        {scan: ("ingested inferred evaluated exported", "evaluated", pytest.approx(dice[scan])) for scan in "abc"}
    assert parent.data.metrics["mean_dice_mean"] == pytest.approx(sum(dice.values()) / 3)
    worst = {Path(f.path).name for f in c.list_artifacts(parent.info.run_id, "worst")}
    assert worst == {f"{scan}-overlay.png" for scan in "abc"}  # three scans: all under the five worst

    before = {scan: fingerprint(scan) for scan in "abc"}
    second = nightly_flow(catalog=em["catalog"], return_state=True)
    assert second.is_completed(), second.message
    assert set(statuses(second.result()).values()) == {"unchanged"}
    # a run that did nothing leaves no MLflow run behind: still the one nightly run
    assert [r.info.run_id for r in c.search_runs([registry.experiment_id(NAME)], "tags.`tilewise.kind` = 'nightly'")] \
        == [parent.info.run_id]
    assert {scan: fingerprint(scan) for scan in "abc"} == before  # nothing rewritten: no model call


def test_per_scan_runs_only_where_the_catalog_asks(em, home):
    """``reports: {per_scan: true}``: the night's run and, nested under it, an evaluate run per
    evaluated scan with its metrics and overlay."""
    from mlflow import MlflowClient

    from flows.nightly import nightly_flow
    from models import registry

    catalog = write_catalog(home / "catalog-per-scan", NAME, em["stacks"], extra="reports: {per_scan: true}\n")
    c = MlflowClient(tracking_uri=registry.tracking_uri())
    before = {r.info.run_id for r in c.search_runs([registry.experiment_id(NAME)], "tags.`tilewise.kind` = 'nightly'")}
    state = nightly_flow(catalog=str(catalog), force=True, return_state=True)  # force: every scan evaluated again
    assert state.is_completed(), state.message
    (parent,) = [r for r in c.search_runs([registry.experiment_id(NAME)], "tags.`tilewise.kind` = 'nightly'")
                 if r.info.run_id not in before]
    children = c.search_runs([registry.experiment_id(NAME)], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.data.tags["tilewise.scan"] for r in children) == ["a", "b", "c"]
    metrics = {o.scan_id: o.metrics for o in state.result() if o.step == "evaluate"}
    for child in children:
        assert child.data.metrics["mean_dice"] == pytest.approx(metrics[child.data.tags["tilewise.scan"]]["mean_dice"])
        names = {Path(f.path).name for f in c.list_artifacts(child.info.run_id, "evaluation")}
        assert f"{child.data.tags['tilewise.scan']}-overlay.png" in names


def test_backfill_force_recomputes_exactly_the_selected_scans(em):
    from flows.cli import app

    for scan, day in zip("abc", ("2024-01-10", "2024-02-10", "2024-03-10")):
        t = datetime.fromisoformat(day + "T12:00:00").timestamp()
        image = em["stacks"] / scan / "image"
        for p in [*image.iterdir(), image]:
            os.utime(p, (t, t))
    runner.invoke(app, ["run", "nightly", "--catalog", em["catalog"]])  # everything up to date first
    before = {scan: fingerprint(scan) for scan in "abc"}
    result = runner.invoke(app, ["backfill", NAME, "--catalog", em["catalog"], "--since", "2024-02-01",
                                 "--until", "2024-02-28", "--force"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    after = {scan: fingerprint(scan) for scan in "abc"}
    assert after["a"] == before["a"] and after["c"] == before["c"]
    assert after["b"]["complete"]["at"] != before["b"]["complete"]["at"]
    assert after["b"]["export"] != before["b"]["export"] and after["b"]["files"] != before["b"]["files"]
    assert "inferred" in result.output and "exported" in result.output and "│ a " not in result.output

    bad = runner.invoke(app, ["backfill", NAME, "--catalog", em["catalog"], "--since", "2024-13-01"])
    assert bad.exit_code == 1 and "YYYY-MM-DD" in bad.output


def test_promotion_during_a_run_is_seen_by_the_next_run_only(em, monkeypatch):
    import flows.infer as infer_module
    from flows.nightly import nightly_flow
    from models import registry

    v2 = register(MODEL, seed=2)  # promoted before the run: this run re-infers every scan with it
    promoted = {}
    real = infer_module.infer_scan

    def promote_then_infer(*args, **kwargs):
        if not promoted:  # a promotion while the run is under way
            promoted["v3"] = register(MODEL, seed=3)
            assert str(registry.describe(f"models:/{MODEL}@champion")["version"]) == promoted["v3"].rsplit("/", 1)[1]
        return real(*args, **kwargs)

    monkeypatch.setattr(infer_module, "infer_scan", promote_then_infer)
    state = nightly_flow(catalog=em["catalog"], return_state=True)
    assert state.is_completed(), state.message
    outcomes = state.result()
    assert {o.status for o in outcomes if o.step == "infer"} == {"inferred"}
    assert {o.model for o in outcomes if o.step != "ingest"} == {v2}  # the alias was resolved once
    for scan in "abc":
        assert storage.read_record(store(scan) + "/prediction")["model"] == v2
        sidecar = Path(by_step(outcomes)[(scan, "export")].output + ".tilewise.json")
        assert json.loads(sidecar.read_text())["model"] == v2

    monkeypatch.setattr(infer_module, "infer_scan", real)
    nxt = nightly_flow(catalog=em["catalog"], return_state=True).result()
    assert {o.model for o in nxt if o.step == "infer"} == {promoted["v3"]}
    assert {o.status for o in nxt if o.step == "infer"} == {"inferred"}


def test_reprocess_switch_keeps_old_predictions(em, home):
    from flows.nightly import nightly_flow

    catalog = write_catalog(home / "catalog-keep", NAME, em["stacks"], extra="")
    text = (catalog / f"{NAME}.yaml").read_text().replace("model: {architecture: unet}",
                                                          "model: {architecture: unet, reprocess_on_new_champion: false}")
    (catalog / f"{NAME}.yaml").write_text(text)
    old = storage.read_record(store("a") + "/prediction")["model"]
    new = register(MODEL, seed=4)
    outcomes = nightly_flow(catalog=str(catalog), return_state=True).result()
    assert {o.status for o in outcomes if o.step == "infer"} == {"kept"}
    assert {o.model for o in outcomes if o.step == "infer"} == {old} and old != new
    assert storage.read_record(store("a") + "/prediction")["model"] == old


def test_corrupt_scan_fails_alone_and_is_named(em, home, samples):
    from flows.cli import app

    stacks = home / "broken-stacks"
    copy_stack(samples, stacks / "good", [6, 7])
    bad = copy_stack(samples, stacks / "zbad", [6, 7])
    data = (bad / "image" / "7.png").read_bytes()
    (bad / "image" / "7.png").write_bytes(data[: len(data) // 4])
    catalog = write_catalog(home / "catalog-broken", "em_broken", stacks, model=f", name: {MODEL}")
    result = runner.invoke(app, ["run", "nightly", "--catalog", str(catalog)], env={"COLUMNS": "250"})
    assert result.exit_code == 1
    assert "1 of 2 scans failed" in result.output
    assert "em_broken/zbad (ingest)" in result.output and "7.png" in result.output
    assert storage.is_complete(store("good", "em_broken") + "/prediction")
    assert not storage.is_complete(store("zbad", "em_broken"))


def test_a_corrupt_scan_fails_alone_inside_its_batch(em, home, samples, monkeypatch):
    """Three scans in one batch per step (TILEWISE_BATCH_SCANS=3): one ingest task, one infer task;
    the corrupt scan fails alone, named, and the two others go through every step."""
    from flows.nightly import nightly_flow

    monkeypatch.setenv("TILEWISE_BATCH_SCANS", "3")
    stacks = home / "batch-stacks"
    copy_stack(samples, stacks / "good1", [4, 5])
    bad = copy_stack(samples, stacks / "mbad", [4, 5])
    copy_stack(samples, stacks / "zgood", [6, 7])
    data = (bad / "image" / "5.png").read_bytes()
    (bad / "image" / "5.png").write_bytes(data[: len(data) // 4])
    catalog = write_catalog(home / "catalog-batch", "em_batch", stacks, model=f", name: {MODEL}")
    state = nightly_flow(catalog=str(catalog), return_state=True)
    assert state.is_failed() and "1 of 3 scans failed" in state.message and "em_batch/mbad (ingest)" in state.message
    got = statuses(state.result(raise_on_failure=False))
    assert got[("mbad", "ingest")] == "failed" and ("mbad", "infer") not in got
    for scan in ("good1", "zgood"):
        assert [got[(scan, s)] for s in ("ingest", "infer", "evaluate", "export")] == \
            ["ingested", "inferred", "evaluated", "exported"]
        assert storage.is_complete(store(scan, "em_batch") + "/prediction")


def test_nightly_killed_during_inference_completes_on_the_next_run(em, home, samples):
    from prefect.settings import PREFECT_API_URL

    from flows.cli import app
    from tasks.engine.infer import EngineConfig, infer_scan
    from tasks.engine.model_io import load_model
    from tasks.ingest import discover_scans, ingest_scan
    from data_catalog import find_entry

    stacks = home / "slow-stacks"
    copy_stack(samples, stacks / "big", list(range(8)))
    catalog = write_catalog(home / "catalog-slow", "em_slow", stacks, chunks="[1, 128, 128]")
    version = register("em_slow-unet", channels=(16, 32, 64), seed=5)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "TILEWISE_HOME": str(home)}
    cmd = [sys.executable, "-m", "flows.cli", "run", "nightly", "--catalog", str(catalog)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(home))
    pred = Path(store("big", "em_slow")) / "prediction"
    deadline, done = time.time() + 240, 0
    while time.time() < deadline and proc.poll() is None:
        try:
            done = int(zarr.open_array(str(pred / "done"), mode="r")[:].sum())
        except Exception:
            done = 0
        if done >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the nightly finished before it could be killed: " + proc.stdout.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # with a server, the run created the global limit
        assert client.read_global_concurrency_limit_by_name("gpu").limit == 1
    mask = zarr.open_array(str(pred / "done"), mode="r")[:]
    assert not storage.is_complete(str(pred)) and 0 < mask.sum() < mask.size
    finished = {p: p.stat().st_mtime_ns for idx in zip(*np.nonzero(mask))
                for p in [pred / "probabilities" / "c" / "0" / "/".join(map(str, idx))]}

    result = runner.invoke(app, ["run", "nightly", "--catalog", str(catalog)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "resumed" in result.output
    assert storage.is_complete(str(pred))
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # finished chunks were not rewritten
    record = storage.read_record(str(pred))
    assert record["model"] == version and record["complete"]["tiles"] < 8 * 5 * 5  # 5 x 5 tiles per section

    # An uninterrupted run of the same model over the same scan gives the same prediction, to
    # float16 rounding: a resumed run's last batch is shorter, and torch's CPU kernels give a batch of
    # one tile logits that differ from the same tile's in a batch of four in the last float32 bits
    # (measured: 3e-6), which flips the float16 rounding of a few pixels (28 of 4 M in one run).
    (spec,) = discover_scans(find_entry("em_slow", catalog))
    reference = str(home / "reference.zarr")
    ingest_scan(spec, reference)
    infer_scan(reference, load_model(version), EngineConfig(tile=(128, 128), overlap=0.25, batch=4))
    probs = zarr.open_array(str(pred / "probabilities"))[:].astype(np.float32)
    ref_probs = zarr.open_array(reference + "/prediction/probabilities")[:].astype(np.float32)
    step = float(np.spacing(np.float16(1.0)))  # one float16 step at 1 (the largest below 1: half this)
    assert np.abs(probs - ref_probs).max() <= step and (probs != ref_probs).mean() < 1e-4
    assert_labels_equal_where_decided(zarr.open_array(str(pred / "labels"))[:],
                                      zarr.open_array(reference + "/prediction/labels")[:], ref_probs,
                                      tol=2 * step, max_undecided=0.01)  # an untrained net: 0.5 % near-ties


@pytest.mark.slow
def test_nightly_trains_registers_calibrates_evaluates_and_exports(home, samples, prefect_server, monkeypatch):
    """No model registered: the nightly trains one (tiny budget), registers it, fits its calibrator,
    infers with it calibrated, evaluates (ISBI scores) and exports an OME-TIFF."""
    import tifffile

    from flows.nightly import nightly_flow
    from tasks.calibration import calibrator as calibrator_module

    # a 12-second model: the decision guard (tests/test_calibration.py) may keep the raw
    # probabilities; this test is about the named cubic being fitted, stored and applied
    monkeypatch.setattr(calibrator_module, "DICE_TOLERANCE", 1.0)

    catalog = home / "catalog-train"
    catalog.mkdir()
    (catalog / "em.yaml").write_text(textwrap.dedent(f"""
        name: em_trained
        modality: em
        scans: {{path: "{samples}/em/isbi2012_*/image", id: "{{parent}}"}}
        labels: {{path: "{{dir}}/label", mapping: {{255: 0, 0: 1}}, classes: [interior, membrane],
                  boundary_class: membrane}}
        reader: {{spacing: [50, 4, 4], unit: nanometer}}
        chunks: [8, 512, 512]
        model: {{architecture: unet}}
        tiling: {{tile: [256, 256], overlap: 0.25, batch: 4}}
        training: {{epochs: 1, max_minutes: 0.2}}
        calibration: {{method: cubic}}
        export: {{format: tiff}}
    """))
    state = nightly_flow(catalog=str(catalog), return_state=True)
    assert state.is_completed(), state.message
    got = by_step(state.result())
    assert got[("*", "train")].status == "trained" and got[("*", "train")].model == "models:/em_trained-unet/1"
    assert [got[("isbi2012_train", s)].status for s in ("ingest", "infer", "evaluate", "export")] == \
        ["ingested", "inferred", "evaluated", "exported"]
    record = storage.read_record(store("isbi2012_train", "em_trained") + "/prediction")
    assert record["model"] == "models:/em_trained-unet/1"
    assert record["calibrator"] != "none" and record["calibrator"]["method"] == "cubic"
    assert "isbi_v_rand" in got[("isbi2012_train", "evaluate")].metrics
    with tifffile.TiffFile(got[("isbi2012_train", "export")].output) as tif:
        assert tif.asarray().shape == (8, 512, 512)
