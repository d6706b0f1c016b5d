#!/usr/bin/env python
"""Benchmark: ``evaluate`` and ``export`` per GB of scan, relative to a plain Zarr read of it.

    .venv/bin/python benchmarks/evaluate_export.py [--size-gb 0.25] [--workdir DIR]
                                                   [--kinds mri,em,satellite] [--repeats 1] [--json]

The default (0.25 GiB per kind, three kinds, one repeat) takes about 5-10 minutes on a shared
2-core machine the first time (most of it building the scans) and less when the work folder's
scans are reused; sizes of 1 GiB and more work the same way, only slower.

Scans (built once per kind and size, cached in ``--workdir``; the inputs are deleted once ingested):
the synthetic inputs of benchmarks/ingest.py (``make_nifti``, ``make_tiff``, ``make_geotiff``)
of about ``--size-gb`` GiB of image voxels, each ingested with ``tasks.ingest.ingest_scan`` WITH a
reference label file made from the same geometry:

* mri:       float32 (Z, Y, X) = (k, 512, 512); labels background / head / brain / ventricle (NIfTI uint8).
* em:        uint8 sections of 4096 x 4096, 40 x 8 x 8 nm; labels interior / membrane (TIFF stack, ISBI
             values 255 / 0). em-isbi: the same, smaller (--isbi-size-gb).
* satellite: 4-band uint16 Sentinel-2-like GeoTIFF, UTM; labels background / building / road (64-pixel
             fields by brightness, plus road segments crossing many 512-pixel windows) as a GeoTIFF mask.

A fake prediction is then written into each store exactly as tasks/engine/infer.py lays it out,
output chunk by output chunk: ``prediction/probabilities`` float16 (K, *spatial), ``labels`` uint8
(argmax), ``done`` marks after each chunk's data, attrs, completion mark last. Probabilities are a
softmax of 5 x (box-smoothed one-hot of the reference) + blobby noise (sigma 1.5, 8-voxel blobs), so
they are soft at class boundaries and wrong in places: metrics are non-trivial.

Steps, each measured in its own fresh subprocess (best time over ``--repeats``; the order of the
steps alternates between repeats):

* plain read (the reference): every chunk of ``image/0``, ``prediction/probabilities``,
  ``prediction/labels`` and ``labels/reference`` read one chunk at a time (``array[chunk box]``),
  no computation. Its time per array is kept, so each step is also compared with the read of only
  the arrays it reads ("ratio to its arrays").
* evaluate: ``tasks.metrics.evaluate.evaluate_scan(store, write=False)`` (no MLflow, no overlays;
  for mri it includes HD95 / surface Dice). For em this is WITHOUT a boundary class (confusion
  matrix, Dice/IoU, ECE/Brier/NLL only); "evaluate isbi" runs ``boundary_class="membrane"`` (the
  ISBI 2012 scores, as an EM catalog entry would) on a separate small EM scan, kind ``em-isbi``,
  of ``--isbi-size-gb`` (default 0.03 GiB = two 4096 x 4096 sections): those scores cost about a
  minute per such section (measured), too slow for the whole default scan.
* export: ``tasks.export.export_scan(store, ExportOptions(format, out, force=True))`` for each format
  that fits the kind: mri -> nifti (.nii.gz), zarr; em -> tiff (OME-TIFF), zarr;
  satellite -> geotiff (COG), geojson (EPSG:4326), zarr. Labels only (``what="labels"``).
  ``zarr`` writes the NGFF label image into the store itself (``labels/prediction``).

Memory (as benchmarks/ingest.py measures it): each worker imports what its step needs (including
what the step would import lazily: MONAI/torch for surface metrics, rasterio, rio-cogeo, shapely,
tifffile, nibabel), records VmRSS as its baseline, resets the kernel's peak mark
(/proc/self/clear_refs), runs, and reads the peak back as VmHWM from /proc/self/status (not
``ru_maxrss``: Linux carries the parent's resident set over exec into it, a floor clear_refs does
not lower; the scans are also built in a subprocess so the driver stays small). Working memory =
peak - baseline, shown in MB and as a percentage of the scan's image bytes. Modules first imported
during the timed step are listed (an import inside the step is time the table charges to it).

Units: scan GB = 10^9 bytes of image voxels (level 0, uncompressed); MB = 10^6 bytes. The stores sit
in the page cache (built just before, or re-read), so reads come from RAM, not disk, on both sides.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30
RESULT_MARK = "BENCH_RESULT "
BUILD_VERSION = 1  # bump when the scan / label / prediction generators change
DEFAULT_WORKDIR = Path("/tmp/tilewise-evaluate-export-bench")

EM_SPACING = (40.0, 8.0, 8.0)  # nm
KINDS = {
    "mri": {"modality": "mri", "classes": ("background", "head", "brain", "ventricle"),
            "exports": ("nifti", "zarr"), "input": "mri_float32.nii", "labels": "mri_labels.nii"},
    "em": {"modality": "em", "classes": ("interior", "membrane"),
           "exports": ("tiff", "zarr"), "input": "em_uint8.tif", "labels": "em_labels.tif"},
    # A small EM scan for evaluate WITH the boundary class (ISBI 2012 scores): their Python flood
    # fill costs about a minute per 4096 x 4096 section, so this scan has --isbi-size-gb only.
    "em-isbi": {"modality": "em", "classes": ("interior", "membrane"),
                "exports": (), "input": "em_uint8.tif", "labels": "em_labels.tif"},
    "satellite": {"modality": "satellite", "classes": ("background", "building", "road"),
                  "exports": ("geotiff", "geojson", "zarr"), "input": "s2_4band_uint16.tif",
                  "labels": "s2_labels.tif"},
}
OUT_NAME = {"nifti": "labels.nii.gz", "tiff": "labels.ome.tif", "geotiff": "labels.tif", "geojson": "labels.geojson"}
# the arrays each step reads (for "ratio to its arrays")
READS = {
    "evaluate": ("labels/reference", "prediction/labels", "prediction/probabilities"),
    "evaluate isbi": ("labels/reference", "prediction/labels", "prediction/probabilities"),
    "export nifti": ("prediction/labels",),
    "export tiff": ("prediction/labels",),
    "export zarr": ("prediction/labels",),
    "export geotiff": ("prediction/labels", "image/0"),  # image/0: the source nodata mask
    "export geojson": ("prediction/labels", "image/0"),
}
ARRAYS = ("image/0", "prediction/probabilities", "prediction/labels", "labels/reference")


def _ingest_bench():
    """benchmarks/ingest.py as a module (its input generators)."""
    spec = importlib.util.spec_from_file_location("tilewise_bench_ingest", REPO / "benchmarks" / "ingest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# memory helpers (as in benchmarks/ingest.py)
from measure import maxrss as _maxrss, proc_status as _status, reset_peak as _reset_peak, rss as _rss  # noqa: E402


def _peak(reset: bool) -> int:
    """Peak RSS since the reset: VmHWM, which /proc/self/clear_refs resets. ``ru_maxrss`` is no good
    here: Linux keeps in it the resident set of the process image exec replaced (the parent's at
    fork), and clear_refs does not lower it, so a worker started by a big driver inherits the
    driver's size as a floor. Without a reset, ru_maxrss is all there is."""
    hwm = _status("VmHWM") if reset else 0
    return hwm or _maxrss()


