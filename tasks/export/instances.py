"""Instance export: one polygon per instance with its table's attributes, for QGIS and GIS tools.

``tilewise export --what instances --format geojson|gpkg``. For each row of the instance table
(``prediction/instances.parquet``) the instance's box is read from ``prediction/instances`` (through
a cache of decoded chunks, rows in box order, so each chunk is decoded about once), outlined with
``rasterio.features.shapes`` (GDALPolygonize, 4-connectivity) in exact integer PIXEL coordinates,
the pieces unioned with shapely (an instance cut in two by another is one MultiPolygon), mapped to
the CRS by the scan's affine transform, and -- for GeoJSON in EPSG:4326 (RFC 7946, the default) --
reprojected with one pyproj call per batch of features (not one per feature); exteriors
counter-clockwise. ``--crs source`` keeps the source CRS (GeoJSON's 2008 ``crs`` member);
GeoPackage (pyogrio, layer ``instances``) is always in the source CRS.

Attributes: ``id``, ``class``, ``class_name``, ``score``, ``pixels`` (the instance's pixel count),
``area`` (in the CRS's units squared, ``area_unit``), ``world_x`` / ``world_y`` (the centroid, CRS).
Streamed: features are written in batches of ``BATCH``; memory is one batch and the chunk cache.
Needs a 2D raster with a CRS (as the GeoTIFF export); volumes export their instance label image
with ``--what instances --format nifti|tiff|zarr`` instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tasks.errors import ScanError
from tasks.export.geotiff import check_fits as _geotiff_fits
from tasks.export.source import ExportSource
from tasks.instances import store as inst_store

BATCH = 2000
POLYGON_FORMATS = ("geojson", "gpkg")


def check_instances(src: ExportSource) -> None:
    if not inst_store.instances_complete(src.url):
        raise ScanError(src.url, "has no complete instances: run tilewise instances (or infer with an instance "
                                 "model) first")


def _read_rows(url: str):
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(inst_store.table_url(url), "rb") as fh:
        table = pq.read_table(fh)
    order = np.lexsort((np.asarray(table.column("x0")), np.asarray(table.column("y0"))))
    return table.take(order)


def _outline(window: np.ndarray, value: int, y0: int, x0: int):
    """The polygon(s) of ``window == value``, pixel coordinates of the scan."""
    from rasterio.features import shapes
    from rasterio.transform import Affine
    from shapely import unary_union
    from shapely.geometry import shape

    mask = (window == value).astype(np.uint8)
    pieces = [shape(g) for g, v in shapes(mask, mask=mask.astype(bool), connectivity=4,
                                          transform=Affine.translation(x0, y0)) if v == 1]
    return unary_union(pieces)


def polygons(src: ExportSource, crs_out: str | None):
    """Batches of (geometries in the output CRS, attribute columns) in box order."""
    import shapely
    import zarr
    from pyproj import CRS as ProjCRS
    from pyproj import Transformer
    from rasterio.transform import Affine
    from shapely.affinity import affine_transform

    from tasks.engine.tiles import ChunkCache

    spatial = _geotiff_fits(src)
    transform = Affine(*spatial["transform"][:6])
    matrix = [transform.a, transform.b, transform.d, transform.e, transform.c, transform.f]
    source_crs = ProjCRS.from_wkt(spatial["crs_wkt"])
    to = Transformer.from_crs(source_crs, crs_out, always_xy=True) if crs_out else None
    ids = ChunkCache(zarr.open_array(f"{inst_store.prediction_url(src.url)}/{inst_store.INSTANCES}", mode="r"),
                     budget_bytes=128 << 20)
    rows = _read_rows(src.url)
    cols = {k: rows.column(k).to_numpy(zero_copy_only=False) for k in
            ("id", "class", "class_name", "score", "y0", "x0", "y1", "x1", "area", "world_x", "world_y")}
    for start in range(0, rows.num_rows, BATCH):
        sl = slice(start, min(start + BATCH, rows.num_rows))
        geoms = []
        for i, y0, x0, y1, x1 in zip(*(cols[k][sl] for k in ("id", "y0", "x0", "y1", "x1"))):
            window = ids[int(y0): int(y1), int(x0): int(x1)]
            geoms.append(affine_transform(_outline(window, int(i), int(y0), int(x0)), matrix))
        geoms = np.asarray(geoms, dtype=object)
        crs_area = shapely.area(geoms)
        if to is not None:  # one call for every vertex of the batch
            geoms = shapely.transform(geoms, lambda xy: np.column_stack(to.transform(xy[:, 0], xy[:, 1])))
        geoms = shapely.orient_polygons(geoms, exterior_cw=False)  # RFC 7946: exteriors counter-clockwise
        attrs = {"id": cols["id"][sl].astype(np.int64), "class": cols["class"][sl].astype(np.int64),
                 "class_name": cols["class_name"][sl].astype(object), "score": cols["score"][sl].astype(np.float64),
                 "pixels": cols["area"][sl].astype(np.int64), "area": crs_area,
                 "world_x": cols["world_x"][sl].astype(np.float64), "world_y": cols["world_y"][sl].astype(np.float64)}
        yield geoms, attrs


def _area_unit(crs) -> str:
    return f"{crs.linear_units}^2" if crs.is_projected else "degree^2"


def export_instance_polygons(src: ExportSource, tmp: Path, options, provenance: dict[str, Any]) -> dict[str, Any]:
    """Write ``src``'s instance polygons to ``tmp`` as GeoJSON or GeoPackage (module docstring)."""
    from rasterio.crs import CRS

    check_instances(src)
    spatial = _geotiff_fits(src)
    crs = CRS.from_wkt(spatial["crs_wkt"])
    count = 0
    if options.format == "gpkg":
        import pyogrio.raw
        import shapely

        for geoms, attrs in polygons(src, None):
            multi = shapely.to_wkb(np.asarray([g if g.geom_type == "MultiPolygon" else shapely.MultiPolygon([g])
                                               for g in geoms], dtype=object))
            pyogrio.raw.write(str(tmp), multi, list(attrs.values()), list(attrs.keys()), layer="instances",
                              driver="GPKG", geometry_type="MultiPolygon", crs=crs.to_wkt(), append=count > 0,
                              layer_metadata={"tilewise": json.dumps(provenance, default=str),
                                              "area_unit": _area_unit(crs)})
            count += len(geoms)
        if count == 0:  # an empty layer still says what it would hold
            pyogrio.raw.write(str(tmp), np.asarray([], dtype=object), [np.asarray([], np.int64)], ["id"],
                              layer="instances", driver="GPKG", geometry_type="MultiPolygon", crs=crs.to_wkt())
        return {"crs": f"EPSG:{crs.to_epsg()}" if crs.to_epsg() else "source WKT", "features": count,
                "layer": "instances"}
    from shapely.geometry import mapping

    to_4326 = options.crs == "4326"
    head: dict[str, Any] = {"type": "FeatureCollection", "name": f"{src.record.get('scan_id') or 'scan'} instances"}
    if not to_4326:
        epsg = crs.to_epsg()
        head["crs"] = {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{epsg}" if epsg else crs.to_wkt()}}
    head["tilewise"] = provenance
    unit = _area_unit(crs)
    with open(tmp, "w") as f:
        f.write(json.dumps(head, default=str)[:-1] + ', "features": [\n')
        for geoms, attrs in polygons(src, "EPSG:4326" if to_4326 else None):
            for k, geom in enumerate(geoms):
                props = {name: (values[k].item() if hasattr(values[k], "item") else values[k])
                         for name, values in attrs.items()}
                props["area_unit"] = unit
                feature = {"type": "Feature", "id": props["id"], "geometry": mapping(geom), "properties": props}
                f.write(("" if count == 0 else ",\n") + json.dumps(feature))
                count += 1
        f.write("\n]}\n")
    return {"crs": "EPSG:4326" if to_4326 else (f"EPSG:{crs.to_epsg()}" if crs.to_epsg() else "source WKT"),
            "features": count}
