"""The instance table: one row per instance of ``prediction/instances``, computed chunk by chunk.

Columns (Parquet, written with pyarrow to ``prediction/instances.parquet``):

- ``id`` (uint32) the value in the label image; ``class`` (int16) and ``class_name``; ``score``
  (float32): the detector's, or for instances from a semantic prediction the mean probability of
  the instance's class over its pixels (NaN when the prediction has no probabilities);
- the box: ``z0, y0, x0`` (first voxel) and ``z1, y1, x1`` (one past the last), array axes, voxels;
  2D scans have no ``z0 / z1``; ``area``: pixel (voxel) count;
- ``centroid_z / centroid_y / centroid_x``: the mean voxel index (pixels);
- ``world_x / world_y`` (``world_z``): the centroid in world coordinates -- for GeoTIFF rasters the
  scan's affine transform applied to the pixel centre (col + 0.5, row + 0.5), in the CRS's units;
  for NIfTI volumes the NIfTI affine applied to (i, j, k) = (x, y, z) (mm, scanner RAS+); for other
  stacks index x spacing (the catalog's or the TIFF's unit, e.g. nanometer). The schema's metadata
  names the CRS (``crs``, WKT) or the ``unit``.

Memory: a few numbers per id (area, box, coordinate sums, per-class counts), grown as ids appear;
one chunk of the label image (and of the class map / probabilities) at a time. Ids are sorted.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from tasks import storage
from tasks.instances import store as inst_store


class _Stats:
    """Per-id sums over chunks (index = id)."""

    def __init__(self, ndim: int, classes: int):
        self.ndim, self.k = ndim, classes
        self.area = np.zeros(0, np.int64)
        self.lo = np.zeros((ndim, 0), np.int64)
        self.hi = np.zeros((ndim, 0), np.int64)
        self.sums = np.zeros((ndim, 0), np.float64)
        self.votes = np.zeros((classes, 0), np.int64)
        self.prob = np.zeros((classes, 0), np.float64)

    def grow(self, n: int) -> None:
        if n <= len(self.area):
            return
        extra = n - len(self.area)
        big = np.iinfo(np.int64).max
        self.area = np.concatenate([self.area, np.zeros(extra, np.int64)])
        self.lo = np.concatenate([self.lo, np.full((self.ndim, extra), big)], axis=1)
        self.hi = np.concatenate([self.hi, np.full((self.ndim, extra), -1)], axis=1)
        self.sums = np.concatenate([self.sums, np.zeros((self.ndim, extra))], axis=1)
        self.votes = np.concatenate([self.votes, np.zeros((self.k, extra), np.int64)], axis=1)
        self.prob = np.concatenate([self.prob, np.zeros((self.k, extra))], axis=1)

    def add(self, box, ids: np.ndarray, labels: np.ndarray | None, probs: np.ndarray | None) -> None:
        fg = ids > 0
        if not fg.any():
            return
        values = ids[fg].astype(np.int64)
        self.grow(int(values.max()) + 1)
        n = len(self.area)
        self.area += np.bincount(values, minlength=n)
        coords = np.nonzero(fg)
        for axis, (c, s) in enumerate(zip(coords, box)):
            c = c.astype(np.int64) + s.start
            self.sums[axis] += np.bincount(values, weights=c, minlength=n)
            np.minimum.at(self.lo[axis], values, c)
            np.maximum.at(self.hi[axis], values, c + 1)
        if labels is not None:
            lab = labels[fg].astype(np.int64)
            for k in range(self.k):
                self.votes[k] += np.bincount(values[lab == k], minlength=n)
        if probs is not None:
            for k in range(self.k):
                self.prob[k] += np.bincount(values, weights=probs[k][fg].astype(np.float64), minlength=n)


def world_coordinates(centroid: np.ndarray, record: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``centroid`` (ndim, N) mean voxel indices, array order -> world columns and schema metadata."""
    spatial = record.get("spatial") or {}
    ndim = centroid.shape[0]
    if spatial.get("format") == "geotiff" and spatial.get("transform"):
        a, b, c, d, e, f = spatial["transform"][:6]
        row, col = centroid[-2] + 0.5, centroid[-1] + 0.5  # pixel centres
        meta = {"crs": spatial.get("crs_wkt") or "", "unit": "crs"}
        return {"world_x": a * col + b * row + c, "world_y": d * col + e * row + f}, meta
    if spatial.get("format") == "nifti" and spatial.get("affine") and ndim == 3:
        affine = np.asarray(spatial["affine"], np.float64)
        ijk = np.stack([centroid[2], centroid[1], centroid[0], np.ones(centroid.shape[1])])  # array (z, y, x) = (k, j, i)
        xyz = affine @ ijk
        return {"world_x": xyz[0], "world_y": xyz[1], "world_z": xyz[2]}, {"unit": "mm (NIfTI affine, RAS+)"}
    spacing = record.get("spacing") or [1.0] * ndim
    unit = record.get("unit") or "pixel"
    names = ["world_z", "world_y", "world_x"][-ndim:]
    return {n: centroid[i] * float(s) for i, (n, s) in enumerate(zip(names, spacing))}, {"unit": unit}


