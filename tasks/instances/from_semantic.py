"""Instances out of a complete semantic prediction: the step the flows call.

``components``: connected components of each instance class of ``prediction/labels``
(tasks/instances/components.py), out of core. ``watershed``: EM cells by a seeded watershed of the
calibrated membrane probability (tasks/instances/watershed.py). Either way the result is
``prediction/instances`` (uint32, ids 1..N) and its table, then the completion mark
(tasks/instances/store.py). Work is decided from a digest: the prediction's digest and completion
time, the method and its parameters; instances made from the same is ``unchanged``.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from tasks import identity, storage
from tasks.errors import ScanError
from tasks.instances import store as inst_store


def _per_section_default(record: dict[str, Any], ndim: int) -> bool:
    """A 3D stack predicted by a 2D model (tiles of depth 1) is labelled section by section."""
    tile = (record.get("params") or {}).get("tile") or []
    return ndim == 3 and len(tile) == 3 and int(tile[0]) == 1


def instances_from_prediction(store: str, *, method: str = "components", classes: list[str] | None = None,
                              min_size: int = 16, per_section: bool | None = None,
                              membrane_class: str | None = None, seed_threshold: float = 0.3,
                              median: int = 0) -> dict[str, Any]:
    """Compute (or find up to date) the instances of ``store``'s prediction. ``classes``: names of
    the classes whose objects to label (default: every class but the first); ``membrane_class``:
    the watershed's boundary class (default: the prediction's class named ``membrane``).
    Returns {status: computed | unchanged, method, count, seconds}.

    "Unchanged" is decided holding the store's lock shared (beside exports and evaluations); the
    work, and the decision again, under the writer's lock: the prediction it reads and the digest
    it records are those of one and the same record."""
    t0 = time.perf_counter()
    store = str(store).rstrip("/")
    if method not in ("components", "watershed"):
        raise ScanError(store, f"unknown instance method {method!r}: components or watershed")
    options = dict(method=method, classes=classes, min_size=min_size, per_section=per_section,
                   membrane_class=membrane_class, seed_threshold=seed_threshold, median=median)
    if not storage.exists(store):  # no lock file beside a store that is not there
        raise ScanError(store, "has no complete prediction: run tilewise infer first")
    with storage.store_lock(store, purpose="instances", shared=True):
        found = _instances(store, t0, compute=False, **options)
    if found is not None:
        return found
    with storage.store_lock(store, purpose="instances"):
        return _instances(store, t0, compute=True, **options)


def _instances(store: str, t0: float, *, compute: bool, method: str, classes: list[str] | None, min_size: int,
               per_section: bool | None, membrane_class: str | None, seed_threshold: float, median: int
               ) -> dict[str, Any] | None:
    """The result when the instances are up to date (or the model's own); else, with ``compute``,
    compute them (the caller holds the writer's lock), without it None."""
    pred_url = inst_store.prediction_url(store)
    if not storage.is_complete(pred_url):
        raise ScanError(store, "has no complete prediction: run tilewise infer first")
    record = storage.read_record(pred_url) or {}
    if record.get("mode") == "instances":  # an instance model made them already
        count = ((record.get(inst_store.RECORD_KEY) or {}).get(storage.COMPLETE_KEY) or {}).get("count")
        return {"status": "unchanged", "method": "detector", "count": count, "seconds": 0.0,
                "message": "made by the instance model"}
    names = list(record.get("classes") or [])
    chosen = list(classes) if classes else names[1:]
    unknown = [c for c in chosen if c not in names]
    if unknown:
        raise ScanError(store, f"classes {unknown} are not in the prediction's classes {names}")
    group = storage.open_group(pred_url, mode="r")
    labels = group["labels"]
    ndim = labels.ndim
    section = _per_section_default(record, ndim) if per_section is None else bool(per_section)
    params: dict[str, Any] = {"method": method, "classes": chosen, "min_size": int(min_size), "per_section": section}
    if method == "watershed":
        membrane = membrane_class or ("membrane" if "membrane" in names else None)
        if membrane not in names:
            raise ScanError(store, f"watershed needs a membrane class among {names}; got {membrane!r}")
        if "probabilities" not in group:
            raise ScanError(store, "watershed needs prediction/probabilities (the membrane probability)")
        params.update({"membrane_class": membrane, "seed_threshold": float(seed_threshold)})
        if median > 1:  # only then: digests of instances made without it stay what they were
            params["median"] = int(median)
    digest = identity.instances_digest(record, params)
    if inst_store.instances_complete(store, digest) and not identity.outdated(
            "instances", inst_store.read_instances_record(store)):
        count = inst_store.read_instances_record(store)[storage.COMPLETE_KEY].get("count")
        return {"status": "unchanged", "method": method, "count": count, "seconds": time.perf_counter() - t0}
    if not compute:
        return None
    from tasks.instances.table import instance_table, write_table

    out = inst_store.create_instances(store, labels.shape, labels.chunks, source=method, digest_value=digest,
                                      params=params)
    inst_store.update_record(store, identity.stamp("instances"))
    if method == "components":
        from tasks.instances.components import label_components

        count = label_components(labels, [names.index(c) for c in chosen], out, min_size=int(min_size),
                                 per_section=section, where=store)
    else:
        from tasks.instances.watershed import watershed_cells

        count = watershed_cells(group["probabilities"], names.index(params["membrane_class"]), out,
                                seed_threshold=float(seed_threshold), min_size=int(min_size), where=store,
                                median=int(median))
    write_table(store, instance_table(store))
    inst_store.mark_instances_complete(store, {"at": datetime.now(timezone.utc).isoformat(), "count": count})
    from tasks.export.ngff import write_instances_ngff

    write_instances_ngff(store)  # napari: the objects beside the image and the class labels
    return {"status": "computed", "method": method, "count": count, "seconds": time.perf_counter() - t0}
