"""Cloud-Optimized GeoTIFF export of the predicted labels (or probabilities) of a raster scan.

Two steps, both streamed:

1. ``prediction/labels`` (or ``probabilities``) is written window by window (``tile`` x ``tile``
   pixels) into a tiled, DEFLATE-compressed staging GeoTIFF beside the output, with the source's
   CRS (``crs_wkt``), affine transform (rasterio order a, b, c, d, e, f) and nodata.
2. ``rio_cogeo.cogeo.cog_translate`` rewrites it as a COG: internal tiles of ``tile`` pixels
   (512 by default), DEFLATE, overviews resampled with NEAREST. GDAL's default overview resampling
   for ``gdaladdo`` / ``BuildOverviews`` in many tools is an average or cubic kernel, which invents
   class indices between two classes; nearest only ever copies a class that is there. The result is
   checked with ``rio_cogeo.cogeo.cog_validate``.

Nodata: if the source image declared nodata (per band, ``attrs.tilewise.spatial.nodata``), a pixel
whose every band equals its nodata value is nodata in the export: 255 for uint8 labels (65535 for
uint16, more than 255 classes), NaN for probabilities. Without a source nodata the export has none.
Memory: one window (``tile``² pixels, times K bands for probabilities) plus GDAL's block cache
(capped at 64 MB); cog_translate works in memory only below 64 MB of output pixels, else through a
temporary file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tasks.errors import ScanError
from tasks.export.source import ExportSource, finite_or_fail

GDAL_CACHE_MB = 64  # rasterio.Env passes an int GDAL_CACHEMAX to GDALSetCacheMax: bytes, not MB
IN_MEMORY_BYTES = 64 << 20


def check_fits(src: ExportSource) -> dict[str, Any]:
    spatial = src.spatial
    if spatial.get("format") != "geotiff":
        raise ScanError(src.url, f"has no georeferencing (the scan came from {spatial.get('format') or 'an unknown source'}, "
                                 "not a GeoTIFF): GeoTIFF export needs a CRS and a transform; use --format tiff")
    if not spatial.get("crs_wkt"):
        raise ScanError(src.url, "has no CRS (its source GeoTIFF declared none): GeoTIFF export needs one")
    if src.ndim != 2:
        raise ScanError(src.url, f"GeoTIFF export needs a 2D raster, this scan has shape {src.shape}")
    return spatial


def source_nodata(spatial: dict[str, Any]) -> list[float] | None:
    """The per-band nodata of the source image, or None when it declared none on any band."""
    values = spatial.get("nodata") or []
    if not values or any(v is None for v in values):
        return None
    return [float("nan") if v == "NaN" else float(v) for v in values]


def nodata_mask(image_window: np.ndarray, nodata: list[float]) -> np.ndarray:
    """(Y, X) True where every band of a (C, Y, X) window equals its band's nodata (NaN matches NaN)."""
    mask = np.ones(image_window.shape[1:], dtype=bool)
    for band, value in zip(image_window, nodata):
        mask &= np.isnan(band) if np.isnan(value) else (band == value)
    return mask


def windows(height: int, width: int, tile: int):
    from rasterio.windows import Window

    for y0 in range(0, height, tile):
        for x0 in range(0, width, tile):
            yield Window(x0, y0, min(tile, width - x0), min(tile, height - y0))


def _stage(src: ExportSource, path: Path, what: str, tile: int, spatial: dict[str, Any]) -> dict[str, Any]:
    import rasterio
    from rasterio.crs import CRS
    from rasterio.transform import Affine

    height, width = src.shape
    nodata = source_nodata(spatial)
    image = None
    if nodata is not None:
        import zarr

        image = zarr.open_group(src.url, mode="r")["image/0"]
    if what == "labels":
        dtype = "uint8" if len(src.classes) <= 255 else "uint16"
        out_nodata = (255 if dtype == "uint8" else 65535) if nodata is not None else None
        count, names = 1, ["labels"]
    else:
        # an instance model's prediction has no probabilities: export_scan refuses that case first
        dtype, count, names = "float32", src.probabilities.shape[0], list(src.classes)
        out_nodata = float("nan") if nodata is not None else None
    profile = {
        "driver": "GTiff", "width": width, "height": height, "count": count, "dtype": dtype,
        "crs": CRS.from_wkt(spatial["crs_wkt"]), "transform": Affine(*spatial["transform"][:6]),
        "nodata": out_nodata, "tiled": True, "blockxsize": tile, "blockysize": tile,
        "compress": "deflate", "zlevel": 1, "interleave": "band" if count > 1 else "pixel", "BIGTIFF": "IF_SAFER",
    }
    with rasterio.open(path, "w", **profile) as dst:
        for i, name in enumerate(names, start=1):
            dst.set_band_description(i, name)
        for window in windows(height, width, tile):
            rows = slice(window.row_off, window.row_off + window.height)
            cols = slice(window.col_off, window.col_off + window.width)
            mask = None
            if image is not None:
                mask = nodata_mask(np.asarray(image[:, rows, cols]), nodata)
            if what == "labels":
                block = np.asarray(src.labels[rows, cols]).astype(dtype)
                if mask is not None:
                    block[mask] = out_nodata
                dst.write(block, 1, window=window)
            else:
                block = finite_or_fail(np.asarray(src.probabilities[:, rows, cols], dtype=np.float32), src.url,
                                       f"rows {rows.start}-{rows.stop - 1}, columns {cols.start}-{cols.stop - 1}")
                if mask is not None:
                    block[:, mask] = np.nan
                dst.write(block, window=window)
    return {"dtype": dtype, "bands": count, "nodata": None if out_nodata is None else
            (out_nodata if what == "labels" else "NaN")}


def export_geotiff(src: ExportSource, tmp: Path, options, provenance: dict[str, Any]) -> dict[str, Any]:
    """Write a COG of ``options.what`` to ``tmp`` (see module docstring); returns what it wrote."""
    import rasterio
    from rio_cogeo.cogeo import cog_translate, cog_validate
    from rio_cogeo.profiles import cog_profiles

    spatial = check_fits(src)
    tile = options.tile
    stage = tmp.with_name(tmp.name + ".stage.tif")
    try:
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB << 20):
            details = _stage(src, stage, options.what, tile, spatial)
            height, width = src.shape
            profile = cog_profiles.get("deflate")
            profile.update(blockxsize=tile, blockysize=tile, BIGTIFF="IF_SAFER")
            itemsize = 1 if details["dtype"] == "uint8" else (2 if details["dtype"] == "uint16" else 4)
            tags = {"TILEWISE_PROVENANCE": json.dumps(provenance, default=str),
                    "TILEWISE_CLASSES": json.dumps(src.classes), "TILEWISE_CONTENT": options.what}
            cog_translate(str(stage), str(tmp), profile, overview_resampling="nearest", resampling="nearest",
                          in_memory=height * width * details["bands"] * itemsize < IN_MEMORY_BYTES,
                          additional_cog_metadata=tags, forward_band_tags=True, quiet=True,
                          config={"GDAL_NUM_THREADS": "ALL_CPUS", "GDAL_TIFF_OVR_BLOCKSIZE": str(tile)})
            valid, errors, _warnings = cog_validate(str(tmp), quiet=True)
            if not valid:
                raise RuntimeError(f"rio-cogeo says the COG is not valid: {'; '.join(errors)}")
            with rasterio.open(tmp) as cog:
                details["overviews"] = cog.overviews(1)
    finally:
        stage.unlink(missing_ok=True)
    details["overview_resampling"] = "nearest"
    return details