# --------------------------------------------------------------------------------------------
# label files matching the benchmark inputs


def make_mri_labels(path: Path, shape_ijk: tuple[int, int, int], bench) -> None:
    """NIfTI uint8 labels of _mri_block's geometry: 1 head, 2 brain, 3 ventricle (in the brain)."""
    import numpy as np

    ni, nj, nk = shape_ijk
    hdr = bench.mri_header(shape_ijk, np.uint8)
    hdr.set_intent("label")
    hdr["vox_offset"] = 352
    f32 = np.float32
    y = (((np.arange(nj, dtype=f32) + 0.5) / nj) * 2 - 1)[None, :, None]
    x = (((np.arange(ni, dtype=f32) + 0.5) / ni) * 2 - 1)[None, None, :]
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        hdr.write_to(f)
        f.write(b"\0" * (352 - f.tell()))
        for k0 in range(0, nk, 16):
            k1 = min(k0 + 16, nk)
            z = (((np.arange(k0, k1, dtype=f32) + 0.5) / nk) * 2 - 1)[:, None, None]
            r2 = (x / f32(0.78)) ** 2 + (y / f32(0.9)) ** 2 + (z / f32(0.95)) ** 2
            vent = (x / f32(0.12)) ** 2 + ((y - f32(0.05)) / f32(0.3)) ** 2 + (z / f32(0.35)) ** 2
            lab = (r2 < 1).astype(np.uint8) + (r2 < 0.72) + ((vent < 1) & (r2 < 0.72))
            f.write(lab.astype(np.uint8).tobytes())  # (k, j, i) C order = NIfTI (i, j, k) file order
    tmp.rename(path)


