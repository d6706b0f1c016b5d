"""Bad input: a one-line ScanError / CatalogError naming the file and the problem, and no
complete group left behind (ideally no group at all)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest
import yaml

from data_catalog import CatalogError, load_catalog, load_entry
from tasks import storage
from tasks.errors import ScanError
from tasks.ingest import LabelSpec, ScanSpec, ingest_scan

REPO = Path(__file__).parents[1]
SAMPLES = REPO / "data_catalog/samples"
FLAIR = SAMPLES / "mri/brats2015/brats_2013_pat0003_1/Flair_subtrMeanDivStd.nii.gz"
EM = SAMPLES / "em/isbi2012_train"
CHIP = SAMPLES / "satellite/spacenet1_rio/images/3band_013022223130_Public_img53.tif"


def _truncate_copy(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def _zero_length_nifti(path: Path) -> Path:
    """A NIfTI-1 header saying dim = (3, 4, 0, 5), written by hand (no data)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape((4, 0, 5))
    raw = bytearray(header.binaryblock)
    dims = np.frombuffer(bytes(raw[40:56]), dtype="<i2")
    assert list(dims[:4]) == [3, 4, 0, 5], dims  # the header really says a zero-length j axis
    path.write_bytes(bytes(raw) + b"\x00" * 4)  # vox_offset 352: extension flag, no voxels
    return path


# Each case: (spec, the path the error must name, a regex the problem must match).


def case_missing_path(tmp: Path):
    p = tmp / "nope" / "scan.nii.gz"
    return ScanSpec("x", "mri", (p,)), p, r"does not exist"


def case_empty_folder(tmp: Path):
    p = tmp / "empty"
    p.mkdir()
    return ScanSpec("x", "em", (p,)), p, r"no image slices"


def case_text_named_nii_gz(tmp: Path):
    p = tmp / "scan.nii.gz"
    p.write_text("this is not an image\n")
    return ScanSpec("x", "mri", (p,)), p, r"not a readable NIfTI"


def case_truncated_nii_gz(tmp: Path):
    p = _truncate_copy(FLAIR, tmp / "flair.nii.gz")
    return ScanSpec("x", "mri", (p,)), p, r"(?i)cannot read|not a readable|truncat|ended"


def case_zero_length_axis(tmp: Path):
    p = _zero_length_nifti(tmp / "zero.nii")
    return ScanSpec("x", "mri", (p,)), p, r"zero-length axis"


def case_slices_of_different_shapes(tmp: Path):
    folder = tmp / "slices"
    folder.mkdir()
    for i in range(3):
        iio.imwrite(folder / f"{i}.png", np.zeros((8, 8), dtype=np.uint8))
    iio.imwrite(folder / "3.png", np.zeros((8, 9), dtype=np.uint8))
    iio.imwrite(folder / "10.png", np.zeros((8, 8), dtype=np.uint8))
    return ScanSpec("x", "em", (folder,)), folder / "3.png", r"shape"


def case_not_a_tiff_tiff_reader(tmp: Path):
    p = tmp / "stack.tif"
    p.write_text("plain text, not a TIFF\n")
    return ScanSpec("x", "em", (p,), reader_kind="tiff"), p, r"not a readable TIFF"


def case_not_a_tiff_geotiff_reader(tmp: Path):
    p = tmp / "chip.tif"
    p.write_text("plain text, not a TIFF\n")
    return ScanSpec("x", "satellite", (p,)), p, r"not a readable GeoTIFF"


def case_truncated_geotiff(tmp: Path):
    p = _truncate_copy(CHIP, tmp / "chip.tif")
    return ScanSpec("x", "satellite", (p,)), p, r"(?i)cannot read|not a readable"


def case_truncated_tiff_stack(tmp: Path):
    p = _truncate_copy(CHIP, tmp / "chip.tif")
    return ScanSpec("x", "em", (p,), reader_kind="tiff"), p, r"(?i)cannot read|not a readable"


def case_label_value_not_in_mapping(tmp: Path):
    shutil.copytree(EM, tmp / "em")
    label_dir = tmp / "em" / "label"
    lab = iio.imread(label_dir / "4.png")
    lab[10, 20] = 128
    iio.imwrite(label_dir / "4.png", lab)
    spec = ScanSpec("x", "em", (tmp / "em" / "image",), spacing=(50.0, 4.0, 4.0),
                    labels=LabelSpec((label_dir,), {255: 0, 0: 1}, ("interior", "membrane")))
    return spec, label_dir, r"label value 128 is not in the label mapping"


def case_nifti_label_value_not_in_mapping(tmp: Path):
    data = np.zeros((5, 4, 3), dtype=np.float32)
    data[1, 1, 1] = 2.5  # not an integer class
    _save_nifti(tmp / "img.nii.gz", np.ones((5, 4, 3), dtype=np.float32))
    _save_nifti(tmp / "lab.nii.gz", data)
    spec = ScanSpec("x", "mri", (tmp / "img.nii.gz",),
                    labels=LabelSpec((tmp / "lab.nii.gz",), {0: 0, 1: 1, 2: 2}, ("a", "b", "c")))
    return spec, tmp / "lab.nii.gz", r"label value 2.5 is not in the label mapping"


