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


def test_cli_list_counts_scans():
    result = runner.invoke(app, ["catalog", "list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 3}
    assert rows["brats2015_mri"].split("│")[3].strip() == "2"
    assert rows["spacenet_rio"].split("│")[3].strip() == "3"


def test_cli_start_up_does_not_import_heavy_libraries():
    code = (
        "import sys; from typer.testing import CliRunner; from flows.cli import app;"
        "r = CliRunner().invoke(app, ['catalog', 'validate']); assert r.exit_code == 0, r.output;"
        "CliRunner().invoke(app, ['--help']);"
        "print(sorted(m for m in ('torch', 'monai', 'prefect', 'mlflow', 'zarr') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
