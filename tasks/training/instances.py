"""Mask R-CNN training from label images: instances are connected components of the instance
classes (buildings in SpaceNet masks; cells = the ISBI interior class), boxes derived from them.
Validation metric: COCO mask AP at IoU 0.5 (pycocotools), on held-out patches; F1 at IoU 0.5 of
the detections that inference keeps (score >= 0.5) beside it.

The recipe is sized for training from scratch on a CPU with a few images (nothing pretrained can
be downloaded; benchmarks/maskrcnn_synthetic.py and benchmarks/train.py measure each part):

- :data:`DETECTOR_ARGS`: a ResNet-18 FPN with GroupNorm, a 64-channel FPN and light heads
  (models/maskrcnn.py), tiles at their own scale; fewer proposals and sampled RoIs (a 256² tile
  holds tens of objects, not the hundreds COCO's defaults are made for), half of them positive.
- :func:`anchor_sizes`: one anchor size per FPN level from the sizes of the training objects in
  pixels (the catalog's pixel size decides how big a building is).
- :class:`Recipe`: AdamW with a linear warm-up and the poly decay over the budget
  (tasks/training/loop.py), flips, 90-degree rotations and per-band photometric jitter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from tasks.training.loop import TrainConfig, TrainOutcome, _squeeze, fit, poly_schedule

# models/maskrcnn.py's arguments for new Mask R-CNN trainings (tasks/training/train.py); the
# anchors are added per dataset by anchor_sizes().
DETECTOR_ARGS = {"backbone": "resnet18", "norm": "group", "fpn_channels": 64, "box_head": 256, "mask_head": 64,
                 "keep_scale": True, "proposals_train": 512, "proposals_test": 512, "rpn_batch": 256,
                 "roi_batch": 128, "roi_positive": 0.5}
FPN_LEVELS = 5  # ResNet FPN: strides 4, 8, 16, 32 and the pooled 64


@dataclass(frozen=True)
class Recipe:
    """How the detector is optimised (not part of the model: the card does not need it)."""

    optimiser: str = "adamw"  # or "sgd" (momentum 0.9), torchvision's reference
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 100  # iterations of linear warm-up from lr / 100
    augment: str = "strong"  # "strong": flips, rot90, per-band photometric jitter; "basic": the semantic one
    clip: float = 10.0


RECIPE = Recipe()


def anchor_sizes(instances: list[dict], levels: int = FPN_LEVELS) -> list[int]:
    """One anchor size per FPN level, doubling, the smallest the power of two at or below the 5th
    percentile of the objects' sqrt(box area) in pixels, so the smallest objects get anchors and
    the largest still fit under the top level. ``instances``: per patch, ``boxes`` and ``masks``
    (:func:`instances_from_labels`); objects cut by a patch edge are not measured (they look
    smaller than they are). No object at all: torchvision's FPN sizes (32 to 512)."""
    sizes = []
    for found in instances:
        h, w = found["masks"].shape[1:]
        for x0, y0, x1, y1 in found["boxes"]:
            if x0 > 0 and y0 > 0 and x1 < w and y1 < h:
                sizes.append(math.sqrt((x1 - x0) * (y1 - y0)))
    if not sizes:
        return [32 * 2 ** i for i in range(levels)]
    smallest = max(4, 2 ** int(math.floor(math.log2(np.percentile(sizes, 5)))))
    return [smallest * 2 ** i for i in range(levels)]


def training_anchor_sizes(config: TrainConfig, sampler, classes: list[int], patches: int = 48) -> list[int]:
    """:func:`anchor_sizes` of the instance ``classes`` in a fixed sample of training patches."""
    found = []
    for image, label in sampler.fixed(patches):
        _, label = _squeeze(config, image, label)
        found.append(instances_from_labels(label, {c: 1 for c in classes}))
    return anchor_sizes(found)


