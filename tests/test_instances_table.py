"""The instance table (tasks/instances/table.py) against scikit-image's regionprops, world
coordinates by hand; section linking (link.py) against a hand-worked case and scipy in 3D; the
seeded watershed (watershed.py) on a drawn cell partition; instances_from_prediction end to end."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from scipy import ndimage
from skimage.measure import regionprops

from tasks import storage
from tasks.errors import ScanError
from tasks.instances import store as inst_store
from tasks.instances.from_semantic import instances_from_prediction
from tasks.instances.link import link_sections, relabel
from tasks.instances.table import instance_table, world_coordinates, write_table
from tasks.instances.watershed import cells_in_section
from tests.test_evaluate import make_store, write_prediction
from tests.test_instances_components import same_objects


def blobs3d(shape=(16, 24, 20)):
    ref = np.zeros(shape, np.uint8)
    ref[2:9, 3:15, 2:9] = 1       # crosses chunk borders at 8 on every axis
    ref[10:14, 16:22, 12:19] = 2
    ref[11:13, 2:5, 14:18] = 1
    return ref


def test_table_equals_regionprops_and_world_coordinates_follow_the_affine(tmp_path):
    ref = blobs3d()
    store = make_store(tmp_path, ref, spacing=(2.0, 1.0, 1.0))
    write_prediction(store, ref, classes=["background", "a", "b"])
    out = instances_from_prediction(store, method="components", classes=["a", "b"], min_size=1)
    assert out["status"] == "computed" and out["count"] == 3
    ids = zarr.open_array(f"{store}/prediction/instances")[...]
    table = pq.read_table(inst_store.table_url(store)).to_pydict()
    props = {p.label: p for p in regionprops(ids.astype(np.int64))}
    assert table["id"] == sorted(props)
    affine = np.asarray(storage.read_record(store)["spatial"]["affine"])
    for row, i in enumerate(table["id"]):
        p = props[i]
        assert table["area"][row] == p.area
        assert [table[k][row] for k in ("z0", "y0", "x0", "z1", "y1", "x1")] == list(p.bbox)
        np.testing.assert_allclose([table[f"centroid_{a}"][row] for a in "zyx"], p.centroid)
        assert table["class_name"][row] == ["background", "a", "b"][ref[tuple(p.coords[0])]]
        assert math.isclose(table["score"][row], 0.8, rel_tol=1e-3)  # write_prediction's confidence, float16
        z, y, x = p.centroid
        np.testing.assert_allclose([table[f"world_{a}"][row] for a in "xyz"], (affine @ [x, y, z, 1])[:3])
    assert instances_from_prediction(store, method="components", classes=["a", "b"], min_size=1)["status"] == "unchanged"
    again = instances_from_prediction(store, method="components", classes=["a", "b"], min_size=40)
    assert again["status"] == "computed" and again["count"] == 2  # the 24-voxel blob is dropped


def test_world_coordinates_of_a_geotiff_pixel_centre_and_of_a_spaced_stack():
    record = {"spatial": {"format": "geotiff", "crs_wkt": "EPSG:4326", "transform": [0.5, 0, 100.0, 0, -0.5, 200.0]}}
    world, meta = world_coordinates(np.array([[10.0], [4.0]]), record)  # row 10, col 4
    assert world["world_x"][0] == 100.0 + 0.5 * 4.5 and world["world_y"][0] == 200.0 - 0.5 * 10.5
    assert meta["crs"] == "EPSG:4326"
    world, meta = world_coordinates(np.array([[2.0], [3.0], [4.0]]), {"spacing": [50, 4, 4], "unit": "nanometer"})
    assert (world["world_z"][0], world["world_y"][0], world["world_x"][0]) == (100.0, 12.0, 16.0)
    assert meta["unit"] == "nanometer"


def test_write_table_is_atomic(tmp_path, monkeypatch):
    ref = blobs3d()
    store = make_store(tmp_path, ref)
    write_prediction(store, ref, classes=["background", "a", "b"])
    inst_store.create_instances(store, ref.shape, (8, 8, 8), source="test", digest_value="x", params={})
    import pyarrow.parquet

    def broken(table, where, **kw):
        where.write(b"PAR1 half")
        raise OSError("disk full")

    monkeypatch.setattr(pyarrow.parquet, "write_table", broken)
    with pytest.raises(OSError):
        write_table(store, instance_table(store))
    assert not storage.exists(inst_store.table_url(store))  # no half file under the final name
    assert not list((tmp_path / "scan.zarr" / "prediction").glob("*.tmp"))  # nor a leftover
    with pytest.raises(ValueError, match="table is missing"):
        inst_store.mark_instances_complete(store, {"count": 0})
    assert not inst_store.instances_complete(store)


def test_incomplete_prediction_and_unknown_class_are_one_line_errors(tmp_path):
    ref = blobs3d()
    store = make_store(tmp_path, ref)
    write_prediction(store, ref, classes=["background", "a", "b"], complete=False)
    with pytest.raises(ScanError, match="no complete prediction"):
        instances_from_prediction(store)
    write_prediction(store, ref, classes=["background", "a", "b"])
    with pytest.raises(ScanError, match=r"\['c'\] are not in the prediction's classes"):
        instances_from_prediction(store, classes=["c"])


def test_link_sections_hand_worked_and_equal_to_3d_connectivity_for_columns(tmp_path):
    # section 0: ids 1, 2; section 1: 3 (continues 1), 4 (new); section 2: 5 (continues 3), 6 (overlaps 4 by 1 px of 9)
    s = np.zeros((3, 10, 10), np.uint32)
    s[0, 0:4, 0:4] = 1; s[0, 6:9, 6:9] = 2
    s[1, 0:4, 1:5] = 3; s[1, 5:8, 0:3] = 4
    s[2, 1:4, 1:4] = 5; s[2, 7:10, 2:5] = 6
    arr = zarr.create_array(str(tmp_path / "s.zarr"), shape=s.shape, chunks=(2, 10, 10), dtype="uint32")
    arr[...] = s
    lookup = link_sections(arr)
    assert lookup[1] == lookup[3] == lookup[5] == 1
    assert len({lookup[2], lookup[4], lookup[6], 1}) == 4 and lookup.max() == 4
    # convex columns (cylinders) drifting slowly: linking by overlap = scipy's 3D components
    rng = np.random.default_rng(2)
    truth = np.zeros((12, 64, 64), np.int64)
    for v, (y, x) in enumerate(rng.integers(8, 48, size=(6, 2)), start=1):
        for z in range(12):
            yy, xx = np.mgrid[:64, :64]
            truth[z][((yy - y - z // 4) ** 2 + (xx - x) ** 2 <= 16) & (truth[z] == 0)] = v
    lab3d, n = ndimage.label(truth > 0)
    per_section = np.zeros_like(truth, np.uint32)
    offset = 0
    for z in range(12):
        lab, k = ndimage.label(truth[z] > 0)
        per_section[z] = np.where(lab > 0, lab + offset, 0)
        offset += k
    arr = zarr.create_array(str(tmp_path / "c.zarr"), shape=truth.shape, chunks=(5, 32, 32), dtype="uint32")
    arr[...] = per_section
    lookup = link_sections(arr)
    relabel(arr, lookup, arr)
    same_objects(arr[...], lab3d)
    assert lookup.max() == n


def test_seeded_watershed_recovers_drawn_cells():
    from skimage.segmentation import find_boundaries

    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:200, :200]
    seeds = rng.uniform(0, 200, size=(30, 2))
    truth = np.argmin((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2, axis=-1) + 1
    boundary = find_boundaries(truth, mode="thick")
    membrane = np.where(boundary, 0.95, 0.05) + rng.normal(0, 0.02, truth.shape)
    membrane = ndimage.gaussian_filter(membrane, 1.0)
    cells = cells_in_section(membrane, seed_threshold=0.3, min_size=10)
    assert cells.max() == 30
    for v in range(1, 31):  # each drawn cell's interior is one recovered cell with IoU >= 0.9
        inside = (truth == v) & ~boundary
        got = np.bincount(cells[inside]).argmax()
        assert got > 0
        iou = ((cells == got) & inside).sum() / ((cells == got) | inside).sum()
        assert iou >= 0.9, (v, iou)


def test_instances_are_an_ngff_label_image_and_go_when_cleared(tmp_path):
    ref = blobs3d()
    store = make_store(tmp_path, ref)
    write_prediction(store, ref, classes=["background", "a", "b"])
    instances_from_prediction(store, classes=["a", "b"], min_size=1)
    root = zarr.open_group(store, mode="r")
    assert root["labels"].attrs["ome"]["labels"][-1] == "instances"
    node = root["labels/instances"]
    assert node.attrs["ome"]["image-label"]["source"] == {"image": "../../"}
    np.testing.assert_array_equal(node["0"][...], zarr.open_array(f"{store}/prediction/instances")[...])
    levels = [d["path"] for d in node.attrs["ome"]["multiscales"][0]["datasets"]]
    for a, b in zip(levels, levels[1:]):  # each level the first pixel of each block of the one above
        upper, lower = node[a][...], node[b][...]
        f = [-(-n // m) for n, m in zip(upper.shape, lower.shape)]
        np.testing.assert_array_equal(lower, upper[tuple(slice(None, None, k) for k in f)])
    inst_store.clear_instances(store)
    root = zarr.open_group(store, mode="r")
    assert "instances" not in root["labels"].attrs["ome"]["labels"] and "instances" not in root["labels"]
