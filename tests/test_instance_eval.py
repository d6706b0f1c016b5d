"""Out-of-core instance scores (tasks/metrics/instance_eval.py) against independent dense
references: pycocotools on RLE masks (tasks.metrics.instances.coco_ap), Hungarian F1
(f1_at_iou), MONAI's compute_panoptic_quality; objects across chunk borders; evaluate end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import zarr
from monai.metrics import compute_panoptic_quality
from scipy import ndimage

from tasks.instances.from_semantic import instances_from_prediction
from tasks.metrics.evaluate import evaluate_scan
from tasks.metrics.instance_eval import coco_from_contingency, contingency, f1_from_contingency, panoptic_quality
from tasks.metrics.instances import coco_ap, f1_at_iou, masks_from_labels
from tests.test_evaluate import make_store, write_prediction


def scene(seed: int, shape=(96, 120)):
    """A reference instance image and a prediction: shifted, eroded, one missed, one extra, one split."""
    rng = np.random.default_rng(seed)
    ref = np.zeros(shape, np.int32)
    for v in range(1, 13):
        y, x = rng.integers(0, shape[0] - 14), rng.integers(0, shape[1] - 14)
        h, w = rng.integers(5, 14, size=2)
        ref[y: y + h, x: x + w][ref[y: y + h, x: x + w] == 0] = v
    pred = np.zeros_like(ref)
    for v in range(1, 13):
        m = ref == v
        if v == 3:
            continue  # missed
        if v % 2:
            m = np.roll(m, int(rng.integers(-3, 4)), axis=1)
        else:
            m = ndimage.binary_erosion(m, iterations=int(rng.integers(0, 2)))
        pred[m & (pred == 0)] = v + 100
    pred[0:6, 0:6] = 500  # extra
    return ref, pred


def zarr_of(tmp_path, name, data, chunks=(32, 32)):
    a = zarr.create_array(str(tmp_path / name), shape=data.shape, chunks=chunks, dtype="uint32")
    a[...] = data
    return a


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap_f1_pq_equal_dense_references(tmp_path, seed):
    ref, pred = scene(seed)
    rng = np.random.default_rng(seed)
    pred_ids = [v for v in np.unique(pred) if v]
    scores = {int(v): float(s) for v, s in zip(pred_ids, rng.random(len(pred_ids)))}
    table = contingency(zarr_of(tmp_path, "r.zarr", ref), zarr_of(tmp_path, "p.zarr", pred))
    ours = coco_from_contingency(table, scores)
    dense = coco_ap([masks_from_labels(ref)], [[pred == v for v in pred_ids]], [[scores[int(v)] for v in pred_ids]])
    for key in ("ap", "ap50", "ap75"):
        assert ours[key] == pytest.approx(dense[key], abs=1e-9), key
    f1 = f1_from_contingency(table)
    reference_f1 = f1_at_iou([masks_from_labels(ref)], [[pred == v for v in pred_ids]])
    assert (f1["tp"], f1["f1"]) == (reference_f1["tp"], pytest.approx(reference_f1["f1"]))
    pq = panoptic_quality(table)
    for name in ("pq", "sq", "rq"):
        monai = float(compute_panoptic_quality(torch.as_tensor(pred), torch.as_tensor(ref), metric_name=name,
                                               smooth_numerator=0.0))
        assert pq[name] == pytest.approx(monai, abs=1e-6), name


def test_per_section_counts_each_section_as_an_image(tmp_path):
    ref, pred = scene(4, (64, 64))
    stack_ref, stack_pred = np.stack([ref, ref]), np.stack([pred, np.zeros_like(pred)])
    table = contingency(zarr_of(tmp_path, "r.zarr", stack_ref, (2, 32, 32)),
                        zarr_of(tmp_path, "p.zarr", stack_pred, (2, 32, 32)), per_section=True)
    f1 = f1_from_contingency(table)
    single = f1_from_contingency(contingency(ref, pred))
    assert f1["reference"] == 2 * single["reference"] and f1["tp"] == single["tp"]


def test_no_reference_or_no_prediction(tmp_path):
    empty = np.zeros((40, 40), np.int32)
    ref, _ = scene(5, (40, 40))
    assert math.isnan(coco_from_contingency(contingency(empty, ref))["ap"])
    assert coco_from_contingency(contingency(ref, empty))["ap"] == 0.0
    assert f1_from_contingency(contingency(ref, empty))["f1"] == 0.0


def test_evaluate_reports_instance_scores_of_a_perfect_prediction(tmp_path):
    ref = np.zeros((16, 24, 20), np.uint8)
    ref[2:9, 3:15, 2:9] = 1
    ref[10:14, 16:22, 12:19] = 1
    ref[11:13, 2:5, 14:18] = 2
    store = make_store(tmp_path, ref)
    write_prediction(store, ref, classes=["background", "a", "b"])
    instances_from_prediction(store, classes=["a"], min_size=1)
    report = evaluate_scan(store)
    inst = report.instances
    assert inst["reference_instances"] == inst["predicted_instances"] == 2
    assert (inst["ap50"], inst["f1"], inst["pq"]) == (pytest.approx(1.0), 1.0, pytest.approx(1.0))
    assert report.flat_metrics()["instances_f1"] == 1.0
    assert report.instances_digest is not None
