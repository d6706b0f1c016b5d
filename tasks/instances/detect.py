"""Instance inference: a Mask R-CNN over tiles, merged into whole-scan instances, written out of core.

The engine's rules (tasks/engine): the same tile plan (the card's tile, ``overlap``, ``placement``;
a 2D model over a 3D stack runs section by section with depth-1 tiles), border padding, batches,
a reader thread prefetching the next batch while the detector runs, the device, the store lock.
Each tile's detections (mask probability >= 0.5, score >= ``score_threshold``, label = the card's
class index) go to :class:`tasks.instances.merge.TileMerger` in plan order, which returns each
object as soon as no later tile can touch it; finished objects are painted into per-chunk buffers
(a pixel claimed by two objects goes to the higher score) and a buffer is written to
``prediction/instances`` (uint32, ids 1..N in finishing order) as soon as no tile and no open
object can touch its chunk -- with ``prediction/labels`` (uint8, each pixel its object's class) so
semantic evaluation and exports still work. A stack predicted section by section is then linked
across sections (tasks/instances/link.py). Then the table, then the marks (instances, then the
prediction's own): nothing half-written is complete.

Tiles whose every pixel is the scan's nodata (GeoTIFF ``nodata``, every band) are not passed to the
detector: skipped and counted. No detection at all is a valid, empty (all background) result.

Resume: the detector is the expensive part. Each tile's detections are cached, compressed, under
``prediction/.detections/<tile number>.npz`` (written under a temporary name, then renamed). A run
with the same digest (model, parameters, score threshold) after a crash re-uses every cached tile
without calling the detector, merges and paints again (cheap), and removes the cache once complete.
A complete prediction with the same digest is ``unchanged``; any other is replaced.

Memory: the open objects (tasks/instances/merge.py), the chunk buffers the open objects and the
tiles not yet run still touch (about one row of chunks along the first axis), one batch of tiles.
"""

from __future__ import annotations

import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import numpy as np

from tasks import identity, storage
from tasks.engine.infer import EngineConfig, resolve_tile
from tasks.engine.plan import TilePlan, plan_tiles
from tasks.engine.tiles import ChunkCache, read_tile
from tasks.errors import ScanError
from tasks.instances import store as inst_store
from tasks.instances.merge import Detection, Instance, TileMerger
from tasks.version import tilewise_version

log = logging.getLogger(__name__)

CACHE = ".detections"

Detector = Callable[[np.ndarray], list[list[Detection]]]


@dataclass
class InstanceResult:
    store: str
    status: str  # inferred | resumed | unchanged
    tiles: int = 0
    skipped_nodata: int = 0
    model_calls: int = 0
    cached_tiles: int = 0
    instances: int = 0
    large_instances: int = 0
    peak_open: int = 0
    seconds: float = 0.0


def torch_detector(network, device: str | None = None, score_threshold: float = 0.5) -> Detector:
    """A torchvision Mask R-CNN (eval mode) as a :data:`Detector`: (B, C, *tile) float32 -> per
    tile a list of :class:`Detection` (mask probability >= 0.5, score >= ``score_threshold``)."""
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    network = network.to(dev).eval()

    def detect(batch: np.ndarray) -> list[list[Detection]]:
        with torch.inference_mode():
            outputs = network(list(torch.from_numpy(np.ascontiguousarray(batch)).to(dev)))
        found = []
        for out in outputs:
            keep = out["scores"] >= score_threshold
            masks = (out["masks"][keep, 0] >= 0.5).cpu().numpy()
            found.append([Detection(m, float(s), int(lab)) for m, s, lab in
                          zip(masks, out["scores"][keep].cpu().tolist(), out["labels"][keep].cpu().tolist())])
        return found

    return detect


def detector_network(model) -> Any:
    """The torchvision detector inside a loaded instance model (models/maskrcnn.py's wrapper)."""
    return getattr(model.module, "detector", model.module)


def _digest(model_identity: str, config: EngineConfig, tile: tuple[int, ...], score_threshold: float) -> str:
    return identity.detector_digest(model_identity, config.result_fields(), list(tile), score_threshold)


def _nodata(record: dict) -> float | None:
    values = (record.get("spatial") or {}).get("nodata") or []
    values = [v for v in values if v is not None]
    return float(values[0]) if values and all(v == values[0] for v in values) else None


