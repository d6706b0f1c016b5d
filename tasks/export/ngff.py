"""The scan group as OME-NGFF 0.5 from its root, with the prediction as an NGFF label image.

Layout (README "Zarr layout"):

    SCAN.zarr/               attrs["ome"]["multiscales"]: the image's metadata, datasets "image/0", "image/1"...
      image/                 unchanged (keeps its own multiscales: readers opened at image/ still work)
      labels/                attrs["ome"]["labels"] = ["reference", "prediction", "instances"]
        reference/           NGFF "image-label" of the reference labels, written by ingest (tasks/ingest/reference.py)
        prediction/          NGFF "image-label": 0/ 1/ ... (*spatial) uint8, the image pyramid's grid
      prediction/            unchanged (probabilities, labels, done)

An OME-Zarr reader opened at the ROOT (``ome_zarr.reader.Reader``, napari-ome-zarr) finds the
multiscale image there, then the ``labels`` group and, through its list, the label images
(reference, prediction, instances), whose ``image-label.source.image`` ("../../") points back to the root.

The label pyramid has the image pyramid's levels (same shapes, scales and chunks); each level is
the block MODE of the level above (ties to the smaller class index; a short edge block counts the
pixels it has), so a label pixel summarises exactly the block its image pixel averages and only
ever holds a class that is there. Built chunk by chunk: memory is one output chunk of the level
being written plus its source block (the chunk times the factors, at most 8x).

Completion: "prediction" is taken out of ``labels``' list before the group is rewritten and put
back last, so a reader never sees a half-written label image listed; the group's
``attrs["tilewise"]`` records the prediction's digest, so an unchanged prediction is not rewritten.
A prediction that is replaced or cleared (a new model, ``--force``) loses its label images first
(:func:`remove_prediction`): "prediction" and "instances" are unlisted before the prediction is
touched and listed again only when the new one is complete, so after a re-infer that failed a
viewer shows no mask rather than the old one. Everything here writes the store: it runs under the
store's lock (the writer's, or the brief one of ``export --format zarr``, tasks/store_lock.py).
"""

from __future__ import annotations

import itertools

from datetime import datetime, timezone
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from tasks import identity, storage
from tasks.errors import ScanError

NGFF_VERSION = "0.5"
COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def _present_values(block: np.ndarray) -> np.ndarray:
    """The distinct values of ``block``, ascending: by ``bincount`` in pieces for small unsigned types
    (no sort, no full-size widened copy), else ``np.unique``."""
    if block.dtype.kind != "u" or block.dtype.itemsize > 2:
        return np.unique(block)
    flat = block.reshape(-1)
    seen = np.zeros(1 << (8 * block.dtype.itemsize), dtype=bool)
    for start in range(0, flat.size, 1 << 18):
        counts = np.bincount(flat[start:start + (1 << 18)])
        seen[:counts.size] |= counts > 0
    return np.flatnonzero(seen).astype(block.dtype)


