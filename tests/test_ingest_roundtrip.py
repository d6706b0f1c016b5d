"""Ingest round trip: every stored voxel and every metadata field against independent readers.

The sample data are read here with nibabel (MRI), imageio (EM slices, stacked in numeric order)
and rasterio + tifffile (GeoTIFF); the pyramid levels against a block mean written here with
``np.add.reduceat`` (a different algorithm from the code under test); the OME-NGFF metadata
through ome-zarr's own reader.
"""

from __future__ import annotations

import dataclasses
import json
import os
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

from data_catalog import load_catalog
from tasks import storage
from tasks.ingest import LabelSpec, ScanSpec, discover_scans, ingest_scan
from tasks.ingest import readers as readers_mod

SAMPLES = Path(__file__).parents[1] / "data_catalog/samples"
CATALOG = Path(__file__).parents[1] / "data_catalog"
MRI = SAMPLES / "mri/brats2015"
EM = SAMPLES / "em/isbi2012_train"
SAT = SAMPLES / "satellite/spacenet1_rio"
MRI_SUBJECTS = ["brats_2013_pat0003_1", "brats_2013_pat0005_1"]
MRI_CHANNELS = ["Flair_subtrMeanDivStd.nii.gz", "T1c_subtrMeanDivStd.nii.gz"]
CHIPS = [f"3band_013022223130_Public_img{n}" for n in (53, 54, 57)]


# --------------------------------------------------------------------------------------------
# independent references
# --------------------------------------------------------------------------------------------


def ref_block_mean(a: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Block mean over the trailing ``len(factors)`` axes, computed by summing with reduceat.

    A short trailing block is the mean of the pixels it holds; integers are rounded half up
    (floor(sum / n + 1/2)), bool is the majority with ties True, floats are averaged in float64.
    """
    lead = a.ndim - len(factors)
    if a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer):
        sums = a.astype(np.int64)
    else:
        sums = a.astype(np.float64)
    counts = np.ones(a.shape[lead:], dtype=np.int64)
    for i, f in enumerate(factors):
        starts = np.arange(0, a.shape[lead + i], f)
        with np.errstate(invalid="ignore"):
            sums = np.add.reduceat(sums, starts, axis=lead + i)
        counts = np.add.reduceat(counts, starts, axis=i)
    if a.dtype == np.bool_:
        return 2 * sums >= counts
    if np.issubdtype(a.dtype, np.integer):
        return ((2 * sums + counts) // (2 * counts)).astype(a.dtype)
    with np.errstate(invalid="ignore"):
        return (sums / counts).astype(a.dtype)


def ref_pyramid(level0: np.ndarray, factors: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Each level the block mean of the level above (the documented construction)."""
    levels = [level0]
    for f in factors:
        levels.append(ref_block_mean(levels[-1], f))
    return levels


def assert_level_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    if np.issubdtype(expected.dtype, np.floating):
        # float32 sums in a different order: a few ulps; a wrong block or axis is off by O(1)
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=2e-5, equal_nan=True)
        np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
        np.testing.assert_array_equal(np.isposinf(actual), np.isposinf(expected))
        np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected))
    else:
        np.testing.assert_array_equal(actual, expected)


def nifti_as_czyx(path: Path) -> np.ndarray:
    """A NIfTI file as (C, Z, Y, X) = (t, k, j, i), scaled as nibabel scales it."""
    data = np.asarray(nib.load(str(path)).dataobj)
    if data.ndim == 3:
        data = data[..., np.newaxis]
    return np.stack([np.transpose(data[..., t], (2, 1, 0)) for t in range(data.shape[3])])


def em_stack(folder: Path) -> np.ndarray:
    files = sorted(folder.glob("*.png"), key=lambda p: int(p.stem))
    return np.stack([iio.imread(f) for f in files])  # (Z, Y, X)


def rasterio_read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


# --------------------------------------------------------------------------------------------
# store helpers
# --------------------------------------------------------------------------------------------


def group(store: Path) -> zarr.Group:
    return zarr.open_group(str(store), mode="r", zarr_format=3)


def record(store: Path) -> dict:
    return dict(group(store).attrs["tilewise"])


def level(store: Path, n: int) -> np.ndarray:
    return group(store)["image"][str(n)][...]


def image_levels(store: Path) -> list[str]:
    return sorted(group(store)["image"].array_keys(), key=int)


def ngff_multiscale(store: Path) -> dict:
    attrs = dict(group(store)["image"].attrs)
    return attrs["ome"]["multiscales"][0]


def file_mtimes(store: Path) -> dict[str, int]:
    return {str(p.relative_to(store)): p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}


def chunk_files(store: Path) -> list[Path]:
    return [p for p in store.rglob("*") if p.is_file() and p.name != "zarr.json"]


def bump_mtime(path: Path, seconds: int = 5) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


# --------------------------------------------------------------------------------------------
# the real samples, through the real catalog
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def catalog_specs() -> dict[str, ScanSpec]:
    specs = {}
    for loaded in load_catalog(CATALOG):
        for spec in discover_scans(loaded):
            specs[spec.scan_id] = spec
    return specs


