#!/usr/bin/env python
"""Benchmark: tilewise ingest vs. "read it all with the native library, then write Zarr".

    .venv/bin/python benchmarks/ingest.py [--size-gb 1.0] [--workdir DIR] [--keep]
                                          [--kinds nifti,nifti-gz,tiff,geotiff,geotiff-striped]
                                          [--repeats 2]
                                          [--breakdown] [--same-work]

For every input kind it builds a synthetic scan of about ``--size-gb`` GiB (uncompressed voxel
bytes; 1 GiB = 2**30 bytes) in a work folder, then measures in fresh subprocesses, one run each:

* tilewise:  ``tasks.ingest.to_zarr.ingest_scan(spec, store, force=True)`` into a new store
             (level 0 + pyramid + stats + source sha256 + OME-NGFF metadata).
* reference: the native library reads the whole array into memory (nibabel
             ``np.asarray(img.dataobj)``, ``tifffile.imread``, rasterio ``src.read()``), then
             ``zarr.create_array`` + one assignment writes it channel-first with the same chunks
             and the same codec (``tasks.ingest.to_zarr.COMPRESSOR``). Level 0 only.
* same-work (``--same-work``): the reference plus the rest of tilewise's work done the plain
             way: the source's sha256 on a thread beside it, the value range, each pyramid level
             computed whole in memory (tilewise's plan and means) and written with the pyramid's
             codec. It holds the whole scan and does one thing after another, so "same/ref" is
             what the work itself costs on this machine, done plainly, and "tw/same" what
             tilewise's pipeline (streaming, hashing and encoding beside the reads) gains or loses
             against that.

Memory: each worker imports everything both paths need (tilewise modules, numpy, zarr, nibabel,
tifffile, rasterio, ome_zarr), records VmRSS as its baseline, resets the kernel's peak-RSS mark
(/proc/self/clear_refs, where allowed), runs, and reads the peak mark VmHWM from /proc/self/status.
Working memory = peak - baseline: the memory the ingest itself needs, not the import cost.
(``getrusage().ru_maxrss`` is not used where the mark can be reset: clear_refs does not lower it and
on Linux it keeps the spawning driver's resident set, so every kind read the same ~334 MB.)

Each run also reports its CPU seconds over all threads (``os.times``), user and system: the
system share is the kernel's (page faults, copies into the page cache, its reclaim) and moves with
the machine's state more than the code's.

The runs alternate (tilewise first in odd repeats, reference first in even ones) and the table
reports the best (minimum) time over ``--repeats`` runs and the largest working memory seen. The
inputs sit in the page cache after generation (24 GiB machine), so both sides read from RAM, not
disk; the stores are written to the work folder and removed at the end, not after each run: removing
thousands of chunk files makes ext4 skip those freshly freed inodes when the next run creates its
files (``recently_deleted`` in the kernel's profile), which slowed whichever run came next by up to
4 s at 1 GiB -- a cost of the benchmark's own clean-up that a nightly ingest of new scans does not
pay. After each run its store is written back and its pages dropped from the page cache
(``measure.settle``; the files stay): otherwise every kept store left ~1 GiB of cache behind, the
later runs paid the kernel's reclaim (writing 1 GiB of chunk files took 0.3 s of system time with
free memory, up to 2.3 s with the cache full), and which side it hit most depended on the order:
the plain NIfTI ratio read 0.86-0.89 in two such runs, 1.12-1.20 settled. Where the disk cannot
hold every store, each is removed after its run (and the output says so).

Inputs (realistic shapes; their size scales with --size-gb):

* nifti:    plain ``.nii`` (uncompressed, memory-mappable), float32, (i, j, k) = (512, 512, 1024)
            at 1 GiB: a high-resolution (0.5 mm) whole-head volume after bias correction and
            resampling, hence float32. Smooth head/brain/ventricle structure, texture, noise.
* nifti-gz: the same voxels as ``.nii.gz`` (gzip level 1, nibabel's default), the usual MRI
            distribution format: reading it means one front-to-back decompression.
* tiff:     an uncompressed multi-page EM stack written with tifffile, uint8, Z pages of
            4096 x 4096 (64 pages at 1 GiB), 8 nm pixels, 40 nm sections (spacing passed in the
            ScanSpec as a catalog would, so the pyramid keeps every section).
* geotiff:  a Sentinel-2-like 4-band (B02 B03 B04 B08) uint16 GeoTIFF, tiled 512 x 512, DEFLATE +
            horizontal predictor, UTM 33N (EPSG:32633), 10 m pixels, nodata 0, written with
            rasterio; about 11776 x 11776 pixels at 1 GiB (a Sentinel-2 tile is 10980 x 10980).
* geotiff-striped: the same scene striped (GDAL's default strips of a few rows, as many exporters
            write): it can only be read in whole rows, so ingest holds one slab (a chunk row).

``--breakdown`` adds one instrumented tilewise run per kind (not part of the table) that wall-
clocks the pieces of the ingest (slab reads in the read-ahead thread, stats, downsampling, Zarr
writes per level, source hashing in its thread) and prints each thread's CPU seconds (the main
thread, the encoders, the hash, the read-ahead; zarr's own threads outlive the run and are left
out). Threads overlap, so the pieces need not add up.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30
MIB = 1 << 20
RESULT_MARK = "BENCH_RESULT "
GEN_VERSION = 1  # bump when the generators change, so --workdir reuse regenerates

# kind -> modality, file name, what it is
KINDS = {
    "nifti": ("mri", "mri_float32.nii", "plain .nii float32"),
    "nifti-gz": ("mri", "mri_float32.nii.gz", ".nii.gz (gzip 1) float32"),
    "tiff": ("em", "em_uint8.tif", "TIFF stack uint8"),
    "geotiff": ("satellite", "s2_4band_uint16.tif", "GeoTIFF 4xuint16 deflate"),
    "geotiff-striped": ("satellite", "s2_4band_uint16_striped.tif", "GeoTIFF striped 4xuint16"),
}
DEFAULT_KINDS = ("nifti", "nifti-gz", "tiff", "geotiff", "geotiff-striped")
EM_SPACING = (40.0, 8.0, 8.0)  # nm: section thickness, pixel size
EM_UNIT = "nanometer"


# --------------------------------------------------------------------------------------------
# memory helpers
from measure import maxrss as _maxrss, proc_status as _vm, reset_peak as _reset_peak, rss as _rss, settle as _settle  # noqa: E402


def _peak(reset: bool) -> int:
    """Peak resident set since the last ``_reset_peak``: VmHWM (which clear_refs resets), else
    ru_maxrss (which it does not, and which on Linux includes the spawning parent's peak)."""
    hwm = _vm("VmHWM") if reset else 0
    return hwm or _maxrss()


# --------------------------------------------------------------------------------------------
# input generation (in pieces; a few tens of MiB at a time)


def _nifti_shape(size: int) -> tuple[int, int, int]:
    ni = nj = 512
    nk = max(16, math.ceil(size / (ni * nj * 4)))
    return ni, nj, nk


def _mri_block(k0: int, k1: int, nk: int, nj: int, ni: int, rng) -> "np.ndarray":
    """Voxels k0:k1 as a C-ordered (k, j, i) float32 array, which is NIfTI's (i, j, k) file order."""
    import numpy as np

    f32 = np.float32
    z = (((np.arange(k0, k1, dtype=f32) + 0.5) / nk) * 2 - 1)[:, None, None]
    y = (((np.arange(nj, dtype=f32) + 0.5) / nj) * 2 - 1)[None, :, None]
    x = (((np.arange(ni, dtype=f32) + 0.5) / ni) * 2 - 1)[None, None, :]
    r2 = (x / f32(0.78)) ** 2 + (y / f32(0.9)) ** 2 + (z / f32(0.95)) ** 2  # head
    vol = np.where(r2 < 1, f32(450), f32(0))
    vol += np.where(r2 < 0.72, f32(350), f32(0))  # brain
    vent = (x / f32(0.12)) ** 2 + ((y - f32(0.05)) / f32(0.3)) ** 2 + (z / f32(0.35)) ** 2
    vol -= np.where(vent < 1, f32(550), f32(0))  # ventricles (dark)
    bias = f32(1) + f32(0.12) * np.sin(f32(2.1) * x + f32(0.3)) * np.cos(f32(1.7) * y) + f32(0.06) * z
    vol *= bias
    # smooth-ish texture: coarse noise, repeated 8x in-plane and 4x through-plane
    nkz = k1 - k0
    coarse = rng.standard_normal((-(-nkz // 4), -(-nj // 8), -(-ni // 8)), dtype=f32) * f32(35)
    tex = coarse.repeat(4, 0)[:nkz].repeat(8, 1)[:, :nj].repeat(8, 2)[:, :, :ni]
    vol += tex * (r2 < 1)
    vol += rng.standard_normal(vol.shape, dtype=f32) * f32(12)  # thermal noise everywhere
    return vol


def mri_header(shape_ijk: tuple[int, int, int], dtype):
    """The NIfTI header of the synthetic head: 0.5 mm isotropic, centred, sform = qform (code 1)."""
    import nibabel as nib
    import numpy as np

    ni, nj, nk = shape_ijk
    zoom = 0.5
    affine = np.diag([zoom, zoom, zoom, 1.0])
    affine[:3, 3] = [-ni * zoom / 2, -nj * zoom / 2, -nk * zoom / 2]
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((ni, nj, nk))
    hdr.set_data_dtype(dtype)
    hdr.set_zooms((zoom, zoom, zoom))
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_qform(affine, 1)
    hdr.set_sform(affine, 1)
    return hdr


def make_nifti(path: Path, size: int, seed: int = 1) -> dict:
    import nibabel as nib
    import numpy as np

    ni, nj, nk = _nifti_shape(size)
    hdr = mri_header((ni, nj, nk), np.float32)
    hdr.set_slope_inter(1.0, 0.0)
    hdr["vox_offset"] = 352
    hdr["descrip"] = b"tilewise benchmark synthetic MRI"
    rng = np.random.default_rng(seed)
    step = 16
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        hdr.write_to(f)
        f.write(b"\0" * (352 - f.tell()))  # empty extension flag, pad to vox_offset
        for k0 in range(0, nk, step):
            f.write(_mri_block(k0, min(k0 + step, nk), nk, nj, ni, rng).tobytes())
    tmp.rename(path)
    img = nib.load(str(path))  # sanity: nibabel agrees on what we wrote
    assert img.shape == (ni, nj, nk) and img.get_data_dtype() == np.float32, (img.shape, img.get_data_dtype())
    return {"shape_source": [ni, nj, nk], "dtype": "float32", "note": "(i, j, k), 0.5 mm isotropic"}


def make_nifti_gz(path: Path, plain: Path) -> dict:
    tmp = path.with_name(path.name + ".part")
    with open(plain, "rb") as src, gzip.open(tmp, "wb", compresslevel=1) as dst:
        shutil.copyfileobj(src, dst, 16 * MIB)
    tmp.rename(path)
    return {"note": f"gzip level 1 of {plain.name}"}


def _em_shape(size: int) -> tuple[int, int, int]:
    ny = nx = 4096
    return max(1, math.ceil(size / (ny * nx))), ny, nx


def make_tiff(path: Path, size: int, seed: int = 2) -> dict:
    import numpy as np
    import tifffile

    nz, ny, nx = _em_shape(size)
    rng = np.random.default_rng(seed)
    yy = np.arange(ny, dtype=np.float32)[:, None]
    xx = np.arange(nx, dtype=np.float32)[None, :]
    # cell-like texture: bright cytoplasm, dark curvy "membranes", some organelle blobs
    wave = np.sin(xx * np.float32(0.021) + np.float32(3) * np.sin(yy * np.float32(0.006)))
    wave2 = np.sin(yy * np.float32(0.017) + np.float32(2.5) * np.sin(xx * np.float32(0.008)))
    base = (np.float32(150) - np.float32(70) * (np.abs(wave * wave2) < np.float32(0.05))
            - np.float32(40) * ((wave + wave2) > np.float32(1.6))).astype(np.uint8)
    del wave, wave2

    def pages():
        for z in range(nz):
            page = np.roll(base, (3 * z, 2 * z), axis=(0, 1))
            coarse = rng.integers(0, 40, (ny // 16, nx // 16), dtype=np.uint8)
            page += coarse.repeat(16, 0).repeat(16, 1)
            page += rng.integers(0, 28, (ny, nx), dtype=np.uint8)
            yield page

    tmp = path.with_name(path.name + ".part")
    per_cm = 1e7 / EM_SPACING[1]  # 8 nm pixels -> pixels per centimetre
    tifffile.imwrite(tmp, pages(), shape=(nz, ny, nx), dtype=np.uint8, photometric="minisblack",
                     metadata={"axes": "ZYX"}, resolution=(per_cm, per_cm), resolutionunit="CENTIMETER",
                     bigtiff=nz * ny * nx > 3.5 * GIB)
    tmp.rename(path)
    return {"shape_source": [nz, ny, nx], "dtype": "uint8", "note": "ZYX pages 4096x4096, uncompressed"}


def _geotiff_shape(size: int) -> tuple[int, int, int]:
    bands = 4
    side = max(512, math.ceil(math.sqrt(size / (bands * 2)) / 512) * 512)
    return bands, side, side


def make_geotiff(path: Path, size: int, seed: int = 3, tiled: bool = True) -> dict:
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    bands, h, w = _geotiff_shape(size)
    rng = np.random.default_rng(seed)
    band_base = np.array([600, 900, 800, 2500], dtype=np.float32)[:, None, None]
    band_gain = np.array([400, 500, 900, 2200], dtype=np.float32)[:, None, None]
    # tiled 512² (a COG's layout), or striped: GDAL's default strips (a few rows each), as many
    # exporters write them
    layout = dict(tiled=True, blockxsize=512, blockysize=512) if tiled else dict(tiled=False)
    profile = dict(driver="GTiff", height=h, width=w, count=bands, dtype="uint16", crs="EPSG:32633",
                   transform=from_origin(399960.0, 5000040.0, 10.0, 10.0), nodata=0, **layout,
                   compress="deflate", predictor=2, num_threads="ALL_CPUS", BIGTIFF="IF_SAFER")
    tmp = path.with_name(path.name + ".part")
    xx = np.arange(w, dtype=np.float32)[None, None, :]
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.descriptions = ("B02", "B03", "B04", "B08")
        for r0 in range(0, h, 512):
            rows = min(512, h - r0)
            yy = np.arange(r0, r0 + rows, dtype=np.float32)[None, :, None]
            # land-cover patches (64 px fields), a smooth gradient, sensor noise
            field = rng.random((1, -(-rows // 64), -(-w // 64)), dtype=np.float32)
            field = field.repeat(64, 1)[:, :rows].repeat(64, 2)[:, :, :w]
            smooth = np.float32(0.15) * np.sin(xx * np.float32(0.0013)) * np.cos(yy * np.float32(0.0011))
            val = band_base + band_gain * (field + smooth)
            val += rng.standard_normal((bands, rows, w), dtype=np.float32) * np.float32(25)
            dst.write(np.clip(val, 1, 10000).astype(np.uint16), window=Window(0, r0, w, rows))
    tmp.rename(path)
    return {"shape_source": [bands, h, w], "dtype": "uint16",
            "note": f"4 bands, {'tiled 512' if tiled else 'striped'}, deflate+predictor 2, EPSG:32633 10 m"}


def build_inputs(workdir: Path, kinds: list[str], size: int) -> dict[str, dict]:
    """Make (or reuse, when a matching marker is there) every input; returns kind -> info."""
    inputs = workdir / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict] = {}
    order = sorted(kinds, key=lambda k: k == "nifti-gz")  # the .gz is made from the plain .nii
    if "nifti-gz" in kinds and "nifti" not in kinds:
        order = ["nifti"] + order
    for kind in order:
        modality, name, _ = KINDS[kind]
        path = inputs / name
        marker = path.with_name(path.name + ".json")
        want = {"size": size, "gen_version": GEN_VERSION, "kind": kind}
        if path.exists() and marker.exists():
            info = json.loads(marker.read_text())
            if all(info.get(k) == v for k, v in want.items()):
                print(f"  {kind:9s} reusing {path} ({path.stat().st_size / GIB:.2f} GiB on disk)", flush=True)
                out[kind] = info
                continue
        t0 = time.perf_counter()
        if kind == "nifti":
            info = make_nifti(path, size)
        elif kind == "nifti-gz":
            info = make_nifti_gz(path, inputs / KINDS["nifti"][1])
        elif kind == "tiff":
            info = make_tiff(path, size)
        else:
            info = make_geotiff(path, size, tiled=kind == "geotiff")
        info.update(want, path=str(path), file_bytes=path.stat().st_size)
        marker.write_text(json.dumps(info))
        print(f"  {kind:9s} made {path} ({info['file_bytes'] / GIB:.2f} GiB on disk) "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)
        out[kind] = info
    return {k: out[k] for k in kinds}


# --------------------------------------------------------------------------------------------
# worker (runs in a fresh subprocess)


def _spec(kind: str, path: Path):
    from tasks.ingest.discover import ScanSpec

    modality = KINDS[kind][0]
    if modality == "em":
        return ScanSpec(scan_id=kind, modality="em", sources=(path,), spacing=EM_SPACING, unit=EM_UNIT)
    return ScanSpec(scan_id=kind, modality=modality, sources=(path,))


def _reference(kind: str, path: Path, store: Path):
    """The reference: the whole array read with the native library, then written as level 0.
    Returns the array and what the run reports of it."""
    import numpy as np
    import zarr

    from tasks.ingest.to_zarr import COMPRESSOR, chunks_for

    if kind in ("nifti", "nifti-gz"):
        import nibabel as nib

        # mmap=False: a real read into memory (with mmap a plain .nii would come back as a lazy
        # memmap, and the read would happen page by page inside the Zarr write).
        img = nib.load(str(path), mmap=False)
        data = np.asarray(img.dataobj)  # (i, j, k)
        arr = data.T[np.newaxis]  # (c, z, y, x) = (1, k, j, i), a view: Zarr gathers each chunk
        dims = ("c", "z", "y", "x")
    elif kind == "tiff":
        import tifffile

        data = tifffile.imread(str(path))  # (Z, Y, X)
        arr = data[np.newaxis]
        dims = ("c", "z", "y", "x")
    else:
        import rasterio

        with rasterio.open(str(path)) as src:
            data = src.read()  # (bands, Y, X)
        arr = data
        dims = ("c", "y", "x")
    chunks = chunks_for(_spec(kind, path), tuple(arr.shape[1:]))
    z = zarr.create_array(store=str(store), shape=arr.shape, dtype=arr.dtype, chunks=(1, *chunks),
                          compressors=COMPRESSOR, fill_value=0, dimension_names=dims, zarr_format=3)
    z[...] = arr
    return arr, {"shape": list(arr.shape), "dtype": str(arr.dtype), "chunks": [1, *chunks], "dims": dims}


def _same_work(kind: str, path: Path, store: Path) -> dict:
    """The reference plus the rest of what tilewise's ingest does, the plain in-memory way: the
    source's sha256 on a thread beside the read and write (as tilewise hashes), the value range,
    and each pyramid level computed from the level before, whole, in memory (tilewise's
    ``plan_pyramid`` and ``downsample_mean``, so the same levels and the same means) and written
    with the pyramid's codec. No streaming, no memory bound (it holds the scan and its level 1):
    what the same work costs on this machine without tilewise's pipeline around it."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import zarr

    from tasks.ingest.pyramid import downsample_mean, plan_pyramid
    from tasks.ingest.readers import default_reader_kind, open_reader
    from tasks.ingest.to_zarr import PYRAMID_COMPRESSOR, sha256_file

    spec = _spec(kind, path)
    with ThreadPoolExecutor(max_workers=1) as hasher:
        digest = hasher.submit(sha256_file, path)
        arr, detail = _reference(kind, path, store / "0")
        detail["range"] = [float(arr.min()), float(arr.max())]
        spacing = spec.spacing
        if spacing is None:
            with open_reader([path], default_reader_kind(spec.modality, [path])) as reader:
                spacing = reader.spacing
        chunks = tuple(detail["chunks"][1:])
        plan = plan_pyramid(tuple(arr.shape[1:]), spacing, chunks)
        level = arr
        for i, factors in enumerate(plan.factors, start=1):
            step = chunks[0] * factors[0]  # rows of the level before per piece: one output chunk row
            level = np.concatenate([downsample_mean(level[:, r:r + step], factors)
                                    for r in range(0, level.shape[1], step)], axis=1)
            z = zarr.create_array(store=str(store / str(i)), shape=level.shape, dtype=level.dtype,
                                  chunks=(1, *chunks), compressors=PYRAMID_COMPRESSOR, fill_value=0,
                                  dimension_names=detail["dims"], zarr_format=3)
            z[...] = level
        detail["levels"] = plan.levels
        detail["sha256"] = digest.result()
    return detail


def _spot_check(kind: str, path: Path, store: Path, seed: int = 7, regions: int = 4) -> dict:
    """Compare random level-0 regions to the source (read independently of tilewise's readers),
    and one level-1 region to the block mean of level 0."""
    import numpy as np
    import zarr

    from tasks.ingest.pyramid import downsample_mean

    rng = np.random.default_rng(seed)
    group = zarr.open_group(str(store), mode="r", zarr_format=3)
    lvl0 = group["image/0"]
    shape = lvl0.shape
    spatial = shape[1:]
    problems = []
    for _ in range(regions):
        size = [min(n, s) for n, s in zip(spatial, (3, 97, 113) if len(spatial) == 3 else (97, 113))]
        start = [int(rng.integers(0, n - s + 1)) for n, s in zip(spatial, size)]
        sl = tuple(slice(a, a + s) for a, s in zip(start, size))
        got = lvl0[(slice(None), *sl)]
        if kind in ("nifti", "nifti-gz"):
            import nibabel as nib

            (z0, z1), (y0, y1), (x0, x1) = [(s.start, s.stop) for s in sl]
            img = nib.load(str(path))
            want = np.asarray(img.dataobj[x0:x1, y0:y1, z0:z1]).T[np.newaxis]
        elif kind == "tiff":
            import tifffile

            zsl, ysl, xsl = sl
            with tifffile.TiffFile(str(path)) as tif:
                want = np.stack([tif.pages[z].asarray()[ysl, xsl] for z in range(zsl.start, zsl.stop)])[np.newaxis]
        else:
            import rasterio
            from rasterio.windows import Window

            ysl, xsl = sl
            with rasterio.open(str(path)) as src:
                want = src.read(window=Window(xsl.start, ysl.start, xsl.stop - xsl.start, ysl.stop - ysl.start))
        if got.shape != want.shape or got.dtype != want.dtype or not np.array_equal(got, want, equal_nan=True):
            problems.append(f"level 0 region {[(s.start, s.stop) for s in sl]} differs")
    if "image/1" in group:
        lvl1 = group["image/1"]
        factors = tuple(int(round(a / b)) for a, b in zip(spatial, lvl1.shape[1:]))
        # a region of level 1 well inside the array
        size1 = [max(1, min(n // 2, s)) for n, s in zip(lvl1.shape[1:], (2, 40, 40) if len(spatial) == 3 else (40, 40))]
        start1 = [int(rng.integers(0, n - s + 1)) for n, s in zip(lvl1.shape[1:], size1)]
        stop1 = [a + s for a, s in zip(start1, size1)]
        full = all((b * f) <= n for b, f, n in zip(stop1, factors, spatial))
        if full:
            sl0 = tuple(slice(a * f, b * f) for a, b, f in zip(start1, stop1, factors))
            sl1 = tuple(slice(a, b) for a, b in zip(start1, stop1))
            want = downsample_mean(lvl0[(slice(None), *sl0)], factors)
            got = lvl1[(slice(None), *sl1)]
            ok = np.allclose(got, want, rtol=1e-6, atol=1e-4, equal_nan=True) if got.dtype.kind == "f" \
                else np.array_equal(got, want)
            if not ok:
                problems.append(f"level 1 region {list(zip(start1, stop1))} is not the block mean of level 0")
    return {"ok": not problems, "problems": problems, "levels": len([k for k in group["image"].array_keys()])}


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def _slab_bytes(store: Path) -> int:
    """Bytes of one slab as tilewise streams it (a chunk row, rounded up to a whole pyramid
    block), from the group's own record: the unit its memory use is made of."""
    import numpy as np
    import zarr

    record = dict(zarr.open_group(str(store), mode="r", zarr_format=3).attrs["tilewise"])
    shapes = record["pyramid"]["shapes"]
    multiple = 1
    for upper, lower in zip(shapes, shapes[1:]):
        multiple *= 2 if lower[0] != upper[0] else 1
    step = min(math.lcm(record["chunks"][1], multiple), record["shape"][1])
    return record["shape"][0] * step * math.prod(record["shape"][2:]) * np.dtype(record["dtype"]).itemsize


class _Clock:
    """Wall time per named piece, summed over calls (any thread)."""

    def __init__(self):
        import threading

        self.lock = threading.Lock()
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.cpu: dict[str, float] = {}  # thread CPU-s (user + system) by thread name, pools' suffixes cut

    def thread_cpu(self, name: str, seconds: float) -> None:
        name = name.rstrip("0123456789").rstrip("_") or name
        with self.lock:
            self.cpu[name] = self.cpu.get(name, 0.0) + seconds

    def wrap(self, name: str, fn):
        import functools

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                with self.lock:
                    self.seconds[name] = self.seconds.get(name, 0.0) + dt
                    self.calls[name] = self.calls.get(name, 0) + 1

        return timed


def _instrument(clock: _Clock) -> None:
    """Monkeypatch (in this worker only) the pieces of the ingest so their wall time is known, and
    every thread started from now on so its CPU time is (tilewise's pools end with the ingest)."""
    import threading

    import zarr

    run = threading.Thread.run

    def counted_run(self):
        try:
            run(self)
        finally:
            clock.thread_cpu(self.name, time.thread_time())

    threading.Thread.run = counted_run

    import tasks.ingest.readers as readers
    import tasks.ingest.to_zarr as tz

    for cls in (readers.NiftiReader, readers.TiffStackReader, readers.GeoTiffReader, readers.SliceFolderReader):
        cls.read_slab = clock.wrap("read_slab (read-ahead thread)", cls.read_slab)
    tz.sha256_file = clock.wrap("sha256 of sources (hash thread)", tz.sha256_file)
    for cls in (readers.NiftiReader, readers.TiffStackReader, readers.GeoTiffReader):
        if "read_window" in vars(cls):
            cls.read_window = clock.wrap("read_window (read-ahead thread)", cls.read_window)
    tz._SlabStats.update = clock.wrap("stats (NaN/min/max)", tz._SlabStats.update)
    tz.downsample_mean = clock.wrap("downsample_mean", tz.downsample_mean)
    orig_write = tz._PyramidWriter.write

    level_of: dict[int, int] = {}
    orig_setitem = zarr.Array.__setitem__

    def setitem(self, key, value):
        name = f"zarr write level {level_of.get(id(self), '?')}"
        return clock.wrap(name, orig_setitem)(self, key, value)

    def write(self, *args, **kwargs):
        for i, a in enumerate(self.arrays):
            level_of[id(a)] = i
        return orig_write(self, *args, **kwargs)

    zarr.Array.__setitem__ = setitem
    tz._PyramidWriter.write = clock.wrap("PyramidWriter.write (all levels)", write)
    tz._stream = clock.wrap("_stream (whole slab loop)", tz._stream)


def worker(job: dict) -> dict:
    sys.path.insert(0, str(REPO))
    t_imp = time.perf_counter()
    import tasks.ingest  # noqa: F401  (the ingest package itself, as a flow would import it)
    from tasks.ingest.to_zarr import ingest_scan

    rss_tilewise_imports = _rss()
    # What ingest imports lazily, and what the reference uses: imported up front by both sides so
    # that working memory is what the data needs, not a library's import cost.
    import nibabel  # noqa: F401
    import numpy as np  # noqa: F401
    import ome_zarr.format  # noqa: F401
    import ome_zarr.writer  # noqa: F401
    import rasterio  # noqa: F401
    import tifffile  # noqa: F401
    import zarr  # noqa: F401

    import_s = time.perf_counter() - t_imp
    kind, mode, path, store = job["kind"], job["mode"], Path(job["path"]), Path(job["store"])
    clock = None
    if job.get("breakdown"):
        clock = _Clock()
        _instrument(clock)
    import gc

    gc.collect()
    baseline = _rss()
    peak_reset = _reset_peak()
    peak_before = _peak(peak_reset)
    t0, cpu0, main0 = time.perf_counter(), os.times(), time.thread_time()
    if mode == "tilewise":
        result = ingest_scan(_spec(kind, path), store, force=True)
        detail = {"status": result.status, "shape": list(result.shape)}
    elif mode == "same-work":
        detail = _same_work(kind, path, store)
    else:
        detail = _reference(kind, path, store)[1]
    seconds, cpu1, main1 = time.perf_counter() - t0, os.times(), time.thread_time()
    peak = _peak(peak_reset)
    out = {
        "kind": kind, "mode": mode, "seconds": seconds, "baseline_rss": baseline,
        # every thread's CPU over the run: user (the process's own work) and system (the kernel's:
        # page faults, the page cache's copies and reclaim, which vary with the machine's state)
        "user_s": cpu1.user - cpu0.user, "system_s": cpu1.system - cpu0.system,
        "rss_after_tilewise_imports": rss_tilewise_imports, "peak_rss": peak,
        "peak_before": peak_before, "peak_reset": peak_reset, "working": peak - baseline,
        "import_seconds": import_s, "detail": detail,
        "torch_imported": "torch" in sys.modules, "monai_imported": "monai" in sys.modules,
    }
    if mode == "tilewise":
        out["level0_bytes"] = _dir_bytes(store / "image" / "0")
        out["store_bytes"] = _dir_bytes(store)
        out["slab_bytes"] = _slab_bytes(store)
        if job.get("check"):
            out["check"] = _spot_check(kind, path, store)
    elif mode == "same-work":
        out["level0_bytes"] = _dir_bytes(store / "0")
        out["store_bytes"] = _dir_bytes(store)
    else:
        out["level0_bytes"] = _dir_bytes(store)
    if clock is not None:
        out["breakdown"] = {k: [v, clock.calls[k]] for k, v in sorted(clock.seconds.items())}
        out["thread_cpu"] = {"main thread": main1 - main0, **clock.cpu}
    return out


# --------------------------------------------------------------------------------------------
# driver


def run_worker(job: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONWARNINGS", "ignore")
    proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    raise RuntimeError(f"worker {job['mode']} {job['kind']} failed (rc {proc.returncode}):\n"
                       f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def _mb(n: float) -> float:
    return n / 1e6


def print_table(kinds: list[str], infos: dict, runs: list[dict], repeats: int) -> bool:
    print()
    print(f"Best (min) time of {repeats} alternating run(s) per side, each a fresh subprocess; working memory = "
          "peak RSS (VmHWM after a reset) - RSS after imports, the largest seen. Scan size = uncompressed voxel bytes.")
    hdr = (f"{'kind':9s} {'input':26s} {'scan GB':>7s} {'tw s':>7s} {'ref s':>7s} {'ratio':>6s} "
           f"{'tw MB':>7s} {'tw %':>6s} {'slab MB':>7s} {'ref MB':>7s} {'tw L0/ref':>9s} {'check':>6s} {'torch/monai':>11s}")
    print(hdr)
    print("-" * len(hdr))
    all_ok = True
    for kind in kinds:
        tw = [r for r in runs if r["kind"] == kind and r["mode"] == "tilewise"]
        ref = [r for r in runs if r["kind"] == kind and r["mode"] == "reference"]
        if not tw or not ref:
            continue
        import numpy as np

        shape = tw[0]["detail"]["shape"]
        scan_bytes = math.prod(shape) * np.dtype(ref[0]["detail"]["dtype"]).itemsize
        t_tw, t_ref = min(r["seconds"] for r in tw), min(r["seconds"] for r in ref)
        w_tw, w_ref = max(r["working"] for r in tw), max(r["working"] for r in ref)
        ratio = t_tw / t_ref
        frac = w_tw / scan_bytes
        checks = [r["check"]["ok"] for r in tw if "check" in r]
        check = "ok" if checks and all(checks) else ("n/a" if not checks else "MISMATCH")
        leaked = any(r["torch_imported"] or r["monai_imported"] for r in tw)
        size_ratio = tw[0]["level0_bytes"] / max(1, ref[0]["level0_bytes"])
        all_ok &= check == "ok" and not leaked
        print(f"{kind:9s} {KINDS[kind][2]:26s} {scan_bytes / 1e9:7.3f} {t_tw:7.2f} {t_ref:7.2f} "
              f"{ratio:5.2f}{'*' if ratio > 1.15 else ' '} {_mb(w_tw):7.0f} {100 * frac:5.1f}{'*' if frac > 0.08 else ' '} "
              f"{_mb(tw[0].get('slab_bytes', 0)):7.0f} {_mb(w_ref):7.0f} {size_ratio:9.3f} {check:>6s} {'LOADED!' if leaked else 'no':>11s}")
    print("-" * len(hdr))
    print("targets: ratio = tilewise/reference time <= 1.15; tw % = tilewise working memory / scan size <= 8%"
          " (* = over target).")
    print("scan GB = 10^9 bytes of voxels; MB = 10^6 bytes; slab MB = one chunk row (a window-reading "
          "reader never holds one; a .nii.gz holds one, gathered from ~4 MB pieces).")
    print("tw L0/ref = bytes of tilewise level 0 / bytes of the reference array (same chunks and codec: ~1.000).")
    print("tilewise also writes the pyramid, computes stats and sha256 of the sources; the reference writes level 0 only.")
    for kind in kinds:
        if any(r["torch_imported"] or r["monai_imported"] for r in runs if r["kind"] == kind and r["mode"] == "tilewise"):
            print(f"  FAIL {kind}: torch or monai was in sys.modules after ingest_scan (ingest must not import them)")
        for r in runs:
            if r["kind"] == kind and r.get("check") and not r["check"]["ok"]:
                print(f"  {kind}: " + "; ".join(r["check"]["problems"]))
                break
    return all_ok


def print_runs(runs: list[dict]) -> None:
    print("\nAll runs (s, CPU-s user + system, working MB, baseline RSS MB):")
    for r in runs:
        extra = "" if r["peak_reset"] else " (peak not resettable: working includes import peak)"
        print(f"  {r['kind']:9s} {r['mode']:9s} {r['seconds']:7.2f} s {r['user_s']:6.2f} + {r['system_s']:5.2f} CPU-s "
              f"{_mb(r['working']):7.0f} MB "
              f"baseline {_mb(r['baseline_rss']):5.0f} MB (tilewise imports alone {_mb(r['rss_after_tilewise_imports']):4.0f} MB)"
              f"{extra}")


def print_same_work(kinds: list[str], runs: list[dict]) -> None:
    print("\nThe same work without tilewise's pipeline (--same-work: the reference, plus the sha256 beside it, "
          "the value range and the pyramid computed whole in memory; best times):")
    print(f"  {'kind':9s} {'same s':>7s} {'same/ref':>8s} {'tw/same':>7s} {'same MB':>8s} {'CPU-s tw / same / ref (user + system)':>40s}")
    for kind in kinds:
        best = {}
        for mode in ("tilewise", "reference", "same-work"):
            rs = [r for r in runs if r["kind"] == kind and r["mode"] == mode]
            if rs:
                best[mode] = min(rs, key=lambda r: r["seconds"])
        if len(best) < 3:
            continue
        tw, ref, same = best["tilewise"], best["reference"], best["same-work"]
        cpu = " / ".join(f"{r['user_s'] + r['system_s']:.2f}" for r in (tw, same, ref))
        print(f"  {kind:9s} {same['seconds']:7.2f} {same['seconds'] / ref['seconds']:8.2f} "
              f"{tw['seconds'] / same['seconds']:7.2f} {_mb(same['working']):8.0f} {cpu:>40s}")


def print_breakdown(kind: str, r: dict) -> None:
    print(f"\nBreakdown, instrumented tilewise run on {kind} (total {r['seconds']:.2f} s; threads overlap):")
    for name, (sec, calls) in sorted(r["breakdown"].items(), key=lambda kv: -kv[1][0]):
        print(f"  {name:36s} {sec:7.2f} s  {calls:5d} calls")
    cpu = r.get("thread_cpu") or {}
    print(f"  CPU-s by thread (user + system; of {r['user_s'] + r['system_s']:.2f} over all threads): "
          + ", ".join(f"{name} {sec:.2f}" for name, sec in sorted(cpu.items(), key=lambda kv: -kv[1])))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.0, help="scan size per input, GiB of voxels (default 1.0)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="work folder (default: a new folder under /tmp); inputs made there earlier with "
                         "the same size are reused")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (inputs) at the end")
    ap.add_argument("--kinds", default=",".join(DEFAULT_KINDS),
                    help=f"comma-separated subset of {','.join(KINDS)} (default: all)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per side and kind; the best time counts (default 2)")
    ap.add_argument("--breakdown", action="store_true",
                    help="one extra instrumented tilewise run per kind: where the ingest time goes")
    ap.add_argument("--same-work", action="store_true",
                    help="a third side: the reference plus tilewise's other work (sha256, range, pyramid) done in memory")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per worker run")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(RESULT_MARK + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        ap.error(f"unknown kind(s) {unknown}; choose from {list(KINDS)}")
    size = int(args.size_gb * GIB)
    made_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="tilewise-ingest-bench-", dir="/tmp")) if made_workdir else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    print(f"tilewise ingest benchmark: {args.size_gb} GiB per scan, kinds {kinds}, work folder {workdir}, "
          f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}", flush=True)
    all_ok = True
    try:
        print("Building inputs:", flush=True)
        infos = build_inputs(workdir, kinds, size)
        os.sync()  # let the inputs' writeback finish before anything is timed
        time.sleep(2)
        runs: list[dict] = []
        stores = Path(tempfile.mkdtemp(prefix="stores-", dir=workdir))  # a kept work folder may hold older ones
        n = 0
        # every store kept to the end (see the docstring): at most ~1.2x the input's bytes each
        need = 1.2 * size * len(kinds) * (3 if args.same_work else 2) * args.repeats + 2 * GIB
        keep_stores = shutil.disk_usage(stores).free > need
        if not keep_stores:
            print(f"  (less than {need / GIB:.0f} GiB free: each store is removed right after its run)", flush=True)
        for rep in range(args.repeats):
            for kind in kinds:
                order = ("tilewise", "reference") if rep % 2 == 0 else ("reference", "tilewise")
                if args.same_work:
                    order = order + ("same-work",) if rep % 2 == 0 else ("same-work",) + order
                for mode in order:
                    n += 1
                    store = stores / f"{kind}-{mode}-{n}.zarr"
                    job = {"kind": kind, "mode": mode, "path": infos[kind]["path"], "store": str(store),
                           "check": mode == "tilewise" and rep == 0}
                    try:
                        r = run_worker(job, args.timeout)
                    finally:
                        if not keep_stores:
                            shutil.rmtree(store, ignore_errors=True)
                        else:
                            _settle(store)  # outside the timed run: the next starts with free memory
                    runs.append(r)
                    print(f"  run {n:2d}: {kind:9s} {mode:9s} {r['seconds']:7.2f} s  CPU {r['user_s']:5.2f} user "
                          f"+ {r['system_s']:5.2f} sys  working {_mb(r['working']):6.0f} MB" + (f"  check {'ok' if r['check']['ok'] else 'MISMATCH'}"
                                                             if "check" in r else ""), flush=True)
        breakdowns = {}
        if args.breakdown:
            for kind in kinds:
                store = stores / f"{kind}-breakdown.zarr"
                try:
                    breakdowns[kind] = run_worker({"kind": kind, "mode": "tilewise", "path": infos[kind]["path"],
                                                   "store": str(store), "breakdown": True}, args.timeout)
                finally:
                    if not keep_stores:
                        shutil.rmtree(store, ignore_errors=True)
        print_runs(runs)
        for kind, r in breakdowns.items():
            print_breakdown(kind, r)
        all_ok = print_table(kinds, infos, runs, args.repeats)
        if args.same_work:
            print_same_work(kinds, runs)
        print(f"\nTotal benchmark wall time {time.perf_counter() - t_all:.0f} s.")
    finally:
        if args.keep:
            print(f"Kept {workdir}")
        elif made_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            shutil.rmtree(workdir / "inputs", ignore_errors=True)
            for old in workdir.glob("stores*"):
                shutil.rmtree(old, ignore_errors=True)
    return 0 if all_ok else 1  # 1: a spot check failed or torch/monai got imported (timing targets don't fail)


if __name__ == "__main__":
    sys.exit(main())
