"""GeoJSON export: one polygon per connected region of each class, streamed tile by tile.

Polygonising: ``rasterio.features.shapes`` (GDALPolygonize, 4-connectivity) on windows of
``tile`` x ``tile`` pixels of ``prediction/labels``, background (class 0) and source nodata
masked out. Each window is polygonised with the window's own transform in PIXEL coordinates
(``Affine.translation(col_off, row_off)``): vertices are exact integers, so the two pieces of a
region cut by a window seam share their seam edge bit for bit and ``shapely.unary_union`` merges
them exactly (CRS coordinates from two window transforms can differ in the last bit and leave
slivers). Only finished polygons are mapped to the CRS (the scan's affine transform) and, by
default, reprojected to EPSG:4326 with ``rasterio.warp.transform_geom`` as RFC 7946 requires
(longitude, latitude; exterior rings counter-clockwise). ``crs="source"`` keeps the source CRS and
names it in a ``crs`` member (the GeoJSON 2008 convention QGIS and GDAL read; not RFC 7946).

Merging across seams, rows of windows top to bottom: a piece that touches no seam is a whole
region and is written at once. Pieces touching a seam are unioned per class with the regions left
open by the row above; a merged region still touching the seam below the current row stays open,
the others are written. So a region is ONE polygon however many windows it spans.

Memory bound: one window of labels (``tile``² bytes) plus the polygons of the regions that touch
the current horizontal seam and the seam-touching pieces of the current row. It does not grow with
the raster's height; a single region spanning the whole raster is held until its last row (it must
be whole before it can be written).

Properties: ``class`` (index), ``class_name``, ``area`` in the source CRS's units squared
(``area_unit``; degree² for a geographic CRS), ``pixels`` (the exact pixel count).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, TextIO

import numpy as np

from tasks.export.geotiff import check_fits as _geotiff_fits
from tasks.export.geotiff import nodata_mask, source_nodata
from tasks.export.source import ExportSource

BACKGROUND = 0


def check_fits(src: ExportSource) -> dict[str, Any]:
    """Same needs as a GeoTIFF: a 2D raster with a CRS and a transform."""
    return _geotiff_fits(src)


def _polygons(geom) -> Iterable:
    """The polygons of a union result (Polygon, MultiPolygon or a collection)."""
    if geom.is_empty:
        return []
    if geom.geom_type == "Polygon":
        return [geom]
    return [g for part in getattr(geom, "geoms", []) for g in _polygons(part)]


class _Writer:
    """A FeatureCollection written feature by feature."""

    def __init__(self, f: TextIO, src: ExportSource, crs, to_4326: bool, transform, provenance: dict[str, Any]):
        from shapely.affinity import affine_transform

        self.f, self.src, self.crs, self.to_4326 = f, src, crs, to_4326
        self.matrix = [transform.a, transform.b, transform.d, transform.e, transform.c, transform.f]
        self.affine_transform = affine_transform
        self.count = 0
        self.per_class: dict[int, int] = {}
        self.area_unit = (f"{crs.linear_units}^2" if crs.is_projected else "degree^2")
        head: dict[str, Any] = {"type": "FeatureCollection", "name": str(src.record.get("scan_id") or "prediction")}
        if not to_4326:
            epsg = crs.to_epsg()
            head["crs"] = {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{epsg}" if epsg
                                                          else crs.to_wkt()}}
        head["tilewise"] = provenance
        text = json.dumps(head, default=str)
        f.write(text[:-1] + ', "features": [\n')

    def emit(self, pixel_polygon, cls: int) -> None:
        from rasterio.warp import transform_geom
        from shapely.geometry import mapping, shape
        from shapely.geometry.polygon import orient

        geom = self.affine_transform(pixel_polygon, self.matrix)
        area = float(geom.area)
        if self.to_4326:
            geom = shape(transform_geom(self.crs, "EPSG:4326", mapping(geom)))
        geom = orient(geom, sign=1.0)  # RFC 7946: exterior counter-clockwise, holes clockwise
        name = self.src.classes[cls] if cls < len(self.src.classes) else f"class_{cls}"
        feature = {"type": "Feature", "id": self.count, "geometry": mapping(geom),
                   "properties": {"class": cls, "class_name": name, "area": area, "area_unit": self.area_unit,
                                  "pixels": int(round(pixel_polygon.area))}}
        self.f.write(("" if self.count == 0 else ",\n") + json.dumps(feature))
        self.count += 1
        self.per_class[cls] = self.per_class.get(cls, 0) + 1

    def close(self) -> None:
        self.f.write("\n]}\n")


def export_geojson(src: ExportSource, tmp: Path, options, provenance: dict[str, Any]) -> dict[str, Any]:
    """Write the label polygons of ``src`` to ``tmp`` (see module docstring)."""
    import zarr
    from rasterio.crs import CRS
    from rasterio.features import shapes
    from rasterio.transform import Affine
    from shapely import unary_union
    from shapely.geometry import shape

    spatial = check_fits(src)
    height, width = src.shape
    tile = options.tile
    crs = CRS.from_wkt(spatial["crs_wkt"])
    transform = Affine(*spatial["transform"][:6])
    to_4326 = options.crs == "4326"
    nodata = source_nodata(spatial)
    image = zarr.open_group(src.url, mode="r")["image/0"] if nodata is not None else None
    open_regions: dict[int, list] = {}
    held_peak = 0
    with open(tmp, "w") as f:
        writer = _Writer(f, src, crs, to_4326, transform, provenance)
        for y0 in range(0, height, tile):
            y1 = min(y0 + tile, height)
            seam_pieces: dict[int, list] = {}
            for x0 in range(0, width, tile):
                x1 = min(x0 + tile, width)
                block = np.asarray(src.labels[y0:y1, x0:x1])
                mask = block != BACKGROUND
                if image is not None:
                    mask &= ~nodata_mask(np.asarray(image[:, y0:y1, x0:x1]), nodata)
                if not mask.any():
                    continue
                for geom, value in shapes(block, mask=mask, connectivity=4, transform=Affine.translation(x0, y0)):
                    poly, cls = shape(geom), int(value)
                    minx, miny, maxx, maxy = poly.bounds
                    on_seam = ((x0 > 0 and minx == x0) or (x1 < width and maxx == x1)
                               or (y0 > 0 and miny == y0) or (y1 < height and maxy == y1))
                    if on_seam:
                        seam_pieces.setdefault(cls, []).append(poly)
                    else:
                        writer.emit(poly, cls)
            held_peak = max(held_peak, sum(map(len, seam_pieces.values())) + sum(map(len, open_regions.values())))
            still_open: dict[int, list] = {}
            for cls in sorted(set(open_regions) | set(seam_pieces)):
                merged = unary_union(open_regions.get(cls, []) + seam_pieces.get(cls, []))
                for poly in _polygons(merged):
                    if y1 < height and poly.bounds[3] == y1:
                        still_open.setdefault(cls, []).append(poly)
                    else:
                        writer.emit(poly, cls)
            open_regions = still_open
        writer.close()
    return {"crs": "EPSG:4326" if to_4326 else (f"EPSG:{crs.to_epsg()}" if crs.to_epsg() else "source WKT"),
            "features": writer.count, "features_per_class": {str(k): v for k, v in sorted(writer.per_class.items())},
            "tile": tile, "max_polygons_held": held_peak}