@pytest.fixture(scope="module")
def ingested(catalog_specs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stores")
    stores = {}
    for scan_id, spec in catalog_specs.items():
        store = root / f"{scan_id}.zarr"
        result = ingest_scan(spec, store)
        assert result.status == "ingested"
        assert result.scan_id == scan_id
        stores[scan_id] = store
    return stores


def test_catalog_discovers_every_sample(catalog_specs):
    assert sorted(catalog_specs) == sorted(MRI_SUBJECTS + ["isbi2012_train"] + CHIPS)
    mri = catalog_specs["brats_2013_pat0003_1"]
    assert mri.modality == "mri"
    assert [p.name for p in mri.sources] == MRI_CHANNELS
    assert mri.labels.sources[0].name == "OTMultiClass.nii.gz"
    em = catalog_specs["isbi2012_train"]
    assert [p.resolve() for p in em.sources] == [(EM / "image").resolve()]
    assert Path(em.labels.sources[0]).resolve() == (EM / "label").resolve()
    assert em.labels.mapping == {255: 0, 0: 1}
    sat = catalog_specs[CHIPS[0]]
    assert Path(sat.labels.sources[0]).resolve() == (SAT / "masks" / f"{CHIPS[0]}.tif").resolve()


def test_every_sample_store_is_complete(ingested):
    for scan_id, store in ingested.items():
        assert storage.is_complete(str(store)), scan_id
        rec = record(store)
        assert rec["scan_id"] == scan_id
        assert rec["complete"]["options_digest"]


# ---- MRI -----------------------------------------------------------------------------------


@pytest.mark.parametrize("subject", MRI_SUBJECTS)
def test_mri_level0_is_nibabel_transposed_both_channels(ingested, subject):
    store = ingested[subject]
    expected = np.concatenate([nifti_as_czyx(MRI / subject / ch) for ch in MRI_CHANNELS])
    nii_shape = nib.load(str(MRI / subject / MRI_CHANNELS[0])).shape  # (i, j, k)
    assert expected.shape == (2, nii_shape[2], nii_shape[1], nii_shape[0])
    got = level(store, 0)
    assert got.dtype == np.float32
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    # Channels in catalog order: FLAIR first. (Guards against a swap: the two differ.)
    assert not np.array_equal(got[0], got[1])
    rec = record(store)
    assert rec["shape"] == list(expected.shape)
    assert rec["axes"] == "czyx"
    assert rec["channel_names"] == ["Flair_subtrMeanDivStd", "T1c_subtrMeanDivStd"]


@pytest.mark.parametrize("subject", MRI_SUBJECTS)
def test_mri_labels_are_mapped_label_file(ingested, subject):
    store = ingested[subject]
    raw = np.asarray(nib.load(str(MRI / subject / "OTMultiClass.nii.gz")).dataobj)
    assert set(np.unique(raw).tolist()) <= {0, 1, 2, 3, 4}
    expected = np.transpose(raw, (2, 1, 0)).astype(np.uint8)  # mapping is the identity 0..4
    labels = storage.reference(group(store))
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels[...], expected)
    rec = record(store)
    assert rec["labels"]["classes"] == ["background", "necrosis", "edema", "non_enhancing", "enhancing"]
    assert rec["labels"]["class_voxels"] == np.bincount(expected.ravel(), minlength=5).tolist()


@pytest.mark.parametrize("subject", MRI_SUBJECTS)
def test_mri_metadata_matches_nibabel(ingested, subject):
    store = ingested[subject]
    img = nib.load(str(MRI / subject / MRI_CHANNELS[0]))
    rec = record(store)
    np.testing.assert_array_equal(np.array(rec["spatial"]["affine"]), img.affine)
    assert rec["spatial"]["nifti_shape"] == list(img.shape)
    assert rec["spatial"]["axcodes"] == list(nib.aff2axcodes(img.affine))
    sform, code = img.header.get_sform(coded=True)
    assert rec["spatial"]["sform_code"] == int(code)
    np.testing.assert_array_equal(np.array(rec["spatial"]["sform"]), sform)
    zi, zj, zk = (float(z) for z in img.header.get_zooms()[:3])
    assert rec["spacing"] == [zk, zj, zi]
    assert rec["unit"] == "millimeter"  # from the catalog: the headers say 'unknown'
    stats = rec["stats"]
    data = np.concatenate([nifti_as_czyx(MRI / subject / ch) for ch in MRI_CHANNELS])
    assert stats["nan_count"] == 0 and stats["posinf_count"] == 0 and stats["neginf_count"] == 0
    assert stats["min"] == pytest.approx(float(data.min()))
    assert stats["max"] == pytest.approx(float(data.max()))


MRI_SHAPES = {
    # (Z, Y, X) = (k, j, i); catalog chunks 32 x 64 x 64; ceil halving until the axes fit a chunk
    "brats_2013_pat0003_1": [(32, 161, 146), (16, 81, 73), (8, 41, 37)],
    "brats_2013_pat0005_1": [(32, 169, 141), (16, 85, 71), (8, 43, 36)],
}


@pytest.mark.parametrize("subject", MRI_SUBJECTS)
def test_mri_pyramid_shapes_values_and_ngff_scales(ingested, subject):
    store = ingested[subject]
    shapes = MRI_SHAPES[subject]
    assert image_levels(store) == [str(n) for n in range(len(shapes))]
    rec = record(store)
    assert rec["pyramid"]["shapes"] == [list(s) for s in shapes]
    expected = ref_pyramid(level(store, 0), [(2, 2, 2)] * (len(shapes) - 1))
    for n, shape in enumerate(shapes):
        got = level(store, n)
        assert got.shape == (2, *shape)
        assert_level_equal(got, expected[n])
    ms = ngff_multiscale(store)
    assert [d["path"] for d in ms["datasets"]] == ["0", "1", "2"]
    for n, d in enumerate(ms["datasets"]):
        assert d["coordinateTransformations"] == [{"type": "scale", "scale": [1.0] + [float(2**n)] * 3}]
    assert [a["name"] for a in ms["axes"]] == ["c", "z", "y", "x"]
    assert [a["type"] for a in ms["axes"]] == ["channel", "space", "space", "space"]
    assert [a.get("unit") for a in ms["axes"][1:]] == ["millimeter"] * 3


# ---- EM ------------------------------------------------------------------------------------


def test_em_level0_is_png_stack_in_numeric_order(ingested):
    store = ingested["isbi2012_train"]
    expected = em_stack(EM / "image")
    assert expected.shape == (8, 512, 512) and expected.dtype == np.uint8
    got = level(store, 0)
    assert got.shape == (1, 8, 512, 512)
    np.testing.assert_array_equal(got[0], expected)


def test_em_labels_membrane_mapping(ingested):
    store = ingested["isbi2012_train"]
    raw = em_stack(EM / "label")
    assert set(np.unique(raw).tolist()) == {0, 255}
    expected = np.where(raw == 255, 0, 1).astype(np.uint8)  # 255 interior -> 0, 0 membrane -> 1
    labels = storage.reference(group(store))[...]
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, expected)
    assert record(store)["labels"]["class_voxels"] == [int((raw == 255).sum()), int((raw == 0).sum())]


