"""Train one catalog dataset's model, track it in MLflow, register it and apply the champion rule."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from data_catalog import LoadedEntry, entry_model_name
from models.card import ModelCard, Normalization
from tasks import storage
from tasks.ingest import discover_scans
from tasks.settings import scan_store
from tasks.training.data import (PatchSampler, ScanArrays, TrainingError, channel_statistics, in_memory,
                                 open_training_scan, per_scan_normalised, split_regions)
from tasks.training.init_from import (FREEZABLE, InitialWeights, apply_initial_weights, encoder_modules,
                                      read_initial_weights)
from tasks.training.instances import DETECTOR_ARGS
from tasks.training.loop import TrainConfig, TrainOutcome, train_semantic
from tasks.training.validation import WholeRegionValidation, within_budget

log = logging.getLogger(__name__)

DEFAULT_TILE = {2: (256, 256), 3: (64, 64, 64)}
# Sized for a CPU (benchmarks/train.py --throughput measures them): a 16-channel U-Net trains 3.6x
# faster than a 32-channel one at 256² with the same held-out scores; one residual unit per level in
# 3D is 1.45x faster than two; DeepLab's ASPP at 64 channels 1.47x faster than 128.
ARCHITECTURE_ARGS = {("unet", 2): {"base_channels": 16},
                     ("unet", 3): {"base_channels": 16, "num_res_units": 1},
                     ("deeplab", 2): {"aspp_channels": 64},
                     ("maskrcnn", 2): DETECTOR_ARGS}  # + anchors sized on the training objects (plan_training)
VALIDATION_OVERLAP = 0.25  # whole-region validation: the engine's tiling, fewer tiles than infer's 0.5


@dataclass
class TrainingPlan:
    """Everything decided and checked before the first epoch."""

    config: TrainConfig
    train_sampler: PatchSampler
    val_sampler: PatchSampler  # fixed validation patches (Mask R-CNN's AP50) and the calibration split
    validation: WholeRegionValidation  # semantic networks: whole regions through the engine's tiling
    arrays: dict[str, ScanArrays]
    scans: list[ScanArrays]
    initial: InitialWeights | None = None  # --init-from
    normalization: Normalization | None = None  # per scan (applied by ``arrays``), else None: z-score


@dataclass
class TrainReport:
    dataset: str
    architecture: str
    run_id: str
    metric_name: str
    metric: float
    epochs: int
    stopped: str
    seconds: float
    registered: str  # NAME/VERSION
    alias: str
    decision: str
    first_train_loss: float
    last_train_loss: float
    calibration: str = "not run"  # the calibrator fitted after registration, or why there is none
    initialised_from: str = ""  # --init-from: what was loaded and what was initialised
    watershed: str = ""  # EM: the watershed settings tuned on the validation sections, or why not


def plan_training(loaded: LoadedEntry, architecture: str | None, epochs: int | None, max_minutes: float | None,
                  seed: int = 0, store_root: str | None = None, init_from: str | None = None,
                  freeze: str | None = None) -> TrainingPlan:
    """Check the data and decide every option, before anything is trained."""
    entry = loaded.entry
    # None means "the catalog's budget"; 0 is not None: a budget of nothing is an error, not the default
    if epochs is not None and epochs < 1:
        raise TrainingError(f"epochs must be at least 1, got {epochs}")
    if max_minutes is not None and not max_minutes > 0:
        raise TrainingError(f"max_minutes must be more than 0, got {max_minutes}")
    if entry.labels is None:
        raise TrainingError(f"{loaded.file}: dataset '{entry.name}' has no labels section; nothing to train on")
    architecture = architecture or (entry.model.architecture if entry.model else "unet")
    specs = discover_scans(loaded)
    classes = tuple(entry.labels.classes)
    scans = [open_training_scan(scan_store(entry.name, s.scan_id, store_root), len(classes)) for s in specs]
    if not scans:
        raise TrainingError(f"dataset '{entry.name}': no scans found at {entry.scans.path}")
    channels = {s.store: s.image.shape[0] for s in scans}
    if len(set(channels.values())) > 1:
        listing = ", ".join(f"{k}: {v}" for k, v in channels.items())
        raise TrainingError(f"dataset '{entry.name}': scans have different channel counts ({listing})")
    ranks = {s.labels.ndim for s in scans}
    if len(ranks) > 1:
        raise TrainingError(f"dataset '{entry.name}': scans mix 2D and 3D ({sorted(ranks)})")
    train_regions, val_regions = split_regions(scans, seed=seed)
    spatial = scans[0].labels.ndim
    tile = tuple(entry.tiling.tile) if entry.tiling.tile else DEFAULT_TILE[spatial]
    model_dims = len(tile)
    if model_dims == 2 and spatial == 3:
        patch = (1, *tile)
    elif model_dims == spatial:
        patch = tile
    else:
        raise TrainingError(f"{loaded.file}: tiling.tile {list(tile)} does not fit {spatial}D scans")
    if architecture in ("deeplab", "maskrcnn") and model_dims != 2:
        raise TrainingError(f"{loaded.file}: {architecture} is 2D; set a 2D tiling.tile")
    channels = scans[0].image.shape[0]
    initial = read_initial_weights(init_from, architecture) if init_from else None
    if freeze is not None and freeze not in FREEZABLE:
        raise TrainingError(f"--freeze {freeze}: unknown; one of: {', '.join(FREEZABLE)}")
    args: dict = dict(ARCHITECTURE_ARGS.get((architecture, model_dims), {}))
    if architecture == "unet":
        from models.unet import unet_levels

        args["levels"] = unet_levels(tile)
    if initial is not None and initial.architecture_args is not None:
        args = initial.architecture_args  # fine-tuning keeps the parent's shape: its layers all fit
    config = TrainConfig(architecture=architecture, spatial_dims=model_dims, patch=patch, in_channels=channels,
                         classes=classes, epochs=entry.training.epochs if epochs is None else epochs,
                         max_minutes=entry.training.max_minutes if max_minutes is None else max_minutes,
                         seed=seed, architecture_args=args, batch=2 if model_dims == 3 else 4,
                         freeze=freeze, photometric=_photometric(entry, architecture))
    normalization = _per_scan_normalization(entry, architecture)
    loaded_scans = in_memory(scans)
    if normalization is not None:  # each scan's images read through its own statistics
        loaded_scans = per_scan_normalised(loaded_scans, normalization)
    arrays = {s.store: s for s in loaded_scans}
    train_sampler = PatchSampler(train_regions, arrays, patch, seed=seed, pad=entry.tiling.pad)
    val_sampler = PatchSampler(val_regions, arrays, patch, seed=seed + 1, pad=entry.tiling.pad)
    if architecture == "maskrcnn" and args.get("backbone") in ("resnet18", "resnet34") and "anchor_sizes" not in args:
        from tasks.training.instances import training_anchor_sizes

        names = entry.labels.instance_classes or list(classes[1:])
        sizes = training_anchor_sizes(config, train_sampler, [classes.index(n) for n in names])
        config = replace(config, architecture_args={**args, "anchor_sizes": sizes})
    validation = WholeRegionValidation(within_budget(val_regions, patch), patch,
                                       2 if model_dims == 2 and spatial == 3 else None,
                                       overlap=VALIDATION_OVERLAP, batch=config.batch)
    return TrainingPlan(config, train_sampler, val_sampler, validation, arrays, scans, initial, normalization)


def _per_scan_normalization(entry, architecture: str) -> Normalization | None:
    """The catalog's ``training.normalization``; ``auto`` is per-scan percentiles for satellite
    semantic models (scenes differ in brightness and colour balance: issue 19), z-score otherwise
    (None). Mask R-CNN keeps z-score under ``auto``: its detector code applies the card per tile."""
    kind = entry.training.normalization
    if kind == "auto":
        kind = "scan_percentile" if entry.modality == "satellite" and architecture != "maskrcnn" else "zscore"
    return Normalization(kind="scan_percentile", percentiles=[1.0, 99.0]) if kind == "scan_percentile" else None


def _photometric(entry, architecture: str) -> bool:
    """The catalog's ``training.photometric`` (off unless asked for: see data_catalog/schema.py)."""
    return entry.training.photometric == "on"