class _Cache:
    """Per-tile detections on the store's filesystem (fsspec), atomic per file."""

    def __init__(self, pred_url: str):
        import fsspec

        self.fs, self.root = fsspec.core.url_to_fs(f"{pred_url}/{CACHE}")
        self.fs.makedirs(self.root, exist_ok=True)

    def _path(self, number: int) -> str:
        return f"{self.root}/{number}.npz"

    def get(self, number: int) -> list[Detection] | None:
        path = self._path(number)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as fh:
            data = np.load(io.BytesIO(fh.read()))
            shape = tuple(int(s) for s in data["shape"])
            bits = np.unpackbits(data["masks"], count=len(data["scores"]) * int(np.prod(shape)))
            masks = bits.reshape(len(data["scores"]), *shape).astype(bool)
            return [Detection(m, float(s), int(lab)) for m, s, lab in zip(masks, data["scores"], data["labels"])]

    def put(self, number: int, detections: list[Detection], shape: tuple[int, ...]) -> None:
        buf = io.BytesIO()
        masks = np.stack([d.mask for d in detections]) if detections else np.zeros((0, *shape), bool)
        np.savez_compressed(buf, masks=np.packbits(masks.astype(bool).ravel()), shape=np.asarray(shape),
                            scores=np.asarray([d.score for d in detections], np.float32),
                            labels=np.asarray([d.label for d in detections], np.int64))
        tmp = self._path(number) + ".tmp"
        with self.fs.open(tmp, "wb") as fh:
            fh.write(buf.getvalue())
        self.fs.mv(tmp, self._path(number))

    def remove(self) -> None:
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)


class _Painter:
    """Finished instances -> per-chunk buffers -> ``instances`` and ``labels``, each chunk written
    once, when no remaining tile and no open object can touch it."""

    def __init__(self, group, plan: TilePlan, where: str):
        self.instances, self.labels = group[inst_store.INSTANCES], group["labels"]
        self.plan, self.where = plan, where
        self.remaining = plan.tiles_per_chunk()
        self.buffers: dict[tuple[int, ...], np.ndarray] = {}
        self.score = np.zeros(1, np.float32)  # by id; 0: background
        self.label = np.zeros(1, np.uint8)
        self.count = 0
        self.peak_buffers = 0

    def _buffer(self, index):
        if index not in self.buffers:
            box = self.plan.chunk_box(index)
            self.buffers[index] = np.zeros([s.stop - s.start for s in box], np.uint32)
            self.peak_buffers = max(self.peak_buffers, len(self.buffers))
        return self.buffers[index]

    def paint(self, inst: Instance) -> None:
        self.count += 1
        inst_store.check_count(self.where, self.count)
        if self.count >= len(self.score):
            self.score = np.concatenate([self.score, np.zeros(len(self.score), np.float32)])
            self.label = np.concatenate([self.label, np.zeros(len(self.label), np.uint8)])
        self.score[self.count], self.label[self.count] = inst.score, inst.label
        c = self.plan.chunks
        ranges = [range(a // s, (b - 1) // s + 1) for a, b, s in zip(inst.lo, inst.hi, c)]
        for index in np.ndindex(*[len(r) for r in ranges]):
            chunk = tuple(r[i] for r, i in zip(ranges, index))
            box = self.plan.chunk_box(chunk)
            lo = [max(a, s.start) for a, s in zip(inst.lo, box)]
            hi = [min(b, s.stop) for b, s in zip(inst.hi, box)]
            part = inst.mask[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, inst.lo))]
            buf = self._buffer(chunk)[tuple(slice(a - s.start, b - s.start) for a, b, s in zip(lo, hi, box))]
            take = part & ((buf == 0) | (self.score[buf] < inst.score))
            buf[take] = self.count

    def tile_done(self, origin) -> None:
        for chunk in self.plan.chunks_of_tile(origin):
            self.remaining[chunk] -= 1

    def flush(self, open_boxes: list[tuple[tuple[int, ...], tuple[int, ...]]], final: bool = False) -> None:
        for chunk in [c for c, n in self.remaining.items() if n == 0 or final]:
            box = self.plan.chunk_box(chunk)
            if not final and any(all(a < s.stop and b > s.start for a, b, s in zip(lo, hi, box))
                                 for lo, hi in open_boxes):
                continue
            del self.remaining[chunk]
            buf = self.buffers.pop(chunk, None)
            if buf is None:
                continue  # nothing painted: the arrays' fill value (0) is right
            self.instances[box] = buf
            self.labels[box] = self.label[buf]


def _present_ids(instances, count: int) -> np.ndarray:
    """The ids 1..count that still have a pixel (one pass, chunk by chunk)."""
    seen = np.zeros(count + 1, bool)
    depth = instances.chunks[0]
    for a in range(0, instances.shape[0], depth):
        seen[np.unique(np.asarray(instances[a: a + depth]))] = True
    return np.flatnonzero(seen[1:]) + 1