def test_em_metadata_and_single_level(ingested):
    store = ingested["isbi2012_train"]
    rec = record(store)
    assert rec["spacing"] == [50.0, 4.0, 4.0]
    assert rec["unit"] == "nanometer"
    assert rec["spatial"]["slice_files"] == [f"{i}.png" for i in range(8)]
    # 512 x 512 sections fit the catalog's 8 x 512 x 512 chunk: one level.
    assert image_levels(store) == ["0"]
    ms = ngff_multiscale(store)
    assert ms["datasets"][0]["coordinateTransformations"] == [{"type": "scale", "scale": [1.0, 50.0, 4.0, 4.0]}]
    assert [a.get("unit") for a in ms["axes"]] == [None, "nanometer", "nanometer", "nanometer"]
    assert rec["stats"]["min"] == float(em_stack(EM / "image").min())
    assert rec["stats"]["max"] == float(em_stack(EM / "image").max())


def test_em_pyramid_keeps_z_with_anisotropic_spacing(catalog_specs, tmp_path):
    spec = dataclasses.replace(catalog_specs["isbi2012_train"], chunks=(8, 128, 128), labels=None)
    store = tmp_path / "em.zarr"
    assert ingest_scan(spec, store).status == "ingested"
    shapes = [(8, 512, 512), (8, 256, 256), (8, 128, 128)]
    assert image_levels(store) == ["0", "1", "2"]
    expected = ref_pyramid(em_stack(EM / "image")[np.newaxis], [(1, 2, 2), (1, 2, 2)])
    for n, shape in enumerate(shapes):
        got = level(store, n)
        assert got.shape == (1, *shape)
        assert_level_equal(got, expected[n])
    scales = [d["coordinateTransformations"][0]["scale"] for d in ngff_multiscale(store)["datasets"]]
    assert scales == [[1.0, 50.0, 4.0, 4.0], [1.0, 50.0, 8.0, 8.0], [1.0, 50.0, 16.0, 16.0]]


def test_slices_are_stacked_in_numeric_not_lexical_order(tmp_path):
    folder = tmp_path / "stack"
    folder.mkdir()
    for i in range(12):  # lexical order would be 0, 1, 10, 11, 2, ...
        iio.imwrite(folder / f"{i}.png", np.full((6, 5), 10 * i, dtype=np.uint8))
    store = tmp_path / "s.zarr"
    ingest_scan(ScanSpec("s", "em", (folder,)), store)
    got = level(store, 0)
    assert got.shape == (1, 12, 6, 5)
    np.testing.assert_array_equal(got[0, :, 0, 0], 10 * np.arange(12))
    assert record(store)["spatial"]["slice_files"] == [f"{i}.png" for i in range(12)]


# ---- satellite -----------------------------------------------------------------------------


@pytest.mark.parametrize("chip", CHIPS)
def test_geotiff_level0_all_bands_and_mask(ingested, chip):
    store = ingested[chip]
    expected = rasterio_read(SAT / "images" / f"{chip}.tif")
    assert expected.shape == (3, 406, 438)
    # A second, unrelated decoder agrees (YXS -> CYX).
    np.testing.assert_array_equal(np.moveaxis(tifffile.imread(SAT / "images" / f"{chip}.tif"), -1, 0), expected)
    got = level(store, 0)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)
    mask = rasterio_read(SAT / "masks" / f"{chip}.tif")[0]
    assert set(np.unique(mask).tolist()) <= {0, 255}
    labels = storage.reference(group(store))[...]
    np.testing.assert_array_equal(labels, (mask == 255).astype(np.uint8))


@pytest.mark.parametrize("chip", CHIPS)
def test_geotiff_metadata_matches_rasterio(ingested, chip):
    store = ingested[chip]
    rec = record(store)
    with rasterio.open(SAT / "images" / f"{chip}.tif") as src:
        assert rec["spatial"]["crs_wkt"] == src.crs.to_wkt()
        assert rec["spatial"]["crs_epsg"] == 4326 == src.crs.to_epsg()
        assert rec["spatial"]["transform"] == list(src.transform)[:6]
        assert rec["spatial"]["transform_gdal"] == list(src.transform.to_gdal())
        assert rec["spatial"]["nodata"] == [None, None, None] == list(src.nodatavals)
        assert rec["spatial"]["bounds"] == list(src.bounds)
        scale = [1.0, abs(src.transform.e), abs(src.transform.a)]
    assert rec["axes"] == "cyx"
    assert rec["channel_names"] == ["red", "green", "blue"]
    assert rec["warnings"] == []
    ms = ngff_multiscale(store)
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    assert ms["datasets"][0]["coordinateTransformations"] == [{"type": "scale", "scale": scale}]
    assert image_levels(store) == ["0"]  # 406 x 438 fits one 512 x 512 chunk


def test_geotiff_pyramid_odd_sizes(catalog_specs, tmp_path):
    chip = CHIPS[2]  # the one with 34 % no-data
    spec = dataclasses.replace(catalog_specs[chip], chunks=(128, 128))
    store = tmp_path / "chip.zarr"
    ingest_scan(spec, store)
    expected = ref_pyramid(rasterio_read(SAT / "images" / f"{chip}.tif"), [(2, 2), (2, 2)])
    assert image_levels(store) == ["0", "1", "2"]
    for n, shape in enumerate([(406, 438), (203, 219), (102, 110)]):
        got = level(store, n)
        assert got.shape == (3, *shape)
        assert_level_equal(got, expected[n])
    with rasterio.open(SAT / "images" / f"{chip}.tif") as src:
        e, a = abs(src.transform.e), abs(src.transform.a)
    scales = [d["coordinateTransformations"][0]["scale"] for d in ngff_multiscale(store)["datasets"]]
    assert scales == [[1.0, e, a], [1.0, 2 * e, 2 * a], [1.0, 4 * e, 4 * a]]


@pytest.mark.parametrize("height, width", [(1000, 101), (700, 1250), (600, 2200)],
                         ids=["narrow-odd", "wide-ragged", "short-wide"])
