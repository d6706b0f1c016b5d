"""Instance segmentation scores: COCO mask AP, AP50, AP75 (pycocotools) and F1 at IoU 0.5.

- AP: the COCO detection challenge's mask average precision (Lin et al., "Microsoft COCO: Common
  Objects in Context", ECCV 2014; cocodataset.org/#detection-eval), computed by pycocotools'
  ``COCOeval(iouType="segm")``: precision averaged over 101 recall points and IoU thresholds
  0.50:0.05:0.95 (AP), or at IoU 0.50 (AP50) / 0.75 (AP75); all areas, up to 100 detections per
  image; one category (class-agnostic) unless categories are given.
- F1 at IoU 0.5: ground-truth and predicted instances matched one to one (Hungarian assignment,
  scipy) among pairs with IoU >= 0.5; precision = TP / predicted, recall = TP / reference.

Input: instance label images (0 = background, every other value one instance; (Y, X), or (Z, Y, X)
taken as Z separate images), or lists of boolean masks with scores.

Conventions: no reference instance and no prediction -> AP and F1 undefined (NaN); no reference
but some predictions -> AP NaN (pycocotools gives -1: no ground truth to rank against), F1 0;
references but no predictions -> AP 0, F1 0.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from models.quiet import quiet


def masks_from_labels(labels: np.ndarray) -> list[np.ndarray]:
    """One boolean mask per non-zero value of a 2D instance label image, in increasing value order."""
    labels = np.asarray(labels)
    return [labels == v for v in np.unique(labels) if v != 0]


def _images(labels: np.ndarray) -> list[np.ndarray]:
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return [labels]
    if labels.ndim == 3:
        return list(labels)
    raise ValueError(f"instance labels must be (Y, X) or (Z, Y, X), got shape {labels.shape}")


def coco_ap(reference: Sequence[Sequence[np.ndarray]], predicted: Sequence[Sequence[np.ndarray]],
            scores: Sequence[Sequence[float]] | None = None) -> dict[str, float]:
    """COCO mask AP / AP50 / AP75 over images: ``reference[i]`` and ``predicted[i]`` are the boolean
    (Y, X) masks of image i, ``scores[i]`` the predicted masks' confidences (default 1.0)."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(reference) != len(predicted):
        raise ValueError(f"{len(reference)} reference images but {len(predicted)} predicted images")
    images, gt_anns, dets = [], [], []
    for i, (ref_masks, pred_masks) in enumerate(zip(reference, predicted)):
        shape = None
        for m in list(ref_masks) + list(pred_masks):
            shape = np.asarray(m).shape
            break
        images.append({"id": i + 1, "height": int(shape[0]) if shape else 1, "width": int(shape[1]) if shape else 1})
        for m in ref_masks:
            rle = mask_utils.encode(np.asfortranarray(np.asarray(m, dtype=np.uint8)))
            gt_anns.append({"id": len(gt_anns) + 1, "image_id": i + 1, "category_id": 1, "segmentation": rle,
                            "area": float(mask_utils.area(rle)), "bbox": list(mask_utils.toBbox(rle)),
                            "iscrowd": 0})
        image_scores = scores[i] if scores is not None else [1.0] * len(pred_masks)
        for m, s in zip(pred_masks, image_scores):
            rle = mask_utils.encode(np.asfortranarray(np.asarray(m, dtype=np.uint8)))
            dets.append({"image_id": i + 1, "category_id": 1, "segmentation": rle, "score": float(s),
                         "area": float(mask_utils.area(rle)), "bbox": list(mask_utils.toBbox(rle))})
    if not gt_anns:
        return {"ap": math.nan, "ap50": math.nan, "ap75": math.nan}
    if not dets:
        return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    with quiet():  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = {"images": images, "annotations": gt_anns, "categories": [{"id": 1, "name": "instance"}]}
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ap, ap50, ap75 = (float(v) for v in ev.stats[:3])
    return {k: (v if v >= 0 else math.nan) for k, v in (("ap", ap), ("ap50", ap50), ("ap75", ap75))}


def _iou_matrix(ref_masks: Sequence[np.ndarray], pred_masks: Sequence[np.ndarray]) -> np.ndarray:
    if not len(ref_masks) or not len(pred_masks):
        return np.zeros((len(ref_masks), len(pred_masks)))
    r = np.stack([np.asarray(m, bool).ravel() for m in ref_masks]).astype(np.float64)
    p = np.stack([np.asarray(m, bool).ravel() for m in pred_masks]).astype(np.float64)
    inter = r @ p.T
    union = r.sum(1)[:, None] + p.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def f1_at_iou(reference: Sequence[Sequence[np.ndarray]], predicted: Sequence[Sequence[np.ndarray]],
              threshold: float = 0.5) -> dict[str, float]:
    """Precision, recall and F1 of one-to-one matches with IoU >= ``threshold``, over images."""
    from scipy.optimize import linear_sum_assignment

    tp = n_ref = n_pred = 0
    for ref_masks, pred_masks in zip(reference, predicted):
        n_ref += len(ref_masks)
        n_pred += len(pred_masks)
        iou = _iou_matrix(ref_masks, pred_masks)
        if iou.size:
            rows, cols = linear_sum_assignment(-np.where(iou >= threshold, iou, 0.0))
            tp += int(np.sum(iou[rows, cols] >= threshold))
    if n_ref == 0 and n_pred == 0:
        return {"precision": math.nan, "recall": math.nan, "f1": math.nan, "tp": 0, "reference": 0, "predicted": 0}
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_ref if n_ref else 0.0
    f1 = 2 * tp / (n_ref + n_pred)
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "reference": n_ref, "predicted": n_pred}


def instance_scores(reference_labels: np.ndarray, predicted_labels: np.ndarray,
                    scores: dict[int, float] | None = None) -> dict[str, float]:
    """COCO AP / AP50 / AP75 and F1 at IoU 0.5 from two instance label images ((Y, X) or
    (Z, Y, X) = Z images). ``scores`` maps a predicted instance value to its confidence (default 1)."""
    reference_labels, predicted_labels = np.asarray(reference_labels), np.asarray(predicted_labels)
    if reference_labels.shape != predicted_labels.shape:
        raise ValueError(f"reference shape {reference_labels.shape} != prediction shape {predicted_labels.shape}")
    refs, preds, confidences = [], [], []
    for ref_image, pred_image in zip(_images(reference_labels), _images(predicted_labels)):
        refs.append(masks_from_labels(ref_image))
        values = [v for v in np.unique(pred_image) if v != 0]
        preds.append([pred_image == v for v in values])
        confidences.append([(scores or {}).get(int(v), 1.0) for v in values])
    return {**coco_ap(refs, preds, confidences), **{f"{k}_iou50": v for k, v in f1_at_iou(refs, preds).items()
                                                    if k in ("precision", "recall", "f1")}}
