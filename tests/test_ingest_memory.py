"""Ingest working memory, measured (tracemalloc traces numpy's buffers), not taken from counters.

Each scan is 64 MiB of voxels with a realistic cross-section, so one slab (one chunk row along the
first spatial axis) is a large part of it: the slab-at-a-time ingest held two slabs (the one being
written, one read ahead), a float downsampling copy and 8 MiB hash blocks, i.e. 55-140 % of these
scans. Streaming windows of whole chunks keeps it to a few windows plus the pyramid's unfinished
chunks. GDAL's block cache is C memory, outside tracemalloc: ``test_geotiff_block_cache_is_dropped``
reads GDAL's own counter of it.
"""

from __future__ import annotations

import gzip
import shutil
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import rasterio
import tifffile
from rasterio.transform import from_origin

from tasks.ingest import ScanSpec, ingest_scan

MIB = 1 << 20
SCAN_BYTES = 64 * MIB


def _nifti(path: Path) -> ScanSpec:
    # (i, j, k) = (512, 512, 64) float32: 1 MiB per k; the MRI chunks are 32 deep, a 32 MiB slab
    data = np.random.default_rng(0).random((512, 512, 64), dtype=np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path / "scan.nii"))
    return ScanSpec("mri", "mri", (path / "scan.nii",))


def _nifti_gz(path: Path) -> ScanSpec:
    _nifti(path)
    with open(path / "scan.nii", "rb") as src, gzip.open(path / "scan.nii.gz", "wb", compresslevel=1) as dst:
        shutil.copyfileobj(src, dst, 16 * MIB)
    (path / "scan.nii").unlink()
    return ScanSpec("mri", "mri", (path / "scan.nii.gz",))


def _tiff(path: Path) -> ScanSpec:
    # 4 uncompressed pages of 4096 x 4096 uint8 (16 MiB each, one page per chunk row)
    rng = np.random.default_rng(1)
    tifffile.imwrite(path / "stack.tif", rng.integers(0, 255, (4, 4096, 4096), dtype=np.uint8),
                     photometric="minisblack", metadata={"axes": "ZYX"})
    return ScanSpec("em", "em", (path / "stack.tif",), spacing=(40.0, 8.0, 8.0))


def _geotiff(path: Path) -> ScanSpec:
    # 4 bands uint16, 2048 rows x 4096 columns, tiled 512, deflate: a 512-row slab is 16 MiB
    bands, h, w = 4, 2048, 4096
    rng = np.random.default_rng(2)
    with rasterio.open(path / "scene.tif", "w", driver="GTiff", height=h, width=w, count=bands,
                       dtype="uint16", crs="EPSG:32633", transform=from_origin(0, 0, 10, 10), tiled=True,
                       blockxsize=512, blockysize=512, compress="deflate") as dst:
        for r0 in range(0, h, 512):
            dst.write(rng.integers(1, 4000, (bands, 512, w), dtype=np.uint16),
                      window=rasterio.windows.Window(0, r0, w, 512))
    return ScanSpec("s2", "satellite", (path / "scene.tif",))


MAKERS = {"nifti": _nifti, "nifti-gz": _nifti_gz, "tiff": _tiff, "geotiff": _geotiff}
# Bound on the traced peak, as a fraction of the scan's voxel bytes. Measured on the slab-at-a-time
# ingest: nifti 87.9 MiB, nifti-gz 76.7, tiff 51.9, geotiff 57.1; windowed: 17.0, 52.9, 14.7, 22.9.
# A .nii.gz can only be read front to back, so it holds one 32 MiB slab (gathered from pieces).
BOUND = {"nifti": 0.45, "nifti-gz": 1.0, "tiff": 0.45, "geotiff": 0.45}


@pytest.fixture(scope="module", params=sorted(MAKERS))
def scan(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, MAKERS[request.param](folder)


def _warm_up(kind: str, folder: Path) -> None:
    """One small ingest of the same kind first: what ingest imports lazily (ome-zarr, codecs) is
    Python objects that tracemalloc would count."""
    folder.mkdir()
    if kind.startswith("nifti"):
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(folder / "w.nii"))
        spec = ScanSpec("w", "mri", (folder / "w.nii",))
    elif kind == "tiff":
        tifffile.imwrite(folder / "w.tif", np.zeros((2, 8, 8), np.uint8), metadata={"axes": "ZYX"})
        spec = ScanSpec("w", "em", (folder / "w.tif",))
    else:
        with rasterio.open(folder / "w.tif", "w", driver="GTiff", height=8, width=8, count=1, dtype="uint16",
                           crs="EPSG:32633", transform=from_origin(0, 0, 10, 10)) as dst:
            dst.write(np.ones((1, 8, 8), np.uint16))
        spec = ScanSpec("w", "satellite", (folder / "w.tif",))
    ingest_scan(spec, folder / "w.zarr")