def test_tiled_raster_in_nested_window_order_equals_the_block_means(tmp_path, monkeypatch, height, width):
    """A tiled raster is read window by window chunk within chunk (small windows here, so there are
    many); every level equals the block means of rasterio's whole read, whatever the width: one
    narrower than a chunk and odd (101: narrower than the windows' multiple, lcm(2**levels, 101)),
    ragged edges."""
    from tasks.ingest import to_zarr

    monkeypatch.setattr(to_zarr, "WINDOW_BYTES", 16 << 10)
    path = tmp_path / "scene.tif"
    data = np.random.default_rng(7).integers(0, 60000, (2, height, width), dtype=np.uint16)
    with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=2, dtype="uint16",
                       crs="EPSG:32633", transform=from_origin(0, 0, 10, 10), tiled=True,
                       blockxsize=64, blockysize=64) as dst:
        dst.write(data)
    store = tmp_path / "scene.zarr"
    ingest_scan(ScanSpec("scene", "satellite", (path,), chunks=(128, 128)), store)
    levels = image_levels(store)
    expected = ref_pyramid(rasterio_read(path), [(2, 2)] * (len(levels) - 1))
    assert len(levels) >= 3
    for n in range(len(levels)):
        assert_level_equal(level(store, n), expected[n])


# ---- OME-NGFF read back by ome-zarr ----------------------------------------------------------


@pytest.mark.parametrize(
    "scan_id, levels, axes",
    [
        ("brats_2013_pat0003_1", 3, ["c", "z", "y", "x"]),
        ("brats_2013_pat0005_1", 3, ["c", "z", "y", "x"]),
        ("isbi2012_train", 1, ["c", "z", "y", "x"]),
        (CHIPS[0], 1, ["c", "y", "x"]),
    ],
)
def test_ome_zarr_reader_reads_the_pyramid(ingested, scan_id, levels, axes):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    store = ingested[scan_id]
    location = parse_url(str(store / "image"), mode="r")
    assert location is not None
    assert location.version == "0.5"
    nodes = list(Reader(location)())
    assert nodes, "ome-zarr found no image"
    node = nodes[0]
    assert node.load(Multiscales) is not None
    assert len(node.data) == levels
    assert [a["name"] for a in node.metadata["axes"]] == axes
    assert node.metadata["name"] == scan_id
    rec = record(store)
    for n, arr in enumerate(node.data):
        assert tuple(arr.shape) == (rec["shape"][0], *rec["pyramid"]["shapes"][n])
    np.testing.assert_array_equal(np.asarray(node.data[-1]), level(store, levels - 1))
    transforms = node.metadata["coordinateTransformations"]
    assert len(transforms) == levels
    assert transforms[0][0]["scale"][1:] == rec["spacing"]


# --------------------------------------------------------------------------------------------
# re-ingest: unchanged, touched, changed
# --------------------------------------------------------------------------------------------


def _em_copy(tmp_path: Path) -> ScanSpec:
    shutil.copytree(EM, tmp_path / "em")
    return ScanSpec(
        "em", "em", (tmp_path / "em" / "image",), spacing=(50.0, 4.0, 4.0), unit="nanometer",
        labels=LabelSpec((tmp_path / "em" / "label",), {255: 0, 0: 1}, ("interior", "membrane")),
    )


def test_reingest_unchanged_rewrites_nothing(tmp_path):
    spec = _em_copy(tmp_path)
    store = tmp_path / "em.zarr"
    assert ingest_scan(spec, store).status == "ingested"
    before = file_mtimes(store)
    assert chunk_files(store), "no chunk files written"
    record_before = record(store)
    again = ingest_scan(spec, store)
    assert again.status == "unchanged"
    assert again.shape == (1, 8, 512, 512)
    assert file_mtimes(store) == before
    assert record(store) == record_before
    assert storage.is_complete(str(store))


def test_reingest_touched_or_recopied_identical_files_stays_unchanged(tmp_path, monkeypatch):
    from tasks.ingest import to_zarr

    spec = _em_copy(tmp_path)
    store = tmp_path / "em.zarr"
    ingest_scan(spec, store)
    before = {k: v for k, v in file_mtimes(store).items() if k != "zarr.json"}
    bump_mtime(spec.sources[0] / "3.png")  # touched
    label = spec.labels.sources[0] / "5.png"
    label.write_bytes(label.read_bytes())  # rewritten with the same bytes
    bump_mtime(label)
    hashed: list[str] = []
    real_hash = to_zarr.sha256_file
    monkeypatch.setattr(to_zarr, "sha256_file", lambda path, *a, **k: hashed.append(path.name) or real_hash(path, *a, **k))
    assert ingest_scan(spec, store).status == "unchanged"
    assert sorted(hashed) == ["3.png", "5.png"]  # the touched files are hashed once...
    assert ingest_scan(spec, store).status == "unchanged"
    assert sorted(hashed) == ["3.png", "5.png"]  # ...and not again: their new mtimes were stored
    assert {k: v for k, v in file_mtimes(store).items() if k != "zarr.json"} == before  # no array rewritten
    stored = {f["path"]: f for f in record(store)["source"]["files"]}
    touched = (spec.sources[0] / "3.png").resolve()
    assert stored[str(touched)]["mtime_ns"] == touched.stat().st_mtime_ns
    assert stored[str(touched)]["sha256"] == real_hash(touched)


def test_reingest_changed_slice_gives_new_values(tmp_path):
    spec = _em_copy(tmp_path)
    store = tmp_path / "em.zarr"
    ingest_scan(spec, store)
    target = spec.sources[0] / "3.png"
    data = iio.imread(target)
    data[100:110, 200:220] = 255 - data[100:110, 200:220]
    iio.imwrite(target, data)
    bump_mtime(target)
    result = ingest_scan(spec, store)
    assert result.status == "ingested"
    assert storage.is_complete(str(store))
    expected = em_stack(spec.sources[0])
    assert not np.array_equal(expected, em_stack(EM / "image"))
    np.testing.assert_array_equal(level(store, 0)[0], expected)
    assert ingest_scan(spec, store).status == "unchanged"