def downsample_mode(block: np.ndarray, factors: tuple[int, ...], values: np.ndarray | None = None) -> np.ndarray:
    """Most frequent value of each ``factors`` block of an integer (*spatial) array.

    Ties go to the smaller value; a short trailing block counts only the pixels it has. Cost: one
    counting pass per distinct value in ``block`` (a handful of classes), found by ``bincount`` for
    small unsigned types (no sort) and compared in the block's own dtype (no widened copy).
    ``values``: every value the block may hold, ascending (a class map's classes), when the caller
    knows them: no pass to find them.
    """
    if all(f == 1 for f in factors):
        return block.copy()
    values = _present_values(block) if values is None else np.asarray(values, dtype=block.dtype)
    ragged = any(n % f for n, f in zip(block.shape, factors))
    if ragged:  # pad with a value that is not in the block: it counts for no class
        if block.dtype.kind in "ui" and np.iinfo(block.dtype).max > values[-1]:
            absent = values[-1] + 1
            padded = block
        else:
            padded, absent = block.astype(np.int64), -1 if values[0] > -1 else values[0] - 1
        pad = [(0, (-n) % f) for n, f in zip(block.shape, factors)]
        padded = np.pad(padded, pad, constant_values=absent)
    else:
        padded = block
    # one strided view per position inside a block: summing their matches counts each block's votes
    views = [padded[tuple(slice(o, None, f) for o, f in zip(offsets, factors))]
             for offsets in itertools.product(*(range(f) for f in factors))]
    out_shape = views[0].shape
    count_type = np.uint8 if len(views) < 256 else np.int64
    if len(values) == 2 and not ragged:
        # Two values (a two-class label map): the larger wins where it holds more than half of its
        # block, else the smaller (ties to the smaller): one counting pass, 5x faster on 512² chunks.
        count = np.zeros(out_shape, dtype=count_type)
        match = np.empty(out_shape, dtype=bool)
        for view in views:
            np.equal(view, values[1], out=match)
            count += match
        best = np.full(out_shape, values[0], dtype=block.dtype)
        best[count > len(views) // 2] = values[1]
        return best
    best = np.zeros(out_shape, dtype=block.dtype)
    best_count = np.zeros(out_shape, dtype=count_type)
    count = np.empty(out_shape, dtype=count_type)
    match = np.empty(out_shape, dtype=bool)
    for value in values:  # ascending: a later value must beat, not tie, to win
        count.fill(0)
        for view in views:
            np.equal(view, value, out=match)
            count += match
        better = count > best_count
        best[better] = value
        best_count[better] = count[better]
    return best


def _image_multiscale(group: zarr.Group) -> dict[str, Any]:
    try:
        return dict(group["image"].attrs["ome"]["multiscales"][0])
    except (KeyError, IndexError, TypeError):
        raise ScanError(group.store_path, "image/ has no OME-NGFF multiscales metadata") from None


def write_root_multiscales(group: zarr.Group) -> None:
    """Make the scan group an NGFF image at its root: the image's multiscales with paths 'image/N'."""
    ms = _image_multiscale(group)
    root = {**ms, "datasets": [{**d, "path": f"image/{d['path']}"} for d in ms["datasets"]]}
    ome = dict(group.attrs.get("ome", {}))
    ome.update(version=NGFF_VERSION, multiscales=[root])
    group.attrs["ome"] = ome


def spatial_levels(group: zarr.Group) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[tuple[int, ...]]]:
    """Spatial axes, per-level scale transforms and factors (level n from level n-1) of the image."""
    ms = _image_multiscale(group)
    axes = [a for a in ms["axes"] if a.get("type") != "channel"]
    first_spatial = len(ms["axes"]) - len(axes)
    scales, factors = [], []
    for n, d in enumerate(ms["datasets"]):
        scale = [float(s) for s in d["coordinateTransformations"][0]["scale"][first_spatial:]]
        scales.append([{"type": "scale", "scale": scale}])
        if n:
            prev = scales[n - 1][0]["scale"]
            factors.append(tuple(int(round(s / p)) for s, p in zip(scale, prev)))
    return axes, scales, factors


SLAB_BYTES = 1 << 20  # labels read and written per call: whole rows of chunks, several while they stay under it


