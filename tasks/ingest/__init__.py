"""Ingestion: source files (NIfTI, TIFF, slice folders, GeoTIFF) → one Zarr scan group each."""

from tasks.ingest.discover import LabelSpec, ScanSpec, discover_scans
from tasks.ingest.to_zarr import IngestResult, ingest_scan

__all__ = ["IngestResult", "LabelSpec", "ScanSpec", "discover_scans", "ingest_scan"]