def test_reingest_after_a_slice_is_added(tmp_path):
    spec = _em_copy(tmp_path)
    store = tmp_path / "em.zarr"
    ingest_scan(spec, store)
    extra = np.full((512, 512), 42, dtype=np.uint8)
    iio.imwrite(spec.sources[0] / "8.png", extra)
    iio.imwrite(spec.labels.sources[0] / "8.png", np.full((512, 512), 255, dtype=np.uint8))
    assert ingest_scan(spec, store).status == "ingested"
    got = level(store, 0)
    assert got.shape == (1, 9, 512, 512)
    np.testing.assert_array_equal(got[0, :8], em_stack(EM / "image"))
    assert (got[0, 8] == 42).all()
    assert (storage.reference(group(store))[8] == 0).all()


def test_reingest_changed_label_gives_new_labels(tmp_path):
    spec = _em_copy(tmp_path)
    store = tmp_path / "em.zarr"
    ingest_scan(spec, store)
    target = spec.labels.sources[0] / "0.png"
    data = iio.imread(target)
    data[:16, :16] = 0  # paint membrane
    iio.imwrite(target, data)
    bump_mtime(target)
    assert ingest_scan(spec, store).status == "ingested"
    expected = np.where(em_stack(spec.labels.sources[0]) == 255, 0, 1).astype(np.uint8)
    np.testing.assert_array_equal(storage.reference(group(store))[...], expected)
    assert (expected[0, :16, :16] == 1).all()


def _write_nifti(path: Path, data: np.ndarray, zooms=(1.0, 1.0, 1.0), affine=None, units="mm") -> None:
    if affine is None:
        affine = np.diag([*zooms[:3], 1.0])
    img = nib.Nifti1Image(data, affine)
    img.header.set_zooms(tuple(zooms) + (1.0,) * (data.ndim - len(zooms)))
    img.header.set_xyzt_units(units, "sec")
    nib.save(img, str(path))


def test_reingest_same_size_byte_change_is_detected(tmp_path):
    # Same size, new bytes: only the content hash can tell.
    path = tmp_path / "v.nii"
    rng = np.random.default_rng(0)
    _write_nifti(path, rng.normal(size=(6, 5, 4)).astype(np.float32))
    spec = ScanSpec("v", "mri", (path,))
    store = tmp_path / "v.zarr"
    ingest_scan(spec, store)
    old = level(store, 0)
    raw = bytearray(path.read_bytes())
    offset = int(nib.load(str(path)).dataobj.offset)
    raw[offset + 4 * 17 : offset + 4 * 18] = np.float32(1234.5).tobytes()  # voxel 17 in file order
    size = path.stat().st_size
    path.write_bytes(bytes(raw))
    assert path.stat().st_size == size
    bump_mtime(path)
    assert ingest_scan(spec, store).status == "ingested"
    new = level(store, 0)
    np.testing.assert_array_equal(new, nifti_as_czyx(path))
    assert (new != old).sum() == 1
    # voxel 17 in Fortran order of (i, j, k) = (6, 5, 4): i = 5, j = 2, k = 0 -> (z, y, x) = (0, 2, 5)
    assert new[0, 0, 2, 5] == np.float32(1234.5)


def test_changed_options_reingest(catalog_specs, tmp_path):
    spec = dataclasses.replace(catalog_specs["isbi2012_train"], labels=None)
    store = tmp_path / "em.zarr"
    ingest_scan(spec, store)
    assert image_levels(store) == ["0"]
    result = ingest_scan(dataclasses.replace(spec, chunks=(8, 256, 256)), store)
    assert result.status == "ingested"
    assert image_levels(store) == ["0", "1"]
    assert record(store)["chunks"] == [1, 8, 256, 256]
    assert ingest_scan(spec, store, force=True).status == "ingested"
    assert image_levels(store) == ["0"]


# --------------------------------------------------------------------------------------------
# crash and retry
# --------------------------------------------------------------------------------------------


class SimulatedCrash(BaseException):
    """Like a KeyboardInterrupt or a kill: not an Exception, nothing may swallow it."""


def _crash_on_call(monkeypatch, cls, n: int) -> list[int]:
    calls = []
    original = cls.read_slab

    def read_slab(self, start, stop):
        calls.append(start)
        if len(calls) == n:
            raise SimulatedCrash(f"crash in read_slab call {n}")
        return original(self, start, stop)

    monkeypatch.setattr(cls, "read_slab", read_slab)
    return calls


def _mri_spec(catalog_specs) -> ScanSpec:
    # 32 sections in 8-section slabs: 4 image slabs, then 4 label slabs
    return dataclasses.replace(catalog_specs["brats_2013_pat0003_1"], chunks=(8, 64, 64))


def _assert_mri_correct(store: Path) -> None:
    subject = MRI / "brats_2013_pat0003_1"
    expected = np.concatenate([nifti_as_czyx(subject / ch) for ch in MRI_CHANNELS])
    np.testing.assert_array_equal(level(store, 0), expected)
    for n, ref in enumerate(ref_pyramid(expected, [(2, 2, 2)] * (len(image_levels(store)) - 1))):
        assert_level_equal(level(store, n), ref)
    labels = np.transpose(np.asarray(nib.load(str(subject / "OTMultiClass.nii.gz")).dataobj), (2, 1, 0))
    np.testing.assert_array_equal(storage.reference(group(store))[...], labels.astype(np.uint8))


@pytest.mark.parametrize("crash_at", [2, 6], ids=["image-slab-2", "label-slab-2"])
def test_crash_mid_ingest_leaves_nothing_complete_and_retry_is_correct(catalog_specs, tmp_path, monkeypatch, crash_at):
    spec = _mri_spec(catalog_specs)
    store = tmp_path / "mri.zarr"
    calls = _crash_on_call(monkeypatch, readers_mod.NiftiReader, crash_at)
    with pytest.raises(SimulatedCrash):
        ingest_scan(spec, store)
    assert len(calls) >= crash_at
    assert not storage.is_complete(str(store))
    assert not store.exists(), "the partial group was left behind"
    monkeypatch.undo()
    result = ingest_scan(spec, store)
    assert result.status == "ingested"
    assert storage.is_complete(str(store))
    assert image_levels(store) == ["0", "1", "2"]
    _assert_mri_correct(store)