def make_em_labels(path: Path, shape_zyx: tuple[int, int, int]) -> None:
    """TIFF stack: 0 on make_tiff's dark curvy membranes, 255 elsewhere (ISBI 2012 convention)."""
    import numpy as np
    import tifffile

    nz, ny, nx = shape_zyx
    yy = np.arange(ny, dtype=np.float32)[:, None]
    xx = np.arange(nx, dtype=np.float32)[None, :]
    wave = np.sin(xx * np.float32(0.021) + np.float32(3) * np.sin(yy * np.float32(0.006)))
    wave2 = np.sin(yy * np.float32(0.017) + np.float32(2.5) * np.sin(xx * np.float32(0.008)))
    base = np.where(np.abs(wave * wave2) < np.float32(0.05), 0, 255).astype(np.uint8)
    del wave, wave2
    tmp = path.with_name(path.name + ".part")
    tifffile.imwrite(tmp, (np.roll(base, (3 * z, 2 * z), axis=(0, 1)) for z in range(nz)), shape=(nz, ny, nx),
                     dtype=np.uint8, photometric="minisblack", metadata={"axes": "ZYX"})
    tmp.rename(path)


def make_satellite_labels(path: Path, image: Path) -> None:
    """GeoTIFF mask on the image's grid: 64-pixel fields whose mean B04 is bright are buildings (1),
    plus 12-pixel-wide road segments (2) about 1800 pixels long, crossing several 512-pixel windows."""
    import numpy as np
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(image) as src:
        h, w = src.height, src.width
        profile = dict(driver="GTiff", height=h, width=w, count=1, dtype="uint8", crs=src.crs,
                       transform=src.transform, tiled=True, blockxsize=512, blockysize=512, compress="deflate")
        tmp = path.with_name(path.name + ".part")
        with rasterio.open(tmp, "w", **profile) as dst:
            for r0 in range(0, h, 512):
                rows = min(512, h - r0)
                b04 = src.read(3, window=Window(0, r0, w, rows)).astype(np.float32)
                means = b04.reshape(rows // 64, 64, w // 64, 64).mean(axis=(1, 3))
                lab = ((means - 800) / 900 > 0.75).astype(np.uint8).repeat(64, 0).repeat(64, 1)
                yy = np.arange(r0, r0 + rows)[:, None]
                xx = np.arange(w)[None, :]
                horizontal = ((yy % 1000) < 12) & (((xx + 300 * (yy // 1000)) % 2400) < 1800)
                vertical = ((xx % 1300) < 12) & (((yy + 500 * (xx // 1300)) % 2600) < 1800)
                lab[horizontal | vertical] = 2
                dst.write(lab, 1, window=Window(0, r0, w, rows))
    tmp.rename(path)


# --------------------------------------------------------------------------------------------
# the fake prediction, written as tasks/engine/infer.py writes it


def write_fake_prediction(store: Path, seed: int = 7) -> dict:
    """prediction/ as the engine leaves it, chunk by chunk (see module docstring)."""
    import numpy as np
    from scipy.ndimage import uniform_filter

    from tasks import storage
    from tasks.ingest.to_zarr import COMPRESSOR
    from tasks.version import tilewise_version

    group = storage.open_group(str(store), mode="r")
    ref = storage.reference(group)
    classes = list(storage.reference_record(group)["classes"])
    k, shape, chunks = len(classes), tuple(ref.shape), tuple(group["image/0"].chunks[1:])
    grid = tuple(-(-n // c) for n, c in zip(shape, chunks))
    digest = hashlib.sha256(f"benchmark-fake-{store.name}-{BUILD_VERSION}".encode()).hexdigest()
    pred = storage.open_group(f"{store}/prediction", mode="w")
    axes = "zyx"[-len(shape):]
    probs_arr = pred.create_array("probabilities", shape=(k, *shape), dtype="float16", chunks=(1, *chunks),
                                  compressors=COMPRESSOR, fill_value=0, dimension_names=("c", *axes))
    labels_arr = pred.create_array("labels", shape=shape, dtype="uint8", chunks=chunks, compressors=COMPRESSOR,
                                   fill_value=0, dimension_names=tuple(axes))
    done = pred.create_array("done", shape=grid, dtype="uint8", chunks=(1,) * len(grid), fill_value=0)
    pred.attrs[storage.ATTRS_KEY] = {"kind": "prediction", "digest": digest, "classes": classes,
                                     "model": "models:/benchmark-fake/1", "params": {"note": "benchmark fake"},
                                     "tilewise_version": tilewise_version()}
    rng = np.random.default_rng(seed)
    flat = tuple(1 if c == 1 else 5 for c in chunks)  # smooth within a section, never across EM sections
    blob = tuple(1 if c == 1 else 8 for c in chunks)
    classes_axis = np.arange(k, dtype=np.uint8).reshape((k,) + (1,) * len(shape))
    wrong = 0
    for index in np.ndindex(*grid):
        box = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, chunks, shape))
        truth = np.asarray(ref[box])
        onehot = (truth[None] == classes_axis).astype(np.float32)
        smooth = uniform_filter(onehot, size=(1, *flat), mode="nearest")
        coarse = rng.standard_normal((k, *(-(-n // b) for n, b in zip(truth.shape, blob))), dtype=np.float32)
        for a, b in enumerate(blob, start=1):
            coarse = coarse.repeat(b, axis=a)
        noise = coarse[(slice(None),) + tuple(slice(0, n) for n in truth.shape)]
        logits = np.float32(5) * smooth + np.float32(1.5) * noise
        logits -= logits.max(axis=0, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=0, keepdims=True)
        labels = p.argmax(axis=0).astype(np.uint8)
        wrong += int((labels != truth).sum())
        probs_arr[(slice(None),) + box] = p.astype(np.float16)
        labels_arr[box] = labels
        done[index] = 1  # after the chunk's data
    storage.mark_complete(pred, {"at": datetime.now(timezone.utc).isoformat()})
    return {"classes": classes, "pixel_error": wrong / math.prod(shape)}


def _image_info(store: Path) -> dict:
    import numpy as np
    import zarr

    image = zarr.open_group(str(store), mode="r")["image/0"]
    return {"shape": list(image.shape), "dtype": str(image.dtype), "chunks": list(image.chunks),
            "image_bytes": math.prod(image.shape) * np.dtype(image.dtype).itemsize}


def build_scan(workdir: Path, kind: str, size: int) -> dict:
    """The scan group for ``kind`` (reused when its marker matches), with labels and prediction."""
    from tasks import storage
    from tasks.ingest import LabelSpec, ScanSpec, ingest_scan

    spec_k = KINDS[kind]
    store = workdir / f"{kind}.zarr"
    marker = workdir / f"{kind}.json"
    want = {"kind": kind, "size": size, "build_version": BUILD_VERSION}
    if marker.exists() and store.exists() and storage.is_complete(str(store)) \
            and storage.is_complete(f"{store}/prediction"):
        info = json.loads(marker.read_text())
        if all(info.get(key) == value for key, value in want.items()):
            print(f"  {kind:9s} reusing {store}", flush=True)
            return info
    shutil.rmtree(store, ignore_errors=True)
    bench = _ingest_bench()
    inputs = workdir / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    image, labels = inputs / spec_k["input"], inputs / spec_k["labels"]
    t0 = time.perf_counter()
    if kind == "mri":
        bench.make_nifti(image, size)
        make_mri_labels(labels, bench._nifti_shape(size), bench)
        mapping = {v: v for v in range(4)}
        spec_extra = {}
    elif kind in ("em", "em-isbi"):
        bench.make_tiff(image, size)
        make_em_labels(labels, bench._em_shape(size))
        mapping = {255: 0, 0: 1}
        spec_extra = {"spacing": EM_SPACING, "unit": "nanometer"}
    else:
        bench.make_geotiff(image, size)
        make_satellite_labels(labels, image)
        mapping = {0: 0, 1: 1, 2: 2}
        spec_extra = {}
    t_inputs = time.perf_counter() - t0
    spec = ScanSpec(kind, spec_k["modality"], (image,), dataset=f"benchmark-{kind}",
                    labels=LabelSpec((labels,), mapping, spec_k["classes"]), **spec_extra)
    t0 = time.perf_counter()
    ingest_scan(spec, store, force=True)
    t_ingest = time.perf_counter() - t0
    t0 = time.perf_counter()
    fake = write_fake_prediction(store)
    t_pred = time.perf_counter() - t0
    shutil.rmtree(inputs, ignore_errors=True)
    info = {**want, "store": str(store), **_image_info(store), **fake,
            "build_seconds": {"inputs": t_inputs, "ingest": t_ingest, "prediction": t_pred}}
    marker.write_text(json.dumps(info))
    print(f"  {kind:9s} built {store}: image {info['shape']} {info['dtype']} "
          f"({info['image_bytes'] / 1e9:.3f} GB), inputs {t_inputs:.0f} s, ingest {t_ingest:.0f} s, "
          f"prediction {t_pred:.0f} s (pixel error {fake['pixel_error']:.4f})", flush=True)
    return info


# --------------------------------------------------------------------------------------------
# worker (a fresh subprocess per measurement)


def _stub_calibration() -> bool:
    """tasks.calibration.scores.ReliabilityBins if it is missing from this checkout: the same
    streaming sums (15 equal-width bins of the top-class confidence, Brier, NLL), so the cost
    evaluate pays for it is about the real one. True when the stub was installed."""
    try:
        import tasks.calibration.scores  # noqa: F401

        return False
    except ImportError:
        pass
    import types

    import numpy as np

    class ReliabilityBins:
        def __init__(self, bins: int = 15):
            self.bins = bins
            self.count = np.zeros(bins, np.int64)
            self.conf = np.zeros(bins)
            self.hits = np.zeros(bins)
            self.n, self.nll, self.brier = 0, 0.0, 0.0

        def update(self, probs, labels):
            n = labels.size
            top = probs.argmax(0)
            conf = probs[top, np.arange(n)]
            b = np.minimum((conf * self.bins).astype(np.int64), self.bins - 1)
            self.count += np.bincount(b, minlength=self.bins)
            self.conf += np.bincount(b, conf, minlength=self.bins)
            self.hits += np.bincount(b, top == labels, minlength=self.bins)
            p = probs[labels, np.arange(n)]
            self.nll -= float(np.log(np.clip(p, 1e-12, 1)).sum())
            sq = (probs ** 2).sum(0) - 2 * p + 1
            self.brier += float(sq.sum())
            self.n += n

        def scores(self):
            ece = float(np.abs(self.hits - self.conf).sum() / max(self.n, 1))
            return {"ece": ece, "brier": self.brier / self.n, "nll": self.nll / self.n, "pixels": self.n}

    scores = types.ModuleType("tasks.calibration.scores")
    scores.ReliabilityBins = ReliabilityBins
    sys.modules.setdefault("tasks.calibration", types.ModuleType("tasks.calibration"))
    sys.modules["tasks.calibration.scores"] = scores
    return True


def _has_isbi() -> bool:
    return importlib.util.find_spec("tasks.metrics.isbi") is not None


def _plain_read(store: str) -> dict:
    """Every chunk of every array, one ``array[box]`` at a time; seconds and bytes per array."""
    import numpy as np
    import zarr

    from tasks import storage

    group = zarr.open_group(store, mode="r")
    per: dict[str, dict] = {}
    checksum = 0
    for name in ARRAYS:
        arr = storage.reference(group) if name == storage.REFERENCE else group[name]
        t0 = time.perf_counter()
        grid = tuple(-(-n // c) for n, c in zip(arr.shape, arr.chunks))
        nbytes = 0
        for index in np.ndindex(*grid):
            box = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, arr.chunks, arr.shape))
            block = arr[box]
            nbytes += block.nbytes
            checksum ^= block.reshape(-1)[:1].tobytes()[0] if block.size else 0  # use the result
        per[name] = {"seconds": time.perf_counter() - t0, "bytes": nbytes, "chunks": math.prod(grid)}
    return {"arrays": per, "checksum": checksum}


def _preimport(step: str, kind: str) -> list[str]:
    """Import what the step needs, lazily imported ones included, so working memory is the data's."""
    import numpy  # noqa: F401
    import zarr  # noqa: F401

    from tasks import storage  # noqa: F401

    notes = []
    if step.startswith("evaluate"):
        if _stub_calibration():
            notes.append("tasks.calibration missing: ReliabilityBins stubbed by the benchmark")
        import scipy.ndimage  # noqa: F401

        import tasks.ingest.pyramid  # noqa: F401
        import tasks.metrics.evaluate  # noqa: F401
        import tasks.metrics.surface  # noqa: F401

        if kind == "mri":
            import monai.metrics  # noqa: F401
            import torch  # noqa: F401
        if step == "evaluate isbi":
            import skimage.metrics  # noqa: F401
            import skimage.segmentation  # noqa: F401

            import tasks.metrics.isbi  # noqa: F401
    elif step.startswith("export"):
        fmt = step.split()[1]
        import tasks.export  # noqa: F401
        import tasks.export.export  # noqa: F401
        import tasks.export.ngff  # noqa: F401
        import tasks.export.provenance  # noqa: F401

        if fmt == "nifti":
            import nibabel  # noqa: F401

            import tasks.export.nifti  # noqa: F401
        elif fmt == "tiff":
            import tifffile  # noqa: F401

            import tasks.export.tiff  # noqa: F401
        elif fmt in ("geotiff", "geojson"):
            import rasterio  # noqa: F401
            import rasterio.crs  # noqa: F401
            import rasterio.features  # noqa: F401
            import rasterio.transform  # noqa: F401
            import rasterio.warp  # noqa: F401
            import rasterio.windows  # noqa: F401

            import tasks.export.geotiff  # noqa: F401
            if fmt == "geotiff":
                import rio_cogeo.cogeo  # noqa: F401
                import rio_cogeo.profiles  # noqa: F401
            else:
                import shapely  # noqa: F401
                import shapely.geometry  # noqa: F401

                import tasks.export.geojson  # noqa: F401
    return notes


def _dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def worker(job: dict) -> dict:
    sys.path.insert(0, str(REPO))
    step, kind, store = job["step"], job["kind"], job["store"]
    t_imp = time.perf_counter()
    notes = _preimport(step, kind)
    import_s = time.perf_counter() - t_imp
    import gc

    gc.collect()
    before_modules = set(sys.modules)
    baseline = _rss()
    peak_reset = _reset_peak()
    detail: dict = {}
    profiler = None
    if job.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t0 = time.perf_counter()
    if step == "plain read":
        detail = _plain_read(store)
    elif step.startswith("evaluate"):
        from tasks.metrics.evaluate import evaluate_scan

        boundary = "membrane" if step == "evaluate isbi" else None
        if kind == "em" and boundary is None:
            notes.append("without the boundary class: no ISBI scores (see em-isbi, evaluate isbi)")
        report = evaluate_scan(store, boundary_class=boundary, write=False)
        detail = {"mean_iou": report.semantic.get("mean_iou"), "pixel_accuracy": report.semantic.get("pixel_accuracy"),
                  "calibration": report.calibration,
                  "surface_note": (report.surface or {}).get("note"),
                  "surface_shape": (report.surface or {}).get("surface_shape"),
                  "isbi": None if report.isbi is None else {k: v for k, v in report.isbi.items() if k != "sections"}}
    else:
        from tasks.export import ExportOptions, export_scan

        fmt = step.split()[1]
        out = None if fmt == "zarr" else str(Path(job["outdir"]) / f"{kind}-{OUT_NAME[fmt]}")
        result = export_scan(store, ExportOptions(format=fmt, out=out, force=True))
        target = Path(f"{store}/labels/prediction") if fmt == "zarr" else Path(out)
        detail = {"status": result.status, "out": str(target), "out_bytes": _dir_bytes(target)}
    seconds = time.perf_counter() - t0
    peak = _peak(peak_reset)
    profile = None
    if profiler is not None:
        profiler.disable()
        profile = _profile_summary(profiler)
    late = sorted(m for m in set(sys.modules) - before_modules
                  if "." not in m and m.lstrip("_") not in sys.stdlib_module_names)  # third-party / tilewise
    return {"kind": kind, "step": step, "seconds": seconds, "baseline_rss": baseline, "peak_rss": peak,
            "ru_maxrss": _maxrss(), "peak_reset": peak_reset, "working": peak - baseline, "import_seconds": import_s,
            "imported_during_step": late, "notes": notes, "detail": detail, "profile": profile}


def _profile_summary(profiler, top: int = 10) -> dict:
    """The functions with the most own time, and tilewise's own functions by cumulative time."""
    import pstats

    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)

    def name(key):
        file, line, func = key
        short = file.replace(str(REPO) + "/", "").split("site-packages/")[-1]
        return f"{short}:{line}({func})"

    by_own = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    ours = [kv for kv in stats.items() if kv[0][0].startswith(str(REPO / "tasks"))]
    by_cum = sorted(ours, key=lambda kv: -kv[1][3])[:top]
    return {"own": [[name(k), v[2], v[1]] for k, v in by_own], "tilewise_cumulative": [[name(k), v[3], v[1]] for k, v in by_cum]}


# --------------------------------------------------------------------------------------------
# driver


def run_worker(job: dict, timeout: float, echo=None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONWARNINGS", "ignore")
    proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=timeout)
    if echo is not None:
        for line in proc.stdout.splitlines():
            if not line.startswith(RESULT_MARK):
                print(line, file=echo, flush=True)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    raise RuntimeError(f"worker {job['step']} {job['kind']} failed (rc {proc.returncode}):\n"
                       f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def steps_for(kind: str) -> list[str]:
    if kind == "em-isbi":
        return ["plain read", "evaluate isbi"]
    return ["plain read", "evaluate"] + [f"export {fmt}" for fmt in KINDS[kind]["exports"]]


def summarise(kinds: list[str], infos: dict, runs: list[dict]) -> list[dict]:
    rows = []
    for kind in kinds:
        scan_gb = infos[kind]["image_bytes"] / 1e9
        reads = [r for r in runs if r["kind"] == kind and r["step"] == "plain read"]
        if not reads:
            continue
        t_read = min(r["seconds"] for r in reads)
        per_array = {name: min(r["detail"]["arrays"][name]["seconds"] for r in reads) for name in ARRAYS}
        for step in steps_for(kind):
            mine = [r for r in runs if r["kind"] == kind and r["step"] == step]
            if not mine:
                continue
            t = min(r["seconds"] for r in mine)
            working = max(r["working"] for r in mine)
            own = sum(per_array[a] for a in READS.get(step, ARRAYS))
            rows.append({
                "kind": kind, "scan_gb": scan_gb, "step": step, "seconds": t, "seconds_per_gb": t / scan_gb,
                "ratio_to_plain_read": t / t_read, "ratio_to_its_arrays_read": t / own if own else None,
                "its_arrays": list(READS.get(step, ARRAYS)),
                "working_mb": working / 1e6, "working_pct_of_scan": 100 * working / infos[kind]["image_bytes"],
                "runs": len(mine), "imported_during_step": sorted({m for r in mine for m in r["imported_during_step"]}),
                "notes": sorted({n for r in mine for n in r["notes"]}), "detail": mine[0]["detail"],
            })
    return rows


def print_table(rows: list[dict], infos: dict, repeats: int) -> None:
    print()
    print(f"Best time of {repeats} run(s) per step, each a fresh subprocess; working memory = peak RSS (VmHWM after "
          "clear_refs) - RSS after imports, the largest seen.")
    print("plain read = every chunk of image/0, prediction/probabilities, prediction/labels, labels/reference, "
          "one chunk at a time.")
    hdr = (f"{'kind':9s} {'scan GB':>7s}  {'step':16s} {'seconds':>8s} {'s per GB':>8s} {'ratio to plain read':>19s} "
           f"{'ratio to its arrays':>19s} {'working MB':>10s} {'% of scan':>9s}")
    print(hdr)
    print("-" * len(hdr))
    last = None
    for r in rows:
        if last is not None and r["kind"] != last:
            print()
        last = r["kind"]
        own = f"{r['ratio_to_its_arrays_read']:19.2f}" if r["ratio_to_its_arrays_read"] is not None else f"{'':19s}"
        print(f"{r['kind']:9s} {r['scan_gb']:7.3f}  {r['step']:16s} {r['seconds']:8.2f} {r['seconds_per_gb']:8.1f} "
              f"{r['ratio_to_plain_read']:19.2f} {own} {r['working_mb']:10.0f} {r['working_pct_of_scan']:9.1f}")
    print("-" * len(hdr))
    print("scan GB = 10^9 bytes of image voxels (level 0, uncompressed); MB = 10^6 bytes. 'ratio to its arrays' = "
          "step time / plain read time of only the arrays that step reads:")
    for step, arrays in READS.items():
        print(f"  {step}: {', '.join(arrays)}")
    for kind, info in infos.items():
        print(f"{kind}: image {info['shape']} {info['dtype']} chunks {info['chunks']}, classes {info['classes']}, "
              f"fake prediction pixel error {info['pixel_error']:.4f}")
    for r in rows:
        for note in r["notes"]:
            print(f"  note ({r['kind']}, {r['step']}): {note}")
        if r["imported_during_step"]:
            print(f"  note ({r['kind']}, {r['step']}): modules first imported inside the timed step: "
                  f"{', '.join(r['imported_during_step'])}")


def print_profile(r: dict) -> None:
    prof = r["profile"]
    print(f"\nProfile of {r['kind']} {r['step']} ({r['seconds']:.2f} s under cProfile):")
    print("  most own time:")
    for name, sec, calls in prof["own"]:
        print(f"    {sec:8.2f} s {calls:9d} calls  {name}")
    print("  tilewise functions, cumulative:")
    for name, sec, calls in prof["tilewise_cumulative"]:
        print(f"    {sec:8.2f} s {calls:9d} calls  {name}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=0.25,
                    help="image voxels per scan, GiB (default 0.25: a run of about 5-10 minutes on 2 cores)")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                    help=f"work folder; scans built there before with the same size are reused (default {DEFAULT_WORKDIR})")
    ap.add_argument("--kinds", default=",".join(KINDS),
                    help=f"comma-separated subset of {','.join(KINDS)} (default: all)")
    ap.add_argument("--isbi-size-gb", type=float, default=0.03,
                    help="size of the em-isbi scan (default 0.03: two 4096 x 4096 sections, about 2 minutes)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per step; the best time counts (default 1)")
    ap.add_argument("--json", action="store_true", help="print the table as JSON")
    ap.add_argument("--profile", action="store_true",
                    help="one extra cProfile'd run of each evaluate / export step (not in the table): where the time goes")
    ap.add_argument("--clean", action="store_true", help="remove the work folder at the end")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per worker run")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        job = json.loads(args.worker)
        if job.get("step") == "build":
            sys.path.insert(0, str(REPO))
            result = build_scan(Path(job["workdir"]), job["kind"], job["size"])
        else:
            result = worker(job)
        print(RESULT_MARK + json.dumps(result), flush=True)
        return 0

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        ap.error(f"unknown kind(s) {unknown}; choose from {list(KINDS)}")
    size = int(args.size_gb * GIB)
    workdir = args.workdir / f"{args.size_gb:g}gib"
    workdir.mkdir(parents=True, exist_ok=True)
    log = sys.stderr if args.json else sys.stdout
    t_all = time.perf_counter()
    print(f"tilewise evaluate/export benchmark: {args.size_gb} GiB per scan, kinds {kinds}, work folder {workdir}, "
          f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}", file=log, flush=True)
    infos = {}
    print("Scans:", file=log, flush=True)
    for kind in kinds:  # in a subprocess too, so the driver stays small (its size is no worker's business)
        kind_size = min(size, int(args.isbi_size_gb * GIB)) if kind == "em-isbi" else size
        infos[kind] = run_worker({"step": "build", "kind": kind, "workdir": str(workdir), "size": kind_size},
                                 args.timeout, echo=log)
    os.sync()
    outdir = workdir / "exports"
    outdir.mkdir(exist_ok=True)
    runs: list[dict] = []
    n = 0
    try:
        for rep in range(args.repeats):
            for kind in kinds:
                order = steps_for(kind) if rep % 2 == 0 else steps_for(kind)[::-1]
                for step in order:
                    n += 1
                    job = {"kind": kind, "step": step, "store": infos[kind]["store"], "outdir": str(outdir)}
                    r = run_worker(job, args.timeout)
                    runs.append(r)
                    print(f"  run {n:2d}: {kind:9s} {step:16s} {r['seconds']:8.2f} s  working "
                          f"{r['working'] / 1e6:6.0f} MB  (imports {r['import_seconds']:.1f} s)", file=log, flush=True)
        profiles = []
        if args.profile:
            for kind in kinds:
                for step in steps_for(kind)[1:]:
                    if step == "evaluate isbi":
                        continue  # minutes; its profile: _fiji_flood (Python BFS) and scipy.sparse contingency tables
                    job = {"kind": kind, "step": step, "store": infos[kind]["store"], "outdir": str(outdir),
                           "profile": True}
                    profiles.append(run_worker(job, args.timeout))
        rows = summarise(kinds, infos, runs)
        if args.json:
            print(json.dumps({"size_gib": args.size_gb, "repeats": args.repeats, "scans": infos, "rows": rows,
                              "profiles": [{k: p[k] for k in ("kind", "step", "seconds", "profile")} for p in profiles]},
                             indent=1))
        else:
            print_table(rows, infos, args.repeats)
            for p in profiles:
                print_profile(p)
        print(f"\nTotal wall time {time.perf_counter() - t_all:.0f} s.", file=log)
    finally:
        shutil.rmtree(outdir, ignore_errors=True)
        if args.clean:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
