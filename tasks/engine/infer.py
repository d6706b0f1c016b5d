"""Out-of-core sliding-window inference over a scan group: Zarr in, Zarr out, resumable.

The pieces (each testable alone): ``plan`` (where tiles go), ``tiles`` (reading them with border
padding), ``runner`` (the network: device, AMP, TTA, output checks), ``accumulate`` (weighted
logits per output chunk, finalised as soon as its last tile is in), and the writer below (one
output chunk at a time, then its done mark). This module only drives them.

Output, beside the scan's ``image`` (README, "Zarr layout"):

    prediction/probabilities   (K, *spatial) float16|float32, chunks (1, *image chunks); not written
                               with ``EngineConfig(outputs="labels")`` (runs that only need the mask)
    prediction/labels          (*spatial) uint8: argmax, or probability >= threshold for K == 1
    prediction/done            one uint8 per output chunk, written after that chunk's data
    prediction attrs["tilewise"]["complete"] written last, when every chunk is done

A re-run with the same model and parameters skips the chunks already done (resume) or, when the
prediction is complete, does nothing; other parameters replace the prediction.

Empty tiles (``skip``): with ``EngineConfig.skip_empty`` (``"auto"``: the source's declared nodata)
tiles whose whole input is empty are not run; voxels that only such tiles cover are background with
probability 1 (not calibrated), the rest blend the tiles that ran. The prediction's attributes name
the rule (``skip_empty``) and its completion record counts the tiles skipped; the rule enters the
digest only when one applies, so a scan without nodata keeps the digest it had.

Calibration: when the model version has a calibrator (``LoadedModel.calibrator``, filled from the
registry) or one is passed, every output chunk's blended probabilities go through it before they
are written, and the labels are taken from the calibrated probabilities. The prediction's
attributes name it (``calibrator``: method and sha256 of the map, or ``"none"``) and the digest
that decides resume / replace includes it. ``EngineConfig(calibration=False)`` writes the raw
probabilities.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Callable, Container, Iterable, Iterator, Literal

import numpy as np
import zarr

from tasks import identity, storage
from tasks.chunk_io import ChunkCodec
from tasks.engine.accumulate import BufferPool, Chunk, ChunkAccumulator
from tasks.engine.blend import (BlendMode, ChunkWeights, importance_map, labels_from, probabilities,
                                two_class_probabilities)
from tasks.engine.label_pyramid import NOT_GIVEN, LabelPyramid
from tasks.engine.model_io import LoadedModel
from tasks.engine.plan import ChunkSet, Placement, TilePlan, plan_tiles, stripe_width
from tasks.engine.runner import AmpMode, Lanes, ModelOutputError, ModelRunner, cpu_lanes
from tasks.engine.scan_stats import for_scan as normalization_for_scan
from tasks.engine.skip import EmptyRule, SkipSetting, find_empty_tiles, resolve_rule, valid_region
from tasks.engine.tiles import ChunkCache, PadMode, read_tile, source_band, source_box, source_reads
from tasks.errors import ScanError
from tasks.export.ngff import COMPRESSOR as LABEL_COMPRESSOR
from tasks.export.ngff import remove_label_image, remove_prediction, unlist_label_image, write_prediction_labels_ngff
from tasks.ingest.to_zarr import COMPRESSOR
from tasks.version import tilewise_version

log = logging.getLogger(__name__)

DEFAULT_TILE = {2: (256, 256), 3: (96, 96, 96)}
WRITERS = 2  # threads encoding and writing finished chunks
WRITES_PENDING = 4  # finished chunks waiting for a writer before blending waits: bounds their memory
BLENDS_PENDING = 1  # batches of logits run and waiting to be blended before the model waits
Outputs = Literal["labels,probabilities", "labels"]
OUTPUTS = ("labels,probabilities", "labels")


@dataclass(frozen=True)
class EngineConfig:
    """Options of one inference run. Sizes are spatial, array order (Z, Y, X) or (Y, X)."""

    tile: tuple[int, ...] | None = None  # None: the model card's, else 256² (2D) / 96³ (3D)
    overlap: float = 0.5
    blend: BlendMode = "gaussian"
    sigma_scale: float = 0.125
    pad: PadMode = "reflect"
    placement: Placement = "even"
    batch: int = 4
    device: str | None = None  # None: cuda if present, else cpu
    amp: AmpMode = "none"
    tta: bool = False
    channels_last: bool = False
    backend: str = "eager"  # tasks.engine.backends.OFFERED; not in the digest (logits within 1e-3 of eager)
    output_dtype: Literal["float16", "float32"] = "float16"
    threshold: float = 0.5
    memory_budget_mb: int = 512  # partial output chunks held before spilling to disk
    stripe_mb: int = 64  # open output and input chunks of a row of tiles; a wider scan runs in stripes
    input_cache_mb: int = 256  # decoded input chunks kept for the overlapping tiles that reuse them
    calibration: bool = True  # apply the model version's calibrator, if it has one
    crf: dict | None = None  # dense CRF after the prediction (tasks.refine.crf.CrfParams fields); its own output
    skip_empty: SkipSetting = "auto"  # tiles with no signal: auto (source nodata) | off | corner | a background value
    outputs: Outputs = "labels,probabilities"  # "labels": no probability array (calibration, ECE, CRF need one)

    @property
    def writes_probabilities(self) -> bool:
        return self.outputs != "labels"

    def result_fields(self) -> dict:
        """The options that change the numbers written (not device, batch or memory budget; the
        calibrator itself, not the ``calibration`` switch, enters the digest, and so does the resolved
        empty-tile rule, not the ``skip_empty`` setting; the backend stays within 1e-3 of eager)."""
        skip = {"device", "batch", "memory_budget_mb", "stripe_mb", "input_cache_mb", "channels_last", "backend",
                "calibration", "crf", "skip_empty"}  # the CRF writes prediction/crf with a digest of its own
        if self.outputs == "labels,probabilities":  # the default: predictions made before the option keep their digest
            skip.add("outputs")
        return {k: v for k, v in asdict(self).items() if k not in skip}


@dataclass
class InferResult:
    store: str
    status: str  # "inferred" | "resumed" | "unchanged" | "partial" (a region of a distributed run)
    tiles: int = 0
    model_calls: int = 0
    chunks_written: int = 0
    seconds: float = 0.0
    spills: int = 0
    peak_accumulator_mb: float = 0.0
    classes: list[str] = field(default_factory=list)
    tiles_skipped: int = 0  # empty tiles not run (``tiles`` counts those that ran)
    input_chunks_decoded: int = 0  # input chunks read and decoded ...
    input_chunks_needed: int = 0  # ... of the distinct ones the tiles touch (ratio 1: each decoded once)


@dataclass
class Prepared:
    """Everything a run (or one Dask region of it) needs, decided once."""

    store: str
    plan: TilePlan
    config: EngineConfig
    squeeze_axis: int | None
    classes: list[str]
    digest: str
    todo: ChunkSet  # chunks not done yet
    resumed: bool
    model_identity: str
    calibrator: Any = None  # tasks.calibration.calibrator.Calibrator, or None
    empty_rule: EmptyRule | None = None  # tiles whose input is all empty under it are not run
    region: tuple[tuple[int, int], ...] | None = None  # the box the tiles cover (non-empty voxels), None: all
    normalization: Any = None  # models.card.Normalization of this scan (a per-scan one resolved); None: the card's


def _fail(store: str, problem: str) -> ScanError:
    return ScanError(store, problem)


def _prediction(store: str) -> str:
    return f"{str(store).rstrip('/')}/prediction"


def resolve_tile(config: EngineConfig, model: LoadedModel, spatial: tuple[int, ...], store: str
                 ) -> tuple[tuple[int, ...], int | None]:
    """The tile over the scan's spatial axes and, for a 2D model on a 3D scan, the axis to squeeze."""
    model_dims = model.card.spatial_dims or len(spatial)
    tile = config.tile or (tuple(model.card.tile) if model.card.tile else DEFAULT_TILE[model_dims])
    tile = tuple(int(t) for t in tile)
    if any(t <= 0 for t in tile):
        raise _fail(store, f"tile sizes must be positive, got {tile}")
    squeeze = None
    if model_dims == 2 and len(spatial) == 3:
        if len(tile) == 2:
            tile = (1, *tile)
        if tile[0] != 1:
            raise _fail(store, f"a 2D model on a 3D scan needs tiles of depth 1, got {tile}")
        squeeze = 2  # (B, C, 1, Y, X) -> (B, C, Y, X)
    elif model_dims != len(spatial):
        raise _fail(store, f"a {model_dims}D model cannot run on a {len(spatial)}D scan")
    if len(tile) != len(spatial):
        raise _fail(store, f"tile {tile} has {len(tile)} sizes but the scan has {len(spatial)} spatial axes")
    return tile, squeeze


