"""Panoptic output (Kirillov et al., "Panoptic Segmentation", CVPR 2019): every pixel gets a class
and, for "thing" classes, an instance -- in the COCO panoptic convention of one segment id per
pixel plus a segment list.

``prediction/panoptic`` (uint32, the scan's spatial shape, chunked like the instances): a thing
pixel keeps its instance id (1..N, the ids of ``prediction/instances`` and its table); a pixel of
stuff class k (amorphous: membrane, road, water) gets the one segment id ``N + 1 + r``, r the rank
of k among the stuff classes; anything else (background, a thing pixel no instance kept) is 0,
void. Written chunk by chunk from ``prediction/labels`` and ``prediction/instances``.
"""

from __future__ import annotations


import numpy as np

from tasks import storage
from tasks.instances import store as inst_store


def write_panoptic(store: str, thing_classes: list[int], stuff_classes: list[int]) -> dict:
    """Write ``prediction/panoptic``; returns {"segments": the stuff segments [{id, category_id,
    class_name, isthing}], "things": N (their ids are 1..N, listed in the instance table)}."""
    from tasks.ingest.to_zarr import COMPRESSOR

    pred_url = inst_store.prediction_url(store)
    group = storage.open_group(pred_url, mode="r+")
    instances, labels = group[inst_store.INSTANCES], group["labels"]
    names = list((storage.read_record(pred_url) or {}).get("classes") or [])
    count = int(((inst_store.read_instances_record(store) or {}).get(storage.COMPLETE_KEY) or {}).get("count") or 0)
    stuff = {int(k): count + 1 + r for r, k in enumerate(sorted(set(stuff_classes)))}
    lookup = np.zeros(max([*stuff, *thing_classes, 0]) + 1 if stuff else 1, np.uint32)
    for k, sid in stuff.items():
        lookup[k] = sid
    if inst_store.PANOPTIC in group:
        del group[inst_store.PANOPTIC]
    out = group.create_array(inst_store.PANOPTIC, shape=instances.shape, dtype="uint32", chunks=instances.chunks,
                             compressors=COMPRESSOR, fill_value=0, dimension_names=tuple("zyx"[-instances.ndim:]))
    for box in storage.chunk_boxes(instances.shape, instances.chunks):
        ids = np.asarray(instances[box])
        lab = np.asarray(labels[box]).astype(np.int64)
        stuff_ids = np.where(lab < len(lookup), lookup[np.minimum(lab, len(lookup) - 1)], 0)
        out[box] = np.where(ids > 0, ids, stuff_ids)
    segments = [{"id": sid, "category_id": k, "class_name": names[k] if k < len(names) else f"class_{k}",
                 "isthing": False} for k, sid in stuff.items()]
    return {"segments": segments, "things": count, "thing_classes": list(thing_classes)}
