"""Multi-page OME-TIFF export (EM stacks, or any scan): one page per section, streamed.

``tifffile.TiffWriter(ome=True).write`` is given an iterator that yields one (Y, X) section at a
time from ``prediction/labels`` (or, for probabilities, every section of class 0, then class 1,
...: OME axes CZYX), so memory is one section. Pages are DEFLATE-compressed, minisblack.

Physical size: ``attrs.tilewise.spacing`` (Z, Y, X) in ``unit`` becomes the TIFF resolution tags
(XResolution / YResolution in pixels per centimetre, ResolutionUnit = CENTIMETER, as Fiji and
tilewise's own TIFF reader read them) and the OME-XML PhysicalSizeX/Y/Z with their unit, so the
section spacing survives too. A scan without a known spacing gets no resolution tags.
Provenance: the Software tag and the ``.tilewise.json`` sidecar (OME-XML owns ImageDescription).
The OME UUID names what the file holds (a name-based UUID of the scan's content digest, the
prediction's model and parameters, the calibrator and the export's options), not the moment it was
written: the same prediction exported twice, or by a cluster and by one process, gives the same
bytes.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from tasks.errors import ScanError
from tasks.export.source import ExportSource, finite_or_fail

CENTIMETRES = {"angstrom": 1e-8, "nanometer": 1e-7, "micrometer": 1e-4, "millimeter": 0.1, "centimeter": 1.0,
               "meter": 100.0}
OME_UNITS = {"angstrom": "Å", "nanometer": "nm", "micrometer": "µm", "millimeter": "mm", "centimeter": "cm",
             "meter": "m"}


def content_uuid(src: ExportSource, what: str) -> str:
    """The OME UUID of an export of ``what`` from ``src``: a name for its content (module docstring)."""
    name = json.dumps({"store_digest": src.store_digest(), "prediction": src.prediction.get("digest"),
                       "calibrator": src.prediction.get("calibrator"), "what": what}, sort_keys=True, default=str)
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, 'tilewise:' + name)}"


def check_fits(src: ExportSource) -> None:
    if src.ndim not in (2, 3):
        raise ScanError(src.url, f"TIFF export needs a 2D or 3D scan, this one has shape {src.shape}")


def resolution(spacing: list[float] | None, unit: str | None) -> tuple[float, float] | None:
    """(XResolution, YResolution) in pixels per centimetre from (…, Y, X) spacing, or None."""
    if not spacing or unit not in CENTIMETRES or any(s <= 0 for s in spacing[-2:]):
        return None
    return 1.0 / (spacing[-1] * CENTIMETRES[unit]), 1.0 / (spacing[-2] * CENTIMETRES[unit])


def _sections(array, dtype: np.dtype, leading: tuple[int, ...], src: ExportSource) -> Iterator[np.ndarray]:
    if not leading:  # one 2D page
        block = np.asarray(array[...], dtype=dtype)  # a raster: bounded by one page, the unit of TIFF
        yield finite_or_fail(block, src.url, "the raster")
        return
    for index in np.ndindex(*leading):
        yield finite_or_fail(np.asarray(array[index], dtype=dtype), src.url, f"section {index}")


def export_tiff(src: ExportSource, tmp: Path, what: str, provenance: dict[str, Any]) -> dict[str, Any]:
    """Write ``what`` (labels | probabilities) of ``src`` as a multi-page OME-TIFF at ``tmp``."""
    import tifffile

    check_fits(src)
    record = src.record
    spacing, unit = record.get("spacing"), record.get("unit")
    axes = "ZYX"[-src.ndim:]
    if what == "labels":
        dtype = np.dtype("uint8" if len(src.classes) <= 255 else "uint16")
        array, shape = src.labels, src.shape
    else:
        dtype = np.dtype("float32")
        array, shape = src.probabilities, tuple(src.probabilities.shape)
        axes = "C" + axes
    leading = shape[:-2]
    metadata: dict[str, Any] = {"axes": axes, "Name": str(record.get("scan_id") or ""), "UUID": content_uuid(src, what)}
    if what == "probabilities":
        metadata["Channel"] = {"Name": list(src.classes)}
    res = resolution(spacing, unit)
    if spacing and unit in OME_UNITS:
        for name, value in zip("ZYX"[-len(spacing):], spacing):
            metadata[f"PhysicalSize{name}"] = float(value)
            metadata[f"PhysicalSize{name}Unit"] = OME_UNITS[unit]
    nbytes = int(np.prod(shape)) * dtype.itemsize
    with tifffile.TiffWriter(tmp, bigtiff=nbytes > 2**31, ome=True) as tif:
        tif.write(
            _sections(array, dtype, leading, src), shape=shape, dtype=dtype, photometric="minisblack",
            compression="zlib", resolution=res, resolutionunit="CENTIMETER" if res else None,
            metadata=metadata, software="tilewise",
        )
    return {"dtype": dtype.name, "shape": list(shape), "axes": axes, "resolution_px_per_cm": res,
            "spacing": spacing, "unit": unit}