def _result_fields(config: EngineConfig, scan_normalization: dict | None) -> dict:
    """The run's parameters that change the numbers; a per-scan normalisation's values (the scan's
    percentiles) join them only when the card's normalisation is per scan, so older cards keep
    their digests."""
    fields = config.result_fields()
    if scan_normalization is not None:
        fields["scan_normalization"] = scan_normalization
    return fields


def _digest(model_identity: str, config: EngineConfig, tile: tuple[int, ...], calibrator: dict | str = "none",
            empty_rule: EmptyRule | None = None, scan_normalization: dict | None = None) -> str:
    return identity.prediction_digest(model_identity, _result_fields(config, scan_normalization), list(tile),
                                      calibrator, empty_rule.record() if empty_rule is not None else None)


def resolve_calibrator(model: LoadedModel, config: EngineConfig, calibrator: Any = None) -> tuple[Any, dict | str]:
    """The calibrator a run applies -- ``calibrator`` if given, else the model version's own (a dict
    from the registry), none when ``config.calibration`` is off -- and what the prediction's
    attributes say about it: {"method", "sha256", "uri" (the model version it came with)} or "none"."""
    if not config.calibration:
        return None, "none"
    if calibrator is not None:
        return calibrator, calibrator.record()
    own = getattr(model, "calibrator", None)
    if own is None:
        return None, "none"
    from tasks.calibration.calibrator import Calibrator

    own = own if isinstance(own, Calibrator) else Calibrator(**own)
    return own, own.record(model.identity)


