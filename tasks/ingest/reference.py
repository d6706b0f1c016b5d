"""The reference labels as an NGFF image-label, ``labels/reference/``, and the migration of stores
ingested before it was one.

Ingest writes level 0 (``labels/reference/0``, uint8 class indices on the image's level-0 grid)
while it streams the label file, then levels 1.. as ``labels/prediction`` has them (the image
pyramid's grid, each level the block mode of the one above: tasks/export/ngff.py), the colour table
and class names, and lists "reference" first in ``labels/``'s ``ome.labels``: an OME-Zarr reader or
napari opened at the root shows image, reference and prediction. Every reader opens level 0
through ``storage.reference``, which also reads the old layout.

Stores ingested before (``labels/reference`` a plain array) are migrated by the next ingest that
finds them unchanged, under the writer's lock it already holds (:func:`migrate_reference`):

1. levels 1.. and the metadata are written into ``labels/reference-migrating/``, read from the old
   array, which stays where it is: the group is complete and readable as before, and a crash
   here leaves only that folder, replaced by the next try;
2. they are checked (every level there with the image's shape);
3. the scan's completion mark is cleared, the old array moved to ``labels/reference-migrating/0``
   and that group to ``labels/reference`` (two renames on a local disk; copies and deletes on object
   storage), "reference" listed, and the mark written again with the same record, listing the new
   arrays.

So the group is complete with the old reference or complete with the new one; a crash inside step
3 leaves it incomplete (no mark), and the next ingest re-ingests it from its sources.
"""

from __future__ import annotations

import logging
from typing import Any

import fsspec
import zarr

from tasks import storage
from tasks.errors import ScanError
from tasks.export.ngff import label_levels, list_label_image, write_label_levels, write_root_multiscales

log = logging.getLogger(__name__)

NAME = "reference"
MIGRATING = "reference-migrating"  # beside labels/reference while the pyramid of an old one is written
KIND = "ngff-reference-labels"


def reference_arrays(group: zarr.Group) -> list[str]:
    """The paths of the reference label image's levels that a scan's completion mark vouches for."""
    return [f"{storage.REFERENCE}/{level}" for level in label_levels(group)]


def _attrs(record: dict[str, Any]) -> dict[str, Any]:
    return {"kind": KIND, **{k: v for k, v in record.items() if k != "kind"}}


def write_reference_levels(group: zarr.Group, record: dict[str, Any]) -> None:
    """After ingest wrote ``labels/reference/0`` and the image's multiscales: levels 1.., the NGFF
    metadata with the classes' colours and names, ``record`` (classes, mapping, source,
    class_voxels) as the label image's tilewise attributes, and "reference" listed first."""
    target = group[storage.REFERENCE]
    write_label_levels(group, target, NAME, target["0"], list(record.get("classes") or []) or None,
                       _attrs(record), copy_level0=False)
    list_label_image(group["labels"], NAME, first=True)


def needs_migration(store: str) -> bool:
    """True when the scan group's reference is the plain array stores had before (metadata only)."""
    return storage.array_shape(f"{str(store).rstrip('/')}/{storage.REFERENCE}") is not None


def migrate_reference(store: str) -> bool:
    """Turn a complete group's plain ``labels/reference`` array into the NGFF label image, in place
    (module docstring: the order that never leaves a mark above a missing reference). The caller
    holds the store's writer lock. True when it migrated, False when there was nothing to do."""
    store = str(store).rstrip("/")
    if not needs_migration(store):
        return False
    record = storage.read_record(store) or {}
    mark = record.get(storage.COMPLETE_KEY)
    if not mark:
        return False  # not complete: the ingest replaces it, nothing to keep
    group = storage.open_group(store, mode="r+")
    if "multiscales" not in group.attrs.get("ome", {}):
        write_root_multiscales(group)  # stores ingested before the root was made readable
    old = group[storage.REFERENCE]
    info = dict(old.attrs.get(storage.ATTRS_KEY, {}))
    labels = group["labels"]
    # 1. the new levels beside the old array; the group stays complete with the old one
    staging = labels.create_group(MIGRATING, overwrite=True)
    write_label_levels(group, staging, NAME, old, list(info.get("classes") or []) or None, _attrs(info),
                       copy_level0=False)
    # 2. check them before the old layout is given up
    levels = label_levels(group)
    image_shapes = {level: list(group[f"image/{level}"].shape[1:]) for level in levels}
    staged = {f"labels/{MIGRATING}/{level}": image_shapes[level] for level in levels[1:]}
    if not storage.arrays_match(store, staged) or list(old.shape) != image_shapes[levels[0]]:
        raise ScanError(store, "migrating labels/reference: the new pyramid is not complete; left as it was")
    # 3. the swap: not complete from here until the new mark
    storage.clear_complete(store)
    fs, root = fsspec.core.url_to_fs(store)
    _move(fs, f"{root}/{storage.REFERENCE}", f"{root}/labels/{MIGRATING}/0")
    _move(fs, f"{root}/labels/{MIGRATING}", f"{root}/{storage.REFERENCE}")
    group = storage.open_group(store, mode="r+")
    level0 = group[f"{storage.REFERENCE}/0"]
    level0.attrs.pop(storage.ATTRS_KEY, None)  # now the label image's, on its group
    list_label_image(group["labels"], NAME, first=True)
    vouched = mark.get(storage.ARRAYS_KEY)
    kept = ([p for p in vouched if p != storage.REFERENCE] if isinstance(vouched, dict)
            else list(storage.LEGACY_PROMISES["scan"]))
    storage.mark_complete(group, {k: v for k, v in mark.items() if k != storage.ARRAYS_KEY},
                          arrays=kept + reference_arrays(group))
    log.info("%s: labels/reference is now an NGFF label image (migrated in place)", store)
    return True


def _move(fs, source: str, target: str) -> None:
    """Move the folder ``source`` to ``target`` (which does not exist): one rename on a local disk;
    on object storage each object copied, then the originals deleted (fsspec's recursive ``mv``
    there also tries to copy the folder's own key, which S3 does not have)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols:
        fs.mv(source, target, recursive=True)
        return
    fs.invalidate_cache(source)  # a listing cached before the pyramid was written would miss objects
    objects = fs.find(source)
    for path in objects:
        fs.copy(path, target + path[len(source):])
    fs.rm(objects)
    fs.invalidate_cache(source)
    fs.invalidate_cache(target)