def instances_from_labels(label: np.ndarray, instance_classes: dict[int, int], min_area: int = 16) -> dict:
    """Connected components (4-connectivity) of each instance class in a 2D class map.

    ``instance_classes`` maps a class index of the label map to the detector's class (1, 2, ...).
    Returns numpy ``boxes`` (N, 4) as x0, y0, x1, y1 (exclusive ends), ``labels`` (N,), ``masks``
    (N, H, W) uint8. Components smaller than ``min_area`` pixels are dropped.
    """
    from skimage.measure import label as connected, regionprops

    boxes, labels, masks = [], [], []
    for source, target in instance_classes.items():
        components = connected(label == source, connectivity=1)
        for region in regionprops(components):
            if region.area < min_area:
                continue
            y0, x0, y1, x1 = region.bbox
            boxes.append([x0, y0, x1, y1])
            labels.append(target)
            masks.append((components == region.label).astype(np.uint8))
    h, w = label.shape
    return {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "labels": np.asarray(labels, np.int64),
            "masks": np.asarray(masks, np.uint8).reshape(-1, h, w)}


def mask_ap50(predictions: list[dict], truths: list[dict]) -> float:
    """COCO AP at IoU 0.5 for instance masks (pycocotools' COCOeval, iouType 'segm').

    ``predictions``: per image ``masks`` (N, H, W) bool, ``scores`` (N,), ``labels`` (N,);
    ``truths``: per image ``masks`` and ``labels``. Returns 0.0 when no image has a true instance.
    """

    from pycocotools import mask as rle
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from models.quiet import quiet

    images, gts, dts, cats = [], [], [], set()
    for i, (pred, truth) in enumerate(zip(predictions, truths)):
        h, w = truth["masks"].shape[1:] if len(truth["masks"]) else pred["masks"].shape[1:]
        images.append({"id": i, "height": int(h), "width": int(w)})
        for m, c in zip(truth["masks"], truth["labels"]):
            enc = rle.encode(np.asfortranarray(m.astype(np.uint8)))
            enc["counts"] = enc["counts"].decode()
            gts.append({"id": len(gts) + 1, "image_id": i, "category_id": int(c), "segmentation": enc,
                        "area": float(m.sum()), "bbox": list(rle.toBbox(enc)), "iscrowd": 0})
            cats.add(int(c))
        for m, c, s in zip(pred["masks"], pred["labels"], pred["scores"]):
            enc = rle.encode(np.asfortranarray(m.astype(np.uint8)))
            enc["counts"] = enc["counts"].decode()
            dts.append({"image_id": i, "category_id": int(c), "segmentation": enc, "score": float(s)})
    if not gts:
        return 0.0
    gt = COCO()
    gt.dataset = {"images": images, "annotations": gts, "categories": [{"id": c} for c in sorted(cats)]}
    with quiet():
        gt.createIndex()
        if not dts:
            return 0.0
        dt = gt.loadRes(dts)
        ev = COCOeval(gt, dt, iouType="segm")
        ev.params.maxDets = [1, 10, 300]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return max(float(ev.stats[1]), 0.0)


def _targets(found: dict):
    import torch

    return {"boxes": torch.from_numpy(found["boxes"]), "labels": torch.from_numpy(found["labels"]),
            "masks": torch.from_numpy(found["masks"])}


def detector_augment(config: TrainConfig, kind: str = "strong"):
    """Geometric: flips and 90-degree rotations (label-exact: objects stay whole, no interpolation).
    Photometric (``strong``): per-band contrast and brightness jitter on the normalised image, a
    global one, and Gaussian noise -- what differs between scenes and sensors. ``basic``: the
    semantic networks' augmentation (tasks/training/loop.py), elastic deformation included."""
    from monai.transforms import (Compose, RandFlipd, RandGaussianNoised, RandRotate90d, RandScaleIntensityd,
                                  RandShiftIntensityd)

    if kind == "basic":
        from tasks.training.loop import _augment

        return _augment(config)
    keys = ["image", "label"]
    steps = [RandFlipd(keys, prob=0.5, spatial_axis=0), RandFlipd(keys, prob=0.5, spatial_axis=1),
             RandRotate90d(keys, prob=0.75, spatial_axes=(0, 1)),
             RandScaleIntensityd(["image"], factors=0.25, prob=0.8, channel_wise=True),
             RandShiftIntensityd(["image"], offsets=0.25, prob=0.8, channel_wise=True),
             RandScaleIntensityd(["image"], factors=0.2, prob=0.5),
             RandGaussianNoised(["image"], prob=0.3, std=0.1)]
    if kind != "strong":
        raise ValueError(f"unknown augmentation {kind!r}; known: strong, basic")
    return Compose(steps)