def prepare(store: str, model: LoadedModel, config: EngineConfig, runner: ModelRunner | None = None,
            calibrator: Any = None, expect_digest: str | None = None) -> Prepared | None:
    """Validate everything, create (or reopen) the output; None when the output is complete already.

    ``expect_digest`` (a distributed worker): the digest the driver fixed. A worker that computes
    another one (another model version behind an alias, another file at that path) raises, and a
    worker never creates or replaces the output: only the driver does."""
    store = str(store)
    from models.zoo import is_instance_architecture

    if is_instance_architecture(model.card.architecture):
        raise _fail(store, f"model {model.identity} is an instance model (Mask R-CNN): run it in instance mode "
                           "(tilewise infer --mode instances, the default for it)")
    calibrator, cal_record = resolve_calibrator(model, config, calibrator)
    if not 0.0 <= config.overlap < 1.0:
        raise _fail(store, f"overlap must be in [0, 1), got {config.overlap}")
    if config.batch < 1:
        raise _fail(store, f"batch must be at least 1, got {config.batch}")
    if config.outputs not in OUTPUTS:
        raise _fail(store, f"outputs must be one of {', '.join(OUTPUTS)}, got {config.outputs!r}")
    if config.crf is not None and not config.writes_probabilities:
        raise _fail(store, "the CRF refines probabilities: drop --crf or write them (--outputs labels,probabilities)")
    if not storage.is_complete(store):
        raise _fail(store, "is not a complete scan group (no completion mark): ingest it first")
    group = storage.open_group(store, mode="r")
    image = group["image/0"]
    channels, spatial = image.shape[0], tuple(image.shape[1:])
    if model.card.in_channels is not None and model.card.in_channels != channels:
        raise _fail(store, f"the model takes {model.card.in_channels} input channels but the image has {channels}")
    tile, squeeze = resolve_tile(config, model, spatial, store)
    chunks = tuple(image.chunks[1:])
    plan = plan_tiles(spatial, tile, config.overlap, chunks, config.placement)
    try:
        empty_rule = resolve_rule(config.skip_empty, storage.read_record(store) or {}, channels, image)
    except ValueError as exc:
        raise _fail(store, str(exc)) from None
    normalization, norm_record = normalization_for_scan(store, model.card.normalization)  # once per scan
    digest = _digest(model.identity, config, tile, {k: v for k, v in cal_record.items() if k != "uri"}
                     if isinstance(cal_record, dict) else cal_record, empty_rule, norm_record)

    pred_url = _prediction(store)
    if expect_digest is not None and digest != expect_digest:
        raise _fail(store, f"this worker's model {model.identity} gives prediction digest {digest[:12]}, the "
                           f"driver's {expect_digest[:12]}: another model version or file; not touching the prediction")
    record = storage.read_record(pred_url)
    resumed = False
    stale = identity.outdated("infer", record) if record is not None else []
    reusable = (record is not None and record.get("digest") == digest and "classes" in record and not stale
                and storage.arrays_match(pred_url, _output_shapes(config, len(record["classes"]), plan)))
    if reusable and record.get(storage.COMPLETE_KEY):
        if storage.is_complete(pred_url):
            return None
        reusable = False  # a mark whose arrays are not all there vouches for nothing
    if reusable:
        resumed = True
        classes = list(record["classes"])
        if expect_digest is None:  # the driver: an unfinished prediction is never shown as the mask
            for name in ("instances", "prediction"):
                remove_label_image(store, name)
    else:
        if expect_digest is not None:
            raise _fail(store, "the driver's prediction output is missing or changed under this worker; "
                               "not replacing it")
        if stale:
            log.info("%s: made by older code (%s); recomputing the prediction", pred_url, "; ".join(stale))
        elif record is not None and record.get("digest") == digest:
            log.warning("%s: arrays missing or reshaped; recomputing the prediction", pred_url)
        if record is not None or storage.exists(pred_url):
            log.info("%s: replacing a prediction made with another model or parameters", pred_url)
            remove_prediction(store)  # its NGFF label images unlisted first
        classes = list(model.card.classes or [])
        if not classes:  # ask the model: run one tile
            probe = runner or ModelRunner(model.module, device=config.device, squeeze_axis=squeeze)
            first = next(plan.tiles())
            batch = normalization.apply(read_tile(image, first, tile, config.pad)[None])
            try:
                logits = probe(batch, where=f" (tile at {first})")
            except ModelOutputError as exc:
                raise _fail(store, str(exc)) from None
            classes = [f"class_{k}" for k in range(logits.shape[1])]
        if calibrator is not None and len(classes) != len(calibrator.classes) and not (
                len(classes) == 1 and len(calibrator.classes) == 2):
            raise _fail(store, f"the calibrator is for {len(calibrator.classes)} classes, the model gives "
                               f"{len(classes)}")
        _create_output(pred_url, plan, len(classes), config, digest, classes, model.identity, cal_record,
                       empty_rule, norm_record, model.card.validation_foreground)

    # a new output has no chunk done; a reused one's done marks are listed, not read one by one
    todo = ChunkSet(storage.stored_chunks(f"{pred_url}/done") if reusable else np.zeros(plan.chunk_grid, bool))
    region = None
    if empty_rule is not None and todo:  # tiles only over the box of the non-empty voxels
        region = valid_region(group, empty_rule, image.__getitem__, chunks)
        if region is None:  # nothing but empty voxels: no tile at all
            plan = replace(plan, starts=tuple(() for _ in plan.starts))
            region = tuple((0, 0) for _ in spatial)
        else:
            plan = plan_tiles(spatial, tile, config.overlap, chunks, config.placement, region)
    return Prepared(store, plan, config, squeeze, classes, digest, todo, resumed, model.identity, calibrator,
                    empty_rule, region, normalization)