def test_a_crash_while_chunks_encode_leaves_nothing_behind(catalog_specs, tmp_path, monkeypatch):
    """Level 0's chunks encode on the pool while the ingest thread computes the pyramid: a crash
    there (the third window's means) must still leave no group, not one that a chunk written late
    re-creates after the clean-up (chunk writes slowed down so that some are still running)."""
    import time

    from tasks.chunk_io import ChunkCodec
    from tasks.ingest import to_zarr

    spec = _mri_spec(catalog_specs)
    store = tmp_path / "mri.zarr"
    real_write, real_mean, calls, writes = ChunkCodec.write, to_zarr.downsample_mean, [], []

    def slow_write(self, coords, data):
        writes.append(coords)
        time.sleep(0.02)
        return real_write(self, coords, data)

    def crashing_mean(block, factors):
        calls.append(1)
        if len(calls) == 3:
            raise SimulatedCrash("crash in the pyramid")
        return real_mean(block, factors)

    monkeypatch.setattr(ChunkCodec, "write", slow_write)
    monkeypatch.setattr(to_zarr, "downsample_mean", crashing_mean)
    with pytest.raises(SimulatedCrash):
        ingest_scan(spec, store)
    time.sleep(0.3)  # longer than any chunk write: none is left running
    assert writes  # the chunks went through the pool
    assert not store.exists(), "the partial group was left behind or written again"
    monkeypatch.undo()
    assert ingest_scan(spec, store).status == "ingested"
    _assert_mri_correct(store)


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "replacing-complete"])
def test_killed_mid_ingest_without_cleanup_is_not_complete(catalog_specs, tmp_path, monkeypatch, existing):
    # A kill -9 runs no cleanup: whatever was written stays. The completion mark alone must say
    # "not done", so it has to be written last (and an old one taken away first).
    spec = _mri_spec(catalog_specs)
    store = tmp_path / "mri.zarr"
    if existing:
        ingest_scan(dataclasses.replace(spec, chunks=(16, 64, 64)), store)  # other options: re-ingest
        assert storage.is_complete(str(store))
    monkeypatch.setattr(storage, "remove", lambda url: None)
    _crash_on_call(monkeypatch, readers_mod.NiftiReader, 2)
    with pytest.raises(SimulatedCrash):
        ingest_scan(spec, store)
    assert store.exists()  # the partial group really is there
    assert not storage.is_complete(str(store))
    monkeypatch.undo()
    assert ingest_scan(spec, store).status == "ingested"
    assert storage.is_complete(str(store))
    _assert_mri_correct(store)


def test_crash_just_before_completion_mark(catalog_specs, tmp_path, monkeypatch):
    spec = _mri_spec(catalog_specs)
    store = tmp_path / "mri.zarr"

    def crash(*args, **kwargs):
        raise SimulatedCrash("crash before the completion mark")

    monkeypatch.setattr(storage, "mark_complete", crash)
    with pytest.raises(SimulatedCrash):
        ingest_scan(spec, store)
    assert not storage.is_complete(str(store))
    assert not store.exists(), "the partial group was left behind"
    monkeypatch.undo()
    assert ingest_scan(spec, store).status == "ingested"
    assert storage.is_complete(str(store))
    _assert_mri_correct(store)


def test_crash_while_replacing_a_complete_group(tmp_path, monkeypatch):
    spec = _em_copy(tmp_path)
    store = tmp_path / "em.zarr"
    ingest_scan(spec, store)
    assert storage.is_complete(str(store))
    target = spec.sources[0] / "6.png"
    data = iio.imread(target)
    data[:] = 7
    iio.imwrite(target, data)
    bump_mtime(target)
    _crash_on_call(monkeypatch, readers_mod.SliceFolderReader, 1)
    with pytest.raises(SimulatedCrash):
        ingest_scan(spec, store)
    # The old result may not survive, but it must never be reported complete with old values.
    assert not storage.is_complete(str(store))
    monkeypatch.undo()
    assert ingest_scan(spec, store).status == "ingested"
    got = level(store, 0)[0]
    np.testing.assert_array_equal(got, em_stack(spec.sources[0]))
    assert (got[6] == 7).all()


def test_hand_written_partial_group_is_not_complete_and_is_replaced(catalog_specs, tmp_path):
    spec = catalog_specs["isbi2012_train"]
    store = tmp_path / "em.zarr"
    g = zarr.open_group(str(store), mode="w", zarr_format=3)
    g.attrs["tilewise"] = {"format_version": 1, "kind": "scan", "scan_id": "isbi2012_train"}
    arr = g.create_group("image").create_array("0", shape=(1, 8, 512, 512), dtype="uint8", chunks=(1, 8, 512, 512))
    arr[:, :3] = 9  # three sections written, then the machine died
    g.create_group("junk")
    assert not storage.is_complete(str(store))
    result = ingest_scan(spec, store)
    assert result.status == "ingested"
    assert storage.is_complete(str(store))
    np.testing.assert_array_equal(level(store, 0)[0], em_stack(EM / "image"))
    assert "junk" not in set(group(store).group_keys())


def test_complete_copy_without_mark_is_reingested(catalog_specs, ingested, tmp_path):
    # Everything written, the mark not: exactly what a crash at the last step leaves.
    store = tmp_path / "copy.zarr"
    shutil.copytree(ingested["isbi2012_train"], store)
    g = zarr.open_group(str(store), mode="r+", zarr_format=3)
    attrs = dict(g.attrs["tilewise"])
    del attrs["complete"]
    g.attrs["tilewise"] = attrs
    assert not storage.is_complete(str(store))
    assert ingest_scan(catalog_specs["isbi2012_train"], store).status == "ingested"
    assert storage.is_complete(str(store))