def detections_f1(predictions: list[dict], truths: list[dict], score_threshold: float = 0.5) -> float:
    """F1 at IoU 0.5 (tasks/metrics/instances.py) of the detections scoring at least
    ``score_threshold`` (what inference keeps); NaN when there is nothing to find and nothing found."""
    from tasks.metrics.instances import f1_at_iou

    kept = [[m for m, s in zip(p["masks"], p["scores"]) if s >= score_threshold] for p in predictions]
    return f1_at_iou([list(t["masks"].astype(bool)) for t in truths], kept)["f1"]


def train_maskrcnn(config: TrainConfig, sampler, val_patches: list, normalise,
                   on_epoch: Callable[[dict], None] | None = None, instance_classes: dict[int, int] | None = None,
                   network=None, frozen: list | None = None, recipe: Recipe | None = None,
                   to_instances: Callable[[np.ndarray], dict] | None = None) -> TrainOutcome:
    """``to_instances`` turns a label patch into instances (default: connected components of the
    ``instance_classes``; a synthetic set with touching objects passes its own, from object ids).
    ``recipe``: :data:`RECIPE` unless given."""
    import torch
    from monai.utils import set_determinism

    from models.zoo import build
    from tasks.engine.runner import pick_device

    recipe = recipe or RECIPE
    instance_classes = instance_classes or {k: k for k in range(1, len(config.classes))}
    to_instances = to_instances or (lambda label: instances_from_labels(label, instance_classes))
    detector_classes = 1 + len(set(instance_classes.values()))
    set_determinism(seed=config.seed)
    torch.manual_seed(config.seed)
    if network is None:
        network = build("maskrcnn", 2, config.in_channels, detector_classes, **config.architecture_args)
    device = torch.device(pick_device(config.device))
    network.to(device)
    params = [p for p in network.parameters() if p.requires_grad]
    if recipe.optimiser == "sgd":
        optimiser = torch.optim.SGD(params, lr=recipe.lr, momentum=0.9, weight_decay=recipe.weight_decay)
    else:
        optimiser = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    decay = poly_schedule(config)
    warmup = max(recipe.warmup, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: decay(step) * min(1.0, 0.01 + 0.99 * step / warmup))
    augment = detector_augment(config, recipe.augment)
    val = [_squeeze(config, img, lab) for img, lab in val_patches]
    val_truth = [to_instances(lab) for _, lab in val]

    def train_step() -> float:
        images, targets = [], []
        for _ in range(config.batch):
            image, label = _squeeze(config, *sampler.sample())
            item = augment({"image": normalise(image[None])[0], "label": label[None].astype(np.float32)})
            images.append(torch.as_tensor(np.asarray(item["image"]), dtype=torch.float32, device=device))
            found = _targets(to_instances(np.asarray(item["label"])[0].round().astype(np.int64)))
            targets.append({k: v.to(device) for k, v in found.items()})
        loss = sum(network(images, targets).values())
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.clip)
        optimiser.step()
        scheduler.step()
        return loss.item()

    def validate() -> tuple[float, dict]:
        predictions = []
        with torch.inference_mode():
            for image, _ in val:
                det = network([torch.from_numpy(normalise(image[None])[0]).to(device)])[0]
                predictions.append({"masks": (det["masks"][:, 0] >= 0.5).cpu().numpy(),
                                    "scores": det["scores"].cpu().numpy(), "labels": det["labels"].cpu().numpy()})
        return mask_ap50(predictions, val_truth), {"val_f1": detections_f1(predictions, val_truth)}

    outcome = fit(config, network, train_step, validate, "val_ap50", on_epoch, frozen)
    outcome.network.to("cpu")  # registered and served from the CPU
    return outcome
