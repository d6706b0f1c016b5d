"""tasks.ingest.readers.NiftiReader: bands of a plain .nii read straight from the file equal
nibabel's own reading of the whole volume, whatever the dtype, channels and band; files stored
otherwise (scaled, big-endian) take nibabel's path and equal it too; a truncated file is one clear
error naming it."""

from __future__ import annotations

import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tasks.errors import ScanError
from tasks.ingest.readers import NiftiReader


def _save(path: Path, data: np.ndarray, endianness: str = "<", slope: float | None = None) -> Path:
    img = nib.Nifti1Image(data, np.diag([0.9, 1.1, 2.0, 1.0]), nib.Nifti1Header(endianness=endianness))
    if slope is not None:
        img.header.set_slope_inter(slope, 0.0)
    nib.save(img, path)
    return path


def _expected(paths: list[Path]) -> np.ndarray:
    """(C, Z, Y, X) from nibabel's full read of every file (scaling applied as nibabel applies it)."""
    parts = []
    for p in paths:
        a = np.asanyarray(nib.load(str(p)).dataobj)
        a = a[..., None] if a.ndim == 3 else a
        parts.append(np.moveaxis(a, 3, 0).transpose(0, 3, 2, 1))
    return np.concatenate(parts)


rng = np.random.default_rng(2)
CASES = {  # name: (arrays per file, save options, direct read expected)
    "float32": ([rng.random((13, 7, 9), dtype=np.float32)], {}, True),
    "int16-4d": ([rng.integers(-900, 900, (6, 5, 8, 3)).astype(np.int16)], {}, True),
    "uint8-two-files": ([rng.integers(0, 255, (6, 5, 8)).astype(np.uint8)] * 2, {}, True),
    "scaled-int16": ([rng.integers(0, 900, (6, 5, 8)).astype(np.int16)], {"slope": 2.5}, False),
    "big-endian": ([rng.random((6, 5, 8), dtype=np.float32)], {"endianness": ">"}, False),
}


@pytest.mark.parametrize("name", CASES)
def test_every_band_equals_nibabels_whole_read(tmp_path, name):
    arrays, options, direct = CASES[name]
    paths = [_save(tmp_path / f"{name}-{n}.nii", a, **options) for n, a in enumerate(arrays)]
    want = _expected(paths)
    with NiftiReader(paths) as reader:
        assert all((d is not None) == direct for d in reader._direct)
        assert reader.shape == want.shape and reader.dtype == want.dtype
        nz, ny = want.shape[1], want.shape[2]
        for start, stop in [(0, nz), (0, 1), (2, nz - 1)]:
            np.testing.assert_array_equal(reader.read_slab(start, stop), want[:, start:stop])
            for lo, hi in itertools.combinations(range(ny + 1), 2):
                got = reader.read_window(start, stop, lo, hi)
                assert got.flags.c_contiguous
                np.testing.assert_array_equal(got, want[:, start:stop, lo:hi])


def test_a_truncated_plain_nii_is_an_error_naming_it(tmp_path):
    path = _save(tmp_path / "cut.nii", rng.random((16, 16, 40), dtype=np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    reader = NiftiReader([path])
    assert reader._direct[0] is not None
    reader.read_window(0, 4, 0, 16)  # the first half is there
    with pytest.raises(ScanError) as err:
        reader.read_window(30, 40, 2, 9)
    assert "cut.nii" in str(err.value) and "cannot read slices 30-39" in str(err.value)
    reader.close()
