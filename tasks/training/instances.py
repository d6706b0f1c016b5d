"""Mask R-CNN training from label images: instances are connected components of the instance
classes (buildings in SpaceNet masks; cells = the ISBI interior class), boxes derived from them.
Validation metric: COCO mask AP at IoU 0.5 (pycocotools), on held-out patches."""

from __future__ import annotations

from typing import Callable

import numpy as np

from tasks.training.loop import TrainConfig, TrainOutcome, _augment, _squeeze, fit


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
    import contextlib
    import io

    from pycocotools import mask as rle
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

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
    with contextlib.redirect_stdout(io.StringIO()):
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


def _targets(label: np.ndarray, instance_classes: dict[int, int]):
    import torch

    found = instances_from_labels(label, instance_classes)
    return {"boxes": torch.from_numpy(found["boxes"]), "labels": torch.from_numpy(found["labels"]),
            "masks": torch.from_numpy(found["masks"])}


def train_maskrcnn(config: TrainConfig, sampler, val_patches: list, normalise,
                   on_epoch: Callable[[dict], None] | None = None, instance_classes: dict[int, int] | None = None,
                   network=None, frozen: list | None = None) -> TrainOutcome:
    import torch
    from monai.utils import set_determinism

    from models.zoo import build

    instance_classes = instance_classes or {k: k for k in range(1, len(config.classes))}
    detector_classes = 1 + len(set(instance_classes.values()))
    set_determinism(seed=config.seed)
    torch.manual_seed(config.seed)
    if network is None:
        network = build("maskrcnn", 2, config.in_channels, detector_classes, **config.architecture_args)
    params = [p for p in network.parameters() if p.requires_grad]
    optimiser = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    augment = _augment(config)
    val = [_squeeze(config, img, lab) for img, lab in val_patches]
    val_truth = [instances_from_labels(lab, instance_classes) for _, lab in val]

    def train_step() -> float:
        images, targets = [], []
        for _ in range(config.batch):
            image, label = _squeeze(config, *sampler.sample())
            item = augment({"image": normalise(image[None])[0], "label": label[None].astype(np.float32)})
            images.append(torch.as_tensor(np.asarray(item["image"]), dtype=torch.float32))
            targets.append(_targets(np.asarray(item["label"])[0].round().astype(np.int64), instance_classes))
        loss = sum(network(images, targets).values())
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimiser.step()
        return loss.item()

    def validate() -> tuple[float, dict]:
        predictions = []
        with torch.inference_mode():
            for image, _ in val:
                det = network([torch.from_numpy(normalise(image[None])[0])])[0]
                predictions.append({"masks": (det["masks"][:, 0] >= 0.5).numpy(), "scores": det["scores"].numpy(),
                                    "labels": det["labels"].numpy()})
        return mask_ap50(predictions, val_truth), {}

    return fit(config, network, train_step, validate, "val_ap50", on_epoch, frozen)
