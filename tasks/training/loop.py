"""The training loop for semantic networks (U-Net, DeepLab) and for Mask R-CNN.

Patches come from :class:`PatchSampler`; augmentation is MONAI's (flips, 90-degree rotations,
elastic deformation as in the U-Net paper for 2D, small rotations for 3D, intensity jitter) and
runs in a background thread (:class:`BatchPrefetcher`, MONAI ``ThreadDataLoader``'s idea) while
the network trains on the previous batch. The recipe is nnU-Net's: Dice + cross-entropy (MONAI
``DiceCELoss``, optional class weights), AdamW with a poly learning-rate decay, foreground
oversampling (the sampler). Semantic networks are validated after each epoch on whole held-out
regions with the engine's tiling (:mod:`tasks.training.validation`); the best state is kept;
training stops early after ``patience`` epochs without improvement or when the wall-clock budget
is spent. Everything is seeded.
"""

from __future__ import annotations

import copy
import math
import queue
import threading
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
    iterations_per_epoch: int = 50  # between validations (a whole-region validation costs ~10 training steps)
    batch: int = 4
    max_minutes: float = 20.0
    lr: float = 2e-3
    seed: int = 0
    patience: int = 30  # epochs without improvement; the time budget usually ends first
    val_patches: int = 12
    class_weights: tuple[float, ...] | None = None
    architecture_args: dict = field(default_factory=dict)
    freeze: str | None = None  # "encoder": its parameters are not trained for the first freeze_epochs
    freeze_epochs: int = 3
    device: str | None = None  # None: cuda when there is one, else cpu
    amp: bool = True  # bfloat16 autocast on a GPU (never on a CPU, where it is slower)
    photometric: bool = False  # per-band gain, brightness, gamma (tasks/training/augment.py)


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
    if config.photometric:
        from tasks.training.augment import photometric_steps

        steps += photometric_steps()
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


class BatchPrefetcher:
    """Batches made by ``make`` in one background thread, ``depth`` ahead of the training step, so
    sampling and augmentation overlap the forward and backward passes. One producer keeps the
    random streams (sampler, MONAI transforms) in the same order as without it: seeded runs repeat.
    An exception in the producer is raised by the next ``get``."""

    def __init__(self, make: Callable[[], object], depth: int = 2):
        self._make = make
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tilewise-batches", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = (self._make(), None)
            except BaseException as exc:  # handed to the consumer, which raises it
                item = (None, exc)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[1] is not None:
                return

    def get(self):
        batch, error = self._queue.get()
        if error is not None:
            raise error
        return batch

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def __enter__(self) -> "BatchPrefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def poly_schedule(config: TrainConfig, exponent: float = 0.9) -> Callable[[int], float]:
    """nnU-Net's poly decay, (1 - progress) ** 0.9, where progress is the larger of the steps done
    and the wall-clock budget spent: a run that the budget ends still anneals to a small rate."""
    total_steps = config.epochs * config.iterations_per_epoch
    budget = config.max_minutes * 60
    t0 = time.perf_counter()

    def factor(step: int) -> float:
        progress = max(min(step, total_steps) / total_steps, min((time.perf_counter() - t0) / budget, 1.0))
        return max(1.0 - progress, 0.0) ** exponent

    return factor


def fit(config: TrainConfig, network, train_step: Callable[[], float], validate: Callable[[], tuple[float, dict]],
        metric_name: str, on_epoch: Callable[[dict], None] | None = None, frozen: list | None = None) -> TrainOutcome:
    """Epochs of ``train_step`` calls, validation after each, the best state kept; stops at
    ``config.epochs``, after ``config.patience`` epochs without improvement, or at the time budget.

    ``frozen`` modules (``--freeze encoder``) neither learn nor update normalisation statistics for
    the first ``config.freeze_epochs`` epochs: their parameters stop requiring gradients (the
    optimiser skips parameters without one) and they stay in eval mode."""
    t0 = time.perf_counter()
    budget = config.max_minutes * 60
    best, best_epoch, best_state, history, stopped = -math.inf, -1, None, [], "epochs done"
    frozen = list(frozen or [])
    for epoch in range(config.epochs):
        network.train()
        still_frozen = bool(frozen) and epoch < config.freeze_epochs
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(not still_frozen)
            if still_frozen:
                module.eval()
        losses = []
        for _ in range(config.iterations_per_epoch):
            losses.append(train_step())
            if time.perf_counter() - t0 > budget:
                break
        network.eval()
        metric, extra = validate()
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)), metric_name: metric, **extra,
               "seconds": time.perf_counter() - t0}
        if frozen:
            row["encoder_frozen"] = float(still_frozen)
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


def train_semantic(config: TrainConfig, sampler: PatchSampler, validation, arrays: dict, normalise,
                   on_epoch: Callable[[dict], None] | None = None, network=None,
                   frozen: list | None = None) -> TrainOutcome:
    """Train a U-Net or DeepLab (``network``: an initialised one, e.g. from ``--init-from``; else a
    fresh one) and validate it on whole regions (a :class:`~tasks.training.validation.WholeRegionValidation`)."""
    import torch
    from monai.losses import DeepSupervisionLoss, DiceCELoss
    from monai.utils import set_determinism

    from models.zoo import build
    from tasks.training.validation import foreground_dice, validate as validate_regions

    from tasks.engine.runner import pick_device

    set_determinism(seed=config.seed)
    torch.manual_seed(config.seed)
    if network is None:
        network = build(config.architecture, config.spatial_dims, config.in_channels, len(config.classes),
                        **config.architecture_args)
    device = torch.device(pick_device(config.device))
    network.to(device)
    amp = config.amp and device.type == "cuda"
    weight = torch.tensor(config.class_weights, dtype=torch.float32, device=device) if config.class_weights else None
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, weight=weight)
    deep = DeepSupervisionLoss(dice_ce)  # a deeply supervised U-Net's heads, weighted 1, 1/2, 1/4 (nnU-Net)

    def loss_fn(out, y):
        if out.ndim == y.ndim + 1:  # (B, 1 + heads, K, *spatial): every head at full resolution
            return deep(list(torch.unbind(out, dim=1)), y)
        return dice_ce(out, y)
    optimiser = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, poly_schedule(config))
    augment = _augment(config)
    def make():
        x, y = _batch(config, sampler, normalise, augment)
        if device.type == "cuda":  # page-locked, so the copy below overlaps the previous step
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    prefetch = BatchPrefetcher(make)

    def train_step() -> float:
        x, y = prefetch.get()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimiser.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(network(x), y)
        loss.backward()
        optimiser.step()
        scheduler.step()
        return loss.item()

    def validate() -> tuple[float, dict]:
        dice, counts = validate_regions(network, validation, arrays, len(config.classes), normalise,
                                        device=str(device))
        metric = float(np.nanmean(dice)) if not all(np.isnan(dice)) else 0.0
        extra = {f"val_dice_{name}": d for name, d in zip(config.classes[1:], dice)}
        if len(config.classes) > 2:
            extra["val_dice_foreground"] = foreground_dice(counts)
        return metric, extra

    with prefetch:
        outcome = fit(config, network, train_step, validate, "val_dice", on_epoch, frozen)
    outcome.network.to("cpu")  # registered and served from the CPU
    return outcome