def _slabs(shape: tuple[int, ...], chunks: tuple[int, ...], itemsize: int):
    """Boxes of whole chunk rows along the first axis (as many rows as fit in ``SLAB_BYTES``, at least
    one); a row wider than that is cut into chunk-aligned pieces along the next axes instead."""
    row = chunks[0] * int(np.prod(shape[1:])) * itemsize
    if row <= SLAB_BYTES or len(shape) == 1:
        rows = max(1, SLAB_BYTES // max(row, 1)) * chunks[0]
        for start in range(0, shape[0], rows):
            yield (slice(start, min(start + rows, shape[0])),) + tuple(slice(0, n) for n in shape[1:])
        return
    for start in range(0, shape[0], chunks[0]):
        head = slice(start, min(start + chunks[0], shape[0]))
        for rest in _slabs(shape[1:], chunks[1:], itemsize * (head.stop - head.start)):
            yield (head, *rest)


def list_label_image(labels: zarr.Group, name: str, first: bool = False) -> None:
    """List ``name`` in the ``labels`` group's NGFF list (last, or ``first``): call it once the
    label image is complete; a reader shows only what is listed."""
    listed = [n for n in labels.attrs.get("ome", {}).get("labels", []) if n != name]
    labels.attrs["ome"] = {"version": NGFF_VERSION, "labels": [name, *listed] if first else [*listed, name]}


def unlist_label_image(labels: zarr.Group, name: str) -> None:
    """Take ``name`` out of the ``labels`` group's NGFF list (before it is rewritten or removed)."""
    listed = labels.attrs.get("ome", {}).get("labels", [])
    if name in listed or "ome" not in labels.attrs:
        labels.attrs["ome"] = {"version": NGFF_VERSION, "labels": [n for n in listed if n != name]}


def write_label_levels(group: zarr.Group, target: zarr.Group, name: str, level0: zarr.Array,
                       classes: list[str] | None, attrs: dict[str, Any] | None = None, downsample: str = "mode",
                       copy_level0: bool = True, levels_written: bool = False) -> None:
    """Fill the label image group ``target`` on the image pyramid's grid of the scan ``group``:
    levels 1.. (each from the level above) and its NGFF metadata. ``copy_level0``: level 0 is
    written into ``target`` from ``level0``; else ``level0`` is (or will be moved to) ``target/0``
    and only read. ``levels_written``: every level is there already (the engine streamed them,
    ``tasks.engine.label_pyramid``): only the metadata is written. Lists nothing: the caller lists
    the image once it is complete."""
    image = group["image"]
    axes, scales, factors = spatial_levels(group)
    dims = tuple(a["name"] for a in axes)
    if tuple(level0.shape) != tuple(image["0"].shape[1:]):
        raise ScanError(group.store_path, f"labels/{name} has shape {tuple(level0.shape)}, the image "
                                          f"{tuple(image['0'].shape[1:])}")
    previous = level0
    for n, scale in enumerate(scales):
        if levels_written or (n == 0 and not copy_level0):
            continue
        shape = tuple(image[str(n)].shape[1:])
        chunks = tuple(image[str(n)].chunks[1:])
        array = target.create_array(str(n), shape=shape, dtype=level0.dtype, chunks=chunks, compressors=COMPRESSOR,
                                    fill_value=0, dimension_names=dims, overwrite=True)
        # whole rows of chunks, zarr writes them together; sized by what they read (the level above)
        source_bytes = level0.dtype.itemsize * (int(np.prod(factors[n - 1])) if n else 1)
        for box in _slabs(shape, chunks, source_bytes):
            if n == 0:
                array[box] = np.asarray(level0[box])
            else:
                f = factors[n - 1]
                source = tuple(slice(b.start * k, min(b.stop * k, m)) for b, k, m in zip(box, f, previous.shape))
                block = np.asarray(previous[source])
                array[box] = (downsample_mode(block, f) if downsample == "mode"
                              else block[tuple(slice(None, None, k) for k in f)])
        previous = array
    label_meta: dict[str, Any] = {"version": NGFF_VERSION, "source": {"image": "../../"}}
    if classes is not None:
        colors = [{"label-value": k, "rgba": [*PALETTE[(k - 1) % len(PALETTE)], 255]} for k in range(1, len(classes))]
        label_meta["colors"] = [{"label-value": 0, "rgba": [0, 0, 0, 0]}, *colors]
        label_meta["properties"] = [{"label-value": k, "class": c} for k, c in enumerate(classes)]
    how = "block mode of the level above" if downsample == "mode" else "first pixel of each block of the level above"
    target.attrs["ome"] = {
        "version": NGFF_VERSION,
        "multiscales": [{"name": name, "axes": axes,
                         "datasets": [{"path": str(n), "coordinateTransformations": s} for n, s in enumerate(scales)],
                         "type": downsample, "metadata": {"description": how}}],
        "image-label": label_meta,
    }
    if attrs is not None:
        target.attrs[storage.ATTRS_KEY] = attrs


def label_levels(group: zarr.Group) -> list[str]:
    """The paths inside the scan group of a label image's levels, one per image level."""
    return [d["path"] for d in _image_multiscale(group)["datasets"]]


def write_label_image(group: zarr.Group, name: str, level0: zarr.Array, classes: list[str] | None,
                      attrs: dict[str, Any] | None = None, downsample: str = "mode",
                      levels_written: bool = False) -> zarr.Group:
    """Write ``labels/<name>`` as an NGFF image-label on the image's pyramid grid and list it last.

    ``downsample``: ``mode`` (class maps: each level the block mode of the one above) or ``nearest``
    (instance ids, too many distinct values for a mode: the block's first pixel). ``classes`` None:
    no colours or properties (a viewer colours each id itself). ``levels_written``: the unlisted
    group's levels are complete already (streamed by the engine): metadata and listing only."""
    labels = group.require_group("labels")
    unlist_label_image(labels, name)  # unlisted while rewritten
    target = labels[name] if levels_written else labels.create_group(name, overwrite=True)
    write_label_levels(group, target, name, level0, classes, attrs, downsample, levels_written=levels_written)
    list_label_image(labels, name)  # last: now it is complete
    return target


def write_instances_ngff(store: str) -> None:
    """``labels/instances``: the NGFF image-label of ``prediction/instances`` (ids, no colours: a
    viewer gives each object its own), pyramid by the first pixel of each block. Written when the
    instances are complete; :func:`remove_label_image` takes it away when they are cleared."""
    group = storage.open_group(str(store).rstrip("/"), mode="r+")
    if "multiscales" not in group.attrs.get("ome", {}):
        write_root_multiscales(group)
    record = (storage.read_record(f"{str(store).rstrip('/')}/prediction") or {}).get("instances") or {}
    write_label_image(group, "instances", group["prediction/instances"], None,
                      {"kind": "ngff-instance-labels", "from": "prediction/instances",
                       "instances_digest": record.get("digest"),
                       "written_at": datetime.now(timezone.utc).isoformat()}, downsample="nearest")


def remove_label_image(store: str, name: str) -> None:
    """Unlist ``labels/<name>`` first (readers stop showing it), then delete it."""
    url = f"{str(store).rstrip('/')}/labels"
    if storage.read_record(url) is None and not storage.exists(f"{url}/{name}"):
        return
    labels = storage.open_group(url, mode="r+")
    if name in labels.attrs.get("ome", {}).get("labels", []):
        unlist_label_image(labels, name)
    storage.remove(f"{url}/{name}")


def remove_prediction(store: str) -> None:
    """Delete ``store``'s prediction (hold the store's lock): its label images ``labels/instances``
    and ``labels/prediction`` are unlisted and deleted first, then its marks cleared, then the group."""
    store = str(store).rstrip("/")
    for name in ("instances", "prediction"):
        remove_label_image(store, name)
    storage.remove(f"{store}/prediction")


def write_prediction_labels_ngff(store: str, force: bool = False, levels_written: bool = False) -> str:
    """Write ``labels/prediction`` (NGFF image-label of ``prediction/labels``) and the root
    multiscales; "exported", or "unchanged" when it already shows this very prediction.

    The engine calls it after marking a prediction complete (holding the writer's lock);
    ``tilewise export --format zarr`` too (a brief write: it waits for readers of the store).
    ``levels_written``: the engine wrote the unlisted ``labels/prediction`` levels as it went
    (``tasks.engine.label_pyramid``); only its metadata is written and it is listed.
    """
    with storage.store_lock(store, purpose="export", brief=True):
        return _write_prediction_labels(store, force or levels_written, levels_written)


def _write_prediction_labels(store: str, force: bool, levels_written: bool = False) -> str:
    from tasks.export.source import open_source

    src = open_source(store)
    digest = src.prediction_digest()
    group = storage.open_group(src.url, mode="r+")
    if "multiscales" not in group.attrs.get("ome", {}):
        write_root_multiscales(group)  # stores ingested before the root was made readable
    listed = group["labels"].attrs.get("ome", {}).get("labels", []) if "labels" in group else []
    if not force and "prediction" in listed:
        old = group["labels/prediction"].attrs.get(storage.ATTRS_KEY, {})
        if old.get("prediction_digest") == digest and not identity.outdated("export", old):
            return "unchanged"
    attrs = {"kind": "ngff-prediction-labels", "prediction_digest": digest, "model": src.prediction.get("model"),
             "calibrator": src.prediction.get("calibrator"), "from": "prediction/labels",
             "written_at": datetime.now(timezone.utc).isoformat(), **identity.stamp("export")}
    write_label_image(group, "prediction", src.labels, src.classes, attrs, levels_written=levels_written)
    return "exported"