def _traced_ingest(spec: ScanSpec, store: Path):
    """Ingest ``spec`` under tracemalloc: the result and the traced peak above what was held before."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = ingest_scan(spec, store)
        return result, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_ingest_working_memory_is_a_few_windows_not_slabs(scan, tmp_path):
    kind, spec = scan
    _warm_up(kind, tmp_path / "warm-up")
    result, peak = _traced_ingest(spec, tmp_path / "scan.zarr")
    assert result.status == "ingested"
    itemsize = {"nifti": 4, "nifti-gz": 4, "tiff": 1, "geotiff": 2}[kind]
    assert int(np.prod(result.shape)) * itemsize == SCAN_BYTES
    assert peak <= BOUND[kind] * SCAN_BYTES, f"{kind}: traced peak {peak / MIB:.1f} MiB of a {SCAN_BYTES // MIB} MiB scan"


def test_geotiff_block_cache_is_dropped_after_whole_block_reads(tmp_path):
    """GDAL keeps decoded tiles (up to the 64 MiB cap, resident C memory) after a read; a window of
    whole tiles is never read again, so the reader leaves the cache empty behind it."""
    import ctypes
    import glob
    import os

    from tasks.ingest.readers import GeoTiffReader

    libs = glob.glob(os.path.join(os.path.dirname(rasterio.__file__) + ".libs", "libgdal*"))
    if not libs:
        pytest.skip("rasterio not from a wheel bundling libgdal")
    gdal = ctypes.CDLL(libs[0])
    gdal.GDALGetCacheUsed64.restype = ctypes.c_int64
    gdal.GDALGetCacheMax64.restype = ctypes.c_int64
    spec = _geotiff(tmp_path)
    with GeoTiffReader(spec.sources[0]) as reader:
        assert reader.windowed
        block = reader.read_window(0, 1024, 0, 1024)
        assert block.shape == (4, 1024, 1024)
        assert gdal.GDALGetCacheUsed64() == 0
        assert gdal.GDALGetCacheMax64() == 64 << 20
        reader.read_window(100, 300, 0, 700)  # not whole tiles: they stay cached for the next read
        assert gdal.GDALGetCacheUsed64() > 0


def _raster(path: Path, height: int, width: int) -> ScanSpec:
    """One band of uint16, tiled 64 (the chunks asked for), stored chunks of 64 x 64."""
    rng = np.random.default_rng(3)
    with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=1, dtype="uint16",
                       crs="EPSG:32633", transform=from_origin(0, 0, 10, 10), tiled=True,
                       blockxsize=64, blockysize=64) as dst:
        dst.write(rng.integers(1, 4000, (1, height, width), dtype=np.uint16))
    return ScanSpec(path.stem, "satellite", (path,), chunks=(64, 64))


def test_raster_pyramid_holds_one_unfinished_chunk_per_level_however_wide(tmp_path, monkeypatch):
    """Levels 2.. of a raster finish their chunks over several windows. Taken row by row, each held
    a row of unfinished chunks as wide as the scene (here the 32768-wide scene's traced peak was
    1.8x the 4096-wide one's of the same pixels); taken chunk within chunk
    (``PyramidPlan.nested_order``) each holds one, and the width no longer matters (1.01x)."""
    from tasks.ingest import to_zarr

    monkeypatch.setattr(to_zarr, "WINDOW_BYTES", 64 << 10)  # windows of 128 x 256: the buffers show
    _warm_up("geotiff", tmp_path / "warm-up")
    peaks = {}
    for name, (height, width) in {"wide": (256, 32768), "square": (2048, 4096)}.items():
        spec = _raster(tmp_path / f"{name}.tif", height, width)
        result, peaks[name] = _traced_ingest(spec, tmp_path / f"{name}.zarr")
        assert result.status == "ingested" and result.shape == (1, height, width)
    assert peaks["wide"] <= 1.25 * peaks["square"], {k: round(v / MIB, 2) for k, v in peaks.items()}


def test_rows_only_raster_holds_its_slab_packed_and_parks_the_pyramid_chunks(tmp_path, monkeypatch):
    """A striped raster is read in whole rows: a slab (one chunk row) at a time, handed out in
    windows. Held as read, the slab alone is 1x, and levels 1.. finish a chunk only over the next
    slabs: with their unfinished chunks parked (LZ4), the traced peak was 1.97x the slab here.
    Holding the slab packed too (packed piece by piece as read, unpacked a window at a time) and
    building levels 2.. from level 1 brought it to 0.96x: mostly level 1's row of parked chunks and
    the next slab, read meanwhile."""
    from tasks.ingest import to_zarr

    monkeypatch.setattr(to_zarr, "WINDOW_BYTES", 256 << 10)  # read in pieces of 8 rows; 8+ windows a slab
    _warm_up("geotiff", tmp_path / "warm-up")
    height, width = 1024, 16384
    path = tmp_path / "striped.tif"
    yy, xx = np.mgrid[0:height, 0:width]
    smooth = (1000 + 800 * np.sin(yy / 97.0) * np.cos(xx / 131.0)).astype(np.uint16)  # a scene, not noise
    with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=1, dtype="uint16",
                       crs="EPSG:32633", transform=from_origin(0, 0, 10, 10), tiled=False) as dst:
        dst.write(smooth[None])
    del yy, xx
    spec = ScanSpec("striped", "satellite", (path,), chunks=(64, 512))
    slab = 64 * width * 2
    result, peak = _traced_ingest(spec, tmp_path / "striped.zarr")
    assert result.status == "ingested" and result.shape == (1, height, width)
    import zarr

    image = zarr.open_group(str(tmp_path / "striped.zarr" / "image"), mode="r")
    np.testing.assert_array_equal(image["0"][0], smooth)  # every packed window came back whole
    means = smooth
    for level in (1, 2, 3):  # block means of the level above, rounded half up (hand-worked: sum + 2) // 4
        h, w = means.shape
        means = ((means.reshape(h // 2, 2, w // 2, 2).astype(np.uint32).sum(axis=(1, 3)) + 2) // 4).astype(np.uint16)
        np.testing.assert_array_equal(image[str(level)][0], means, err_msg=f"level {level}")
    assert peak <= 1.3 * slab, round(peak / slab, 2)
