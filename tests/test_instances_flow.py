"""The instances step in the nightly chain and `tilewise instances`: a seeded watershed of the
membrane probability into cells (EM, with membrane as stuff: panoptic output), an MLflow run per
scan with the instance table, nothing recomputed on a second run, and the CLI's one-line errors."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from skimage.measure import regionprops
from typer.testing import CliRunner

from tasks import storage
from tests.test_nightly import copy_stack, home, register, write_catalog  # noqa: F401  (fixture)

NAME = "em_instances"
runner = CliRunner()


@pytest.fixture(scope="module")
def em_inst(home, samples, prefect_server):  # noqa: F811
    stacks = home / "inst-stacks"
    for i, scan in enumerate("ab"):
        copy_stack(samples, stacks / scan, [2 * i, 2 * i + 1])
    catalog = write_catalog(home / "inst-catalog", NAME, stacks,
                            extra="instances: {method: watershed, min_size: 8, membrane_class: membrane}\n"
                                  "reports: {per_scan: true}\n")  # the instance table's run per scan
    text = Path(catalog, f"{NAME}.yaml").read_text().replace(
        "classes: [interior, membrane]}", "classes: [interior, membrane], instance_classes: [interior], "
                                          "stuff_classes: [membrane]}")
    Path(catalog, f"{NAME}.yaml").write_text(text)
    register(f"{NAME}-unet", seed=3)
    return {"catalog": str(catalog)}


def _store(scan: str) -> str:
    from tasks.settings import scan_store

    return scan_store(NAME, scan)


def test_nightly_makes_instances_panoptic_and_an_mlflow_run_then_does_no_work(em_inst):
    from mlflow import MlflowClient

    from flows.nightly import nightly_flow
    from models import registry
    from tasks.instances import store as inst_store

    state = nightly_flow(catalog=em_inst["catalog"], return_state=True)
    assert state.is_completed(), state.message
    got = {(o.scan_id, o.step): o for o in state.result()}
    c = MlflowClient(tracking_uri=registry.tracking_uri())
    for scan in "ab":
        assert got[(scan, "instances")].status == "computed", got[(scan, "instances")]
        store = _store(scan)
        assert inst_store.instances_complete(store)
        ids = zarr.open_array(f"{store}/prediction/instances")[:]
        labels = zarr.open_array(f"{store}/prediction/labels")[:]
        table = pq.read_table(inst_store.table_url(store)).to_pydict()
        present = np.unique(ids[ids > 0])
        # the table lists exactly the ids in the image, with their pixel counts
        assert sorted(table["id"]) == present.tolist()
        # real data: the table agrees with scikit-image's regionprops (areas, boxes, centroids)
        props = {r.label: r for r in regionprops(ids.astype(np.int64))}
        for row, i in enumerate(table["id"]):
            r = props[i]
            assert table["area"][row] == r.area
            assert [table[k][row] for k in ("z0", "y0", "x0", "z1", "y1", "x1")] == list(r.bbox)
            np.testing.assert_allclose([table[f"centroid_{a}"][row] for a in "zyx"], r.centroid)
            np.testing.assert_allclose([table[f"world_{a}"][row] for a in "zyx"],
                                       np.asarray(r.centroid) * [50, 4, 4])  # the catalog's spacing, nm
        # panoptic: cells keep their ids, membrane pixels (stuff) one segment, nothing else
        panoptic = zarr.open_array(f"{store}/prediction/panoptic")[:]
        np.testing.assert_array_equal(panoptic[ids > 0], ids[ids > 0])
        stuff = panoptic[(ids == 0) & (labels == 1)]
        assert stuff.size == 0 or (len(np.unique(stuff)) == 1 and stuff[0] not in set(present.tolist()))
        # one MLflow run per scan with the table (the catalog's reports: {per_scan: true})
        run_id = got[(scan, "instances")].message.rsplit("MLflow run ", 1)[-1]
        run = c.get_run(run_id)
        assert run.data.metrics["instances"] == len(present)
        local = c.download_artifacts(run_id, "instances/instances.parquet", tempfile.mkdtemp())
        assert pq.read_table(local).num_rows == len(present)
        # evaluation waited for the instances and scored them
        evaluation = got[(scan, "evaluate")]
        assert evaluation.status == "evaluated"

    second = nightly_flow(catalog=em_inst["catalog"], return_state=True)
    assert second.is_completed(), second.message
    assert {o.status for o in second.result()} == {"unchanged"}


def test_cli_instances_recomputes_with_another_min_size_and_reports_bad_options(em_inst):
    from flows.cli import app
    from tasks.instances import store as inst_store

    before = inst_store.read_instances_record(_store("a"))
    result = runner.invoke(app, ["instances", NAME, "--catalog", em_inst["catalog"], "--min-size", "200", "--json"])
    assert result.exit_code == 0, result.output
    after = inst_store.read_instances_record(_store("a"))
    assert after["digest"] != before["digest"] and after[storage.COMPLETE_KEY]["count"] <= before[storage.COMPLETE_KEY]["count"]
    result = runner.invoke(app, ["instances", NAME, "--catalog", em_inst["catalog"], "--method", "blobs"])
    assert result.exit_code == 1 and "--method must be components or watershed" in result.output
    result = runner.invoke(app, ["instances", "NOPE", "--catalog", em_inst["catalog"]])
    assert result.exit_code == 1 and "NOPE" in result.output and "Traceback" not in result.output


def test_the_catalogs_scoring_and_instance_settings_recompute_what_reads_them(em_inst):
    """Changing what the catalog says about instances and scoring recomputes the steps that read
    it -- instances, panoptic output, evaluation -- and nothing else; no change, no work."""
    from flows.nightly import nightly_flow
    from tasks.instances import store as inst_store

    yaml = Path(em_inst["catalog"], f"{NAME}.yaml")
    original = yaml.read_text()

    def nightly() -> dict:
        state = nightly_flow(catalog=em_inst["catalog"], return_state=True)
        assert state.is_completed(), state.message
        return {(o.scan_id, o.step): o.status for o in state.result() if o.scan_id == "a"}

    def evaluation() -> dict:
        return storage.read_record(f"{_store('a')}/prediction")["evaluation"]

    try:
        nightly()  # settle what the other tests changed
        assert set(nightly().values()) == {"unchanged"}
        assert evaluation()["isbi"] is None and evaluation()["instances"]["pq"] is not None

        yaml.write_text(original.replace("min_size: 8", "min_size: 40"))
        got = nightly()
        assert (got[("a", "ingest")], got[("a", "infer")]) == ("unchanged", "unchanged")
        assert (got[("a", "instances")], got[("a", "evaluate")]) == ("computed", "evaluated")
        assert inst_store.read_instances_record(_store("a"))["params"]["min_size"] == 40

        yaml.write_text(yaml.read_text().replace("classes: [interior, membrane], instance_classes",
                                                 "classes: [interior, membrane], boundary_class: membrane, "
                                                 "instance_classes"))
        got = nightly()
        assert (got[("a", "instances")], got[("a", "evaluate")]) == ("unchanged", "evaluated")
        assert evaluation()["isbi"]["adapted_rand_error"] is not None  # the ISBI scores, now asked for

        yaml.write_text(yaml.read_text().replace(", stuff_classes: [membrane]", ""))
        got = nightly()
        assert (got[("a", "instances")], got[("a", "evaluate")]) == ("computed", "evaluated")
        assert not storage.exists(f"{_store('a')}/prediction/panoptic")  # no stale panoptic output
        assert evaluation()["settings"]["stuff_classes"] is None
        assert set(nightly().values()) == {"unchanged"}
    finally:
        yaml.write_text(original)


def test_watershed_tuned_with_the_version_is_what_the_nightly_uses(em_inst):
    """Training tunes the watershed on the version's validation sections and stores it with the
    version; the nightly's instances use those values unless the catalog sets its own."""
    from data_catalog import find_entry
    from flows.nightly import nightly_flow
    from tasks.instances import store as inst_store
    from tasks.instances.tuning import tune_model, tuned_settings

    yaml = Path(em_inst["catalog"], f"{NAME}.yaml")
    original = yaml.read_text()
    uri = storage.read_record(f"{_store('a')}/prediction")["model"]
    tuning = tune_model(find_entry(NAME, Path(em_inst["catalog"])), uri)
    assert tuned_settings(uri) == {"seed_threshold": tuning.seed_threshold, "median": tuning.median}
    try:
        assert nightly_flow(catalog=em_inst["catalog"], return_state=True).is_completed()
        params = inst_store.read_instances_record(_store("a"))["params"]
        assert params["seed_threshold"] == tuning.seed_threshold and params.get("median", 0) == tuning.median
        yaml.write_text(original.replace("min_size: 8,", "min_size: 8, seed_threshold: 0.45, median: 0,"))
        assert nightly_flow(catalog=em_inst["catalog"], return_state=True).is_completed()
        params = inst_store.read_instances_record(_store("a"))["params"]
        assert params["seed_threshold"] == 0.45 and "median" not in params
    finally:
        yaml.write_text(original)
