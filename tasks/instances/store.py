"""Where instance outputs live in a scan group, and when they count as done (README, "Zarr layout").

Beside the semantic prediction, in the scan's ``prediction/`` group:

    prediction/instances          (*spatial) uint32 label image: 0 = background, ids 1..N unique
                                  across the scan, chunked like the image
    prediction/instances.parquet  one row per instance (tasks.instances.table)
    prediction/panoptic           (*spatial) uint32, COCO panoptic segment ids (tasks.instances.panoptic),
                                  only for datasets with both "thing" and "stuff" classes

and, once complete, ``labels/instances``: the NGFF image-label of the ids (napari opens it with
the image and the class labels).

Their record is ``prediction`` attrs["tilewise"]["instances"]: {"source" (detector | components |
watershed), "digest" (what made them: the prediction's digest and the method's parameters),
"params", "complete": {"at", "count", "arrays": {path: shape}}}. The mark is written last, after
the arrays and the table; without it (or with an array missing or reshaped) the instances are
not done and the next run computes them again. Replacing the prediction removes them with it
(tasks/export/ngff.py ``remove_prediction``: ``labels/instances`` is unlisted first). Every
function here that writes is called holding the store's writer lock (tasks/store_lock.py); a
writer takes the mark (and ``labels/instances``) away before it touches an array.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import zarr

from tasks import storage

INSTANCES = "instances"
PANOPTIC = "panoptic"
TABLE = "instances.parquet"
RECORD_KEY = "instances"
MAX_ID = 2**32 - 1  # uint32 label image: 0 is background


def prediction_url(store: str) -> str:
    return f"{str(store).rstrip('/')}/prediction"


def table_url(store: str) -> str:
    return f"{prediction_url(store)}/{TABLE}"


def digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def read_instances_record(store: str) -> dict[str, Any] | None:
    """The instances' record, or None when the prediction or its instances are absent."""
    record = storage.read_record(prediction_url(store))
    if not record:
        return None
    inst = record.get(RECORD_KEY)
    return dict(inst) if isinstance(inst, dict) else None


def instances_complete(store: str, expected_digest: str | None = None) -> bool:
    """True when the instances carry their completion mark, every array it lists is there with its
    shape, the table exists, and (if given) the digest matches."""
    inst = read_instances_record(store)
    if not inst or not inst.get(storage.COMPLETE_KEY):
        return False
    if expected_digest is not None and inst.get("digest") != expected_digest:
        return False
    arrays = inst[storage.COMPLETE_KEY].get(storage.ARRAYS_KEY) or {INSTANCES: None}
    return storage.arrays_match(prediction_url(store), arrays) and storage.exists(table_url(store))


def _set_record(store: str, value: dict[str, Any] | None) -> None:
    group = storage.open_group(prediction_url(store), mode="r+")
    attrs = dict(group.attrs.get(storage.ATTRS_KEY, {}))
    if value is None:
        attrs.pop(RECORD_KEY, None)
    else:
        attrs[RECORD_KEY] = value
    group.attrs[storage.ATTRS_KEY] = attrs


def update_record(store: str, updates: dict[str, Any]) -> dict[str, Any]:
    """Add ``updates`` to the instances' record (panoptic segments, the MLflow run that logged
    them; a key set to None is removed); call it holding the store's lock. Returns the new record."""
    record = read_instances_record(store) or {}
    record.update(updates)
    record = {k: v for k, v in record.items() if v is not None}
    _set_record(store, record)
    return record


def clear_instances(store: str) -> None:
    """Take the mark away first, then delete the instance arrays and the table."""
    from tasks.export.ngff import remove_label_image

    remove_label_image(store, INSTANCES)  # the NGFF view of the old instances goes first
    if read_instances_record(store) is not None:
        _set_record(store, None)
    pred = prediction_url(store)
    for name in (INSTANCES, PANOPTIC, TABLE):
        storage.remove(f"{pred}/{name}")


def create_instances(store: str, shape: tuple[int, ...], chunks: tuple[int, ...], *, source: str,
                     digest_value: str, params: dict[str, Any]) -> zarr.Array:
    """A fresh, empty ``prediction/instances`` (replacing any old one) and its unmarked record."""
    from tasks.ingest.to_zarr import COMPRESSOR

    clear_instances(store)
    group = storage.open_group(prediction_url(store), mode="r+")
    axes = "zyx"[-len(shape):]
    array = group.create_array(INSTANCES, shape=tuple(shape), dtype="uint32", chunks=tuple(chunks),
                               compressors=COMPRESSOR, fill_value=0, dimension_names=tuple(axes))
    _set_record(store, {"source": source, "digest": digest_value, "params": params})
    return array


def mark_instances_complete(store: str, extra: dict[str, Any], arrays: tuple[str, ...] = (INSTANCES,)) -> None:
    """Write the instances' completion mark (call it last: arrays and table written)."""
    if not storage.exists(table_url(store)):
        raise ValueError(f"{table_url(store)}: not marking instances complete: the table is missing")
    group = storage.open_group(prediction_url(store), mode="r")
    shapes = {}
    for path in arrays:
        node = group[path]
        if not isinstance(node, zarr.Array):
            raise ValueError(f"{prediction_url(store)}/{path}: not an array")
        shapes[path] = list(node.shape)
    inst = read_instances_record(store) or {}
    inst[storage.COMPLETE_KEY] = {**extra, storage.ARRAYS_KEY: shapes}
    _set_record(store, inst)


def check_count(store: str, count: int) -> None:
    """ScanError when ``count`` instances cannot be told apart in a uint32 label image."""
    from tasks.errors import ScanError

    if count > MAX_ID:
        raise ScanError(store, f"{count} instances exceed the uint32 label image's {MAX_ID} ids (more than "
                               f"{MAX_ID} instances); raise the minimum size or the score threshold, or split "
                               "the scan")
