"""Metric values against hand-worked cases and independent implementations (MONAI, scikit-learn)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks.metrics.instances import coco_ap, f1_at_iou, instance_scores
from tasks.metrics.semantic import ConfusionMatrix, fcn_scores, per_class_scores, region_scores, semantic_report
from tasks.metrics.surface import choose_level, strided_read, surface_scores


# --- semantic: the FCN table ---------------------------------------------------------------------

def test_fcn_table_hand_computed_three_classes():
    # 10 pixels. reference: 4 x class 0, 4 x class 1, 2 x class 2.
    ref = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 0])
    cm = ConfusionMatrix(3).update(ref, pred)
    # Rows reference, columns prediction:
    #   ref 0: 3 -> 0, 1 -> 1 ; ref 1: 3 -> 1, 1 -> 2 ; ref 2: 1 -> 2, 1 -> 0
    assert cm.matrix.tolist() == [[3, 1, 0], [0, 3, 1], [1, 0, 1]]
    s = fcn_scores(cm.matrix)
    assert s["pixel_accuracy"] == pytest.approx(7 / 10)
    assert s["mean_accuracy"] == pytest.approx((3 / 4 + 3 / 4 + 1 / 2) / 3)
    # IoU_i = n_ii / (t_i + p_i - n_ii): t = (4, 4, 2), p = (4, 4, 2)
    iou = [3 / (4 + 4 - 3), 3 / (4 + 4 - 3), 1 / (2 + 2 - 1)]
    assert s["mean_iou"] == pytest.approx(sum(iou) / 3)
    assert s["frequency_weighted_iou"] == pytest.approx((4 * iou[0] + 4 * iou[1] + 2 * iou[2]) / 10)
    dice = per_class_scores(cm.matrix)["dice"]
    np.testing.assert_allclose(dice, [6 / 8, 6 / 8, 2 / 4])


def test_against_sklearn_and_monai():
    import torch
    from monai.metrics import DiceMetric, MeanIoU
    from sklearn.metrics import confusion_matrix, jaccard_score

    rng = np.random.default_rng(0)
    ref = rng.integers(0, 4, size=(6, 20, 24))
    pred = np.where(rng.random(ref.shape) < 0.7, ref, rng.integers(0, 4, size=ref.shape))
    cm = ConfusionMatrix(4).update(ref, pred)
    np.testing.assert_array_equal(cm.matrix, confusion_matrix(ref.ravel(), pred.ravel(), labels=range(4)))
    per = per_class_scores(cm.matrix)
    np.testing.assert_allclose(per["iou"], jaccard_score(ref.ravel(), pred.ravel(), average=None, labels=range(4)))

    def onehot(x):
        return torch.nn.functional.one_hot(torch.from_numpy(x), 4).permute(3, 0, 1, 2)[None].float()

    monai_dice = DiceMetric(include_background=True, reduction="none")(onehot(pred), onehot(ref))[0].numpy()
    monai_iou = MeanIoU(include_background=True, reduction="none")(onehot(pred), onehot(ref))[0].numpy()
    np.testing.assert_allclose(per["dice"], monai_dice, rtol=1e-6)
    np.testing.assert_allclose(per["iou"], monai_iou, rtol=1e-6)


def test_streaming_equals_one_shot():
    rng = np.random.default_rng(1)
    ref = rng.integers(0, 3, size=(8, 16, 16))
    pred = rng.integers(0, 3, size=(8, 16, 16))
    whole = ConfusionMatrix(3).update(ref, pred)
    parts = ConfusionMatrix(3)
    for z in range(0, 8, 3):
        for y in range(0, 16, 5):
            other = ConfusionMatrix(3).update(ref[z:z + 3, y:y + 5], pred[z:z + 3, y:y + 5])
            parts.merge(other)
    np.testing.assert_array_equal(parts.matrix, whole.matrix)
    assert fcn_scores(parts.matrix) == fcn_scores(whole.matrix)


def test_conventions_absent_one_empty_both_empty():
    ref = np.array([0, 0, 1, 1, 0, 0])
    pred = np.array([0, 0, 1, 0, 2, 0])  # class 2 predicted, never in the reference; class 3 nowhere
    per = per_class_scores(ConfusionMatrix(4).update(ref, pred).matrix)
    assert math.isnan(per["iou"][3]) and math.isnan(per["dice"][3])  # absent from both: NaN
    assert per["iou"][2] == 0 and per["dice"][2] == 0  # one empty: 0
    assert math.isnan(per["accuracy"][2])  # no reference pixel: accuracy undefined
    s = fcn_scores(ConfusionMatrix(4).update(ref, pred).matrix)
    iou0, iou1 = 3 / (4 + 4 - 3), 1 / 2
    assert s["mean_iou"] == pytest.approx((iou0 + iou1 + 0) / 3)  # class 3 left out, class 2 counted
    report = semantic_report(ConfusionMatrix(4).update(ref, pred).matrix, ["a", "b", "c", "d"])
    assert report["per_class"]["d"]["iou"] is None and report["per_class"]["c"]["dice"] == 0.0
    # Both masks empty everywhere (no pixel at all): NaN table.
    assert all(math.isnan(v) for v in fcn_scores(np.zeros((2, 2), np.int64)).values())


def test_bad_values_are_named():
    with pytest.raises(ValueError, match=r"reference has values 5, 7 outside the class indices 0..2"):
        ConfusionMatrix(3).update(np.array([0, 5, 7, 5]), np.array([0, 1, 2, 1]))
    with pytest.raises(ValueError, match="prediction contains NaN"):
        ConfusionMatrix(3).update(np.array([0, 1]), np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="reference shape"):
        ConfusionMatrix(3).update(np.zeros(3, int), np.zeros(4, int))


# --- surface: HD95 and surface Dice ---------------------------------------------------------------

def _cubes(offset_axis: int, k: int):
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[2:6, 2:6, 2:6] = 1
    pred = np.zeros_like(ref)
    box = [slice(2, 6)] * 3
    box[offset_axis] = slice(2 + k, 6 + k)
    pred[tuple(box)] = 1
    return ref, pred


@pytest.mark.parametrize("axis, expected_hd", [(2, 6.0), (0, 2.0)])
def test_hd95_two_cubes_offset_anisotropic(axis, expected_hd):
    # Two 4^3 cubes offset by 2 voxels along one axis; spacing (Z, Y, X) = (1, 1, 3).
    # Every surface voxel of the far face (16 of the 56 surface voxels, > 5 %) is 2 voxels from
    # the nearest surface voxel of the other cube along that axis: HD95 = 2 * spacing[axis].
    ref, pred = _cubes(axis, 2)
    r = surface_scores(ref, pred, [1], spacing=(1.0, 1.0, 3.0), tolerance=1.0)[1]
    assert r["hd95"] == pytest.approx(expected_hd)


def test_surface_dice_two_cubes_hand_count():
    # Offset 2 along X (spacing 3). Surface voxels of each cube: 56. Within tolerance 1 of the other
    # surface: the ring shared at the first overlapping plane (12) and the face inside the other
    # cube (16) -> 28 / 56. With tolerance 3 the ring one plane further (12 more) -> 40 / 56.
    ref, pred = _cubes(2, 2)
    assert surface_scores(ref, pred, [1], (1, 1, 3), tolerance=1.0)[1]["surface_dice"] == pytest.approx(28 / 56)
    assert surface_scores(ref, pred, [1], (1, 1, 3), tolerance=3.0)[1]["surface_dice"] == pytest.approx(40 / 56)
    same = surface_scores(ref, ref, [1], (1, 1, 3))[1]
    assert same == {"hd95": 0.0, "surface_dice": 1.0}


def test_surface_conventions_empty():
    ref, _ = _cubes(0, 0)
    empty = np.zeros_like(ref)
    both = surface_scores(empty, empty, [1])[1]
    assert math.isnan(both["hd95"]) and math.isnan(both["surface_dice"])
    one = surface_scores(ref, empty, [1])[1]
    assert math.isnan(one["hd95"]) and one["surface_dice"] == 0.0


def test_level_choice_and_strided_read():
    shapes = [(100, 200, 200), (50, 100, 100), (25, 50, 50)]
    assert choose_level(shapes, max_voxels=10**6) == 1
    assert choose_level(shapes, max_voxels=10) == 2
    assert choose_level(shapes) == 0
    a = np.arange(7 * 9 * 5).reshape(7, 9, 5)
    np.testing.assert_array_equal(strided_read(a, (2, 2, 1), rows=2), a[::2, ::2, ::1])
    np.testing.assert_array_equal(strided_read(a, (2, 4, 2), rows=5), a[::2, ::4, ::2])


# --- instances: COCO AP and F1 --------------------------------------------------------------------

def _two_cells():
    ref = np.zeros((32, 32), np.int32)
    ref[2:10, 2:10] = 1
    ref[15:25, 12:30] = 2
    return ref


def test_coco_ap_perfect_and_one_missed():
    ref = _two_cells()
    perfect = instance_scores(ref, ref.copy())
    assert perfect["ap"] == pytest.approx(1.0) and perfect["ap50"] == 1.0 and perfect["ap75"] == 1.0
    assert perfect["f1_iou50"] == 1.0
    missed = np.where(ref == 2, ref, 0)
    r = instance_scores(ref, missed)
    # Recall reaches 1/2 at precision 1; COCO interpolates precision at 101 recall points 0, 0.01,
    # ..., 1: precision 1 at the 51 points <= 0.5, 0 beyond -> 51 / 101, at every IoU threshold.
    assert r["ap"] == pytest.approx(51 / 101) and r["ap50"] == pytest.approx(51 / 101)
    assert r["f1_iou50"] == pytest.approx(2 * 1 / (2 + 1))
    assert r["precision_iou50"] == 1.0 and r["recall_iou50"] == 0.5


def test_instance_conventions():
    ref = _two_cells()
    nothing = np.zeros_like(ref)
    assert instance_scores(ref, nothing)["ap"] == 0.0 and instance_scores(ref, nothing)["f1_iou50"] == 0.0
    assert math.isnan(instance_scores(nothing, nothing)["ap"])
    assert math.isnan(coco_ap([[]], [[ref == 1]])["ap"])
    assert f1_at_iou([[]], [[ref == 1]])["f1"] == 0.0
    # A prediction overlapping a cell by IoU exactly 0.5 counts at threshold 0.5.
    half = np.zeros_like(ref)
    half[2:10, 2:6] = 1  # 32 of the cell's 64 pixels
    assert f1_at_iou([[ref == 1]], [[half == 1]])["tp"] == 1


def test_region_scores_equal_scikit_learn_on_the_binarised_labels():
    """BraTS regions (unions of classes) from the confusion matrix equal Dice (F1) and IoU (Jaccard)
    of the labels binarised by membership, computed by scikit-learn."""
    from sklearn.metrics import f1_score, jaccard_score

    rng = np.random.default_rng(4)
    truth, pred = rng.integers(0, 5, (2, 20, 30, 30))
    pred = np.where(rng.random(pred.shape) < 0.6, truth, pred)  # mostly right, as a model is
    cm = ConfusionMatrix(5)
    cm.update(truth, pred)
    regions = {"whole": [1, 2, 3, 4], "core": [1, 3, 4], "enhancing": [4], "absent": []}
    got = region_scores(cm.matrix, regions)
    for name, members in regions.items():
        t, p = np.isin(truth, members).ravel(), np.isin(pred, members).ravel()
        if not t.any() and not p.any():
            assert got[name]["dice"] is None and got[name]["iou"] is None
            continue
        assert got[name]["dice"] == pytest.approx(f1_score(t, p))
        assert got[name]["iou"] == pytest.approx(jaccard_score(t, p))
        assert (got[name]["reference_pixels"], got[name]["predicted_pixels"]) == (t.sum(), p.sum())