def _output_shapes(config: EngineConfig, classes: int, plan: TilePlan) -> dict[str, list[int]]:
    shapes = {"probabilities": [classes, *plan.shape]} if config.writes_probabilities else {}
    return {**shapes, "labels": list(plan.shape), "done": list(plan.chunk_grid)}


def _create_output(pred_url: str, plan: TilePlan, classes: int, config: EngineConfig, digest: str,
                   names: list[str], model_identity: str, calibrator: dict | str = "none",
                   empty_rule: EmptyRule | None = None, scan_normalization: dict | None = None,
                   validation_foreground: dict | None = None) -> None:
    group = storage.open_group(pred_url, mode="w")
    axes = "zyx"[-plan.ndim:]
    if config.writes_probabilities:
        group.create_array("probabilities", shape=(classes, *plan.shape), dtype=config.output_dtype,
                           chunks=(1, *plan.chunks), compressors=COMPRESSOR, fill_value=0,
                           dimension_names=("c", *axes))
    # the NGFF label image's codec: its level 0 gets each chunk's encoded bytes (label_pyramid)
    group.create_array("labels", shape=plan.shape, dtype="uint8", chunks=plan.chunks, compressors=LABEL_COMPRESSOR,
                       fill_value=0, dimension_names=tuple(axes))
    group.create_array("done", shape=plan.chunk_grid, dtype="uint8", chunks=(1,) * plan.ndim, fill_value=0)
    group.attrs[storage.ATTRS_KEY] = {
        "kind": "prediction", "digest": digest, "classes": names, "model": model_identity, "calibrator": calibrator,
        "params": {**_result_fields(config, scan_normalization), "tile": list(plan.tile)},
        "skip_empty": empty_rule.record() if empty_rule is not None else "off",
        "outputs": config.outputs.split(","),
        # what the model's validation scans held (its card): evaluate and the nightly flag drift from it
        **({"validation_foreground": validation_foreground} if validation_foreground else {}),
        "tilewise_version": tilewise_version(), **identity.stamp("infer"),
    }


