"""One entry point for every export format: check, decide "unchanged", write atomically, record.

``export_scan(store, ExportOptions(format, out, ...))`` reads only complete stores with a complete
prediction, writes OUT under a temporary name and renames it, then writes ``OUT.tilewise.json``
(see ``provenance``). ``zarr`` writes into the store itself (the NGFF label image
``labels/prediction``, see ``ngff``) and keeps its provenance in that group's attributes.

Locking (tasks/store_lock.py): a file export holds the store's lock shared for the whole read
(many exports and evaluations at once; no writer starts, so no chunk is rewritten under it) and
renames its output onto OUT only if the prediction's marks are still the ones its provenance
records; ``zarr`` writes into the store, as a brief writer that waits for the store's readers.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from tasks import storage
from tasks.errors import ScanError
from tasks.export import provenance as prov
from tasks.export.source import open_source

FORMATS = ("nifti", "geotiff", "tiff", "geojson", "gpkg", "zarr")
WHAT = ("labels", "probabilities", "instances")
SUFFIXES = {
    "nifti": (".nii", ".nii.gz"),
    "geotiff": (".tif", ".tiff"),
    "tiff": (".tif", ".tiff"),
    "geojson": (".geojson", ".json"),
    "gpkg": (".gpkg",),
}
DEFAULT_SUFFIX = {"nifti": ".nii.gz", "geotiff": ".tif", "tiff": ".ome.tif", "geojson": ".geojson", "gpkg": ".gpkg"}


@dataclass(frozen=True)
class ExportOptions:
    format: str
    out: str | None = None  # the file to write; unused for zarr
    what: Literal["labels", "probabilities", "instances"] = "labels"
    crs: Literal["4326", "source"] = "4326"  # GeoJSON only
    force: bool = False
    tile: int = 512  # GeoTIFF internal tile / GeoJSON polygonising window, pixels

    def identity(self) -> dict[str, Any]:
        """The options that change the bytes written."""
        d: dict[str, Any] = {"what": self.what}
        if self.format in ("geotiff", "geojson") and self.what != "instances":
            d["tile"] = self.tile
        if self.format == "geojson":
            d["crs"] = self.crs
        return d


@dataclass
class ExportResult:
    store: str
    format: str
    out: str
    status: str  # "exported" | "unchanged"
    sidecar: str | None = None
    seconds: float = 0.0
    details: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_options(store: str, options: ExportOptions) -> None:
    if options.format not in FORMATS:
        raise ScanError(store, f"unknown export format {options.format!r}; choose one of {', '.join(FORMATS)}")
    if options.what not in WHAT:
        raise ScanError(store, f"--what must be one of {', '.join(WHAT)}, got {options.what!r}")
    if options.what == "instances" and options.format not in ("geojson", "gpkg"):
        raise ScanError(store, f"--what instances writes polygons: --format geojson or gpkg, not {options.format} "
                               "(the instance label image is prediction/instances in the store)")
    if options.format == "gpkg" and options.what != "instances":
        raise ScanError(store, "GeoPackage export writes instance polygons: use --what instances")
    if options.crs not in ("4326", "source"):
        raise ScanError(store, f"--crs must be 4326 or source, got {options.crs!r}")
    if options.format == "zarr":
        if options.what != "labels":
            raise ScanError(store, "zarr export writes the NGFF label image; probabilities are already in the store")
        return
    if options.format == "geojson" and options.what == "probabilities":
        raise ScanError(store, "GeoJSON export polygonises labels; --what probabilities is not available")
    if not options.out:
        raise ScanError(store, f"--out is required for {options.format} (e.g. scan{DEFAULT_SUFFIX[options.format]})")
    name = Path(options.out).name.lower()
    if not name.endswith(SUFFIXES[options.format]):
        raise ScanError(options.out, f"a {options.format} export must end with {' or '.join(SUFFIXES[options.format])}")
    if options.tile < 16 or options.tile % 16:
        raise ScanError(store, f"tile must be a positive multiple of 16, got {options.tile}")


def export_scan(store: str, options: ExportOptions) -> ExportResult:
    """Export the prediction of the scan group ``store`` as ``options`` say (see module docstring).
    :class:`storage.StoreBusy` (one line) when another run writes the store."""
    store = str(store).rstrip("/")
    _check_options(store, options)
    if not storage.exists(store):  # no lock file beside a store that is not there
        raise ScanError(store, "does not exist")
    into_store = options.format == "zarr"
    with storage.store_lock(store, purpose="export", shared=not into_store, brief=into_store):
        return _export(store, options)


def _export(store: str, options: ExportOptions) -> ExportResult:
    """:func:`export_scan`'s work, under the store's lock."""
    t0 = time.perf_counter()
    store = str(store).rstrip("/")
    _check_options(store, options)
    src = open_source(store)
    if options.what == "probabilities" and src.probabilities is None:
        why = "inferred with --outputs labels" if src.prediction.get("outputs") == ["labels"] else "an instance model's"
        raise ScanError(store, f"the prediction has no probabilities ({why}): export labels or instances")
    if options.format == "zarr":
        from tasks.export.ngff import write_prediction_labels_ngff

        status = write_prediction_labels_ngff(store, force=options.force)
        return ExportResult(store, "zarr", f"{store}/labels/prediction", status, None, time.perf_counter() - t0)

    out = Path(options.out)
    identity = options.identity()
    if options.what == "instances":
        from tasks.instances import store as inst_store
        from tasks.export.instances import check_instances

        check_instances(src)
        identity["instances_digest"] = (inst_store.read_instances_record(store) or {}).get("digest")
    record = prov.provenance(src, options.format, identity)
    if options.what == "instances":
        from tasks.export.geojson import check_fits
        from tasks.export.instances import export_instance_polygons as write
    elif options.format == "nifti":
        from tasks.export.nifti import check_fits, export_nifti as write
    elif options.format == "geotiff":
        from tasks.export.geotiff import check_fits, export_geotiff as write
    elif options.format == "tiff":
        from tasks.export.tiff import check_fits, export_tiff as write
    else:
        from tasks.export.geojson import check_fits, export_geojson as write
    check_fits(src)  # before anything is touched: a format that does not fit says so
    if not options.force and prov.up_to_date(out, record):
        return ExportResult(store, options.format, str(out), "unchanged", str(prov.sidecar_path(out)),
                            time.perf_counter() - t0)
    with prov.atomic_output(out) as tmp:
        details = write(src, tmp, options, record) if options.format in ("geotiff", "geojson", "gpkg") \
            else write(src, tmp, options.what, record)
        # what the provenance names is what was read: else no rename (a writer that ignored the lock)
        storage.check_marks(f"{store}/prediction", storage.marks(src.prediction), "exported")
    sidecar = prov.write_sidecar(out, {**record, "details": details})
    return ExportResult(store, options.format, str(out), "exported", str(sidecar), time.perf_counter() - t0, details)
