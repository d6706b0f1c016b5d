"""The training loop for semantic networks (U-Net, DeepLab) and for Mask R-CNN.

Patches come from :class:`PatchSampler`; augmentation is MONAI's (flips, 90-degree rotations,
elastic deformation as in the U-Net paper for 2D, small rotations for 3D, intensity jitter);
the loss is Dice + cross-entropy (MONAI ``DiceCELoss``, optional class weights for a weighted
cross-entropy). Validation on a fixed set of held-out patches after each epoch; the best state is
kept; training stops early after ``patience`` epochs without improvement or when the wall-clock
budget is spent. Everything is seeded.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from tasks.training.data import PatchSampler


@dataclass(frozen=True)
class TrainConfig:
    architecture: str
    spatial_dims: int  # of the model; a 2D model on a 3D stack gets patches of depth 1
    patch: tuple[int, ...]  # spatial, in the scan's rank (depth 1 first for 2D-on-3D)
    in_channels: int
    classes: tuple[str, ...]
    epochs: int = 30
    iterations_per_epoch: int = 20
    batch: int = 4
    max_minutes: float = 20.0
    lr: float = 2e-3
    seed: int = 0
    patience: int = 8
    val_patches: int = 12
    class_weights: tuple[float, ...] | None = None
    architecture_args: dict = field(default_factory=dict)


@dataclass
class TrainOutcome:
    network: object  # torch.nn.Module, best validation state loaded
    metric_name: str
    best_metric: float
    best_epoch: int
    history: list[dict]
    stopped: str  # why training ended
    seconds: float


def _augment(config: TrainConfig):
    from monai.transforms import (Compose, Rand2DElasticd, RandAffined, RandFlipd, RandRotate90d,
                                  RandScaleIntensityd, RandShiftIntensityd)

    keys = ["image", "label"]
    dims = config.spatial_dims
    steps = [RandFlipd(keys, prob=0.5, spatial_axis=a) for a in range(dims)]
    steps.append(RandRotate90d(keys, prob=0.5, spatial_axes=(dims - 2, dims - 1)))
    if dims == 2:
        # U-Net paper: smooth random displacement fields on a coarse grid, bicubic-ish interpolation
        steps.append(Rand2DElasticd(keys, prob=0.3, spacing=(32, 32), magnitude_range=(1, 4),
                                    mode=("bilinear", "nearest"), padding_mode="reflection"))
    else:
        steps.append(RandAffined(keys, prob=0.3, rotate_range=(0.2, 0.2, 0.2), mode=("bilinear", "nearest"),
                                 padding_mode="reflection"))
    steps += [RandScaleIntensityd(["image"], factors=0.1, prob=0.3),
              RandShiftIntensityd(["image"], offsets=0.1, prob=0.3)]
    return Compose(steps)


def _squeeze(config: TrainConfig, image: np.ndarray, label: np.ndarray):
    """Scan-rank patches -> model-rank arrays (drop the depth-1 axis of 2D-on-3D)."""
    if len(config.patch) == config.spatial_dims + 1:
        return image[:, 0], label[0]
    return image, label


def _batch(config: TrainConfig, sampler: PatchSampler, normalise, augment):
    import torch

    images, labels = [], []
    for _ in range(config.batch):
        image, label = _squeeze(config, *sampler.sample())
        item = augment({"image": normalise(image[None])[0], "label": label[None].astype(np.float32)})
        images.append(torch.as_tensor(np.asarray(item["image"]), dtype=torch.float32))
        labels.append(torch.as_tensor(np.asarray(item["label"])).round().long())
    return torch.stack(images), torch.stack(labels)


def dice_per_class(pred: np.ndarray, truth: np.ndarray, classes: int) -> list[float]:
    """Dice of every foreground class over all voxels given (NaN where a class is absent in both)."""
    out = []
    for k in range(1, classes):
        p, t = pred == k, truth == k
        denom = p.sum() + t.sum()
        out.append(float(2 * (p & t).sum() / denom) if denom else float("nan"))
    return out


def fit(config: TrainConfig, network, train_step: Callable[[], float], validate: Callable[[], tuple[float, dict]],
        metric_name: str, on_epoch: Callable[[dict], None] | None = None) -> TrainOutcome:
    """Epochs of ``train_step`` calls, validation after each, the best state kept; stops at
    ``config.epochs``, after ``config.patience`` epochs without improvement, or at the time budget."""
    t0 = time.perf_counter()
    budget = config.max_minutes * 60
    best, best_epoch, best_state, history, stopped = -math.inf, -1, None, [], "epochs done"
    for epoch in range(config.epochs):
        network.train()
        losses = []
        for _ in range(config.iterations_per_epoch):
            losses.append(train_step())
            if time.perf_counter() - t0 > budget:
                break
        network.eval()
        metric, extra = validate()
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)), metric_name: metric, **extra,
               "seconds": time.perf_counter() - t0}
        history.append(row)
        if on_epoch:
            on_epoch(row)
        if metric > best:
            best, best_epoch, best_state = metric, epoch, copy.deepcopy(network.state_dict())
        if time.perf_counter() - t0 > budget:
            stopped = f"time budget of {config.max_minutes:g} min"
            break
        if epoch - best_epoch >= config.patience:
            stopped = f"no improvement for {config.patience} epochs"
            break
    network.load_state_dict(best_state)
    return TrainOutcome(network.eval(), metric_name, best, best_epoch, history, stopped, time.perf_counter() - t0)


def train_semantic(config: TrainConfig, sampler: PatchSampler, val_patches: list, normalise,
                   on_epoch: Callable[[dict], None] | None = None) -> TrainOutcome:
    import torch
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism

    from models.zoo import build

    set_determinism(seed=config.seed)
    torch.manual_seed(config.seed)
    network = build(config.architecture, config.spatial_dims, config.in_channels, len(config.classes),
                    **config.architecture_args)
    weight = torch.tensor(config.class_weights, dtype=torch.float32) if config.class_weights else None
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, weight=weight)
    optimiser = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=1e-4)
    total_steps = config.epochs * config.iterations_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: (1 - min(s, total_steps) / total_steps) ** 0.9)
    augment = _augment(config)
    val = [_squeeze(config, img, lab) for img, lab in val_patches]
    val_x = torch.from_numpy(normalise(np.stack([v[0] for v in val])))
    val_y = np.stack([v[1] for v in val])

    def train_step() -> float:
        x, y = _batch(config, sampler, normalise, augment)
        optimiser.zero_grad(set_to_none=True)
        loss = loss_fn(network(x), y)
        loss.backward()
        optimiser.step()
        scheduler.step()
        return loss.item()

    def validate() -> tuple[float, dict]:
        with torch.inference_mode():
            pred = torch.cat([network(val_x[i:i + config.batch]) for i in range(0, len(val_x), config.batch)])
        dice = dice_per_class(pred.argmax(1).numpy(), val_y, len(config.classes))
        metric = float(np.nanmean(dice)) if not all(np.isnan(dice)) else 0.0
        return metric, {"val_loss": float(loss_fn(pred, torch.from_numpy(val_y)[:, None])),
                        **{f"val_dice_{name}": d for name, d in zip(config.classes[1:], dice)}}

    return fit(config, network, train_step, validate, "val_dice", on_epoch)
