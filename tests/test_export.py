"""Export: every format read back with an independent reader (nibabel, rasterio, rio-cogeo,
tifffile, shapely/rasterio.features, ome-zarr) against the SOURCE files, not against the store.

Stores are made by ingesting the bundled samples (and small synthetic NIfTI / GeoTIFF files with
an oblique affine, a UTM CRS and nodata); the "prediction" is written here as the engine writes it
(prediction/probabilities, labels, done, completion mark last) with labels equal to the reference
labels, so an exported mask must equal the source label file voxel for voxel.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest
import rasterio
import tifffile
import zarr
from rasterio.transform import from_origin

from tasks import storage
from tests.cli_output import without_home
from tasks.errors import ScanError
from tasks.export import ExportOptions, export_scan
from tasks.export.ngff import downsample_mode
from tasks.ingest import LabelSpec, ScanSpec, ingest_scan

SAMPLES = Path(__file__).parents[1] / "data_catalog/samples"
BRATS = SAMPLES / "mri/brats2015/brats_2013_pat0003_1"
EM = SAMPLES / "em/isbi2012_train"
CHIP = "3band_013022223130_Public_img53.tif"
SAT = SAMPLES / "satellite/spacenet1_rio"
UTM_SHAPE = (260, 300)


def write_prediction(store: Path, labels: np.ndarray, classes: list[str], nan_at=None) -> None:
    """A complete prediction as tasks/engine/infer.py leaves it; probabilities 0.9 on the label."""
    group = storage.open_group(str(store), mode="r+")
    chunks = group["image/0"].chunks[1:]
    k = len(classes)
    probs = np.where(labels[None] == np.arange(k).reshape((k,) + (1,) * labels.ndim), 0.9, 0.1 / (k - 1))
    if nan_at is not None:
        probs[(0, *nan_at)] = np.nan
    pred = group.create_group("prediction", overwrite=True)
    pred.create_array("probabilities", shape=probs.shape, dtype="float16", chunks=(1, *chunks))[...] = probs
    pred.create_array("labels", shape=labels.shape, dtype="uint8", chunks=chunks)[...] = labels
    grid = tuple(-(-n // c) for n, c in zip(labels.shape, chunks))
    pred.create_array("done", shape=grid, dtype="uint8", chunks=(1,) * len(grid))[...] = 1
    pred.attrs["tilewise"] = {"kind": "prediction", "digest": "test", "classes": classes, "model": "models:/test/1",
                              "calibrator": {"method": "cubic", "version": 1}}
    storage.mark_complete(pred, {"at": "2026-01-01T00:00:00+00:00"})


def oblique_ijk(shape_ijk) -> np.ndarray:
    """Labels no flip or transposition maps onto themselves, as a function of (i, j, k)."""
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape_ijk), indexing="ij")
    return ((i // 3 + 2 * (j // 4) + 3 * k) % 4).astype(np.uint8)


def utm_labels() -> np.ndarray:
    """A disk (class 2) inside a ring (class 1), both across many 64-pixel windows, plus a corner block."""
    yy, xx = np.mgrid[: UTM_SHAPE[0], : UTM_SHAPE[1]]
    r2 = (yy - 128) ** 2 + (xx - 128) ** 2
    lab = np.zeros(UTM_SHAPE, np.uint8)
    lab[r2 < 50**2] = 2
    lab[(r2 >= 70**2) & (r2 < 90**2)] = 1
    lab[200:, 250:] = 1
    lab[:10, :10] = 1  # under the source's nodata corner
    return lab


UTM_TRANSFORM = from_origin(680000.5, 7460000.25, 0.5, 0.5)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    out: dict[str, Path] = {}

    spec = ScanSpec("brats", "mri", (BRATS / "Flair_subtrMeanDivStd.nii.gz",),
                    labels=LabelSpec((BRATS / "OTMultiClass.nii.gz",), {v: v for v in range(5)},
                                     ("bg", "necrosis", "edema", "non_enhancing", "enhancing")))
    out["brats"] = root / "brats.zarr"
    ingest_scan(spec, out["brats"])

    spec = ScanSpec("em", "em", (EM / "image",), spacing=(50, 4, 4), unit="nanometer",
                    labels=LabelSpec((EM / "label",), {255: 0, 0: 1}, ("interior", "membrane")))
    out["em"] = root / "em.zarr"
    ingest_scan(spec, out["em"])

    spec = ScanSpec("chip", "satellite", (SAT / "images" / CHIP,),
                    labels=LabelSpec((SAT / "masks" / CHIP,), {0: 0, 255: 1}, ("background", "building")))
    out["chip"] = root / "chip.zarr"
    ingest_scan(spec, out["chip"])

    # oblique, flipped affine; sform and qform both set, with different codes
    shape_ijk = (20, 24, 12)
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-0.8, 1.2, 2.5])
    affine[:3, 3] = [10.5, -20.25, 3.0]
    img = nib.Nifti1Image(np.random.default_rng(0).normal(size=shape_ijk).astype(np.float32), affine)
    img.header.set_sform(affine, code=1)
    img.header.set_qform(affine, code=2)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, root / "oblique.nii")
    out["oblique"] = root / "oblique.zarr"
    ingest_scan(ScanSpec("oblique", "mri", (root / "oblique.nii",), chunks=(4, 8, 8)), out["oblique"])

    # UTM raster, nodata 0 in a corner, 64-pixel chunks so GeoJSON windows cut the regions
    image = np.random.default_rng(1).integers(1, 255, (3, *UTM_SHAPE), dtype=np.uint8)
    image[:, :20, :30] = 0
    with rasterio.open(root / "utm.tif", "w", driver="GTiff", width=UTM_SHAPE[1], height=UTM_SHAPE[0], count=3,
                       dtype="uint8", crs="EPSG:32723", transform=UTM_TRANSFORM, nodata=0) as dst:
        dst.write(image)
    out["utm"] = root / "utm.zarr"
    ingest_scan(ScanSpec("utm", "satellite", (root / "utm.tif",), chunks=(64, 64)), out["utm"])

    for name in ("brats", "em", "chip"):
        group = zarr.open_group(str(out[name]), mode="r")
        write_prediction(out[name], storage.reference(group)[...], list(storage.reference_record(group)["classes"]))
    write_prediction(out["oblique"], oblique_ijk(shape_ijk).transpose(2, 1, 0), ["a", "b", "c", "d"])
    write_prediction(out["utm"], utm_labels(), ["background", "road", "building"])
    out["root"] = root
    return out


def export(store, fmt, out=None, **kw):
    return export_scan(str(store), ExportOptions(fmt, None if out is None else str(out), **kw))


# ---------------------------------------------------------------------------------------------
# NIfTI
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_nifti_labels_have_the_source_geometry_and_voxels(stores, tmp_path, suffix):
    out = tmp_path / f"mask{suffix}"
    result = export(stores["brats"], "nifti", out)
    assert result.status == "exported"
    # geometry of the scan's own file (FLAIR), voxels of the label file
    mask, source = nib.load(out), nib.load(BRATS / "Flair_subtrMeanDivStd.nii.gz")
    truth = nib.load(BRATS / "OTMultiClass.nii.gz")
    assert mask.shape == source.shape
    assert mask.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(mask.affine, source.affine)
    for coded in ("get_sform", "get_qform"):
        a, a_code = getattr(mask.header, coded)(coded=True)
        b, b_code = getattr(source.header, coded)(coded=True)
        assert int(a_code) == int(b_code)
        if b is not None:
            np.testing.assert_array_equal(a, b)
    assert mask.header.get_zooms() == source.header.get_zooms()
    assert mask.header.get_xyzt_units()[0] == source.header.get_xyzt_units()[0]
    assert mask.header.get_intent()[0] == "label"
    np.testing.assert_array_equal(mask.affine, truth.affine)
    np.testing.assert_array_equal(np.asarray(mask.dataobj), np.asarray(truth.dataobj).astype(np.uint8))


def test_nifti_oblique_flipped_affine_labels_and_probabilities(stores, tmp_path):
    source = nib.load(stores["root"] / "oblique.nii")
    out = tmp_path / "oblique_mask.nii.gz"
    export(stores["oblique"], "nifti", out)
    mask = nib.load(out)
    np.testing.assert_array_equal(mask.affine, source.affine)
    np.testing.assert_array_equal(mask.header.get_sform(), source.header.get_sform())
    assert int(mask.header["sform_code"]) == 1 and int(mask.header["qform_code"]) == 2
    np.testing.assert_allclose(mask.header.get_qform(), source.header.get_qform(), atol=1e-6)  # float32 quaternion
    assert mask.header.get_zooms() == source.header.get_zooms()[:3]
    np.testing.assert_array_equal(np.asarray(mask.dataobj), oblique_ijk(source.shape))

    probs_out = tmp_path / "oblique_probs.nii"
    details = export(stores["oblique"], "nifti", probs_out, what="probabilities").details
    probs = nib.load(probs_out)
    assert probs.shape == (*source.shape, 4) and probs.get_data_dtype() == np.float32 and details["dtype"] == "float32"
    np.testing.assert_array_equal(probs.affine, source.affine)
    data = np.asarray(probs.dataobj)
    expected = np.where(oblique_ijk(source.shape)[..., None] == np.arange(4), 0.9, 0.1 / 3)
    np.testing.assert_allclose(data, expected, atol=1e-3)  # float16 in the store
    ext = probs.header.extensions[0]
    assert json.loads(ext.get_content())["model"] == "models:/test/1"


# ---------------------------------------------------------------------------------------------
# GeoTIFF (COG)
# ---------------------------------------------------------------------------------------------


def test_geotiff_is_a_valid_cog_with_the_source_georeferencing(stores, tmp_path):
    from rio_cogeo.cogeo import cog_validate

    out = tmp_path / "chip_mask.tif"
    export(stores["chip"], "geotiff", out, tile=128)
    valid, errors, _ = cog_validate(str(out), quiet=True)
    assert valid, errors
    with rasterio.open(out) as cog, rasterio.open(SAT / "images" / CHIP) as src, rasterio.open(SAT / "masks" / CHIP) as m:
        assert cog.crs == src.crs and cog.transform == src.transform and cog.nodata is None and src.nodata is None
        assert cog.profile["tiled"] and cog.profile["blockxsize"] == 128 and cog.compression.name == "deflate"
        np.testing.assert_array_equal(cog.read(1), (m.read(1) == 255).astype(np.uint8))
        assert cog.overviews(1) == [2, 4]
        assert cog.tags()["OVERVIEW_RESAMPLING"] == "NEAREST"
        full = cog.read(1)
        for factor in cog.overviews(1):
            overview = cog.read(1, out_shape=(-(-cog.height // factor), -(-cog.width // factor)))
            assert set(np.unique(overview)) <= set(np.unique(full)) == {0, 1}
            # nearest: every overview pixel is a pixel of the full raster, not an average of two classes
            assert 0 < overview.mean() < 1


def test_geotiff_nodata_from_the_source(stores, tmp_path):
    labels_out, probs_out = tmp_path / "utm.tif", tmp_path / "utm_probs.tif"
    export(stores["utm"], "geotiff", labels_out, tile=64)
    export(stores["utm"], "geotiff", probs_out, what="probabilities", tile=64)
    expected = utm_labels()
    with rasterio.open(labels_out) as cog, rasterio.open(stores["root"] / "utm.tif") as src:
        assert cog.crs == src.crs and cog.transform == src.transform and cog.nodata == 255
        data = cog.read(1)
        assert (data[:20, :30] == 255).all()
        np.testing.assert_array_equal(data[20:], expected[20:])
    with rasterio.open(probs_out) as cog:
        assert cog.count == 3 and cog.dtypes[0] == "float32" and np.isnan(cog.nodata)
        assert cog.descriptions == ("background", "road", "building")
        data = cog.read()
        assert np.isnan(data[:, :20, :30]).all() and not np.isnan(data[:, 20:]).any()


# ---------------------------------------------------------------------------------------------
# OME-TIFF
# ---------------------------------------------------------------------------------------------


def test_tiff_pages_resolution_and_voxels(stores, tmp_path):
    out = tmp_path / "em_mask.ome.tif"
    export(stores["em"], "tiff", out)
    expected = np.stack([(iio.imread(EM / "label" / f"{z}.png") == 0).astype(np.uint8) for z in range(8)])
    with tifffile.TiffFile(out) as tif:
        assert len(tif.pages) == 8 and tif.series[0].axes == "ZYX"
        np.testing.assert_array_equal(tif.asarray(), expected)
        tags = tif.pages[0].tags
        assert tags["ResolutionUnit"].value == 3  # centimetre
        assert tags["XResolution"].value == (2_500_000, 1) and tags["YResolution"].value == (2_500_000, 1)  # 4 nm
        ome = tif.ome_metadata
        assert 'PhysicalSizeZ="50.0"' in ome and 'PhysicalSizeZUnit="nm"' in ome
    sidecar = json.loads(Path(f"{out}.tilewise.json").read_text())
    assert sidecar["model"] == "models:/test/1" and sidecar["calibrator"]["method"] == "cubic"


def test_tiff_export_is_reproducible_and_its_uuid_names_its_content(stores, tmp_path):
    """tifffile gives each file a time-based OME UUID unless told one: the same prediction exported
    twice (here to two names, a second apart) must give the same bytes; other content, another UUID."""
    import re
    import time

    a, b, p = tmp_path / "a.ome.tif", tmp_path / "b.ome.tif", tmp_path / "p.ome.tif"
    export(stores["em"], "tiff", a)
    time.sleep(1.1)
    export(stores["em"], "tiff", b)
    export(stores["em"], "tiff", p, what="probabilities")
    assert a.read_bytes() == b.read_bytes()
    uuids = [re.findall(r'UUID="urn:uuid:([0-9a-f-]{36})"', tifffile.TiffFile(f).ome_metadata) for f in (a, p)]
    assert all(len(u) == 1 for u in uuids) and uuids[0] != uuids[1]


# ---------------------------------------------------------------------------------------------
# GeoJSON
# ---------------------------------------------------------------------------------------------


def _rasterize(path: Path, crs_from: str | None, crs_to: str, transform, shape) -> np.ndarray:
    from rasterio.features import rasterize
    from rasterio.warp import transform_geom

    features = json.loads(path.read_text())["features"]
    geoms = [(transform_geom(crs_from, crs_to, f["geometry"]) if crs_from else f["geometry"], f["properties"]["class"])
             for f in features]
    return rasterize(geoms, out_shape=shape, transform=transform, fill=0, dtype="uint8")


@pytest.mark.parametrize("crs", ["4326", "source"])
def test_geojson_round_trip_and_one_polygon_per_region(stores, tmp_path, crs):
    from shapely.geometry import shape

    out = tmp_path / f"utm_{crs}.geojson"
    details = export(stores["utm"], "geojson", out, crs=crs, tile=64).details
    collection = json.loads(out.read_text())
    expected = utm_labels()
    expected[:20, :30] = 0  # nodata in the source: no polygon
    back = _rasterize(out, "EPSG:4326" if crs == "4326" else None, "EPSG:32723", UTM_TRANSFORM, UTM_SHAPE)
    np.testing.assert_array_equal(back, expected)
    # the disk and the ring each span 4 x 4 windows of 64 pixels: one polygon each, plus the corner block
    assert details["features_per_class"] == {"1": 2, "2": 1}
    for f in collection["features"]:
        geom = shape(f["geometry"])
        assert geom.geom_type == "Polygon" and geom.is_valid and geom.exterior.is_ccw
        assert f["properties"]["class_name"] == ["background", "road", "building"][f["properties"]["class"]]
        assert f["properties"]["area"] == pytest.approx(f["properties"]["pixels"] * 0.25)  # 0.5 m pixels
        assert f["properties"]["area_unit"] == "metre^2"
        if crs == "4326":
            lon, lat = geom.exterior.coords[0]
            assert -44 < lon < -43 and -23.5 < lat < -22.5  # Rio, longitude first
    ring = [f for f in collection["features"] if f["properties"]["pixels"] == int((expected == 1).sum()) - 3000]
    assert len(ring) == 1 and len(shape(ring[0]["geometry"]).interiors) == 1
    assert ("crs" in collection) == (crs == "source")


def test_geojson_of_a_real_chip_round_trips(stores, tmp_path):
    out = tmp_path / "chip.geojson"
    export(stores["chip"], "geojson", out, tile=64)
    with rasterio.open(SAT / "masks" / CHIP) as m:
        expected, transform, shape = (m.read(1) == 255).astype(np.uint8), m.transform, m.shape
    np.testing.assert_array_equal(_rasterize(out, None, "EPSG:4326", transform, shape), expected)


# ---------------------------------------------------------------------------------------------
# OME-NGFF at the root; label images
# ---------------------------------------------------------------------------------------------


def _block_mode_reference(a: np.ndarray, factors) -> np.ndarray:
    """Python loop over blocks with np.bincount; ties to the smaller class."""
    out = np.zeros(tuple(-(-n // f) for n, f in zip(a.shape, factors)), a.dtype)
    for index in np.ndindex(*out.shape):
        block = a[tuple(slice(i * f, (i + 1) * f) for i, f in zip(index, factors))]
        out[index] = np.argmax(np.bincount(block.ravel()))
    return out


def test_downsample_mode_matches_a_loop():
    a = np.random.default_rng(3).integers(0, 4, (5, 9, 7)).astype(np.uint8)
    for factors in [(2, 2, 2), (1, 2, 2), (2, 1, 2)]:
        np.testing.assert_array_equal(downsample_mode(a, factors), _block_mode_reference(a, factors))


@pytest.mark.parametrize("low, high", [(0, 1), (3, 7)])
@pytest.mark.parametrize("shape, factors", [((8, 12), (2, 2)), ((4, 8, 6), (2, 2, 2)), ((6, 9), (1, 3)),
                                            ((7, 9), (2, 2))])  # the last ragged: the general path
def test_downsample_mode_of_two_values_matches_a_loop(low, high, shape, factors):
    """Two values (a two-class label map): each block's majority, ties (2 of 4, 4 of 8) to the
    smaller, given the values or finding them."""
    rng = np.random.default_rng(4)
    a = np.where(rng.random(shape) < 0.5, high, low).astype(np.uint8)
    a[(slice(0, 2),) * a.ndim] = np.indices((2,) * a.ndim).sum(axis=0) % 2 * (high - low) + low  # a tie
    want = _block_mode_reference(a, factors)
    np.testing.assert_array_equal(downsample_mode(a, factors), want)
    np.testing.assert_array_equal(downsample_mode(a, factors, np.array([low, high], np.uint8)), want)


def test_ome_zarr_reader_at_the_root_finds_image_and_prediction_labels(stores):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    store = stores["brats"]
    root = zarr.open_group(str(store), mode="r").attrs["ome"]["multiscales"][0]  # written by ingest
    assert [d["path"] for d in root["datasets"]][:2] == ["image/0", "image/1"]
    assert export(store, "zarr").status == "exported"
    assert export(store, "zarr").status == "unchanged"
    nodes = list(Reader(parse_url(str(store), mode="r"))())
    image = nodes[0]
    assert image.load(Multiscales) is not None and image.load(Label) is None
    group = zarr.open_group(str(store), mode="r")
    levels = sorted(group["image"].array_keys(), key=int)
    assert [tuple(d.shape) for d in image.data] == [group["image"][n].shape for n in levels]
    labels = [n for n in nodes if n.load(Label) is not None]
    assert [n.metadata["name"] for n in labels] == ["reference", "prediction"]
    data = labels[1].data
    assert len(data) == len(levels)
    np.testing.assert_array_equal(np.asarray(data[0]), np.asarray(nib.load(BRATS / "OTMultiClass.nii.gz").dataobj)
                                  .astype(np.uint8).transpose(2, 1, 0))
    for n in range(1, len(data)):
        np.testing.assert_array_equal(np.asarray(data[n]), _block_mode_reference(np.asarray(data[n - 1]), (2, 2, 2)))
    assert labels[1].metadata["properties"][4]["class"] == "enhancing"
    # training and evaluate still read the reference where they did
    assert storage.reference(group).shape == group["image/0"].shape[1:]


# ---------------------------------------------------------------------------------------------
# re-export, provenance, bad input
# ---------------------------------------------------------------------------------------------


def test_reexport_unchanged_is_a_noop_and_a_new_prediction_is_exported(stores, tmp_path):
    store = tmp_path / "copy.zarr"
    shutil.copytree(stores["em"], store)
    out = tmp_path / "em.ome.tif"
    assert export(store, "tiff", out).status == "exported"
    stamp = out.stat().st_mtime_ns
    again = export(store, "tiff", out)
    assert again.status == "unchanged" and out.stat().st_mtime_ns == stamp
    assert export(store, "tiff", out, what="probabilities").status == "exported"  # other options
    assert export(store, "tiff", out, what="probabilities").status == "unchanged"
    assert export(store, "tiff", out, what="probabilities", force=True).status == "exported"
    pred = storage.open_group(f"{store}/prediction", mode="r+")
    storage.mark_complete(pred, {"at": "2026-02-02T00:00:00+00:00"})  # the engine re-ran
    assert export(store, "tiff", out, what="probabilities").status == "exported"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["em.ome.tif", "em.ome.tif.tilewise.json"]


def _fails(store, fmt, out, match, **kw):
    with pytest.raises(ScanError, match=match) as info:
        export(store, fmt, out, **kw)
    assert "\n" not in str(info.value)


def test_bad_input_gives_one_line_and_leaves_nothing(stores, tmp_path):
    out = tmp_path / "x.nii.gz"
    _fails(stores["em"], "nifti", out, "has no NIfTI affine")
    _fails(stores["brats"], "geotiff", tmp_path / "x.tif", "has no georeferencing")
    _fails(stores["brats"], "png", tmp_path / "x.png", "unknown export format 'png'")
    _fails(stores["brats"], "nifti", tmp_path / "x.tif", "must end with .nii or .nii.gz")
    _fails(tmp_path / "missing.zarr", "nifti", out, "does not exist")

    incomplete = tmp_path / "incomplete.zarr"
    shutil.copytree(stores["brats"], incomplete)
    storage.clear_complete(str(incomplete / "prediction"))
    _fails(incomplete, "nifti", out, "prediction is incomplete")
    storage.clear_complete(str(incomplete))
    _fails(incomplete, "nifti", out, "not a complete scan group")

    no_crs = tmp_path / "nocrs.tif"
    with rasterio.open(no_crs, "w", driver="GTiff", width=32, height=32, count=1, dtype="uint8") as dst:
        dst.write(np.ones((1, 32, 32), np.uint8))
    with pytest.warns(UserWarning):
        ingest_scan(ScanSpec("nocrs", "satellite", (no_crs,)), tmp_path / "nocrs.zarr")
    write_prediction(tmp_path / "nocrs.zarr", np.zeros((32, 32), np.uint8), ["a", "b"])
    _fails(tmp_path / "nocrs.zarr", "geotiff", tmp_path / "x.tif", "has no CRS")

    nan = tmp_path / "nan.zarr"
    shutil.copytree(stores["oblique"], nan)
    write_prediction(nan, oblique_ijk((20, 24, 12)).transpose(2, 1, 0), ["a", "b", "c", "d"], nan_at=(11, 3, 4))
    _fails(nan, "nifti", out, "contains NaN", what="probabilities")  # labels alone do not read them
    _fails(nan, "tiff", tmp_path / "x.ome.tif", "contains NaN", what="probabilities")
    leftovers = [p.name for p in tmp_path.iterdir() if p.is_file() and not p.name.endswith(".tif") or "tmp" in p.name]
    assert leftovers == [], leftovers


def test_cli_export_prints_one_line_errors(stores, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["export", "--store", str(stores["chip"]), "--format", "geojson", "--out",
                             str(tmp_path / "c.geojson")])
    assert ok.exit_code == 0 and without_home(ok.output).startswith("exported:")
    again = runner.invoke(app, ["export", "--store", str(stores["chip"]), "--format", "geojson", "--out",
                                str(tmp_path / "c.geojson")])
    assert again.exit_code == 0 and without_home(again.output).startswith("unchanged:")
    bad = runner.invoke(app, ["export", "--store", str(stores["em"]), "--format", "geotiff", "--out",
                              str(tmp_path / "e.tif")])
    assert bad.exit_code == 1
    assert without_home(bad.output).startswith("error:") and len(without_home(bad.output).splitlines()) == 1


def test_export_flow_uses_the_catalog_format_and_skips_unpredicted_scans(prefect_server, tmp_path):
    from data_catalog import find_entry
    from flows.export import export_flow
    from tasks.ingest import discover_scans

    catalog = Path(__file__).parents[1] / "data_catalog"
    specs = discover_scans(find_entry("spacenet_rio", catalog))
    root = tmp_path / "stores"
    store = root / "spacenet_rio" / f"{specs[0].scan_id}.zarr"
    ingest_scan(specs[0], store)
    ref = storage.reference(zarr.open_group(str(store), mode="r"))[...]
    write_prediction(store, ref, ["background", "building"])
    state = export_flow("spacenet_rio", catalog=str(catalog), store_root=str(root), out_dir=str(tmp_path / "out"),
                        return_state=True)
    outcomes = state.result()
    assert [(o.scan_id, o.status) for o in outcomes] == [(specs[0].scan_id, "exported")]
    out = tmp_path / "out" / f"{specs[0].scan_id}.tif"  # the catalog says geotiff
    with rasterio.open(out) as cog:
        np.testing.assert_array_equal(cog.read(1), ref)
    again = export_flow("spacenet_rio", catalog=str(catalog), store_root=str(root), out_dir=str(tmp_path / "out"))
    assert [o.status for o in again] == ["unchanged"]