def test_half_written_zarr_json_is_not_complete_and_is_replaced(catalog_specs, tmp_path):
    store = tmp_path / "em.zarr"
    store.mkdir()
    (store / "zarr.json").write_text('{"zarr_format": 3, "node_type": "gro')
    assert not storage.is_complete(str(store))
    assert ingest_scan(catalog_specs["isbi2012_train"], store).status == "ingested"
    assert storage.is_complete(str(store))
    np.testing.assert_array_equal(level(store, 0)[0], em_stack(EM / "image"))


# --------------------------------------------------------------------------------------------
# odd but legal inputs
# --------------------------------------------------------------------------------------------


def test_geotiff_without_crs(tmp_path):
    path = tmp_path / "nocrs.tif"
    data = np.arange(2 * 9 * 7, dtype=np.int16).reshape(2, 9, 7) - 50
    data[1, 4, 3] = -9999
    transform = from_origin(1000.0, 2000.0, 0.5, 0.25)
    with rasterio.open(path, "w", driver="GTiff", width=7, height=9, count=2, dtype="int16",
                       transform=transform, nodata=-9999) as dst:
        dst.write(data)
    store = tmp_path / "nocrs.zarr"
    with pytest.warns(UserWarning, match="CRS"):
        ingest_scan(ScanSpec("nocrs", "satellite", (path,)), store)
    rec = record(store)
    assert rec["spatial"]["crs_wkt"] is None
    assert rec["spatial"]["crs_epsg"] is None
    assert len(rec["warnings"]) == 1 and "CRS" in rec["warnings"][0]
    assert rec["spatial"]["transform"] == list(transform)[:6]
    assert rec["spatial"]["nodata"] == [-9999.0, -9999.0]
    assert rec["unit"] is None
    got = level(store, 0)
    assert got.dtype == np.int16
    np.testing.assert_array_equal(got, data)
    np.testing.assert_array_equal(got, rasterio_read(path))
    assert ngff_multiscale(store)["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 0.25, 0.5]
    assert storage.is_complete(str(store))


def test_projected_float_geotiff_with_nan_nodata(tmp_path):
    path = tmp_path / "utm.tif"
    data = np.linspace(-1, 1, 3 * 10 * 11, dtype=np.float32).reshape(3, 10, 11)
    data[0, 0, :4] = np.nan
    data[2, 9, 10] = np.nan
    transform = from_origin(500000.0, 4000000.0, 10.0, 10.0)
    with rasterio.open(path, "w", driver="GTiff", width=11, height=10, count=3, dtype="float32",
                       crs="EPSG:32633", transform=transform, nodata=np.nan) as dst:
        dst.write(data)
    store = tmp_path / "utm.zarr"
    ingest_scan(ScanSpec("utm", "satellite", (path,), chunks=(4, 4)), store)
    rec = record(store)
    with rasterio.open(path) as src:
        assert rec["spatial"]["crs_wkt"] == src.crs.to_wkt()
    assert rec["spatial"]["crs_epsg"] == 32633
    assert rec["spatial"]["nodata"] == ["NaN", "NaN", "NaN"]
    assert rec["stats"]["nan_count"] == 5
    assert rec["unit"] == "meter"
    assert [a.get("unit") for a in ngff_multiscale(store)["axes"]] == [None, "meter", "meter"]
    expected = ref_pyramid(rasterio_read(path), [(2, 2), (2, 2)])
    assert image_levels(store) == ["0", "1", "2"]  # 10x11 -> 5x6 -> 3x3 (chunk 4)
    for n in range(3):
        assert_level_equal(level(store, n), expected[n])
    assert np.isnan(level(store, 1)[0, 0, :2]).all() and not np.isnan(level(store, 1)[0, 0, 2])


def test_nifti_nan_and_inf_are_kept_and_counted(tmp_path):
    data = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7) / 10 - 3  # (i, j, k)
    data[0, 0, 0] = np.nan
    data[4, 5, 6] = np.nan
    data[2, 3, 1] = np.nan
    data[1, 1, 1] = np.inf
    data[3, 0, 5] = np.inf
    data[0, 5, 2] = -np.inf
    path = tmp_path / "nan.nii.gz"
    _write_nifti(path, data)
    store = tmp_path / "nan.zarr"
    ingest_scan(ScanSpec("nan", "mri", (path,), chunks=(4, 4, 4)), store)
    rec = record(store)
    assert rec["stats"]["nan_count"] == 3
    assert rec["stats"]["posinf_count"] == 2
    assert rec["stats"]["neginf_count"] == 1
    finite = data[np.isfinite(data)]
    assert rec["stats"]["min"] == pytest.approx(float(finite.min()))
    assert rec["stats"]["max"] == pytest.approx(float(finite.max()))
    json.dumps(rec)  # the record is strict JSON-able
    expected = nifti_as_czyx(path)
    got = level(store, 0)
    assert got.shape == (1, 7, 6, 5)
    assert_level_equal(got, expected)
    assert np.isnan(got[0, 0, 0, 0]) and np.isposinf(got[0, 1, 1, 1]) and np.isneginf(got[0, 2, 5, 0])
    # (7, 6, 5) -> (4, 3, 3), which fits the 4^3 chunk
    assert image_levels(store) == ["0", "1"]
    assert_level_equal(level(store, 1), ref_pyramid(expected, [(2, 2, 2)])[1])


def test_nifti_one_section_thick(tmp_path):
    data = (np.arange(20 * 18, dtype=np.int16).reshape(20, 18, 1) * 3 - 100)  # (i, j, k=1)
    path = tmp_path / "thin.nii.gz"
    _write_nifti(path, data, zooms=(1.0, 1.0, 1.0))
    store = tmp_path / "thin.zarr"
    ingest_scan(ScanSpec("thin", "mri", (path,), chunks=(1, 8, 8)), store)
    expected = nifti_as_czyx(path)
    assert expected.shape == (1, 1, 18, 20)
    np.testing.assert_array_equal(level(store, 0), expected)
    assert image_levels(store) == ["0", "1", "2"]
    refs = ref_pyramid(expected, [(1, 2, 2), (1, 2, 2)])
    for n, shape in enumerate([(1, 18, 20), (1, 9, 10), (1, 5, 5)]):
        got = level(store, n)
        assert got.shape == (1, *shape)
        assert_level_equal(got, refs[n])
    assert storage.is_complete(str(store))


