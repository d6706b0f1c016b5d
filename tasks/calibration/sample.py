"""A bounded, stratified sample of raw probabilities and labels from a model's validation split.

Nothing here reads a whole scan. The model runs, with the engine's own pieces (``tiles.read_tile``,
``runner.ModelRunner``, ``blend.probabilities``), on at most ``tiles`` tiles placed inside the
validation regions: half at uniformly random positions, half centred on a random labelled
foreground voxel (class > 0, found in a few probes of the labels) so that small classes are seen.
Of each tile only the centre is kept (the middle half along every axis longer than one voxel):
there the single-tile probabilities are close to the engine's blended ones, whose Gaussian weights
favour tile centres; a pixel seen by two tiles is kept once. From the kept pixels at most
``per_class`` are drawn per class, uniformly.

Stratification changes the class mix, so each pixel carries a weight: the class's share of the
validation regions (counted on ``labels/reference`` chunk by chunk, or from the ingest's
per-class counts when a region is a whole scan) over its share of the sample. Fits and scores
use these weights, so they estimate the validation population rather than the sample's mix. Within
a class, pixels near foreground remain over-represented (foreground-centred tiles): said here,
not corrected.
"""

from __future__ import annotations

import numpy as np

from tasks.calibration.calibrator import CalibrationSample
from tasks.calibration.scores import CalibrationError
from tasks.training.data import Region


