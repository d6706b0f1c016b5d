"""Skipping empty tiles never changes a valid voxel's prediction (hypothesis).

Random 2D and 3D scans, chunkings, tiles, dtypes and empty values (0, the dtype's extremes, -9999,
NaN) with a few small islands of valid data anywhere, ingested for real (so the pyramid the skip
rule reads is the one ingest writes): every voxel that is not empty gets under the default rule the
probabilities it gets with the rule off. The expected values come from the ``off`` run, which
runs every tile. 2D scans are GeoTIFFs declaring the value as nodata (``skip_empty: auto``); 3D
scans are NIfTI with the value given as the background (``skip_empty: <value>``).

The network is pointwise and bounded (logits 0 and 2 + tanh(mean over channels / 100), NaN read as
0, so never infinite or NaN whatever the input), so a voxel's probabilities do not depend on which
tiles cover it, and a valid voxel wrongly left to the skipped-tile background (class 0 with
probability 1) is off by more than 0.7.

Examples are derandomized (the same ones every run) and drawn per dtype; with the code before
float64 pyramid sums and the rounding margin in tasks/engine/skip.py, the float32 draws include a
GeoTIFF with GDAL's nodata -3.4028235e38 and data only in an interior chunk, predicted all background.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import rasterio
import torch
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tasks.engine.infer import EngineConfig, infer_scan
from tasks.engine.model_io import LoadedModel, ModelCard
from tasks.ingest import ScanSpec, ingest_scan

pytestmark = [pytest.mark.filterwarnings("ignore:Dataset has no geotransform"),
              pytest.mark.filterwarnings("ignore:.*GeoTIFF has no CRS"),
              pytest.mark.filterwarnings("ignore:overflow encountered")]  # float64 extremes: sums, float32 input
CARD = ModelCard(classes=["background", "foreground"])
DTYPES = [np.uint8, np.uint16, np.int16, np.float32, np.float64]


class BoundedPointwise(torch.nn.Module):
    def forward(self, x):
        z = 2.0 + torch.tanh(torch.nan_to_num(x, nan=0.0).mean(1, keepdim=True) / 100.0)
        return torch.cat([torch.zeros_like(z), z], 1)


def empty_values(dtype) -> list[float]:
    """0, the extremes of the dtype, -9999 where the dtype holds it, NaN for floats."""
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else np.finfo(dtype)
    values = [0.0, float(info.min), float(info.max)]
    if info.min <= -9999:
        values.append(-9999.0)
    if np.issubdtype(dtype, np.floating):
        values.append(float("nan"))
    return values


def data_values(dtype, empty: float):
    """Valid values: anything the dtype holds (extremes, subnormals), and the neighbours of the empty
    value (a block mean rounds them to it)."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        out = st.integers(int(info.min), int(info.max))
        near = [int(empty) + d for d in (-1, 1) if not np.isnan(empty) and info.min <= int(empty) + d <= info.max]
    else:
        out = st.floats(width=np.dtype(dtype).itemsize * 8, allow_nan=False, allow_infinity=False)
        with np.errstate(over="ignore"):
            near = [] if np.isnan(empty) else [float(np.nextafter(dtype(empty), dtype(d))) for d in (-np.inf, np.inf)]
        near = [v for v in near if np.isfinite(v)]
    return st.one_of(out, st.sampled_from(near)) if near else out


@st.composite
def scans(draw, dtype):
    dims = draw(st.sampled_from([2, 3]))
    empty = draw(st.sampled_from(empty_values(dtype)))
    channels = draw(st.integers(1, 2))
    # per axis a chunk size, a number of whole chunks and a remainder; most often three chunks or more
    # on every axis: interior chunks are the ones a box wrongly read off the pyramid leaves unread
    many = draw(st.sampled_from([True, True, True, False]))
    most = 5 if dims == 2 else 4
    grid = [(draw(st.integers(4, 12 if dims == 2 else 6)), draw(st.integers(3 if many else 1, most)))
            for _ in range(dims)]
    shape = tuple(max(c * k + draw(st.integers(0, c - 1)), 4) for c, k in grid)
    chunks = tuple(c for c, _ in grid)
    tile = tuple(draw(st.integers(min(4, n), min(n, 24))) for n in shape)
    array = np.full((channels, *shape), empty, dtype=dtype)
    # most often every island in a chunk touching no border of the scan (where there is one)
    interior = draw(st.sampled_from([True, True, True, False]))
    for _ in range(draw(st.integers(1, 3))):
        size = tuple(draw(st.integers(1, min(3, n))) for n in shape)
        at = []
        for n, c, s in zip(shape, chunks, size):
            count = -(-n // c)
            index = draw(st.integers(1, count - 2) if interior and count >= 3 else st.integers(0, count - 1))
            at.append(min(index * c + draw(st.integers(0, c - 1)), n - s))
        which = draw(st.sampled_from([[c] for c in range(channels)] + [list(range(channels))]))
        box = tuple(slice(a, a + s) for a, s in zip(at, size))
        for c in which:
            array[(c, *box)] = draw(hnp.arrays(dtype, size, elements=data_values(dtype, empty)))
    return array, empty, chunks, tile


def ingest(folder: Path, array: np.ndarray, empty: float, chunks) -> str:
    if array.ndim == 3:  # GeoTIFF declaring the empty value as every band's nodata
        src = folder / "scan.tif"
        with rasterio.open(src, "w", driver="GTiff", width=array.shape[2], height=array.shape[1],
                           count=array.shape[0], dtype=array.dtype.name, nodata=empty) as dst:
            dst.write(array)
        spec = ScanSpec("scan", "satellite", (src,), chunks=chunks)
    else:
        src = folder / "scan.nii"
        nib.save(nib.Nifti1Image(np.transpose(array, (3, 2, 1, 0)), np.eye(4)), src)
        spec = ScanSpec("scan", "mri", (src,), chunks=chunks)
    store = str(folder / "scan.zarr")
    ingest_scan(spec, store)
    return store


def infer(store: str, tile, skip) -> np.ndarray:
    infer_scan(store, LoadedModel(BoundedPointwise(), CARD, "bounded-pointwise"),
               EngineConfig(tile=tile, output_dtype="float32", skip_empty=skip, batch=8))
    return zarr.open_array(f"{store}/prediction/probabilities")[:]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_valid_voxels_get_the_same_prediction_as_with_skip_empty_off(dtype, data):
    array, empty, chunks, tile = data.draw(scans(dtype), label="case")
    if np.isnan(empty):
        valid = ~np.isnan(array).all(0)
    else:
        valid = ~(array == array.dtype.type(empty)).all(0)
    with tempfile.TemporaryDirectory() as folder:
        store = ingest(Path(folder), array, empty, chunks)
        off = infer(store, tile, "off")
        skipped = infer(store, tile, "auto" if array.ndim == 3 else empty)
    assert np.abs(skipped[:, valid] - off[:, valid]).max(initial=0.0) <= 1e-6