@pytest.mark.parametrize("pages", [1, 3])
def test_tiff_stack_with_one_or_more_pages(tmp_path, pages):
    data = (np.arange(pages * 5 * 7, dtype=np.uint16).reshape(pages, 5, 7) * 100)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data, photometric="minisblack")
    store = tmp_path / "stack.zarr"
    ingest_scan(ScanSpec("stack", "em", (path,)), store)
    got = level(store, 0)
    assert got.shape == (1, pages, 5, 7)
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got[0], data)
    assert record(store)["axes"] == "czyx"


def test_single_page_2d_tiff(tmp_path):
    data = np.arange(5 * 7, dtype=np.float32).reshape(5, 7) / 7
    path = tmp_path / "page.tif"
    tifffile.imwrite(path, data)
    store = tmp_path / "page.zarr"
    ingest_scan(ScanSpec("page", "em", (path,)), store)
    got = level(store, 0)
    assert got.shape == (1, 5, 7)
    np.testing.assert_array_equal(got[0], data)
    assert record(store)["axes"] == "cyx"


def test_nifti_4d_becomes_channels_with_zooms_in_array_order(tmp_path):
    data = np.arange(6 * 5 * 4 * 3, dtype=np.int16).reshape(6, 5, 4, 3) - 100  # (i, j, k, t)
    path = tmp_path / "four.nii.gz"
    _write_nifti(path, data, zooms=(0.5, 0.8, 2.0))
    store = tmp_path / "four.zarr"
    ingest_scan(ScanSpec("four", "mri", (path,)), store)
    got = level(store, 0)
    assert got.shape == (3, 4, 5, 6)
    assert got.dtype == np.int16
    for t in range(3):
        np.testing.assert_array_equal(got[t], np.transpose(data[..., t], (2, 1, 0)))
    rec = record(store)
    assert rec["spacing"] == pytest.approx([2.0, 0.8, 0.5])
    assert rec["unit"] == "millimeter"
    assert rec["spatial"]["channels_per_file"] == [3]
    scale = ngff_multiscale(store)["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale == pytest.approx([1.0, 2.0, 0.8, 0.5])
    np.testing.assert_array_equal(np.array(rec["spatial"]["affine"]), nib.load(str(path)).affine)


def test_plain_uncompressed_nii_with_scaling(tmp_path):
    raw = np.arange(7 * 6 * 5, dtype=np.int16).reshape(7, 6, 5) - 60
    img = nib.Nifti1Image(raw, np.array([[0, 0, -1.5, 10], [2.0, 0, 0, -20], [0, 1.0, 0, 5], [0, 0, 0, 1]]))
    img.header.set_slope_inter(0.5, -2.0)
    img.header.set_xyzt_units("mm", "sec")
    path = tmp_path / "plain.nii"
    nib.save(img, str(path))
    store = tmp_path / "plain.zarr"
    ingest_scan(ScanSpec("plain", "mri", (path,)), store)
    loaded = nib.load(str(path))
    expected = nifti_as_czyx(path)
    np.testing.assert_allclose(expected[0], np.transpose(raw * 0.5 - 2.0, (2, 1, 0)))
    got = level(store, 0)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)
    rec = record(store)
    np.testing.assert_array_equal(np.array(rec["spatial"]["affine"]), loaded.affine)
    assert rec["spatial"]["axcodes"] == list(nib.aff2axcodes(loaded.affine))
    zi, zj, zk = (float(z) for z in loaded.header.get_zooms()[:3])
    assert rec["spacing"] == [zk, zj, zi]


def test_two_nifti_files_become_two_channels(tmp_path):
    rng = np.random.default_rng(3)
    a = rng.normal(size=(4, 5, 6)).astype(np.float32)
    b = rng.normal(size=(4, 5, 6)).astype(np.float32)
    _write_nifti(tmp_path / "a.nii.gz", a)
    _write_nifti(tmp_path / "b.nii", b)
    store = tmp_path / "ab.zarr"
    ingest_scan(ScanSpec("ab", "mri", (tmp_path / "b.nii", tmp_path / "a.nii.gz")), store)
    got = level(store, 0)
    np.testing.assert_array_equal(got[0], b.transpose(2, 1, 0))
    np.testing.assert_array_equal(got[1], a.transpose(2, 1, 0))


def test_geotiff_reads_run_under_a_64_mib_gdal_block_cache_in_the_read_ahead_thread(tmp_path, monkeypatch):
    """GDAL options are per thread and rasterio passes an int GDAL_CACHEMAX as bytes: the cap must
    be 64 MiB (not 64 bytes, not GDAL's 5 % of RAM) where the slabs are read, in ingest's thread."""
    import ctypes
    import glob
    import threading

    libs = glob.glob(os.path.join(os.path.dirname(rasterio.__file__) + ".libs", "libgdal*"))
    if not libs:
        pytest.skip("rasterio not from a wheel bundling libgdal")
    gdal = ctypes.CDLL(libs[0])
    gdal.GDALGetCacheMax64.restype = ctypes.c_int64
    path = tmp_path / "scene.tif"
    with rasterio.open(path, "w", driver="GTiff", width=300, height=700, count=2, dtype="uint16",
                       crs="EPSG:32633", transform=from_origin(0, 0, 1, 1), tiled=True) as dst:
        dst.write(np.arange(2 * 700 * 300, dtype=np.uint16).reshape(2, 700, 300))
    seen = []
    real_read = rasterio.io.DatasetReader.read

    def spy(self, *args, **kwargs):
        seen.append((threading.current_thread().name, gdal.GDALGetCacheMax64()))
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", spy)
    result = ingest_scan(ScanSpec("scene", "satellite", (path,), chunks=(256, 256)), tmp_path / "scene.zarr")
    assert result.status == "ingested"
    assert seen and any(name.startswith("tilewise-read") for name, _ in seen)
    assert {cache for _, cache in seen} == {64 << 20}