def _prepare(store: str, model, config: EngineConfig, score_threshold: float):
    store = str(store).rstrip("/")
    from models.zoo import INSTANCE_ARCHITECTURES, is_instance_architecture

    if not is_instance_architecture(model.card.architecture):
        raise ScanError(store, f"model {model.identity} is a semantic model (architecture "
                               f"{model.card.architecture or 'unknown'}); instance mode needs an instance model "
                               f"({', '.join(INSTANCE_ARCHITECTURES)}), or make instances from its prediction: "
                               "tilewise instances")
    if not 0.0 <= config.overlap < 1.0:
        raise ScanError(store, f"overlap must be in [0, 1), got {config.overlap}")
    if config.overlap == 0.0:
        raise ScanError(store, "instance inference needs overlapping tiles (overlap > 0) to merge objects cut by a "
                               "tile edge")
    if not storage.is_complete(store):
        raise ScanError(store, "is not a complete scan group (no completion mark): ingest it first")
    group = storage.open_group(store, mode="r")
    image = group["image/0"]
    spatial = tuple(image.shape[1:])
    if model.card.in_channels is not None and model.card.in_channels != image.shape[0]:
        raise ScanError(store, f"the model takes {model.card.in_channels} input channels but the image has "
                               f"{image.shape[0]}")
    tile, squeeze = resolve_tile(config, model, spatial, store)
    plan = plan_tiles(spatial, tile, config.overlap, tuple(image.chunks[1:]), config.placement)
    return store, image, plan, squeeze, _digest(model.identity, config, tile, score_threshold)


def infer_instances(store: str, model, config: EngineConfig = EngineConfig(), *, score_threshold: float = 0.5,
                    detector: Detector | None = None,
                    progress: Callable[[int, int], None] | None = None) -> InstanceResult:
    """Instance inference of ``model`` over the scan group at ``store`` (module docstring).
    ``detector`` replaces the model's network (tests inject a deterministic one)."""
    t0 = time.perf_counter()
    store, image, plan, squeeze, digest = _prepare(store, model, config, score_threshold)
    pred_url = inst_store.prediction_url(store)
    with storage.store_lock(store, purpose="infer"):
        record = storage.read_record(pred_url)
        current = record is not None and record.get("digest") == digest and not identity.outdated("detect", record)
        if current and storage.is_complete(pred_url) and inst_store.instances_complete(store, digest):
            return InstanceResult(store, "unchanged", seconds=time.perf_counter() - t0)
        resumed = current and storage.exists(f"{pred_url}/{CACHE}")
        if record is not None and not resumed:
            log.info("%s: replacing a prediction made with another model or parameters", pred_url)
        _recreate(store, plan, model, config, digest, score_threshold, keep_cache=resumed)
        detect = detector or torch_detector(detector_network(model), config.device, score_threshold)
        result = _run(store, image, plan, squeeze, model, config, detect, progress)
        result.status = "resumed" if resumed else "inferred"
        result.seconds = time.perf_counter() - t0
        return result


def _recreate(store, plan, model, config, digest, score_threshold, keep_cache: bool) -> None:
    """A fresh prediction group for instances (the detection cache kept when resuming)."""
    from tasks.ingest.to_zarr import COMPRESSOR

    from tasks.export.ngff import remove_label_image, remove_prediction

    pred_url = inst_store.prediction_url(store)

    if keep_cache:  # resuming: the arrays are made afresh, the detection cache stays
        remove_label_image(store, "prediction")  # the old mask stops being shown first
        pred = storage.open_group(pred_url, mode="r+")
        storage.clear_complete(pred_url)
        for name in ("labels", inst_store.PANOPTIC):
            if name in pred:
                del pred[name]
    else:
        remove_prediction(store)
        pred = storage.open_group(pred_url, mode="w")
    axes = "zyx"[-plan.ndim:]
    pred.create_array("labels", shape=plan.shape, dtype="uint8", chunks=plan.chunks, compressors=COMPRESSOR,
                      fill_value=0, dimension_names=tuple(axes))
    classes = list(model.card.classes or ["background", "object"])
    pred.attrs[storage.ATTRS_KEY] = {
        "kind": "prediction", "mode": "instances", "digest": digest, "classes": classes, "model": model.identity,
        "calibrator": "none", "params": {"tile": list(plan.tile), "overlap": config.overlap, "pad": config.pad,
                                         "placement": config.placement, "score_threshold": score_threshold},
        "tilewise_version": tilewise_version(), **identity.stamp("detect")}
    inst_store.create_instances(store, plan.shape, plan.chunks, source="detector", digest_value=digest,
                                params={"model": model.identity, "score_threshold": score_threshold,
                                        "tile": list(plan.tile), "overlap": config.overlap})