def train_dataset(loaded: LoadedEntry, *, architecture: str | None = None, epochs: int | None = None,
                  max_minutes: float | None = None, seed: int = 0, store_root: str | None = None,
                  init_from: str | None = None, freeze: str | None = None) -> TrainReport:
    import mlflow

    from models import registry
    from models.zoo import build

    entry = loaded.entry
    plan = plan_training(loaded, architecture, epochs, max_minutes, seed, store_root, init_from, freeze)
    config, train_sampler, val_sampler, scans = plan.config, plan.train_sampler, plan.val_sampler, plan.scans
    names = entry.labels.instance_classes or list(config.classes[1:])
    out_channels = 1 + len(names) if config.architecture == "maskrcnn" else len(config.classes)
    import torch

    torch.manual_seed(config.seed)
    network = build(config.architecture, config.spatial_dims, config.in_channels, out_channels,
                    **config.architecture_args)
    init_report = apply_initial_weights(network, plan.initial) if plan.initial else None  # errors before any epoch
    frozen = encoder_modules(config.architecture, network) if config.freeze else None
    if init_report:
        log.info("%s: %s", entry.name, init_report.summary())
    if plan.normalization is not None:  # per scan: the arrays read normalised already
        normalization = plan.normalization

        def normalise(batch: np.ndarray) -> np.ndarray:
            return batch.astype(np.float32, copy=False)
    else:
        mean, std = channel_statistics(train_sampler)
        normalization = Normalization(kind="zscore", mean=mean, std=std)

        def normalise(batch: np.ndarray) -> np.ndarray:
            return normalization.apply(batch.astype(np.float32))
    attrs = storage.read_record(scans[0].store) or {}  # spacing, unit, channel names of the data
    tile = list(config.patch[1:] if len(config.patch) == config.spatial_dims + 1 else config.patch)
    instance_map = {config.classes.index(n): i + 1 for i, n in enumerate(names)}
    card = ModelCard(
        architecture=config.architecture, architecture_args=config.architecture_args,
        in_channels=config.in_channels, channel_names=attrs.get("channel_names"),
        classes=["background", *names] if config.architecture == "maskrcnn" else list(config.classes),
        label_mapping=dict(entry.labels.mapping),
        spatial_dims=config.spatial_dims, tile=tile, normalization=normalization, spacing=attrs.get("spacing"),
        unit=attrs.get("unit"), modality=entry.modality, dataset=entry.name,
    )

    val_patches = val_sampler.fixed(config.val_patches)
    metric_is_regions = config.architecture != "maskrcnn"  # Mask R-CNN: AP50 on fixed validation patches
    experiment = registry.experiment_id(entry.name)
    name = entry_model_name(entry, config.architecture)  # the name inference looks up (catalog model.name)
    with mlflow.start_run(experiment_id=experiment, run_name=f"train {name}") as run:
        mlflow.log_params({
            "architecture": config.architecture, "spatial_dims": config.spatial_dims, "patch": list(config.patch),
            "epochs": config.epochs, "iterations_per_epoch": config.iterations_per_epoch, "batch": config.batch,
            "lr": config.lr, "seed": config.seed, "max_minutes": config.max_minutes, "patience": config.patience,
            "train_regions": len(train_sampler.regions), "val_regions": len(val_sampler.regions),
            **{f"arch.{k}": v for k, v in config.architecture_args.items()},
            "init_from": init_from or "none", "freeze": f"{freeze} ({config.freeze_epochs} epochs)" if freeze else "none",
            "validation": f"whole regions, {plan.validation.voxels} voxels" if metric_is_regions else "patches",
        })
        mlflow.set_tags({"tilewise.dataset": entry.name, "tilewise.modality": entry.modality})
        parent = {}
        if init_report:  # the lineage: which weights this model started from
            parent = {"parent": init_report.resolved, **({"parent_sha256": init_report.sha256} if init_report.sha256
                                                         else {})}
            mlflow.set_tags({f"tilewise.{k}": v for k, v in parent.items()})
            mlflow.log_dict(init_report.record(), "tilewise/init_from.json")
        mlflow.log_dict(card.model_dump(), "tilewise/card_at_start.json")
        # the split the model never trained on, for calibration (tasks/calibration/model_version.py)
        from tasks.calibration.model_version import validation_record

        mlflow.log_dict(validation_record(val_sampler.regions, entry.name, seed), "tilewise/validation.json")

        metric_name = "val_ap50" if config.architecture == "maskrcnn" else "val_dice"  # what fit() selects on

        def on_epoch(row: dict) -> None:
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch" and v == v}, step=row["epoch"])
            # the row rides on the record (extra=) so a terminal front end can draw a progress bar from it
            # (flows/progress.py); everywhere else, the message is the progress report.
            log.info("%s epoch %d/%d: %s", name, row["epoch"] + 1, config.epochs,
                     ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "epoch"),
                     extra={"tilewise_epoch": dict(row), "tilewise_epochs": config.epochs,
                            "tilewise_metric": metric_name, "tilewise_max_minutes": config.max_minutes})

        # a progress display can show the training from its start, not from its first epoch's end
        log.info("%s: training for up to %d epochs or %g min", name, config.epochs, config.max_minutes,
                 extra={"tilewise_training": {"name": name, "epochs": config.epochs,
                                              "max_minutes": config.max_minutes}})
        outcome: TrainOutcome
        if config.architecture == "maskrcnn":
            from tasks.training.instances import train_maskrcnn

            outcome = train_maskrcnn(config, train_sampler, val_patches, normalise, on_epoch,
                                     instance_classes=instance_map, network=network, frozen=frozen)
        else:
            outcome = train_semantic(config, train_sampler, plan.validation, plan.arrays, normalise, on_epoch,
                                     network=network, frozen=frozen)
        card = card.model_copy(update={"metric": {outcome.metric_name: outcome.best_metric}})
        refused = None
        if metric_is_regions:  # per validation scan: foreground fractions for the card, one class everywhere
            from tasks.training.champion_check import degenerate_scans, foreground_fractions, scan_class_fractions

            fractions = scan_class_fractions(outcome.network, plan.validation, plan.arrays, len(config.classes),
                                             normalise)
            card = card.model_copy(update={"validation_foreground": foreground_fractions(fractions)})
            bad = degenerate_scans(fractions, list(config.classes))
            if bad:
                refused = f"predicts one class everywhere on validation scans ({'; '.join(bad)})"
                log.warning("%s: not promoted: it %s", name, refused)
                mlflow.set_tag("tilewise.degenerate", "; ".join(bad))
        mlflow.log_metric(f"best_{outcome.metric_name}", outcome.best_metric)
        mlflow.set_tag("tilewise.stopped", outcome.stopped)
        example = normalise(val_patches[0][0][None])
        if len(config.patch) == config.spatial_dims + 1:
            example = example[:, :, 0]
        info = registry.log_model(outcome.network, card, example)
        promotion = registry.register_and_promote(name, info.model_uri, run.info.run_id, outcome.metric_name,
                                                  outcome.best_metric,
                                                  protocol="whole-regions" if metric_is_regions else None,
                                                  tags=parent, refuse=refused)
    calibration = _calibrate(loaded, f"models:/{promotion.name}/{promotion.version}", store_root, seed,
                             config.architecture)
    watershed = _tune_watershed(loaded, f"models:/{promotion.name}/{promotion.version}", store_root)
    return TrainReport(entry.name, config.architecture, run.info.run_id, outcome.metric_name, outcome.best_metric,
                       len(outcome.history), outcome.stopped, outcome.seconds, f"{promotion.name}/{promotion.version}",
                       promotion.alias, promotion.decision, outcome.history[0]["train_loss"],
                       outcome.history[-1]["train_loss"], calibration,
                       init_report.summary() if init_report else "", watershed)


