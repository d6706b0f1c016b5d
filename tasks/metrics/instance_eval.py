"""Instance scores of a whole scan, out of core: COCO AP / AP50 / AP75, F1 at IoU 0.5, PQ / SQ / RQ.

Everything comes from one chunked pass over the reference and predicted instance images (uint32,
0 = background): the area of every instance and the intersection of every overlapping (reference,
prediction) pair -- a contingency table of O(objects) entries, never a dense mask per object.
From it:

- **AP, AP50, AP75** (the COCO detection challenge's mask AP, Lin et al. ECCV 2014): pycocotools'
  ``COCOeval`` does the ranking, matching and 101-point precision averaging, with the mask IoUs
  handed to it from the table (``computeIoU`` overridden; areas from the table; area range "all";
  up to 10^6 detections per image; class-agnostic, as ``tasks.metrics.instances.coco_ap``).
- **F1 at IoU 0.5**: one-to-one matches among the pairs with IoU >= 0.5 (pycocotools' and
  ``tasks.metrics.instances.f1_at_iou``'s threshold). Above 0.5 a pair is unique (Kirillov et al.,
  "Panoptic Segmentation", CVPR 2019, Theorem 1); only pairs at exactly 0.5 can compete, so the
  Hungarian assignment (scipy) runs on the few candidate pairs only. Precision = TP / predicted,
  recall = TP / reference.
- **PQ, SQ, RQ** (Kirillov et al.): per thing class, matches of the same class with IoU > 0.5;
  SQ = mean IoU of the matches, RQ = TP / (TP + FP/2 + FN/2), PQ = SQ x RQ. Stuff classes count
  one segment per class per image (their pixels in the class maps). Overall = mean over classes.

An "image" is the whole scan, or with ``per_section`` each Z section of a stack (ISBI 2012 cells
are 2D objects). pycocotools needs the IoUs of one image as a dense (detections x references)
matrix; the COCO metrics are therefore limited to ~10^4 x 10^4 objects per image (memory), the
others are not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from models.quiet import quiet
from tasks import storage


@dataclass
class Contingency:
    """Per image: instance areas and pair intersections."""

    ref_area: dict[tuple[int, int], int]  # (image, id) -> pixels
    pred_area: dict[tuple[int, int], int]
    inter: dict[tuple[int, int, int], int]  # (image, ref id, pred id) -> pixels

    def iou(self, image: int, r: int, p: int) -> float:
        i = self.inter.get((image, r, p), 0)
        return i / (self.ref_area[(image, r)] + self.pred_area[(image, p)] - i) if i else 0.0


def _add(target: dict, keys: np.ndarray, counts: np.ndarray) -> None:
    for key, n in zip(map(tuple, keys.T.tolist()), counts.tolist()):
        target[key] = target.get(key, 0) + int(n)


def contingency(reference, prediction, per_section: bool = False) -> Contingency:
    """One pass over the two instance images (zarr arrays or numpy), chunk by chunk (the
    prediction's chunks)."""
    shape = tuple(prediction.shape)
    if tuple(reference.shape) != shape:
        raise ValueError(f"reference shape {tuple(reference.shape)} != prediction shape {shape}")
    chunks = tuple(getattr(prediction, "chunks", shape))
    out = Contingency({}, {}, {})
    for box in storage.chunk_boxes(shape, chunks):
        r = np.asarray(reference[box]).astype(np.int64)
        p = np.asarray(prediction[box]).astype(np.int64)
        if not (r.any() or p.any()):
            continue
        image = (np.arange(box[0].start, box[0].stop)[:, None, None] * np.ones_like(r)) if per_section \
            else np.zeros_like(r)
        for ids, area in ((r, out.ref_area), (p, out.pred_area)):
            fg = ids > 0
            if fg.any():
                keys, counts = np.unique(np.stack([image[fg], ids[fg]]), axis=1, return_counts=True)
                _add(area, keys, counts)
        both = (r > 0) & (p > 0)
        if both.any():
            keys, counts = np.unique(np.stack([image[both], r[both], p[both]]), axis=1, return_counts=True)
            _add(out.inter, keys, counts)
    return out


def coco_from_contingency(table: Contingency, scores: dict[int, float] | None = None) -> dict[str, float]:
    """COCO AP / AP50 / AP75 (class-agnostic) by pycocotools with the table's IoUs."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = sorted({k[0] for k in table.ref_area} | {k[0] for k in table.pred_area})
    if not table.ref_area:
        return {"ap": math.nan, "ap50": math.nan, "ap75": math.nan}
    if not table.pred_area:
        return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    gt_anns, dt_anns, gt_ids, dt_ids = [], [], {}, {}
    for (img, r), area in sorted(table.ref_area.items()):
        gt_ids[len(gt_anns) + 1] = (img, r)
        gt_anns.append({"id": len(gt_anns) + 1, "image_id": img, "category_id": 1, "area": float(area),
                        "bbox": [0, 0, 1, 1], "iscrowd": 0})
    for (img, p), area in sorted(table.pred_area.items()):
        dt_ids[len(dt_anns) + 1] = (img, p)
        dt_anns.append({"id": len(dt_anns) + 1, "image_id": img, "category_id": 1, "area": float(area),
                        "bbox": [0, 0, 1, 1], "iscrowd": 0, "score": float((scores or {}).get(p, 1.0))})
    info = {"images": [{"id": i} for i in images], "categories": [{"id": 1, "name": "instance"}]}

    class _Eval(COCOeval):
        def computeIoU(self, img_id, cat_id):  # noqa: N802  (pycocotools' name)
            gts, dts = self._gts[img_id, cat_id], self._dts[img_id, cat_id]
            if not gts or not dts:
                return []
            order = np.argsort([-d["score"] for d in dts], kind="mergesort")
            dts = [dts[i] for i in order][: self.params.maxDets[-1]]
            return np.array([[table.iou(img_id, gt_ids[g["id"]][1], dt_ids[d["id"]][1]) for g in gts] for d in dts])

    with quiet():  # pycocotools prints its progress
        gt, dt = COCO(), COCO()
        gt.dataset = {**info, "annotations": gt_anns}
        dt.dataset = {**info, "annotations": dt_anns}
        gt.createIndex()
        dt.createIndex()
        ev = _Eval(gt, dt, iouType="bbox")  # bbox: no mask conversion; the IoUs are ours
        ev.params.maxDets = [1, 100, 10**6]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ap, ap50, ap75 = (float(v) for v in ev.stats[:3])
    return {k: (v if v >= 0 else math.nan) for k, v in (("ap", ap), ("ap50", ap50), ("ap75", ap75))}


def matches(table: Contingency, threshold: float = 0.5) -> list[tuple[int, int, int, float]]:
    """(image, ref id, pred id, IoU) of every pair with IoU > ``threshold`` (>= 0.5: one-to-one)."""
    out = []
    for (img, r, p) in table.inter:
        iou = table.iou(img, r, p)
        if iou > threshold:
            out.append((img, r, p, iou))
    return out


def f1_from_contingency(table: Contingency, threshold: float = 0.5) -> dict[str, float]:
    from scipy.optimize import linear_sum_assignment

    pairs = [(img, r, p, table.iou(img, r, p)) for (img, r, p) in table.inter]
    sure = [c for c in pairs if c[3] > max(threshold, 0.5)]  # unique partners (Theorem 1)
    taken_r, taken_p = {(c[0], c[1]) for c in sure}, {(c[0], c[2]) for c in sure}
    ties = [c for c in pairs if threshold <= c[3] <= max(threshold, 0.5)
            and (c[0], c[1]) not in taken_r and (c[0], c[2]) not in taken_p]
    tp = len(sure)
    if ties:  # IoU exactly 0.5 (or a threshold below 0.5): assign these few one to one
        rows = {key: i for i, key in enumerate(sorted({(c[0], c[1]) for c in ties}))}
        cols = {key: i for i, key in enumerate(sorted({(c[0], c[2]) for c in ties}))}
        weights = np.zeros((len(rows), len(cols)))
        for img, r, p, iou in ties:
            weights[rows[(img, r)], cols[(img, p)]] = iou
        r_idx, c_idx = linear_sum_assignment(-weights)
        tp += int(np.sum(weights[r_idx, c_idx] >= threshold))
    n_ref, n_pred = len(table.ref_area), len(table.pred_area)
    if not n_ref and not n_pred:
        return {"precision": math.nan, "recall": math.nan, "f1": math.nan, "tp": 0, "reference": 0, "predicted": 0}
    return {"precision": tp / n_pred if n_pred else 0.0, "recall": tp / n_ref if n_ref else 0.0,
            "f1": 2 * tp / (n_ref + n_pred), "tp": tp, "reference": n_ref, "predicted": n_pred}


def pq_scores(tp_ious: list[float], fp: int, fn: int) -> dict[str, float]:
    """Kirillov et al.'s PQ, SQ, RQ for one class; NaN when the class has no segment at all."""
    tp = len(tp_ious)
    if tp + fp + fn == 0:
        return {"pq": math.nan, "sq": math.nan, "rq": math.nan, "tp": 0, "fp": 0, "fn": 0}
    sq = float(np.mean(tp_ious)) if tp else 0.0
    rq = tp / (tp + 0.5 * fp + 0.5 * fn)
    return {"pq": sq * rq, "sq": sq, "rq": rq, "tp": tp, "fp": fp, "fn": fn}


def panoptic_quality(table: Contingency, ref_class: dict[int, int] | None = None,
                     pred_class: dict[int, int] | None = None, stuff: dict[int, Contingency] | None = None
                     ) -> dict:
    """PQ / SQ / RQ per thing class (``ref_class`` / ``pred_class``: id -> class; default one class
    0) and per stuff class (``stuff[k]``: the contingency of class k's one segment per image), and
    their mean over classes."""
    ref_class, pred_class = ref_class or {}, pred_class or {}
    per: dict[int, dict] = {}
    classes = sorted({ref_class.get(r, 0) for _, r in table.ref_area} | {pred_class.get(p, 0) for _, p in table.pred_area})
    matched = [(img, r, p, iou) for img, r, p, iou in matches(table) if ref_class.get(r, 0) == pred_class.get(p, 0)]
    for c in classes:
        ious = [iou for _, r, _, iou in matched if ref_class.get(r, 0) == c]
        n_ref = sum(1 for _, r in table.ref_area if ref_class.get(r, 0) == c)
        n_pred = sum(1 for _, p in table.pred_area if pred_class.get(p, 0) == c)
        per[c] = {**pq_scores(ious, n_pred - len(ious), n_ref - len(ious)), "isthing": True}
    for c, t in (stuff or {}).items():
        ious = [iou for *_, iou in matches(t)]
        per[c] = {**pq_scores(ious, len(t.pred_area) - len(ious), len(t.ref_area) - len(ious)), "isthing": False}
    defined = [v for v in per.values() if not math.isnan(v["pq"])]
    overall = {k: float(np.mean([v[k] for v in defined])) if defined else math.nan for k in ("pq", "sq", "rq")}
    things = [v for v in defined if v["isthing"]]
    overall.update({f"{k}_things": float(np.mean([v[k] for v in things])) if things else math.nan
                    for k in ("pq", "sq", "rq")})
    return {**overall, "per_class": per}


class _Equals:
    """``array == value`` as uint8, read lazily box by box (a stuff class as one segment)."""

    def __init__(self, array, value: int):
        self.array, self.value = array, int(value)
        self.shape, self.chunks = tuple(array.shape), tuple(array.chunks)

    def __getitem__(self, box):
        return (np.asarray(self.array[box]) == self.value).astype(np.uint8)


def evaluate_instances(store: str, reference, *, things: list[int], stuff: list[int] | None = None,
                       per_section: bool = False, names: list[str] | None = None, min_size: int = 1) -> dict:
    """Instance scores of ``store``'s complete ``prediction/instances`` against reference instances
    = connected components of the ``things`` classes of ``reference`` (a class map, zarr array,
    labelled out of core into a temporary Zarr array; per section for ``per_section`` stacks).
    ``stuff``: classes scored as one segment per image. Class indices are the reference's."""
    import shutil
    import tempfile
    from pathlib import Path

    import pyarrow.parquet as pq
    import zarr

    from tasks.instances import store as inst_store
    from tasks.instances.components import label_components

    names = names or []
    pred_url = inst_store.prediction_url(store)
    group = storage.open_group(pred_url, mode="r")
    predicted = group[inst_store.INSTANCES]
    pred_names = list((storage.read_record(pred_url) or {}).get("classes") or [])
    import fsspec

    with fsspec.open(inst_store.table_url(store), "rb") as fh:
        rows = pq.read_table(fh, columns=["id", "class", "score"]).to_pydict()
    scores = dict(zip(rows["id"], rows["score"]))
    # the prediction's classes by name onto the reference's (an instance model has its own list)
    to_ref = {i: names.index(n) if n in names else i for i, n in enumerate(pred_names)}
    pred_class = {i: to_ref.get(c, c) for i, c in zip(rows["id"], rows["class"])}
    tmp = Path(tempfile.mkdtemp(prefix="tilewise-ref-instances-"))
    try:
        ref_ids = zarr.create_array(str(tmp / "ref.zarr"), shape=reference.shape, chunks=predicted.chunks,
                                    dtype="uint32", fill_value=0)
        n_ref = label_components(reference, things, ref_ids, min_size=min_size, per_section=per_section)
        ref_class: dict[int, int] = {}
        for box in storage.chunk_boxes(ref_ids.shape, ref_ids.chunks):
            ids = np.asarray(ref_ids[box])
            if ids.any():
                fg = ids > 0
                pairs = np.unique(np.stack([ids[fg].astype(np.int64), np.asarray(reference[box])[fg].astype(np.int64)]),
                                  axis=1)
                ref_class.update(zip(pairs[0].tolist(), pairs[1].tolist()))
        table = contingency(ref_ids, predicted, per_section)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stuff_tables = {}
    if stuff:
        labels = group["labels"]
        for k in stuff:
            pred_k = next((i for i, c in to_ref.items() if c == k), k)
            stuff_tables[k] = contingency(_Equals(reference, k), _Equals(labels, pred_k), per_section)
    coco = coco_from_contingency(table, {int(i): float(s) for i, s in scores.items()})
    f1 = f1_from_contingency(table)
    pq_all = panoptic_quality(table, {r: ref_class.get(r, 0) for _, r in table.ref_area}, pred_class, stuff_tables)
    name = (lambda c: names[c] if 0 <= c < len(names) else f"class_{c}")
    return {**coco, "f1": f1["f1"], "precision": f1["precision"], "recall": f1["recall"], "tp": f1["tp"],
            "reference_instances": int(n_ref), "predicted_instances": len(table.pred_area),
            "pq": pq_all["pq"], "sq": pq_all["sq"], "rq": pq_all["rq"],
            "pq_things": pq_all["pq_things"], "per_section": bool(per_section),
            "per_class": {name(c): v for c, v in pq_all["per_class"].items()},
            "note": "reference instances: connected components of the reference's thing classes"
                    + (", section by section" if per_section else "")}
