"""NIfTI-1 export of the predicted labels or probabilities, in the source file's own orientation.

Ingest stored NIfTI voxel (i, j, k) at array[z=k, y=j, x=i] and kept the header's affine, sform and
qform (with their codes), zooms and units in ``attrs.tilewise.spatial``. NIfTI stores data in
Fortran order (i fastest), so a C-ordered (Z, Y, X) slab of ``prediction/labels`` is already the
byte order of NIfTI's (i, j, k) volume: the file is written as the header followed by the Z-slabs
in order, nothing transposed, and voxel (i, j, k) of the mask is voxel (i, j, k) of the source.

Streaming: one chunk row along Z at a time, straight into the file (``.nii``) or through a gzip
stream (``.nii.gz``, compression level 1 as nibabel writes, mtime 0 so identical exports are
identical bytes). Memory: one chunk row of the labels (uint8) or of one class (float32).

Labels are uint8 (uint16 when there are more than 255 classes) with intent NIFTI_INTENT_LABEL.
Probabilities are float32 in ONE 4D file (i, j, k, class): the class is the 4th axis, as SPM's
tissue probability maps (TPM.nii) store one volume per class; pixdim[4] = 1 and no time unit.
Provenance goes into ``descrip`` (short) and a NIfTI comment extension (ecode 6, the JSON).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from tasks.errors import ScanError
from tasks.export.source import ExportSource, finite_or_fail, slabs

GZIP_LEVEL = 1


def check_fits(src: ExportSource) -> dict[str, Any]:
    """The source's NIfTI geometry, or :class:`ScanError` saying what is missing."""
    spatial = src.spatial
    if spatial.get("format") != "nifti" or spatial.get("affine") is None:
        raise ScanError(src.url, f"has no NIfTI affine (the scan came from {spatial.get('format') or 'an unknown source'}); "
                                 "NIfTI export needs a NIfTI source: use --format tiff or zarr")
    if src.ndim != 3:
        raise ScanError(src.url, f"NIfTI export needs a 3D scan, this one has shape {src.shape}")
    nifti_ijk = tuple(spatial.get("nifti_shape", [])[:3])
    if nifti_ijk and nifti_ijk != src.shape[::-1]:
        raise ScanError(src.url, f"prediction shape (Z, Y, X) {src.shape} is not the source's (i, j, k) {nifti_ijk} reversed")
    return spatial


def label_dtype(classes: int) -> np.dtype:
    return np.dtype("<u1") if classes <= 255 else np.dtype("<u2")


def build_header(spatial: dict[str, Any], shape_ijk: tuple[int, ...], dtype: np.dtype, intent: str,
                 provenance: dict[str, Any]):
    """A NIfTI-1 single-file header with the source's sform, qform, codes, zooms and units."""
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape_ijk)
    hdr.set_data_dtype(dtype)
    sform, qform = spatial.get("sform"), spatial.get("qform")
    hdr.set_sform(None if sform is None else np.asarray(sform, dtype=np.float64), code=int(spatial.get("sform_code", 0)))
    hdr.set_qform(None if qform is None else np.asarray(qform, dtype=np.float64), code=int(spatial.get("qform_code", 0)))
    zooms = [float(z) for z in spatial["zooms"][:3]]
    hdr.set_zooms(tuple(zooms + [1.0] * (len(shape_ijk) - 3)))  # after set_qform, which derives zooms
    space, _time = (spatial.get("xyzt_units") or ["unknown", "unknown"])
    hdr.set_xyzt_units(space, "unknown")
    hdr.set_intent(intent)
    hdr.set_slope_inter(1.0, 0.0)
    hdr["descrip"] = f"tilewise {provenance.get('model') or ''}"[:79].encode("ascii", "replace")
    hdr.extensions.append(nib.nifti1.Nifti1Extension("comment", json.dumps(provenance, default=str).encode()))
    return hdr


def _write(path: Path, header, blocks) -> None:
    """Header, padding up to vox_offset, then the data blocks in file order."""
    opener = (lambda p: gzip.GzipFile(str(p), "wb", compresslevel=GZIP_LEVEL, mtime=0)) \
        if path.name.endswith(".gz") else (lambda p: open(p, "wb"))
    with opener(path) as f:  # type: BinaryIO
        header.write_to(f)
        offset = int(header["vox_offset"])
        written = f.tell()
        if written > offset:
            raise RuntimeError(f"NIfTI header of {written} bytes overruns vox_offset {offset}")
        f.write(b"\x00" * (offset - written))
        for block in blocks:
            f.write(np.ascontiguousarray(block).tobytes())


def export_nifti(src: ExportSource, tmp: Path, what: str, provenance: dict[str, Any]) -> dict[str, Any]:
    """Write ``what`` (labels | probabilities) of ``src`` to ``tmp`` (.nii or .nii.gz)."""
    spatial = check_fits(src)
    shape_ijk = tuple(src.shape[::-1])
    if what == "labels":
        dtype = label_dtype(len(src.classes))
        header = build_header(spatial, shape_ijk, dtype, "label", provenance)
        blocks = (np.asarray(src.labels[z0:z1]).astype(dtype, copy=False) for z0, z1 in slabs(src.labels))
    else:
        dtype = np.dtype("<f4")
        k = src.probabilities.shape[0]
        header = build_header(spatial, shape_ijk + (k,), dtype, "none", provenance)
        blocks = (finite_or_fail(np.asarray(src.probabilities[c, z0:z1], dtype=dtype), src.url,
                                 f"class {c}, slices {z0}-{z1 - 1}")
                  for c in range(k) for z0, z1 in slabs(src.labels))
    _write(tmp, header, blocks)
    return {"dtype": dtype.name, "shape_ijk": list(header.get_data_shape())}
