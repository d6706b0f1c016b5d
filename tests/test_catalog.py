"""The catalog schema and `tilewise catalog validate/list`: field-level errors with file and reason."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from data_catalog import DEFAULT_CATALOG_DIR, CatalogError, load_catalog, load_entry
from flows.cli import app
from tasks.ingest import discover_scans

runner = CliRunner()

GOOD = """
name: demo
modality: em
scans: {path: "slices/*"}
"""


LABELS = "labels: {path: '{dir}/x', mapping: {0: 0, 1: 1}, classes: [a, b]%s}\n"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_bundled_catalog_is_valid_and_finds_every_sample_scan():
    entries = {e.entry.name: e for e in load_catalog(DEFAULT_CATALOG_DIR)}
    assert set(entries) == {"isbi2012_em", "brats2015_mri", "spacenet_rio"}
    counts = {name: len(discover_scans(e)) for name, e in entries.items()}
    assert counts == {"isbi2012_em": 1, "brats2015_mri": 2, "spacenet_rio": 3}
    mri = discover_scans(entries["brats2015_mri"])[0]
    assert [p.name for p in mri.sources] == ["Flair_subtrMeanDivStd.nii.gz", "T1c_subtrMeanDivStd.nii.gz"]
    assert mri.labels.sources[0].name == "OTMultiClass.nii.gz" and mri.labels.sources[0].exists()
    sat = discover_scans(entries["spacenet_rio"])[0]
    assert sat.labels.sources[0].parent.name == "masks" and sat.labels.sources[0].exists()
    em = discover_scans(entries["isbi2012_em"])[0]
    assert em.scan_id == "isbi2012_train" and em.labels.mapping == {255: 0, 0: 1}


@pytest.mark.parametrize(
    "text, field, reason",
    [
        (GOOD.replace("modality: em", "modality: ct"), "modality", "'mri', 'em' or 'satellite'"),
        (GOOD.replace("modality: em\n", ""), "modality", "missing required field"),
        (GOOD + "colour: blue\n", "colour", "unknown field"),
        (GOOD + "chunks: [0, 64]\n", "chunks", "positive"),
        (GOOD + "tiling: {overlap: 1.0}\n", "tiling.overlap", "less than 1"),
        (GOOD + "schedule: {cron: 'every night'}\n", "schedule.cron", "five fields"),
        (GOOD + "labels: {path: x, mapping: {0: 3}, classes: [a, b]}\n", "labels", "not class indices"),
        (GOOD.replace('"slices/*"', '"slices/*", id: "{nope}"'), "scans.id", "unknown template field"),
    ],
)
def test_invalid_entries_name_file_field_and_reason(tmp_path, text, field, reason):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(CatalogError) as info:
        load_entry(path)
    problems = info.value.problems
    assert any(p.field == field and reason in p.reason and p.file == path for p in problems), problems


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "broken.yaml", "name: x\nmodality: [em\n")
    with pytest.raises(CatalogError) as info:
        load_entry(path)
    assert info.value.problems[0].field.startswith("line ")


def test_duplicate_names_across_files(tmp_path):
    write(tmp_path, "a.yaml", GOOD)
    write(tmp_path, "b.yaml", GOOD)
    with pytest.raises(CatalogError, match="also used by"):
        load_catalog(tmp_path)


def test_cli_validate_ok_and_errors(tmp_path):
    ok = runner.invoke(app, ["catalog", "validate"])
    assert ok.exit_code == 0, ok.output
    assert "3 catalog entries valid" in ok.output

    write(tmp_path, "good.yaml", GOOD)
    write(tmp_path, "bad.yaml", GOOD.replace("name: demo", "name: other").replace("modality: em", "modality: ct"))
    write(tmp_path, "missing.yaml", "name: third\nscans: {path: x}\n")
    bad = runner.invoke(app, ["catalog", "validate", str(tmp_path)])
    assert bad.exit_code == 1
    lines = [line for line in bad.output.splitlines() if line.strip()]
    assert any("bad.yaml: modality:" in line for line in lines), bad.output
    assert any("missing.yaml: modality: missing required field" in line for line in lines), bad.output
    assert not any("good.yaml" in line for line in lines)


def test_cli_list_counts_scans_with_whole_names_when_not_a_terminal():
    # CliRunner's stdout is not a terminal, like a pipe: tab-separated lines, names never cut to 80 columns
    result = runner.invoke(app, ["catalog", "list"], env={"COLUMNS": "40"})
    assert result.exit_code == 0, result.output
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert lines[0] == ["dataset", "modality", "scans", "labels", "model", "schedule", "file"]
    rows = {cells[0]: dict(zip(lines[0], cells)) for cells in lines[1:]}
    assert set(rows) == {"isbi2012_em", "brats2015_mri", "spacenet_rio"}
    assert rows["brats2015_mri"]["scans"] == "2" and rows["spacenet_rio"]["scans"] == "3"
    assert rows["spacenet_rio"]["model"] == "spacenet_rio-deeplab@champion"
    assert rows["spacenet_rio"]["file"] == "spacenet_rio.yaml"


def test_cli_list_json_for_scripts():
    import json

    result = runner.invoke(app, ["catalog", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["dataset"]: row for row in json.loads(result.stdout)}
    assert rows["isbi2012_em"]["scans"] == 1 and rows["isbi2012_em"]["labels"] is True
    assert rows["isbi2012_em"]["model"] == "models:/isbi2012_em-unet@champion"
    assert rows["brats2015_mri"]["schedule"] == "0 2 * * *" and rows["brats2015_mri"]["timezone"] == "UTC"
    assert Path(rows["spacenet_rio"]["file"]).is_file()


def test_cli_list_in_a_terminal_folds_long_names_instead_of_cutting_them(tmp_path):
    from rich.console import Console

    import flows.cli as cli

    entry = GOOD.replace("name: demo", "name: a_dataset_name_much_longer_than_its_column_would_be")
    write(tmp_path, "long.yaml", entry)
    terminal = Console(force_terminal=True, width=60, soft_wrap=True, record=True, color_system=None)
    saved, cli.out = cli.out, terminal
    try:
        result = runner.invoke(app, ["catalog", "list", "--catalog", str(tmp_path)])
    finally:
        cli.out = saved
    assert result.exit_code == 0, result.output
    text = terminal.export_text()
    assert "…" not in text
    first_column = "".join(line.split("│")[1].strip() for line in text.splitlines() if line.count("│") > 3)
    assert "a_dataset_name_much_longer_than_its_column_would_be" in first_column


@pytest.mark.parametrize(
    "text, field, reason",
    [
        (GOOD + "schedule: {cron: '99 99 * * *'}\n", "schedule.cron", "not a valid cron string"),
        (GOOD + "schedule: {cron: 'H 2 * * *'}\n", "schedule.cron", "not a valid cron string"),
        (GOOD + "schedule: {timezone: Mars/Base}\n", "schedule.timezone", "unknown time zone"),
        (GOOD.replace('"slices/*"', '"slices/*", id: "{stem.upper}"'), "scans.id", "attribute or index access"),
        (GOOD.replace('"slices/*"', '"slices/*", id: "{name[0]}"'), "scans.id", "attribute or index access"),
        (GOOD.replace('"slices/*"', '"slices/*", id: "{stem!r}"'), "scans.id", "conversions and format specs"),
        (GOOD.replace('"slices/*"', '"slices/*", id: "{parent}/{stem}"'), "scans.id", "must not contain '/'"),
        (GOOD.replace('"slices/*"', '"slices/*", id: "..{stem}"'), "scans.id", "must not contain '/'"),
        (GOOD.replace('"slices/*"', '"slices/*", id: "scan"'), "scans.id", "must contain {stem}"),
        (GOOD + "labels: {path: '{dir.parent}/x', mapping: {0: 0}, classes: [a, b]}\n", "labels.path",
         "attribute or index access"),
        (GOOD + "model: {name: 'other/model'}\n", "model.name", "should match pattern"),
        (GOOD.replace('"slices/*"', '"slices/*", date: {from: path}'), "scans.date", "needs a 'pattern'"),
        (GOOD.replace('"slices/*"', '"slices/*", date: {from: path, pattern: "(\\\\d+)-(\\\\d+)"}'),
         "scans.date.pattern", "exactly one group"),
        (GOOD.replace('"slices/*"', '"slices/*", date: {from: path, pattern: "(x)", format: "%Y"}'),
         "scans.date.format", "does not give a date"),
        (GOOD.replace('"slices/*"', '"slices/*", date: {from: mtime, pattern: "(x)"}'), "scans.date",
         "only used with from: path"),
        (GOOD + "tiling: {dask: 'local:0'}\n", "tiling.dask", "local:N"),
        (GOOD + "tiling: {dask: 'somewhere'}\n", "tiling.dask", "HOST:PORT"),
        (GOOD + "training: {epochs: 0}\n", "training.epochs", "greater than or equal to 1"),
        (GOOD + LABELS % ", stuff_classes: [c]", "labels", "stuff_classes ['c'] are not in 'classes'"),
        (GOOD + LABELS % ", stuff_classes: [b], instance_classes: [b]", "labels", "cannot be both a thing"),
        (GOOD + LABELS % ", regions: {tumour: [b, z]}", "labels", "region 'tumour': ['z'] are not in 'classes'"),
        (GOOD + LABELS % ", regions: {tumour: []}", "labels", "region 'tumour': no classes"),
        (GOOD + LABELS % ", regions: {'a b': [b]}", "labels", "letters, digits"),
        (GOOD + LABELS % "" + "instances: {method: watershed}\n", "(entry)", "watershed needs a membrane class"),
        (GOOD + LABELS % "" + "instances: {classes: [z]}\n", "(entry)", "['z'] are not in labels.classes"),
        (GOOD + "instances: {method: components}\n", "(entry)", "name the classes"),
        (GOOD + LABELS % "" + "instances: {min_size: 0}\n", "instances.min_size", "greater than or equal to 1"),
        (GOOD + "export: {format: tiff, instances: shp}\n", "export.instances", "'geojson' or 'gpkg'"),
    ],
)
def test_invalid_schedules_templates_and_new_fields_are_refused_at_load(tmp_path, text, field, reason):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(CatalogError) as info:
        load_entry(path)
    problems = info.value.problems
    assert any(p.field == field and reason in p.reason and p.file == path for p in problems), problems


@pytest.mark.parametrize("cron, timezone", [("99 99 * * *", "UTC"), ("0 2 * * *", "Mars/Base"), ("0 2 * * 8", "UTC"),
                                            ("*/15 2-4 1,15 * 1-5", "Europe/Paris"), ("0 2 30 2 *", "UTC"),
                                            ("H 2 * * *", "UTC"), ("0 0 * * SUN", "America/New_York")])
def test_catalog_schedule_accepts_exactly_what_prefect_accepts(tmp_path, cron, timezone):
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:  # the reference: Prefect's own schedule model
        CronSchedule(cron=cron, timezone=timezone)
        prefect_ok = True
    except ValidationError:
        prefect_ok = False
    path = write(tmp_path, "s.yaml", GOOD + f"schedule: {{cron: '{cron}', timezone: {timezone}}}\n")
    try:
        load_entry(path)
        ours = True
    except CatalogError:
        ours = False
    assert ours == prefect_ok


def test_valid_new_fields_and_their_defaults(tmp_path):
    import datetime

    default = load_entry(write(tmp_path, "d.yaml", GOOD + "model: {architecture: deeplab}\n")).entry
    assert default.model.reprocess_on_new_champion is True and default.tiling.dask is None
    assert default.scans.date.source == "mtime" and default.model.name is None
    text = GOOD.replace('"slices/*"', '"slices/*", date: {from: path, pattern: "_(\\\\d{8})", format: "%Y%m%d"}')
    text += "model: {reprocess_on_new_champion: false}\ntiling: {dask: 'tcp://10.0.0.5:8786'}\n"
    text += "schedule: {cron: '30 1 * * 1-5', timezone: Europe/Berlin}\n"
    entry = load_entry(write(tmp_path, "e.yaml", text)).entry
    assert entry.model.reprocess_on_new_champion is False and entry.tiling.dask == "tcp://10.0.0.5:8786"
    assert entry.scans.date.from_path("/data/site_a/scan_20240131.tif") == datetime.date(2024, 1, 31)
    with pytest.raises(ValueError, match="no date"):
        entry.scans.date.from_path("/data/scan.tif")
    with pytest.raises(ValueError, match="not a date"):
        entry.scans.date.from_path("/data/scan_20241332.tif")


def test_one_model_name_for_training_and_inference(tmp_path):
    from data_catalog import entry_model_name, entry_model_uri

    default = load_entry(write(tmp_path, "a.yaml", GOOD + "model: {architecture: deeplab}\n")).entry
    assert entry_model_name(default) == "demo-deeplab"
    assert entry_model_uri(default) == "models:/demo-deeplab@champion"
    named = load_entry(write(tmp_path, "b.yaml", GOOD + "model: {name: shared-em, alias: staging}\n")).entry
    assert entry_model_name(named) == "shared-em" and entry_model_uri(named) == "models:/shared-em@staging"
    assert entry_model_name(named, "unet") == "shared-em"  # the catalog's architecture: the catalog's name
    assert entry_model_name(named, "maskrcnn") == "demo-maskrcnn"  # another architecture never joins it
    bare = load_entry(write(tmp_path, "c.yaml", GOOD)).entry
    assert entry_model_uri(bare) is None and entry_model_name(bare) == "demo-unet"


def test_training_registers_under_the_catalog_model_name(monkeypatch, tmp_path):
    """The name train_dataset registers is the one flows/infer.py looks up (the review's bug: a catalog
    model.name other than <dataset>-<architecture> was never found, so nightly retrained forever)."""
    from data_catalog import entry_model_name
    from flows.infer import model_uri

    named = load_entry(write(tmp_path, "b.yaml", GOOD + "model: {name: shared-em}\n")).entry
    assert model_uri(named) == f"models:/{entry_model_name(named)}@champion" == "models:/shared-em@champion"
    source = (Path(__file__).resolve().parents[1] / "tasks" / "training" / "train.py").read_text()
    assert "entry_model_name(entry, config.architecture)" in source and "registered_name(" not in source


def test_train_refuses_a_zero_budget_instead_of_using_the_catalogs(tmp_path):
    from tasks.training.data import TrainingError
    from tasks.training.train import plan_training

    loaded = load_entry(write(tmp_path, "t.yaml", GOOD + "labels: {path: x, mapping: {0: 0}, classes: [a, b]}\n"))
    with pytest.raises(TrainingError, match="epochs must be at least 1, got 0"):
        plan_training(loaded, None, 0, None)
    with pytest.raises(TrainingError, match="max_minutes must be more than 0, got 0"):
        plan_training(loaded, None, None, 0.0)
    for args in (["--epochs", "0"], ["--max-minutes", "0"], ["--max-minutes", "-1"]):
        result = runner.invoke(app, ["train", "isbi2012_em", *args])
        assert result.exit_code == 1, result.output
        assert "must be" in result.output and "Traceback" not in result.output


def test_cli_start_up_does_not_import_heavy_libraries():
    code = (
        "import sys; from typer.testing import CliRunner; from flows.cli import app;"
        "r = CliRunner().invoke(app, ['catalog', 'validate']); assert r.exit_code == 0, r.output;"
        "CliRunner().invoke(app, ['--help']);"
        "print(sorted(m for m in ('torch', 'monai', 'prefect', 'mlflow', 'zarr') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