class _ChunkWriter:
    """Writes finished chunks: blended logits → probabilities (calibrated) → labels → done mark.
    The weight sums come from the plan (the tiles that ran); voxels no run tile covers are
    background with probability 1. Arrays handed in go back to ``pool`` once written."""

    def __init__(self, pred_url: str, plan: TilePlan, config: EngineConfig, calibrator: Any = None,
                 importance: np.ndarray | None = None, skipped: set = frozenset(), classes: int = 1,
                 pool: BufferPool | None = None, pyramid: LabelPyramid | None = None):
        self.plan = plan
        self.config = config
        self.calibrator = calibrator
        self.importance = importance
        self.skipped = skipped
        self.classes = classes
        self.pool = pool
        self.pyramid = pyramid
        self.weights = ChunkWeights(plan, importance, skipped)
        self.probs = zarr.open_array(f"{pred_url}/probabilities", mode="r+") if config.writes_probabilities else None
        self.labels = zarr.open_array(f"{pred_url}/labels", mode="r+")
        self.done = zarr.open_array(f"{pred_url}/done", mode="r+")
        # whole chunks of a local prediction are encoded in the writer's own thread (tasks.chunk_io)
        self._probs_codec = ChunkCodec.for_array(self.probs) if self.probs is not None else None
        self._labels_codec = ChunkCodec.for_array(self.labels)
        self._done_bytes = None

    def _background(self, probs: np.ndarray, where: np.ndarray | None = None) -> None:
        """Background with probability 1 (class 0; for one sigmoid class, foreground 0)."""
        sel = (slice(None),) if where is None else (slice(None), where)
        probs[sel] = 0.0
        if probs.shape[0] > 1:
            probs[(0,) + sel[1:]] = 1.0

    def _mark_done(self, index: Chunk) -> None:
        """``done[index] = 1``: the first through zarr, the others as that chunk's stored bytes (the
        same one-byte chunk, encoded once); on object storage each through zarr (no GET to read
        the first back)."""
        if self._done_bytes is None:
            self.done[index] = 1
            if storage.local_bytes(self.done):
                self._done_bytes = storage.read_chunk_bytes(self.done, index)
        else:
            storage.write_chunk_bytes(self.done, index, self._done_bytes)

    def write(self, index: Chunk, summed: np.ndarray | None) -> Chunk:
        box = self.plan.chunk_box(index)
        if summed is None:  # every tile over this chunk was empty
            probs = np.empty((self.classes, *(b.stop - b.start for b in box)), np.float32)
            self._background(probs)
        else:
            weights, uncovered = self.weights(index)  # uncovered: under no tile that ran; overwritten below
            # K > 1: summed holds the logits relative to class 0 (K - 1 channels); class 0's are 0
            if self.classes == 2:
                probs = two_class_probabilities(summed, weights)
            else:
                full = summed if self.classes == 1 else np.concatenate([np.zeros_like(summed[:1]), summed])
                probs = probabilities(full, weights, inplace=True)
            if self.calibrator is not None:  # one chunk (K, *chunk) at a time
                probs = self.calibrator.apply(probs)
            if uncovered is not None:
                self._background(probs, uncovered)
        if self.probs is not None:
            out = _as_dtype(probs, self.config.output_dtype)
            if self._probs_codec is not None:
                self._probs_codec.write_box((slice(0, out.shape[0]),) + box, out)
            else:
                self.probs[(slice(None),) + box] = out
        labels = labels_from(probs, self.config.threshold)
        if self._labels_codec is not None:
            encoded = self._labels_codec.write(index, labels)
        else:
            self.labels[box] = labels
            encoded = NOT_GIVEN
        if self.pyramid is not None:
            self.pyramid.add(box, labels, encoded)
        self._mark_done(index)  # after the data: a done chunk is always a whole chunk
        if summed is not None and self.pool is not None:
            self.pool.give(summed)
        return index


