"""Instance polygons (tasks/export/instances.py): one feature per instance with the table's
attributes; each polygon, mapped back to pixels, has exactly the instance's pixel count; a cut
instance is a MultiPolygon; EPSG:4326 GeoJSON inside the scene, GeoPackage in the source CRS;
unchanged on re-export; one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
from pyproj import Transformer
from shapely.geometry import shape

from tasks.engine.infer import EngineConfig
from tasks.errors import ScanError
from tasks.export import ExportOptions, export_scan
from tasks.instances import store as inst_store
from tasks.instances.detect import infer_instances
from tests.test_instances_detect import PerfectDetector, drawn, geotiff_scan, instance_model

TRANSFORM = (0.5, 0.0, 500000.0, 0.0, -0.5, 4000000.0)  # geotiff_scan's, EPSG:32633


def to_pixels(geom, crs_in: str | None = None):
    """Back to pixel coordinates (col, row) through the inverse affine (and from lon/lat first)."""
    if crs_in:
        back = Transformer.from_crs(crs_in, "EPSG:32633", always_xy=True)
        geom = shapely.transform(geom, lambda xy: np.column_stack(back.transform(xy[:, 0], xy[:, 1])))
    a, _, c, _, e, f = TRANSFORM
    return shapely.transform(geom, lambda xy: np.column_stack([(xy[:, 0] - c) / a, (xy[:, 1] - f) / e]))


@pytest.fixture
def scene(tmp_path):
    ids = drawn(seed=7)
    ids[150:160, 20:60] = 90
    ids[150:160, 80:120] = 90  # one object in two pieces: a MultiPolygon
    store = geotiff_scan(tmp_path, ids)
    infer_instances(store, instance_model(), EngineConfig(overlap=0.25, pad="constant"), detector=PerfectDetector())
    return store


def test_geojson_one_feature_per_instance_with_exact_pixel_areas(scene, tmp_path):
    out = tmp_path / "i.geojson"
    result = export_scan(scene, ExportOptions("geojson", str(out), what="instances"))
    assert result.status == "exported"
    table = pq.read_table(inst_store.table_url(scene)).to_pydict()
    features = json.loads(out.read_text())["features"]
    assert sorted(f["properties"]["id"] for f in features) == sorted(table["id"])
    rows = {i: k for k, i in enumerate(table["id"])}
    multi = 0
    for f in features:
        p, row = f["properties"], rows[f["properties"]["id"]]
        assert (p["class"], p["class_name"], p["pixels"]) == (table["class"][row], table["class_name"][row],
                                                              table["area"][row])
        geom = shape(f["geometry"])
        lon, lat = geom.representative_point().coords[0]
        assert 14.9 < lon < 15.1 and 36.0 < lat < 36.2  # UTM 33N at x=500 km, y=4000 km
        assert to_pixels(geom, "EPSG:4326").area == pytest.approx(table["area"][row], rel=1e-6)
        multi += geom.geom_type == "MultiPolygon"
        if geom.geom_type == "Polygon":
            assert shapely.Polygon(f["geometry"]["coordinates"][0]).exterior.is_ccw  # RFC 7946
    assert multi >= 1
    again = export_scan(scene, ExportOptions("geojson", str(out), what="instances"))
    assert again.status == "unchanged"


def test_geopackage_in_the_source_crs(scene, tmp_path):
    import pyogrio

    out = tmp_path / "i.gpkg"
    export_scan(scene, ExportOptions("gpkg", str(out), what="instances"))
    info = pyogrio.read_info(out, layer="instances")
    table = pq.read_table(inst_store.table_url(scene)).to_pydict()
    assert info["features"] == len(table["id"]) and "32633" in info["crs"]
    meta, _, geometry, fields = pyogrio.raw.read(out, layer="instances")
    ids = list(fields[meta["fields"].tolist().index("id")])
    for i, wkb in zip(ids, geometry):
        row = table["id"].index(i)
        assert to_pixels(shapely.from_wkb(wkb)).area == pytest.approx(table["area"][row], rel=1e-6)


def test_errors_name_the_problem(scene, tmp_path):
    with pytest.raises(ScanError, match="geojson or gpkg"):
        export_scan(scene, ExportOptions("geotiff", str(tmp_path / "x.tif"), what="instances"))
    with pytest.raises(ScanError, match="use --what instances"):
        export_scan(scene, ExportOptions("gpkg", str(tmp_path / "x.gpkg")))
    with pytest.raises(ScanError, match="no probabilities"):
        export_scan(scene, ExportOptions("geotiff", str(tmp_path / "x.tif"), what="probabilities"))
    inst_store.update_record(scene, {"complete": None})
    with pytest.raises(ScanError, match="no complete instances"):
        export_scan(scene, ExportOptions("geojson", str(tmp_path / "y.geojson"), what="instances"))
    assert not (tmp_path / "y.geojson").exists()