def case_missing_label_file(tmp: Path):
    shutil.copytree(EM / "image", tmp / "image")
    missing = tmp / "label"
    spec = ScanSpec("x", "em", (tmp / "image",),
                    labels=LabelSpec((missing,), {255: 0, 0: 1}, ("interior", "membrane")))
    return spec, missing, r"does not exist"


def case_label_shape_mismatch(tmp: Path):
    _save_nifti(tmp / "img.nii.gz", np.ones((5, 4, 3), dtype=np.float32))
    _save_nifti(tmp / "lab.nii.gz", np.zeros((5, 4, 2), dtype=np.uint8))
    spec = ScanSpec("x", "mri", (tmp / "img.nii.gz",),
                    labels=LabelSpec((tmp / "lab.nii.gz",), {0: 0, 1: 1}, ("a", "b")))
    return spec, tmp / "lab.nii.gz", r"does not match"


def case_channels_on_different_grids(tmp: Path):
    _save_nifti(tmp / "a.nii.gz", np.ones((5, 4, 3), dtype=np.float32))
    _save_nifti(tmp / "b.nii.gz", np.ones((5, 4, 4), dtype=np.float32))
    return ScanSpec("x", "mri", (tmp / "a.nii.gz", tmp / "b.nii.gz")), tmp / "b.nii.gz", r"grid"