def _run(store, image, plan: TilePlan, squeeze, model, config: EngineConfig, detect: Detector,
         progress) -> InstanceResult:
    pred_url = inst_store.prediction_url(store)
    pred = storage.open_group(pred_url, mode="r+")
    cache = _Cache(pred_url)
    painter = _Painter(pred, plan, store)
    merger = TileMerger(plan)
    nodata = _nodata(storage.read_record(store) or {})
    source = ChunkCache(image, budget_bytes=config.input_cache_mb << 20)
    norm = model.card.normalization
    origins = list(plan.tiles())
    batches = [list(range(i, min(i + config.batch, len(origins)))) for i in range(0, len(origins), config.batch)]
    result = InstanceResult(store, "inferred", tiles=len(origins))

    def read(numbers):
        """Cached detections where there are; the tiles the detector must see, read and normalised."""
        cached = {n: cache.get(n) for n in numbers}
        todo, skipped, tiles = [], [], []
        for n in numbers:
            if cached[n] is not None:
                continue
            tile = read_tile(source, origins[n], plan.tile, config.pad)
            if nodata is not None and bool(np.all(tile == nodata)):
                skipped.append(n)
                continue
            todo.append(n)
            tiles.append(tile)
        batch = norm.apply(np.stack(tiles)) if tiles else None
        if batch is not None and squeeze is not None:
            batch = batch[:, :, 0]  # (B, C, 1, Y, X) -> (B, C, Y, X): a 2D model over a stack
        return cached, todo, skipped, batch

    with ThreadPoolExecutor(1, thread_name_prefix="tilewise-read") as reader:
        nxt = reader.submit(read, batches[0]) if batches else None
        for i, numbers in enumerate(batches):
            cached, todo, skipped, batch = nxt.result()
            nxt = reader.submit(read, batches[i + 1]) if i + 1 < len(batches) else None
            found: dict[int, list[Detection]] = {n: d for n, d in cached.items() if d is not None}
            result.cached_tiles += len(found)
            if batch is not None:
                detections = detect(batch)
                result.model_calls += 1
                for n, dets in zip(todo, detections):
                    if squeeze is not None:
                        dets = [Detection(d.mask[None], d.score, d.label) for d in dets]
                    cache.put(n, dets, tuple(plan.tile))
                    found[n] = dets
            for n in skipped:
                cache.put(n, [], tuple(plan.tile))
                found[n] = []
            result.skipped_nodata += len(skipped)
            for n in numbers:  # plan order
                for inst in merger.add(origins[n], found[n]):
                    painter.paint(inst)
                painter.tile_done(origins[n])
            painter.flush(merger.open_boxes())
            if progress is not None:
                progress(numbers[-1] + 1, len(origins))
    for inst in merger.finish():
        painter.paint(inst)
    painter.flush([], final=True)
    count = painter.count
    scores, classes = painter.score[: count + 1], painter.label[: count + 1]
    if squeeze is not None and plan.ndim == 3 and plan.shape[0] > 1 and count:
        from tasks.instances.link import link_sections, relabel

        instances = pred[inst_store.INSTANCES]
        lookup = link_sections(instances)
        relabel(instances, lookup, instances)
        linked = np.zeros(int(lookup.max()) + 1, np.float32)
        np.maximum.at(linked, lookup, scores[: len(lookup)])
        scores, classes, count = linked, None, int(lookup.max())
    # objects hidden entirely by higher-scoring ones kept no pixel: ids made consecutive again
    instances = pred[inst_store.INSTANCES]
    present = _present_ids(instances, count)
    if len(present) < count:
        from tasks.instances.link import relabel

        lookup = np.zeros(count + 1, np.uint32)
        lookup[present] = np.arange(1, len(present) + 1, dtype=np.uint32)
        relabel(instances, lookup, instances)
        scores = np.concatenate([[0.0], np.asarray(scores)[present]]).astype(np.float32)
        classes = None if classes is None else np.concatenate([[0], np.asarray(classes)[present]])
        count = len(present)
    from tasks.instances.table import instance_table, write_table

    write_table(store, instance_table(store, classes=classes, scores=scores))
    at = datetime.now(timezone.utc).isoformat()
    inst_store.mark_instances_complete(store, {"at": at, "count": count, "tiles": len(origins),
                                               "skipped_nodata": result.skipped_nodata,
                                               "large_instances": merger.large_instances})
    pred = storage.open_group(pred_url, mode="r+")  # afresh: the instances' mark is in its attributes now
    storage.mark_complete(pred, {"at": at, "tiles": len(origins), "model_calls": result.model_calls},
                          arrays=("labels", inst_store.INSTANCES))
    cache.remove()
    from tasks.export.ngff import write_instances_ngff, write_prediction_labels_ngff

    write_prediction_labels_ngff(store)
    write_instances_ngff(store)
    result.instances, result.large_instances, result.peak_open = count, merger.large_instances, merger.peak_open
    return result
