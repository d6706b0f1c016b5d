"""Evaluate a scan's prediction against its reference labels, in bounded memory.

``evaluate_scan(store)`` reads ``prediction/labels`` and ``prediction/probabilities`` and the
reference (the store's ``labels/reference``, or a label file read with the ingest readers and
mapped with the catalog's ``labels.mapping``; without a catalog entry, label values are class
indices), and computes in one streaming pass over slabs of one chunk row along the first spatial
axis (Z for volumes, one section for EM; Y for rasters), chunk by chunk inside each slab:

- the confusion matrix -> the FCN table, per-class Dice and IoU (tasks/metrics/semantic.py);
- ECE / Brier / NLL of the stored probabilities (tasks/calibration/scores.py);
- for EM with a boundary class (catalog ``labels.boundary_class`` or ``boundary_class=``), the
  ISBI 2012 scores section by section (tasks/metrics/isbi.py); a 2D scan is one section;
- for 3D scans other than EM, HD95 and surface Dice (tasks/metrics/surface.py) on the subsampled
  volumes collected during the pass (level 0 when it has at most ``max_surface_voxels`` voxels);
- the strided mid-planes the overlays draw (tasks/reports/overlay.py).

Memory: one slab of the two label arrays (uint8), one chunk of probabilities (float32), one
section of the boundary probability for EM, and the subsampled volumes (<= ``max_surface_voxels``
each). The result is written into the prediction's attributes (``tilewise.evaluation``) without
touching its completion mark or digest.

Locking (tasks/store_lock.py): the whole read holds the store's lock shared (other readers go on,
no writer starts); the prediction's marks (digest, completion, the instances') are taken at the
start and checked at the end. The record is then written under the brief writer's lock, which
waits for the readers of the same nightly run (an instance-polygon export), and only if the marks
are still the ones read: a prediction replaced in between is never scored under its new mark.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from tasks import identity, storage
from tasks.errors import ScanError
from tasks.metrics.semantic import ConfusionMatrix, json_float, region_scores, semantic_report
from tasks.metrics.surface import DEFAULT_MAX_VOXELS, DEFAULT_TOLERANCE, choose_level, surface_scores

OVERLAY_MAX_PIXELS = 1024


@dataclass
class EvaluationReport:
    """What ``evaluate_scan`` found. ``to_dict()`` is JSON (undefined values are ``null``)."""

    store: str
    scan_id: str
    dataset: str | None
    modality: str | None
    classes: list[str]
    reference: str  # "labels/reference" or the label file
    pixels: int
    semantic: dict
    calibration: dict | None = None
    surface: dict | None = None
    isbi: dict | None = None
    model: str | None = None
    calibrator: Any = None
    prediction_digest: str | None = None
    instances: dict | None = None  # AP / F1 / PQ of prediction/instances (tasks/metrics/instance_eval.py)
    instances_digest: str | None = None  # the instances' digest when they were scored
    settings: dict | None = None  # the catalog settings it read (tasks.identity.scoring_settings)
    # foreground fraction against the model's validation scans (tasks/metrics/drift.py); None when the
    # prediction carries no validation fractions (models trained before they were recorded)
    drift: dict | None = None
    code_version: int = 1  # of the evaluate step (tasks.identity); 1 for reports from before it was recorded
    seconds: float = 0.0
    evaluated_at: str = ""
    # Not JSON: what the reports draw (reliability bins, strided mid-planes and their level).
    extras: dict = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict:
        return jsonable({k: v for k, v in self.__dict__.items() if k != "extras"})

    def flat_metrics(self) -> dict[str, float]:
        """Flat names for MLflow: ``mean_iou``, ``dice_<class>``, ``hd95_<class>``, ``ece`` ...;
        undefined values are left out."""
        flat: dict[str, Any] = {k: v for k, v in self.semantic.items() if not isinstance(v, (dict, list, str))}
        for name, per in self.semantic["per_class"].items():
            flat[f"dice_{name}"], flat[f"iou_{name}"] = per["dice"], per["iou"]
        for name, per in self.semantic.get("regions", {}).items():
            flat[f"region_dice_{name}"], flat[f"region_iou_{name}"] = per["dice"], per["iou"]
        for name, per in (self.surface or {}).get("per_class", {}).items():
            flat[f"hd95_{name}"], flat[f"surface_dice_{name}"] = per["hd95"], per["surface_dice"]
        for key in ("ece", "brier", "nll"):
            flat[key] = (self.calibration or {}).get(key)
        for key, value in (self.isbi or {}).items():
            if isinstance(value, (int, float)) and key != "sections":
                flat[f"isbi_{key}"] = value
        for key in ("ap", "ap50", "ap75", "f1", "precision", "recall", "pq", "sq", "rq"):
            flat[f"instances_{key}"] = (self.instances or {}).get(key)
        if self.drift is not None:  # 1 when the foreground fraction is far outside the validation's
            flat["foreground_fraction"] = self.drift["fraction"]
            flat["drift"] = float(self.drift["far"])
        return {_metric_name(k): float(v) for k, v in flat.items()
                if isinstance(v, (int, float)) and v is not None and math.isfinite(v)}


def _metric_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def jsonable(value: Any) -> Any:
    """Numpy scalars and arrays to Python, NaN/inf to None, recursively."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return json_float(value)
    return value