def class_counts(labels, box: tuple[slice, ...], classes: int) -> np.ndarray:
    """Voxels per class inside ``box`` of ``labels`` (a Zarr array), read one chunk at a time."""
    counts = np.zeros(classes, np.int64)
    chunks = labels.chunks
    full = all(b.start == 0 and b.stop == n for b, n in zip(box, labels.shape))
    recorded = labels.attrs.get("tilewise", {}).get("class_voxels") if full else None
    if recorded is not None and len(recorded) >= 1:
        counts[: min(classes, len(recorded))] = np.asarray(recorded[:classes], np.int64)
        return counts
    ranges = [range(b.start // c * c, b.stop, c) for b, c in zip(box, chunks)]
    for corner in np.ndindex(*[len(r) for r in ranges]):
        sub = tuple(slice(max(r[i], b.start), min(r[i] + c, b.stop)) for r, i, b, c in zip(ranges, corner, box, chunks))
        counts += np.bincount(np.asarray(labels[sub]).reshape(-1), minlength=classes)[:classes]
    return counts


def _origin(box: tuple[slice, ...], tile: tuple[int, ...], rng, centre=None) -> tuple[int, ...]:
    origin = []
    for axis, (b, t) in enumerate(zip(box, tile)):
        size = b.stop - b.start
        if size <= t:  # region thinner than the tile: centre the tile on it (read_tile pads)
            origin.append(b.start - (t - size) // 2)
        elif centre is not None:
            origin.append(int(np.clip(centre[axis] - t // 2, b.start, b.stop - t)))
        else:
            origin.append(b.start + int(rng.integers(0, size - t + 1)))
    return tuple(origin)


def _foreground_voxel(labels, box, tile, rng, probes: int = 6) -> tuple[int, ...] | None:
    for _ in range(probes):
        o = _origin(box, tile, rng)
        window = tuple(slice(max(a, b.start), min(a + t, b.stop)) for a, t, b in zip(o, tile, box))
        hits = np.argwhere(np.asarray(labels[window]) > 0)
        if len(hits):
            pick = hits[rng.integers(len(hits))]
            return tuple(int(w.start + h) for w, h in zip(window, pick))
    return None


def _kept(origin, tile, box) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """The tile's centre inside the region: (slices in tile coordinates, slices in scan coordinates)."""
    in_tile, in_scan = [], []
    for o, t, b in zip(origin, tile, box):
        lo, hi = (0, t) if t == 1 else (t // 4, t - t // 4)
        lo, hi = max(lo, b.start - o), min(hi, b.stop - o)
        in_tile.append(slice(lo, hi))
        in_scan.append(slice(o + lo, o + hi))
    return tuple(in_tile), tuple(in_scan)


def sample_validation(model, regions: list[Region], classes: list[str], *, tiles: int = 24,
                      per_class: int = 20000, seed: int = 0, pad: str = "reflect", device: str | None = None,
                      batch: int = 4, tile: tuple[int, ...] | None = None) -> CalibrationSample:
    """Raw (uncalibrated) probabilities of ``model`` (a LoadedModel) and reference labels on
    ``regions`` (boxes of scan groups, array order (Z, Y, X) / (Y, X)); see the module docstring."""
    from tasks import storage
    from tasks.engine.blend import probabilities
    from tasks.engine.infer import EngineConfig, resolve_tile
    from tasks.engine.runner import ModelRunner
    from tasks.engine.tiles import read_tile

    if not regions:
        raise CalibrationError("no validation regions to calibrate on")
    rng = np.random.default_rng(seed)
    k = len(classes)
    population = np.zeros(k, np.int64)
    opened = []
    for region in regions:
        group = storage.open_group(region.store, mode="r")
        image, labels = group["image/0"], storage.reference(group)
        if labels is None:
            raise CalibrationError("has no labels/reference to calibrate against", region.store)
        population += class_counts(labels, region.box, k)
        opened.append((region, image, labels))
    spatial = tuple(opened[0][1].shape[1:])
    size, squeeze = resolve_tile(EngineConfig(tile=tile), model, spatial, regions[0].store)
    runner = ModelRunner(model.module, device=device, squeeze_axis=squeeze)
    ones = np.ones(size, np.float32)
    volumes = np.array([np.prod(r.shape) for r in regions], float)
    per_region = np.maximum(1, np.round(tiles * volumes / volumes.sum())).astype(int)

    placed = []  # (region index, origin)
    for i, ((region, image, labels), n) in enumerate(zip(opened, per_region)):
        for j in range(int(n)):
            centre = _foreground_voxel(labels, region.box, size, rng) if j % 2 else None
            placed.append((i, _origin(region.box, size, rng, centre)))
    probs_parts, label_parts, tile_ids, keys = [], [], [], []
    from tasks.engine.scan_stats import for_scan

    norms = [for_scan(region.store, model.card.normalization)[0] for region, _, _ in opened]  # as infer does
    for start in range(0, len(placed), batch):
        chunk = placed[start: start + batch]
        x = np.stack([norms[i].apply(read_tile(opened[i][1], o, size, pad)[None])[0] for i, o in chunk])
        logits = runner(x, where=" (calibration sample)")
        for t, ((i, o), tile_logits) in enumerate(zip(chunk, logits)):
            region, _, labels = opened[i]
            in_tile, in_scan = _kept(o, size, region.box)
            p = probabilities(tile_logits[(slice(None),) + in_tile].copy(), ones[in_tile])
            probs_parts.append(p.reshape(p.shape[0], -1))
            label_parts.append(np.asarray(labels[in_scan]).reshape(-1).astype(np.int64))
            tile_ids.append(np.full(label_parts[-1].size, start + t, np.int32))
            grid = np.meshgrid(*[np.arange(s.start, s.stop) for s in in_scan], indexing="ij")
            flat = np.ravel_multi_index([g.reshape(-1) for g in grid], labels.shape)
            keys.append(flat.astype(np.int64) * len(opened) + i)  # (scan voxel, region): unique per pixel
    probs = np.concatenate(probs_parts, axis=1)
    labels = np.concatenate(label_parts)
    tile_of = np.concatenate(tile_ids)
    # overlapping tiles see some pixels twice: keep each pixel once (its first tile's probabilities)
    _, first = np.unique(np.concatenate(keys), return_index=True)
    first.sort()
    probs, labels, tile_of = probs[:, first], labels[first], tile_of[first]
    if labels.size and labels.max() >= k:
        raise CalibrationError(f"labels hold class {int(labels.max())}; the model has {k} classes", regions[0].store)

    keep = []
    for c in range(k):
        where = np.flatnonzero(labels == c)
        if where.size > per_class:
            where = rng.choice(where, per_class, replace=False)
        keep.append(np.sort(where))
    keep = np.concatenate(keep)
    sampled = np.bincount(labels[keep], minlength=k)
    share_pop = population / max(population.sum(), 1)
    share_sample = sampled / max(sampled.sum(), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        class_weight = np.where(sampled > 0, share_pop / share_sample, 0.0)
    weights = class_weight[labels[keep]]
    if weights.sum() > 0:
        weights = weights / weights.mean()
    fitted_on = {
        "regions": [{"store": r.store, "box": [[b.start, b.stop] for b in r.box]} for r in regions],
        "tiles": len(placed), "tile": list(size), "per_class_cap": per_class, "seed": seed,
        "class_voxels_validation": {name: int(v) for name, v in zip(classes, population)},
        "class_pixels_sampled": {name: int(v) for name, v in zip(classes, sampled)},
    }
    return CalibrationSample(probs[:, keep], labels[keep], list(classes), weights, tile_of[keep], fitted_on)