def _save_nifti(path: Path, data: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


CASES = [
    case_missing_path, case_empty_folder, case_text_named_nii_gz, case_truncated_nii_gz,
    case_zero_length_axis, case_slices_of_different_shapes, case_not_a_tiff_tiff_reader,
    case_not_a_tiff_geotiff_reader, case_truncated_geotiff, case_truncated_tiff_stack,
    case_label_value_not_in_mapping, case_nifti_label_value_not_in_mapping, case_missing_label_file,
    case_label_shape_mismatch, case_channels_on_different_grids,
]
IDS = [c.__name__.removeprefix("case_") for c in CASES]


def _assert_one_line_naming(err: ScanError, path: Path, problem: str) -> None:
    text = str(err)
    assert "\n" not in text and "\r" not in text, text
    assert err.path == str(path), (err.path, str(path))
    assert text.startswith(f"{path}: "), text
    assert err.problem and err.problem in text
    assert re.search(problem, err.problem), (problem, err.problem)


@pytest.mark.parametrize("make_case", CASES, ids=IDS)
def test_bad_input_raises_one_line_scan_error_and_leaves_no_group(tmp_path, make_case):
    spec, path, problem = make_case(tmp_path)
    store = tmp_path / "out" / "scan.zarr"
    with pytest.raises(ScanError) as info:
        ingest_scan(spec, store)
    _assert_one_line_naming(info.value, path, problem)
    assert not storage.is_complete(str(store))
    assert not store.exists(), f"a partial group was left at {store}"


def test_bad_input_over_an_old_complete_group_leaves_nothing_complete(tmp_path):
    # The scan was fine last night; today its file is truncated. The old result must not stay
    # marked complete for bytes that are no longer there.
    good = tmp_path / "flair.nii.gz"
    shutil.copy(FLAIR, good)
    spec = ScanSpec("x", "mri", (good,))
    store = tmp_path / "scan.zarr"
    assert ingest_scan(spec, store).status == "ingested"
    _truncate_copy(FLAIR, good)
    with pytest.raises(ScanError) as info:
        ingest_scan(spec, store)
    assert "\n" not in str(info.value)
    assert info.value.path == str(good)
    assert not storage.is_complete(str(store))


# --------------------------------------------------------------------------------------------
# catalog
# --------------------------------------------------------------------------------------------

VALID_ENTRY = {
    "name": "test_ds",
    "modality": "mri",
    "scans": {"path": "samples/*.nii.gz"},
    "labels": {"path": "{dir}/labels/{name}", "mapping": {0: 0, 1: 1}, "classes": ["bg", "fg"]},
}


def _write_entry(path: Path, entry: dict) -> Path:
    path.write_text(yaml.safe_dump(entry, sort_keys=False))
    return path


def _problems(err: CatalogError) -> list[tuple[Path, str, str]]:
    return [(Path(p.file), p.field, p.reason) for p in err.problems]


def test_valid_entry_loads(tmp_path):
    loaded = load_entry(_write_entry(tmp_path / "ok.yaml", VALID_ENTRY))
    assert loaded.entry.name == "test_ds"
    assert loaded.entry.modality == "mri"


def test_unknown_modality(tmp_path):
    path = _write_entry(tmp_path / "ct.yaml", {**VALID_ENTRY, "modality": "ct"})
    with pytest.raises(CatalogError) as info:
        load_entry(path)
    problems = _problems(info.value)
    assert len(problems) == 1
    file, field, reason = problems[0]
    assert file.resolve() == path.resolve()
    assert field == "modality"
    assert "mri" in reason and "em" in reason and "satellite" in reason
    assert str(info.value) == f"{path}: modality: {reason}"


def test_missing_required_field(tmp_path):
    entry = {k: v for k, v in VALID_ENTRY.items() if k != "scans"}
    path = _write_entry(tmp_path / "noscans.yaml", entry)
    with pytest.raises(CatalogError) as info:
        load_entry(path)
    assert _problems(info.value) == [(path, "scans", "missing required field")]


def test_missing_nested_required_field(tmp_path):
    entry = {**VALID_ENTRY, "labels": {"path": "x", "classes": ["bg", "fg"]}}
    path = _write_entry(tmp_path / "nomapping.yaml", entry)
    with pytest.raises(CatalogError) as info:
        load_entry(path)
    assert _problems(info.value) == [(path, "labels.mapping", "missing required field")]


@pytest.mark.parametrize(
    "extra, field",
    [({"colour": "red"}, "colour"), ({"reader": {"spcing": [1, 1, 1]}}, "reader.spcing")],
    ids=["top-level", "nested"],
)
def test_unknown_extra_field(tmp_path, extra, field):
    path = _write_entry(tmp_path / "extra.yaml", {**VALID_ENTRY, **extra})
    with pytest.raises(CatalogError) as info:
        load_entry(path)
    assert _problems(info.value) == [(path, field, "unknown field")]


def test_every_problem_of_every_file_is_reported(tmp_path):
    folder = tmp_path / "catalog"
    folder.mkdir()
    _write_entry(folder / "a_ok.yaml", VALID_ENTRY)
    bad1 = _write_entry(folder / "b_bad.yaml", {**VALID_ENTRY, "name": "b", "modality": "ct", "colour": 1})
    bad2 = _write_entry(folder / "c_bad.yaml", {"name": "c", "modality": "em"})
    with pytest.raises(CatalogError) as info:
        load_catalog(folder)
    got = {(f.name, field) for f, field, _ in _problems(info.value)}
    assert got == {("b_bad.yaml", "modality"), ("b_bad.yaml", "colour"), ("c_bad.yaml", "scans")}
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    assert all(line.startswith((f"{bad1}: ", f"{bad2}: ")) for line in lines)


def test_bundled_catalog_is_valid():
    names = sorted(e.entry.name for e in load_catalog(REPO / "data_catalog"))
    assert names == ["brats2015_mri", "isbi2012_em", "spacenet_rio"]


# --------------------------------------------------------------------------------------------
# the CLI
# --------------------------------------------------------------------------------------------

CLI_CASES = [
    case_missing_path, case_empty_folder, case_text_named_nii_gz, case_truncated_nii_gz,
    case_zero_length_axis, case_slices_of_different_shapes, case_not_a_tiff_tiff_reader,
    case_not_a_tiff_geotiff_reader, case_truncated_geotiff,
]


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("make_case", CLI_CASES, ids=[c.__name__.removeprefix("case_") for c in CLI_CASES])
def test_cli_ingest_bad_input(tmp_path, make_case):
    from typer.testing import CliRunner

    from flows.cli import app

    spec, path, problem = make_case(tmp_path)
    store = tmp_path / "out" / "scan.zarr"
    args = ["ingest", *[str(s) for s in spec.sources], "--store", str(store), "--modality", spec.modality]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = _error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path}: "), lines[0]
    assert re.search(problem, lines[0]), lines[0]
    assert not storage.is_complete(str(store))
    assert not store.exists()


def test_cli_ingest_bad_input_in_a_real_process(tmp_path):
    spec, path, _ = case_truncated_nii_gz(tmp_path)
    store = tmp_path / "scan.zarr"
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "ingest", str(path), "--store", str(store)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {path}: ")
    assert "Traceback" not in proc.stderr
    assert not store.exists()


def test_cli_catalog_validate_reports_file_field_reason(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    folder = tmp_path / "catalog"
    folder.mkdir()
    bad = _write_entry(folder / "bad.yaml", {**VALID_ENTRY, "modality": "ct", "colour": 1})
    _write_entry(folder / "also_bad.yaml", {k: v for k, v in VALID_ENTRY.items() if k != "scans"} | {"name": "z"})
    result = CliRunner().invoke(app, ["catalog", "validate", str(folder)])
    assert result.exit_code == 1, result.output
    lines = _error_lines(result.stderr)
    assert sorted(lines) == sorted([
        f"{folder / 'also_bad.yaml'}: scans: missing required field",
        f"{bad}: colour: unknown field",
        next(line for line in lines if line.startswith(f"{bad}: modality: ")),
    ])
    ok = CliRunner().invoke(app, ["catalog", "validate", str(REPO / "data_catalog")])
    assert ok.exit_code == 0, ok.output