class _Subsample:
    """Every f-th voxel (per axis) of a (Z, Y, X) or (Y, X) array that arrives in slabs along the
    first axis; ``fix`` pins axes to one index (a mid-plane)."""

    def __init__(self, shape: tuple[int, ...], factors: tuple[int, ...], fix: dict[int, int] | None = None):
        self.fix = fix or {}
        self.factors = factors
        out_shape = [-(-n // f) for a, (n, f) in enumerate(zip(shape, factors)) if a not in self.fix]
        self.data = np.zeros(out_shape, dtype=np.uint8)

    def add(self, start: int, slab: np.ndarray) -> None:
        f0 = self.factors[0]
        if 0 in self.fix:
            z = self.fix[0]
            if start <= z < start + slab.shape[0]:
                self.data[...] = slab[(z - start,) + self._rest()]
            return
        first = -(-start // f0) * f0  # first kept row in this slab
        rows = slab[first - start::f0]
        self.data[first // f0: first // f0 + rows.shape[0]] = rows[(slice(None),) + self._rest()]

    def _rest(self) -> tuple:
        return tuple(self.fix[a] if a in self.fix else slice(None, None, self.factors[a])
                     for a in range(1, len(self.factors)))


def _pyramid(group, record: dict) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Spatial shapes of the image pyramid levels and each level's total factor from level 0."""
    from tasks.ingest.pyramid import plan_pyramid

    levels = sorted((k for k in group["image"].array_keys() if k.isdigit()), key=int)
    shapes = [tuple(group[f"image/{k}"].shape[1:]) for k in levels]
    plan = plan_pyramid(shapes[0], record.get("spacing"), tuple(record.get("chunks", [1, *shapes[0]])[1:]))
    if [tuple(s) for s in plan.shapes[: len(shapes)]] != shapes:  # not our pyramid: derive from shapes
        return shapes, [tuple(max(1, round(a / b)) for a, b in zip(shapes[0], s)) for s in shapes]
    totals, acc = [], (1,) * len(shapes[0])
    totals.append(acc)
    for f in plan.factors[: len(shapes) - 1]:
        acc = tuple(a * b for a, b in zip(acc, f))
        totals.append(acc)
    return shapes, totals


def _overlay_level(shapes: list[tuple[int, ...]]) -> int:
    for level, shape in enumerate(shapes):
        if max(shape) <= OVERLAY_MAX_PIXELS:
            return level
    return len(shapes) - 1


class _FileReference:
    """Reference labels from a file (ingest readers), mapped to class indices slab by slab."""

    def __init__(self, path: Path, modality: str, mapping: dict[int, int] | None, classes: int,
                 shape: tuple[int, ...]):
        from tasks.ingest.readers import default_reader_kind, open_reader

        self.path, self.mapping, self.classes = Path(path), mapping, classes
        self.reader = open_reader([self.path], default_reader_kind(modality, [self.path]))
        spatial = tuple(self.reader.shape[1:])
        if spatial != tuple(shape) or self.reader.shape[0] != 1:
            self.reader.close()
            channels = f" with {self.reader.shape[0]} channels" if self.reader.shape[0] != 1 else ""
            raise ScanError(self.path, f"labels of shape {spatial}{channels} do not match the prediction's "
                                       f"shape {tuple(shape)}")

    def read(self, start: int, stop: int) -> np.ndarray:
        values = self.reader.read_slab(start, stop)[0]
        uniq, inverse = np.unique(values, return_inverse=True)
        if self.mapping is None:
            bad = [v for v in uniq if not float(v).is_integer() or not 0 <= v < self.classes]
            if bad:
                raise ScanError(self.path, f"label values {_show(bad)} are outside the class indices "
                                           f"0..{self.classes - 1} (no catalog mapping: values are class indices)")
            return values.astype(np.uint8)
        bad = [v for v in uniq if not float(v).is_integer() or int(v) not in self.mapping]
        if bad:
            raise ScanError(self.path, f"label values {_show(bad)} are not in the label mapping "
                                       f"({', '.join(str(k) for k in sorted(self.mapping))})")
        lut = np.array([self.mapping[int(v)] for v in uniq], dtype=np.uint8)
        return lut[inverse].reshape(values.shape)

    def close(self) -> None:
        self.reader.close()


def _show(values) -> str:
    values = [int(v) if float(v).is_integer() else float(v) for v in values]
    return ", ".join(str(v) for v in values[:10]) + (" ..." if len(values) > 10 else "")


def _entry_of(entry):
    return getattr(entry, "entry", entry)  # a LoadedEntry or a CatalogEntry


def evaluate_scan(store: str, labels_path: str | Path | None = None, entry=None, boundary_class: str | None = None,
                  *, tolerance: float = DEFAULT_TOLERANCE, max_surface_voxels: int = DEFAULT_MAX_VOXELS,
                  write: bool = True) -> EvaluationReport:
    """Score ``store``'s complete prediction against its reference (module docstring).

    ``entry``: the dataset's catalog entry (``CatalogEntry`` or ``LoadedEntry``), for the label
    mapping, class names and boundary class; ``tolerance``: surface Dice tolerance in the scan's
    unit. Raises :class:`ScanError` (one line) for bad input, :class:`storage.StoreBusy` when
    another run writes the store."""
    store = str(store).rstrip("/")
    pred_url = f"{store}/prediction"
    if not storage.exists(store):  # no lock file beside a store that is not there
        raise ScanError(store, "is not a complete scan group (no completion mark): ingest it first")
    with storage.store_lock(store, purpose="evaluate", shared=True):
        read = storage.marks(storage.read_record(pred_url))
        report = _evaluate(store, labels_path, entry, boundary_class, tolerance=tolerance,
                           max_surface_voxels=max_surface_voxels, write=False)
        storage.check_marks(pred_url, read, "evaluated")
    if write:
        write_evaluation(pred_url, report, read)
    return report


def _evaluate(store: str, labels_path: str | Path | None = None, entry=None, boundary_class: str | None = None,
              *, tolerance: float = DEFAULT_TOLERANCE, max_surface_voxels: int = DEFAULT_MAX_VOXELS,
              write: bool = True) -> EvaluationReport:
    """:func:`evaluate_scan`'s work, under the store's shared lock."""
    t0 = time.perf_counter()
    store = str(store).rstrip("/")
    entry = _entry_of(entry)
    record = storage.read_record(store)
    if not record or not record.get(storage.COMPLETE_KEY):
        raise ScanError(store, "is not a complete scan group (no completion mark): ingest it first")
    pred_url = f"{store}/prediction"
    pred_record = storage.read_record(pred_url)
    if not pred_record or not pred_record.get(storage.COMPLETE_KEY):
        raise ScanError(store, "has no complete prediction (prediction/ missing or unfinished): run tilewise infer")
    group = storage.open_group(store)
    labels = group["prediction/labels"]
    # an instance model's prediction has class labels and instances, no probabilities
    probs = group["prediction/probabilities"] if "probabilities" in group["prediction"] else None
    shape, ndim = tuple(labels.shape), labels.ndim
    single = probs is not None and probs.shape[0] == 1  # one output channel: foreground probability
    k = 2 if single else (probs.shape[0] if probs is not None else len(pred_record.get("classes") or []) or 2)
    names = list(pred_record.get("classes") or [])
    if single:
        names = [f"not_{names[0]}" if names else "background", names[0] if names else "foreground"]
    if entry is not None and entry.labels is not None and len(entry.labels.classes) == k:
        names = list(entry.labels.classes)
    if len(names) != k:
        names = [f"class_{i}" for i in range(k)]
    modality = record.get("modality") or (entry.modality if entry is not None else None)

    if labels_path is not None:
        mapping = dict(entry.labels.mapping) if entry is not None and entry.labels is not None else None
        reference = _FileReference(Path(labels_path), modality or "em", mapping, k, shape)
        reference_name, read_reference = str(labels_path), reference.read
    elif (ref_array := storage.reference(group)) is not None:
        if tuple(ref_array.shape) != shape:
            raise ScanError(store, f"labels/reference has shape {tuple(ref_array.shape)} but the prediction has "
                                   f"shape {shape}")
        reference, reference_name = None, storage.REFERENCE

        def read_reference(a: int, b: int) -> np.ndarray:
            return ref_array[a:b]
    else:
        raise ScanError(store, "has no reference labels (labels/reference); pass --labels PATH")

    settings = identity.scoring_settings(entry)
    if boundary_class is not None:
        settings["boundary_class"] = boundary_class
    boundary_class = boundary_class or (entry.labels.boundary_class if entry is not None and entry.labels else None)
    boundary = None
    if boundary_class is not None:
        if boundary_class not in names:
            raise ScanError(store, f"boundary class {boundary_class!r} is not one of the classes ({', '.join(names)})")
        boundary = names.index(boundary_class)
    do_surface = ndim == 3 and modality != "em" and boundary is None

    shapes, factors = _pyramid(group, record)
    overlay_level = _overlay_level(shapes)
    of = factors[overlay_level]
    mids = [n // 2 for n in shapes[overlay_level]]
    plane_fix = [{0: mids[0] * of[0]}, {1: mids[1] * of[1]}, {2: mids[2] * of[2]}] if ndim == 3 else [{}]
    planes = {which: [_Subsample(shape, of, fix) for fix in plane_fix] for which in ("reference", "prediction")}
    surface_level = choose_level(shapes, max_surface_voxels) if do_surface else None
    volumes = ({which: _Subsample(shape, factors[surface_level]) for which in ("reference", "prediction")}
               if do_surface else None)

    from tasks.calibration.scores import ReliabilityBins

    confusion, bins = ConfusionMatrix(k), ReliabilityBins()
    isbi = None
    if boundary is not None and probs is not None:
        from tasks.metrics.isbi import IsbiStackScores

        isbi = IsbiStackScores()
    chunks = tuple(labels.chunks)
    step = shape[0] if (boundary is not None and ndim == 2) else chunks[0]
    try:
        for start in range(0, shape[0], step):
            stop = min(start + step, shape[0])
            ref_slab = np.asarray(read_reference(start, stop))
            pred_slab = np.asarray(labels[start:stop])
            grid = [range(0, n, c) for n, c in zip(shape[1:], chunks[1:])]
            for corner in np.ndindex(*[len(g) for g in grid]):
                box = tuple(slice(g[i], g[i] + c) for g, i, c in zip(grid, corner, chunks[1:]))
                ref, pred = ref_slab[(slice(None),) + box], pred_slab[(slice(None),) + box]
                try:
                    confusion.update(ref, pred)
                except ValueError as exc:
                    where = reference_name if "reference" in str(exc) else f"{store}/prediction/labels"
                    raise ScanError(where, f"slab {start}-{stop}: {exc}") from None
                if probs is None:
                    continue
                p = np.asarray(probs[(slice(None), slice(start, stop)) + box], dtype=np.float32).reshape(probs.shape[0], -1)
                if np.isnan(p).any():
                    raise ScanError(f"{store}/prediction/probabilities",
                                    f"contains NaN (in the chunk at {(start, *(s.start for s in box))})")
                if single:
                    p = np.concatenate([1.0 - p, p])
                bins.update(p, ref.reshape(-1).astype(np.int64))
            if isbi is not None:
                for z in range(start, stop) if ndim == 3 else [None]:
                    section = (z,) if z is not None else ()
                    p = np.asarray(probs[(0 if single else boundary,) + section], dtype=np.float32)
                    if single and boundary == 0:
                        p = 1.0 - p
                    ref_section = ref_slab[z - start] if z is not None else ref_slab
                    isbi.update(np.clip(p, 0.0, 1.0), ref_section == boundary)
            for which, slab in (("reference", ref_slab), ("prediction", pred_slab)):
                for plane in planes[which]:
                    plane.add(start, slab)
                if volumes is not None:
                    volumes[which].add(start, slab)
    finally:
        if reference is not None:
            reference.close()

    surface = None
    if volumes is not None:
        spacing0 = record.get("spacing") or [1.0] * ndim
        spacing = [float(s) * f for s, f in zip(spacing0, factors[surface_level])]
        scores = surface_scores(volumes["reference"].data, volumes["prediction"].data, range(1, k), spacing, tolerance)
        surface = {"tolerance": tolerance, "unit": record.get("unit") or ("voxel" if not record.get("spacing") else None),
                   "surface_level": surface_level, "surface_spacing": spacing,
                   "surface_shape": list(volumes["reference"].data.shape),
                   "note": ("computed at full resolution" if surface_level == 0 else
                            f"volume over {max_surface_voxels} voxels: computed on pyramid level {surface_level}, "
                            f"labels subsampled by striding"),
                   "per_class": {names[c]: {"hd95": json_float(v["hd95"]), "surface_dice": json_float(v["surface_dice"])}
                                 for c, v in scores.items()}}

    calibration = ({k2: json_float(v) if isinstance(v, float) else v for k2, v in bins.scores().items()}
                   if probs is not None else None)
    instances, instances_digest = _instance_scores(store, group, record, pred_record, entry, names, reference_name)
    from tasks.metrics.drift import foreground_drift

    predicted = confusion.matrix.sum(axis=0)  # per predicted class
    drift = foreground_drift(float(predicted[1:].sum() / max(predicted.sum(), 1)),
                             pred_record.get("validation_foreground"))
    report = EvaluationReport(
        store=store, scan_id=record.get("scan_id") or Path(store).name.removesuffix(".zarr"),
        dataset=record.get("dataset") or (entry.name if entry is not None else None), modality=modality,
        classes=names, reference=reference_name, pixels=confusion.pixels,
        semantic=_semantic(confusion.matrix, names, entry), calibration=calibration, surface=surface,
        isbi=jsonable(isbi.result()) if isbi is not None else None, model=pred_record.get("model"),
        calibrator=pred_record.get("calibrator"), prediction_digest=pred_record.get("digest"),
        instances=instances, instances_digest=instances_digest, settings=settings,
        drift=drift.record() if drift is not None else None,
        code_version=identity.code_version("evaluate"), seconds=time.perf_counter() - t0, evaluated_at=datetime.now(timezone.utc).isoformat(),
        extras={"bins": bins, "overlay_level": overlay_level, "overlay_factors": of,
                "planes": {w: [p.data for p in ps] for w, ps in planes.items()}},
    )
    if write:
        write_evaluation(pred_url, report)
    return report


def _semantic(matrix: np.ndarray, names: list[str], entry) -> dict:
    """The FCN table and per-class scores, and the catalog's ``labels.regions`` (unions of classes)."""
    report = semantic_report(matrix, names)
    regions = entry.labels.regions if entry is not None and entry.labels is not None else None
    if regions:
        report["regions"] = region_scores(matrix, {name: [names.index(c) for c in members if c in names]
                                                   for name, members in regions.items()})
    return report


def _instance_scores(store: str, group, record: dict, pred_record: dict, entry, names: list[str],
                     reference_name: str) -> tuple[dict | None, str | None]:
    """AP / F1 / PQ of the scan's instances against connected components of the reference's thing
    classes (the catalog's ``labels.instance_classes``, default every class but the first; stuff:
    ``labels.stuff_classes``), when the instances are complete and the reference is the store's."""
    from tasks.instances import store as inst_store

    inst = pred_record.get(inst_store.RECORD_KEY) or {}
    if not inst_store.instances_complete(store) or reference_name != storage.REFERENCE:
        return None, None
    ref_names = list(entry.labels.classes) if entry is not None and entry.labels is not None else list(names)
    thing_names = (entry.labels.instance_classes if entry is not None and entry.labels is not None else None) \
        or (inst.get("params") or {}).get("classes") or ref_names[1:]
    stuff_names = (entry.labels.stuff_classes if entry is not None and entry.labels is not None else None) or []
    reference = storage.reference(group)
    from tasks.instances.from_semantic import _per_section_default
    from tasks.metrics.instance_eval import evaluate_instances

    per_section = reference.ndim == 3 and (record.get("modality") == "em" or _per_section_default(pred_record, 3))
    scores = evaluate_instances(store, reference, things=[ref_names.index(n) for n in thing_names if n in ref_names],
                                stuff=[ref_names.index(n) for n in stuff_names if n in ref_names],
                                per_section=per_section, names=ref_names)
    return jsonable(scores), inst.get("digest")


def write_evaluation(pred_url: str, report: EvaluationReport, read: dict | None = None) -> None:
    """Put the report into ``prediction`` attrs["tilewise"]["evaluation"]; the completion mark and
    the digest stay as they are. Holds the store's brief writer lock (it waits for readers).
    Refuses if the prediction changed while it was evaluated: another digest, no mark, or marks
    other than ``read`` (``storage.marks`` of the record the evaluation read)."""
    store = pred_url.rstrip("/").removesuffix("/prediction")
    with storage.store_lock(store, purpose="evaluate", brief=True):
        group = storage.open_group(pred_url, mode="r+")
        attrs = dict(group.attrs.get(storage.ATTRS_KEY, {}))
        if attrs.get("digest") != report.prediction_digest or not attrs.get(storage.COMPLETE_KEY) or (
                read is not None and storage.marks(attrs) != read):
            raise ScanError(pred_url, "the prediction changed while it was being evaluated; evaluate again")
        attrs["evaluation"] = report.to_dict()
        group.attrs[storage.ATTRS_KEY] = attrs
