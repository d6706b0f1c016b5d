"""Export a scan's prediction to the formats other tools open (README, "Export").

One concept per module: ``source`` (the complete store and prediction, checked), ``provenance``
(sidecar, digests, atomic rename, the no-op decision), ``nifti``, ``geotiff``, ``tiff``,
``geojson``, ``ngff`` (the scan group as an OME-NGFF image with label images), and ``export``
(the dispatcher the CLI and the flow call). Heavy libraries are imported inside functions.
"""

from tasks.export.export import FORMATS, ExportOptions, ExportResult, export_scan

__all__ = ["FORMATS", "ExportOptions", "ExportResult", "export_scan"]