def _as_dtype(probs: np.ndarray, dtype: str) -> np.ndarray:
    """float32 → the output dtype; float16 by torch (the same rounding to nearest even as numpy's,
    about 14x faster on a CPU without numpy's float16 SIMD)."""
    if dtype == "float16":
        import torch

        return torch.from_numpy(probs).to(torch.float16).numpy()
    return probs.astype(dtype, copy=False)


def run_chunks(prep: Prepared, model: LoadedModel, chunks: set[Chunk] | None = None,
               runner: ModelRunner | None = None,
               progress: Callable[[int, int], None] | None = None,
               pyramid: LabelPyramid | None = None) -> InferResult:
    """Compute the output chunks ``chunks`` (default: every chunk not done yet), each tile once (a
    tile over two stripes of a wide scan twice, once for each stripe's chunks).
    ``pyramid``: the label image levels to feed as label chunks are written (all chunks, one process)."""
    t0 = time.perf_counter()
    config, plan = prep.config, prep.plan
    wanted = prep.todo if chunks is None else {c for c in chunks if c in prep.todo}
    group = storage.open_group(prep.store, mode="r")
    image = ChunkCache(group["image/0"], budget_bytes=config.input_cache_mb << 20)
    runner = runner or ModelRunner(model.module, device=config.device, amp=config.amp, tta=config.tta,
                                   channels_last=config.channels_last, squeeze_axis=prep.squeeze_axis,
                                   backend=config.backend)
    if runner.squeeze_axis is None:
        runner.squeeze_axis = prep.squeeze_axis
    less: Counter = Counter()  # per chunk, its tiles not run (empty)
    skipped: set = set()
    # Softmax is unchanged by a shift of all logits, and blending is linear: summing each tile's
    # logits minus its class-0 logit keeps K - 1 channels per live chunk instead of K.
    kept = max(len(prep.classes) - 1, 1)
    # the run in parts, one after the other: (tile origins, the chunks they add into, the stripe's
    # plan when the part announces its own input reads)
    parts: list[tuple[Iterable[tuple[int, ...]], Container[Chunk], TilePlan | None]]
    if chunks is None and prep.empty_rule is None and prep.todo.is_all():
        # The whole grid: tiles straight from the plan, every count a product of per-axis counts,
        # so memory does not grow with the scan (no list of tiles, no table of chunks). A scan
        # too wide for the open chunks of a row of tiles to fit ``stripe_mb`` runs in stripes
        # (``stripe_width``): the open chunks then span a stripe, not the scan, whatever its width.
        uses, needed = source_reads(plan, image.chunks[1:], config.pad)
        channel_chunks = -(-image.shape[0] // image.chunks[0])  # every one is read
        image.expect_grid(uses, needed * channel_chunks)
        voxel = channel_chunks * image.chunks[0] * np.dtype(image.array.dtype).itemsize
        band = source_band(plan, image.chunks[1:], voxel, config.pad)
        width = stripe_width(plan, kept, config.stripe_mb << 20, band)
        if width is None:
            parts = [(plan.tiles(), wanted, None)]
            total = plan.tile_count()
        else:
            stripes = plan.stripes(width)
            parts = [(sub.tiles(), cols, sub) for sub, cols in stripes]
            total = sum(sub.tile_count() for sub, _ in stripes)
            log.info("%s: %d tiles in %d stripes of %d voxels (%d tiles over two stripes run twice)", prep.store,
                     total, len(stripes), width, total - plan.tile_count())
    else:  # a region, a resumed run or empty tiles to find: the tiles over the chunks wanted, listed
        origins = [o for o in plan.tiles() if any(c in wanted for c in plan.chunks_of_tile(o))]
        if prep.empty_rule is not None:
            decision = find_empty_tiles(group, plan, origins, prep.empty_rule, image.__getitem__)
            skipped = decision.skipped
            log.info("%s: %d of %d tiles empty (%s), not run; decided in %.2f s (%d checked at level 0)",
                     prep.store, len(skipped), len(origins), prep.empty_rule.source, decision.seconds,
                     decision.checked_at_level0)
            for origin in skipped:
                less.update(plan.chunks_of_tile(origin))
            origins = [o for o in origins if o not in skipped]
            image.clear()  # chunks the decision read: the run announces its own reads below
        for origin in origins:
            image.expect((slice(None),) + source_box(origin, plan.tile, plan.shape, config.pad))
        total = len(origins)
        parts = [(origins, wanted, None)]

    def count(index: Chunk) -> int:
        return plan.tiles_in_chunk(index) - less[index] if less else plan.tiles_in_chunk(index)

    batches = ((i, batch) for i, (origins, _, _) in enumerate(parts) for batch in _batches(origins, config.batch))
    weights = importance_map(plan.tile, config.blend, config.sigma_scale)
    pool = BufferPool()
    acc = ChunkAccumulator(plan, kept, wanted, count, budget_bytes=config.memory_budget_mb << 20, pool=pool)
    writer = _ChunkWriter(_prediction(prep.store), plan, config, prep.calibrator, weights, skipped,
                          len(prep.classes), pool, pyramid)
    norm = prep.normalization if prep.normalization is not None else model.card.normalization
    calls_before = runner.calls

    reading = [-1]  # the part being read (the read stage alone moves it on)

    def read(item):
        part, batch = item
        if part != reading[0]:
            reading[0] = part
            stripe = parts[part][2]
            if stripe is not None:  # its own reads (its first tiles re-read the last stripe's border chunks)
                image.clear()
                image.expect_grid(source_reads(stripe, image.chunks[1:], config.pad)[0], image.needed)
        x = np.empty((len(batch), image.shape[0], *plan.tile), np.float32)
        for tile, origin in zip(x, batch):  # each tile from its chunks straight into the batch
            read_tile(image, origin, plan.tile, config.pad, out=tile)
        return norm.apply(x, inplace=True)

    written = ran = empty_chunks = 0
    pending: list[Future] = []  # writes: the blend stage's alone once the first batch is in

    def drain_writes(keep: int) -> None:
        nonlocal written
        while len(pending) > keep:
            pending.pop(0).result()
            written += 1

    def blend(item: tuple[int, list[tuple[int, ...]]], logits: np.ndarray) -> None:
        """The blend stage (one thread, batches in order): weighted logits into their chunks (their
        part's), and every chunk they finish handed to a writer."""
        part, batch = item
        if logits.shape[1] > 1:
            logits = logits[:, 1:] - logits[:, :1]
        for origin, tile_logits in zip(batch, logits):
            tile_logits *= weights
            for index, summed in acc.add(origin, tile_logits, parts[part][1]):
                pending.append(writers.submit(writer.write, index, summed))
        drain_writes(WRITES_PENDING)  # few finished chunks wait for the encoder: memory stays bounded

    blends: deque[Future] = deque()
    with ThreadPoolExecutor(1, thread_name_prefix="tilewise-read") as readers, \
            ThreadPoolExecutor(1, thread_name_prefix="tilewise-blend") as blender, \
            ThreadPoolExecutor(WRITERS, thread_name_prefix="tilewise-write") as writers, \
            Lanes(runner, cpu_lanes(runner, config.batch), config.batch) as lanes:
        try:
            for index in sorted(c for c in wanted if not count(c)):  # only empty tiles over it
                pending.append(writers.submit(writer.write, index, None))
                empty_chunks += 1
                drain_writes(WRITES_PENDING)
            inflight: deque[tuple[tuple[int, list], object]] = deque()  # batches in the lanes, in order

            def finish_oldest() -> None:
                nonlocal ran
                done, queued = inflight.popleft()
                try:
                    logits = queued.result()
                except ModelOutputError as exc:
                    raise _fail(prep.store, str(exc)) from None
                if logits.shape[1] != len(prep.classes):
                    raise _fail(prep.store, f"model gives {logits.shape[1]} classes, the prediction has "
                                            f"{len(prep.classes)}")
                # the model goes on with the next batch while this one is blended (on a GPU the
                # device never waits for the CPU's blending); one batch waits at most
                blends.append(blender.submit(blend, done, logits))
                while len(blends) > BLENDS_PENDING:
                    blends.popleft().result()
                ran += len(done[1])
                if progress is not None:
                    progress(ran, total)

            batch = next(batches, None)
            nxt = readers.submit(read, batch) if batch else None
            while batch:
                x = nxt.result()
                following = next(batches, None)
                nxt = readers.submit(read, following) if following else None
                # on a CPU, the batch split over two lanes and the next one queued behind it (Lanes)
                inflight.append((batch, lanes.submit(x, where=f" (tiles from {batch[1][0]})")))
                if len(inflight) >= lanes.depth:
                    finish_oldest()
                batch = following
            while inflight:
                finish_oldest()
            while blends:
                blends.popleft().result()
        finally:
            for b in blends:  # the blend stage stops before its writes are counted
                b.exception()
            for f in pending:  # let started writes finish so every done mark sits on whole data
                if f.exception() is None:
                    written += 1
            acc.close()
        for f in pending:
            f.result()
    if acc.remaining or acc.completed + empty_chunks != len(wanted):
        raise _fail(prep.store, f"internal error: {len(wanted) - acc.completed - empty_chunks} chunks never completed")
    return InferResult(prep.store, "partial", tiles=ran, model_calls=runner.calls - calls_before,
                       chunks_written=written, seconds=time.perf_counter() - t0, spills=acc.spills,
                       peak_accumulator_mb=acc.peak_bytes / 2**20, classes=prep.classes, tiles_skipped=len(skipped),
                       input_chunks_decoded=image.reads, input_chunks_needed=image.needed)


def _batches(origins: Iterable[tuple[int, ...]], size: int) -> Iterator[list[tuple[int, ...]]]:
    """``origins`` in lists of ``size`` (the last may be shorter), drawn as they are needed."""
    it = iter(origins)
    while batch := list(itertools.islice(it, size)):
        yield batch


def start_label_pyramid(prep: Prepared) -> LabelPyramid | None:
    """The unlisted ``labels/prediction`` levels, written as the run goes, when one process runs every
    chunk of a new prediction and the pyramid's blocks align with chunks; else None (``finish``
    writes the pyramid from ``prediction/labels``)."""
    group = storage.open_group(prep.store, mode="r+")
    if prep.resumed or not prep.todo.is_all() or not LabelPyramid.applies(group):
        return None
    labels = group.require_group("labels")
    unlist_label_image(labels, "prediction")
    target = labels.create_group("prediction", overwrite=True)
    return LabelPyramid(group, target, group["prediction/labels"], classes=len(prep.classes))


def finish(prep: Prepared, extra: dict | None = None, pyramid: LabelPyramid | None = None) -> None:
    """Write the prediction's completion mark, once every chunk is done; then list its NGFF label
    image (its levels from ``pyramid`` when that holds every chunk, else written now)."""
    pred = storage.open_group(_prediction(prep.store), mode="r+")
    done = storage.stored_chunks(f"{_prediction(prep.store)}/done")
    if not done.all():
        raise _fail(prep.store, f"{int((done == 0).sum())} output chunks are not done; not marking complete")
    if prep.region is not None:
        extra = {**(extra or {}), "valid_region": [list(r) for r in prep.region]}
    storage.mark_complete(pred, {"at": datetime.now(timezone.utc).isoformat(), **(extra or {})},
                          arrays=tuple(_output_shapes(prep.config, len(prep.classes), prep.plan)))
    # napari / OME-Zarr readers opened at the scan's root overlay the prediction as an NGFF label image
    write_prediction_labels_ngff(prep.store, levels_written=pyramid is not None and pyramid.complete)


def infer_scan(store: str, model: LoadedModel, config: EngineConfig = EngineConfig(), *,
               runner: ModelRunner | None = None,
               progress: Callable[[int, int], None] | None = None, calibrator: Any = None) -> InferResult:
    """Run ``model`` over the scan group at ``store`` in one process (see module docstring).
    ``calibrator`` (a ``Calibrator``) overrides the model version's own.

    Holds the store's lock (``storage.store_lock``, purpose "infer", the same lock ingest takes)
    from ``prepare`` to ``finish``: another run on this store waits or fails with ``StoreBusy``."""
    t0 = time.perf_counter()
    with storage.store_lock(store, purpose="infer"):
        prep = prepare(store, model, config, runner, calibrator)
        if prep is None:
            return InferResult(str(store), "unchanged")
        pyramid = start_label_pyramid(prep)
        result = run_chunks(prep, model, runner=runner, progress=progress, pyramid=pyramid)
        finish(prep, {"tiles": result.tiles, "model_calls": result.model_calls, "tiles_skipped": result.tiles_skipped},
               pyramid)
    result.status = "resumed" if prep.resumed else "inferred"
    result.seconds = time.perf_counter() - t0
    return result