def instance_table(store: str, *, classes: np.ndarray | None = None, scores: np.ndarray | None = None):
    """The table of ``store``'s ``prediction/instances`` (a pyarrow.Table). ``classes[id]`` /
    ``scores[id]``: the detector's class and score per id; by default the majority class of
    ``prediction/labels`` inside each instance and the mean probability of that class."""
    import pyarrow as pa
    import zarr

    store = str(store).rstrip("/")
    pred = inst_store.prediction_url(store)
    ids_array = zarr.open_array(f"{pred}/{inst_store.INSTANCES}", mode="r")
    pred_record = storage.read_record(pred) or {}
    names = list(pred_record.get("classes") or [])
    group = storage.open_group(pred, mode="r")
    labels = group["labels"] if classes is None and "labels" in group else None
    probs = group["probabilities"] if scores is None and "probabilities" in group else None
    k = max(len(names), probs.shape[0] if probs is not None else 0, 1)
    stats = _Stats(ids_array.ndim, k)
    for box in storage.chunk_boxes(ids_array.shape, ids_array.chunks):
        ids = np.asarray(ids_array[box])
        if not ids.any():
            continue
        stats.add(box, ids, None if labels is None else np.asarray(labels[box]),
                  None if probs is None else np.asarray(probs[(slice(None),) + box], np.float32))
    present = np.flatnonzero(stats.area)
    area = stats.area[present]
    if classes is not None:
        cls = np.asarray(classes)[present].astype(np.int16)
    elif labels is not None:
        cls = stats.votes[:, present].argmax(axis=0).astype(np.int16)
    else:
        cls = np.zeros(len(present), np.int16)
    if scores is not None:
        score = np.asarray(scores, np.float32)[present]
    elif probs is not None and len(present):
        score = (stats.prob[cls, present] / area).astype(np.float32)
    else:
        score = np.full(len(present), math.nan, np.float32)
    centroid = stats.sums[:, present] / np.maximum(area, 1)
    axes = "zyx"[-ids_array.ndim:]
    columns: dict[str, Any] = {"id": present.astype(np.uint32), "class": cls,
                               "class_name": [names[c] if 0 <= c < len(names) else f"class_{c}" for c in cls],
                               "score": score}
    for i, a in enumerate(axes):
        columns[f"{a}0"] = stats.lo[i, present]
    for i, a in enumerate(axes):
        columns[f"{a}1"] = stats.hi[i, present]
    columns["area"] = area
    for i, a in enumerate(axes):
        columns[f"centroid_{a}"] = centroid[i]
    world, meta = world_coordinates(centroid, storage.read_record(store) or {})
    columns.update(world)
    table = pa.table(columns)
    meta.update({"tilewise": json.dumps({"store": store, "axes": axes, "box": "first voxel .. one past the last",
                                         "score": "detector score" if scores is not None else
                                         "mean probability of the class over the instance"})})
    return table.replace_schema_metadata({k2: str(v) for k2, v in meta.items()})


def write_table(store: str, table) -> str:
    """Write ``table`` to ``prediction/instances.parquet``: under a temporary name, then renamed, so
    a reader never sees half a file. Returns the URL."""
    import uuid

    import fsspec
    import pyarrow.parquet as pq

    url = inst_store.table_url(store)
    fs, path = fsspec.core.url_to_fs(url)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with fs.open(tmp, "wb") as fh:
            pq.write_table(table, fh)
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise
    return url
