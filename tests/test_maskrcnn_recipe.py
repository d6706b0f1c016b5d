"""The Mask R-CNN recipe that trains from scratch (issue 19): anchors sized on the training objects,
tiles kept at their scale, GroupNorm, a DeepLab encoder as the detector's backbone, old cards
rebuilding what they were trained with, and -- the short version of
benchmarks/maskrcnn_synthetic.py -- that a few dozen iterations on touching ellipses find them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.zoo import build
from tasks.training.instances import DETECTOR_ARGS, anchor_sizes


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _found(boxes, shape=(100, 100)):
    return {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "masks": np.zeros((len(boxes), *shape), np.uint8)}


def test_anchor_sizes_by_hand():
    # sqrt(box areas): 10x10 -> 10, 20x20 -> 20, 9x16 -> 12, 40x40 -> 40; the 5th percentile of
    # [10, 12, 20, 40] is 10 + 0.15 * 2 = 10.3 -> the power of two below: 8, then doubling
    inside = [[5, 5, 15, 15], [30, 30, 50, 50], [60, 10, 69, 26], [50, 55, 90, 95]]
    assert anchor_sizes([_found(inside)]) == [8, 16, 32, 64, 128]
    # an object cut by the patch edge (x0 = 0, or y1 = the height) is not measured: the tiny one
    # there would otherwise set the smallest anchor to 2 -> 4 (the floor)
    cut = [[0, 40, 3, 43], [70, 97, 73, 100]]
    assert anchor_sizes([_found(inside + cut)]) == [8, 16, 32, 64, 128]
    # bigger objects, bigger anchors: 5th percentile of [40, 50, 60] = 41 -> 32
    assert anchor_sizes([_found([[10, 10, 50, 50], [5, 40, 55, 90]]), _found([[20, 20, 80, 80]])]) == \
        [32, 64, 128, 256, 512]
    assert anchor_sizes([_found([])]) == [32, 64, 128, 256, 512]  # nothing to measure: torchvision's FPN sizes


def test_the_recipe_network_keeps_the_scale_and_uses_group_norm():
    net = build("maskrcnn", 2, 3, 2, **DETECTOR_ARGS, anchor_sizes=[8, 16, 32, 64, 128]).eval()
    images, _ = net.transform([torch.rand(3, 100, 60)])
    assert images.image_sizes == [(100, 60)]  # torchvision's default would rescale to min_size (256)
    assert [tuple(s) for s in net.rpn.anchor_generator.sizes] == [(8,), (16,), (32,), (64,), (128,)]
    kinds = {type(m).__name__ for m in net.modules()}
    assert "GroupNorm" in kinds and not kinds & {"BatchNorm2d", "FrozenBatchNorm2d"}
    features = net.backbone(torch.rand(1, 3, 64, 64))
    assert [tuple(f.shape[-2:]) for f in features.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    default = build("maskrcnn", 2, 3, 2).eval()  # a card without arguments: the old MobileNet detector
    assert default.transform([torch.rand(3, 100, 60)])[0].image_sizes == [(426, 256)]  # x 256/60
    assert isinstance(default.backbone.body["1"], torch.nn.Module)  # MobileNet's numbered stages


def test_old_maskrcnn_cards_rebuild_the_same_tensors():
    """A card written before issue 19 has no detector arguments: the builder's defaults must still
    give its tensors (names and shapes of torchvision's MobileNet-v3 FPN Mask R-CNN)."""
    net = build("maskrcnn", 2, 3, 2)
    state = net.state_dict()
    assert len(state) == 342
    assert tuple(state["backbone.body.0.0.weight"].shape) == (16, 3, 3, 3)
    assert tuple(state["roi_heads.box_head.fc6.weight"].shape) == (1024, 256 * 7 * 7)
    assert tuple(state["roi_heads.mask_head.0.0.weight"].shape) == (256, 256, 3, 3)
    assert tuple(state["roi_heads.mask_predictor.mask_fcn_logits.weight"].shape) == (2, 256, 1, 1)
    assert tuple(state["rpn.head.cls_logits.weight"].shape) == (15, 256, 1, 1)  # 5 sizes x 3 ratios


def test_a_deeplab_encoder_initialises_the_detector_backbone():
    from tasks.training.init_from import InitialWeights, apply_initial_weights, deeplab_encoder_as_backbone

    torch.manual_seed(0)
    deeplab = build("deeplab", 2, 3, 2, aspp_channels=16)
    detector = build("maskrcnn", 2, 3, 2, **DETECTOR_ARGS)
    report = apply_initial_weights(detector, InitialWeights(
        "models:/x-deeplab/1", "models:/x-deeplab/1", deeplab_encoder_as_backbone(deeplab.state_dict()), "deeplab"))
    ours = detector.state_dict()
    torch.testing.assert_close(ours["backbone.body.conv1.weight"], deeplab.stem[0].weight)
    torch.testing.assert_close(ours["backbone.body.layer3.1.conv2.weight"], deeplab.layer3[1].conv2.weight)
    torch.testing.assert_close(ours["backbone.body.layer4.0.downsample.0.weight"],
                               deeplab.layer4[0].downsample[0].weight)
    # every convolution of the ResNet (1 stem + 4 stages x 2 blocks x 2 + 3 downsamples = 20) and the
    # norms' weight and bias (1 + 16 + 3 = 20 norms): 60 tensors; nothing of the FPN or the heads
    assert len(report.loaded) == 60
    assert all(name.startswith("backbone.body.") for name in report.loaded)
    assert "backbone.fpn.inner_blocks.0.0.weight" in report.initialised


def test_a_registered_deeplab_may_start_a_maskrcnn(tmp_path, monkeypatch):
    """``--init-from models:/...`` of a DeepLab for a Mask R-CNN training: allowed (the same data's
    semantic champion), its encoder renamed; the detector keeps its own arguments, not the DeepLab's.
    Another pair (a DeepLab for a U-Net) is still an architecture mismatch."""
    import mlflow
    import mlflow.models

    from models import registry
    from models.card import ModelCard
    from tasks.training.data import TrainingError
    from tasks.training.init_from import apply_initial_weights, read_initial_weights

    monkeypatch.setenv("TILEWISE_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mlflow.models, "infer_pip_requirements",  # speed only: no pip subprocess
                        lambda model_uri, flavor, fallback=None, **kw: list(fallback or []))
    original_uri = mlflow.get_tracking_uri()
    try:
        torch.manual_seed(0)
        deeplab = build("deeplab", 2, 3, 2, aspp_channels=16)
        card = ModelCard(architecture="deeplab", architecture_args={"aspp_channels": 16}, in_channels=3,
                         classes=["background", "building"], spatial_dims=2, tile=[64, 64])
        with mlflow.start_run(experiment_id=registry.experiment_id("rio")) as run:
            info = registry.log_model(deeplab, card, np.zeros((1, 3, 64, 64), np.float32))
            registry.register_and_promote("rio-deeplab", info.model_uri, run.info.run_id, "val_dice", 0.5)
        parent = read_initial_weights("models:/rio-deeplab@champion", "maskrcnn")
        assert parent.architecture == "deeplab" and parent.architecture_args is None
        detector = build("maskrcnn", 2, 3, 2, **DETECTOR_ARGS)
        report = apply_initial_weights(detector, parent)
        assert len(report.loaded) == 60
        torch.testing.assert_close(detector.backbone.body.layer2[0].conv1.weight, deeplab.layer2[0].conv1.weight)
        with pytest.raises(TrainingError, match="a deeplab model; this training builds a unet"):
            read_initial_weights("models:/rio-deeplab/1", "unet")
    finally:
        monkeypatch.undo()
        mlflow.set_tracking_uri(original_uri)


def test_a_few_dozen_iterations_find_touching_ellipses():
    """The recipe learns from scratch: 50 iterations (4 small images each) on 16 training images of
    touching ellipses, scored on 8 images it never saw. Before training the F1 at IoU 0.5 is 0 (no
    detection reaches score 0.5); connected components of the perfect foreground mask, which merge
    the touching ellipses, score well under what the detector must reach."""
    from benchmarks.maskrcnn_synthetic import instances_from_ids, make_set, score
    from benchmarks.maskrcnn_synthetic import ListSampler
    from tasks.training.instances import Recipe, train_maskrcnn
    from tasks.training.loop import TrainConfig

    size, count, axes = 64, 4, (5.0, 10.0)
    train, test = make_set(16, 0, size, count, axes), make_set(8, 2, size, count, axes)
    args = {**DETECTOR_ARGS, "anchor_sizes": anchor_sizes([instances_from_ids(ids) for _, ids in train])}
    config = TrainConfig(architecture="maskrcnn", spatial_dims=2, patch=(size, size), in_channels=1,
                         classes=("background", "ellipse"), epochs=5, iterations_per_epoch=10, batch=4,
                         max_minutes=60, patience=10, architecture_args=args, val_patches=4)
    torch.manual_seed(0)
    before = score(build("maskrcnn", 2, 1, 2, **args), test)
    outcome = train_maskrcnn(config, ListSampler(train), train[:4], lambda b: b, instance_classes={1: 1},
                             recipe=Recipe(lr=2e-3, warmup=10), to_instances=instances_from_ids)
    after = score(outcome.network, test)
    assert before["f1_iou50"] == 0.0
    assert after["components_of_truth_f1"] < 0.8
    assert after["f1_iou50"] >= 0.6 and after["f1_iou50"] > after["components_of_truth_f1"] + 0.1, after
