"""Chunked connected components (tasks/instances/components.py) against scipy.ndimage.label on
scans small enough to hold whole, with objects across chunk borders and corners; memory bounded."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import zarr
from scipy import ndimage

from tasks.instances.components import label_components


def same_objects(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to renumbering: a one-to-one map between the ids (background to background)."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1] and len(np.unique(pairs[1])) == pairs.shape[1]
    assert ((pairs[0] == 0) == (pairs[1] == 0)).all()


def reference(classes_map, classes, connectivity, min_size, per_section=False):
    """scipy, whole array: each class alone, ids unique over classes, small ones dropped."""
    out = np.zeros(classes_map.shape, np.int64)
    n = 0
    for c in classes:
        if per_section:
            for z in range(classes_map.shape[0]):
                lab, k = ndimage.label(classes_map[z] == c, ndimage.generate_binary_structure(2, connectivity))
                sizes = np.bincount(lab.ravel())
                for v in range(1, k + 1):
                    if sizes[v] >= min_size:
                        n += 1
                        out[z][lab == v] = n
            continue
        lab, k = ndimage.label(classes_map == c, ndimage.generate_binary_structure(classes_map.ndim, connectivity))
        sizes = np.bincount(lab.ravel())
        for v in range(1, k + 1):
            if sizes[v] >= min_size:
                n += 1
                out[lab == v] = n
    return out, n


def arrays(tmp_path, data, chunks):
    src = zarr.create_array(str(tmp_path / "src.zarr"), shape=data.shape, chunks=chunks, dtype="uint8")
    src[...] = data
    out = zarr.create_array(str(tmp_path / "out.zarr"), shape=data.shape, chunks=chunks, dtype="uint32")
    return src, out


def blobs(shape, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.random(shape), 2.0)
    levels = np.quantile(noise, np.linspace(0.45, 1, classes + 1))
    return np.digitize(noise, levels[1:-1]).astype(np.uint8) * (noise > levels[0])


@pytest.mark.parametrize("connectivity", [1, 3])
def test_3d_equals_scipy_across_chunk_borders(tmp_path, connectivity):
    data = blobs((40, 90, 110))
    data[5:35, 30:34, 10:100] = 1  # a slab across many chunks, and a diagonal chain across corners
    for i in range(20):
        data[10 + i, 20 + i, 60 + i] = 2
    src, out = arrays(tmp_path, data, (16, 32, 32))
    n = label_components(src, [1, 2], out, connectivity=connectivity, min_size=5)
    expected, m = reference(data, [1, 2], connectivity, 5)
    assert n == m
    got = out[...]
    same_objects(got, expected)
    assert sorted(np.unique(got[got > 0])) == list(range(1, n + 1))  # consecutive ids


def test_2d_classes_stay_apart_and_min_size(tmp_path):
    data = np.zeros((100, 100), np.uint8)
    data[10:50, 10:30] = 1
    data[10:50, 30:50] = 2  # touches class 1 across x = 30, which is also a chunk border
    data[60:62, 60:62] = 1  # 4 pixels: dropped with min_size 5
    src, out = arrays(tmp_path, data, (30, 30))
    assert label_components(src, [1, 2], out, min_size=5) == 2
    got = out[...]
    assert len(np.unique(got[10:50, 10:30])) == 1 and len(np.unique(got[10:50, 30:50])) == 1
    assert got[10, 10] != got[10, 30] and (got[60:62, 60:62] == 0).all()
    expected, _ = reference(data, [1, 2], 1, 5)
    same_objects(got, expected)


def test_per_section_equals_scipy_per_section(tmp_path):
    data = blobs((6, 70, 80), classes=1, seed=3)
    src, out = arrays(tmp_path, data, (4, 32, 32))
    n = label_components(src, [1], out, per_section=True, min_size=3)
    expected, m = reference(data, [1], 1, 3, per_section=True)
    assert n == m
    same_objects(out[...], expected)
    got = out[...]
    assert not set(np.unique(got[0])) - {0} & set(np.unique(got[1])) - {0}  # no id in two sections


def test_memory_is_a_chunk_not_the_scan(tmp_path):
    data = np.zeros((4096, 4096), np.uint8)
    data[::64, :] = 1  # long lines across every chunk of a row
    data[:, ::128] = 1
    src, out = arrays(tmp_path, data, (512, 512))
    tracemalloc.start()
    n = label_components(src, [1], out)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 1
    assert peak < 0.25 * data.size * 4, f"peak {peak / 2**20:.1f} MiB for a {data.size * 4 / 2**20:.0f} MiB label image"


def test_more_components_than_ids_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    from tasks.errors import ScanError
    from tasks.instances import store as inst_store

    data = np.zeros((40, 40), np.uint8)
    data[::4, ::4] = 1  # 100 one-pixel components
    src, out = arrays(tmp_path, data, (16, 16))
    monkeypatch.setattr(inst_store, "MAX_ID", 99)
    with pytest.raises(ScanError, match="100 instances exceed"):
        label_components(src, [1], out, where="scan.zarr")
    assert not out[...].any()