def _tune_watershed(loaded: LoadedEntry, uri: str, store_root: str | None) -> str:
    """EM datasets whose instances are a watershed: tune its seed threshold and median on the new
    version's validation sections (tasks/instances/tuning.py) and store them with it."""
    inst = loaded.entry.instances
    if inst is None or inst.method != "watershed":
        return ""
    from tasks.instances.tuning import tune_model

    try:
        t = tune_model(loaded, uri, store_root)
    except (ValueError, OSError) as exc:
        log.warning("%s: watershed not tuned: %s", uri, exc)
        return f"not tuned: {exc}"
    return (f"seed threshold {t.seed_threshold}, median {t.median}: adapted Rand error {t.adapted_rand_error:.4f} "
            f"(default {t.default_error:.4f}) on {t.sections} validation sections")


def _calibrate(loaded: LoadedEntry, uri: str, store_root: str | None, seed: int, architecture: str = "unet") -> str:
    """Fit and store the new version's calibrator (catalog ``calibration.method``). The model is
    registered already: a sample that cannot be calibrated (one class, constant scores) is a warning."""
    method = loaded.entry.calibration.method
    if method == "none":
        return "none (catalog calibration.method: none)"
    if architecture == "maskrcnn":
        return "none (an instance model: its scores are the detector's; calibration maps pixel probabilities)"
    from tasks.calibration.model_version import calibrate_model
    from tasks.calibration.scores import CalibrationError

    try:
        outcome = calibrate_model(loaded, uri, method, store_root, seed=seed)
    except CalibrationError as exc:
        log.warning("%s: not calibrated: %s", uri, exc)
        return f"not calibrated: {exc}"
    s = outcome.calibrator.summary()
    return (f"{outcome.calibrator.method}: NLL {s['nll_before']:.4f} -> {s['nll_after']:.4f}, "
            f"ECE {s['ece_before']:.4f} -> {s['ece_after']:.4f} (held-out validation pixels)")
