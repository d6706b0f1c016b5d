"""Training data straight from the scan groups: splits, patch sampling, normalisation statistics.

Nothing here loads a whole scan: every patch is read from ``image/0`` and the reference's level 0 (``storage.reference``)
through Zarr, so a 10^10-voxel stack trains in the same memory as a small one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zarr

from tasks import storage


class TrainingError(Exception):
    """The data cannot be trained on; said before any epoch runs."""


@dataclass(frozen=True)
class Region:
    """A box of one scan (spatial slices, array order) used for training or validation."""

    store: str
    box: tuple[slice, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.box)


@dataclass(frozen=True)
class ScanArrays:
    store: str
    image: zarr.Array  # (C, *spatial)
    labels: zarr.Array  # (*spatial), class indices


def open_training_scan(store: str, classes: int) -> ScanArrays:
    """Open a complete scan group with labels; check what training relies on."""
    if not storage.is_complete(store):
        raise TrainingError(f"{store}: not a complete scan group; ingest it first")
    group = storage.open_group(store)
    image, labels = group["image/0"], storage.reference(group)
    if labels is None:
        raise TrainingError(f"{store}: has no labels (the catalog entry needs a 'labels' section)")
    if tuple(labels.shape) != tuple(image.shape[1:]):
        raise TrainingError(f"{store}: labels shape {tuple(labels.shape)} differs from the image's "
                            f"spatial shape {tuple(image.shape[1:])}")
    counts = storage.reference_record(group).get("class_voxels")
    if counts is not None and len(counts) > classes and any(counts[classes:]):
        raise TrainingError(f"{store}: labels hold class indices >= {classes}, not in the label mapping")
    return ScanArrays(store, image, labels)


def in_memory(scans: list[ScanArrays], budget_bytes: int = 2 << 30) -> list[ScanArrays]:
    """The scans decoded once into memory when together they fit ``budget_bytes`` (the samples and
    the shared datasets do): a patch is then a slice, not the decode of every Zarr chunk it touches
    (a 1x256x256 EM patch decodes an 8x512x512 chunk). Larger datasets stay in Zarr."""
    total = sum(int(s.image.nbytes) + int(s.labels.nbytes) for s in scans)
    if total > budget_bytes:
        return scans
    return [ScanArrays(s.store, np.asarray(s.image[...]), np.asarray(s.labels[...])) for s in scans]


SCANS_FOR_SCAN_SPLIT = 4  # from this many scans, whole scans are held out; below, a slab of each scan


def split_regions(scans: list[ScanArrays], val_fraction: float = 0.25, seed: int = 0, by: str = "auto"
                  ) -> tuple[list[Region], list[Region]]:
    """The validation split; no validation pixel is ever sampled for training.

    ``by="auto"``: with at least :data:`SCANS_FOR_SCAN_SPLIT` scans, ``val_fraction`` of the scans
    (at least one, chosen by ``seed``) are held out whole, so validation sees scans unlike the
    training ones. With fewer (BraTS' few subjects, a handful of chips) one held-out scan would be
    a noisy champion signal -- whichever subject it is decides -- and would take a large share of
    the training data, so every scan gives a slab of ``val_fraction`` of its first axis (Z, or
    rows of a raster) instead, holding its fair share of the scan's foreground: the slab whose
    foreground is nearest ``val_fraction`` of the scan's, among those holding some (ties: the
    last). Validation then scores the structures training must learn, and training keeps most of
    every scan's foreground (the slab with the most foreground held 75-77 % of each BraTS
    subject's tumour). The rest of the scan trains. A single scan: its last slab, as before. ``by="scan"``: whole scans from two scans on (how versions trained
    before slabs were recorded split, recomputed for calibrating them)."""
    if not scans:
        raise TrainingError("no labelled scans to train on")
    full = [Region(s.store, tuple(slice(0, n) for n in s.labels.shape)) for s in scans]
    if len(scans) >= (2 if by == "scan" else SCANS_FOR_SCAN_SPLIT):
        order = np.random.default_rng(seed).permutation(len(scans))
        n_val = max(1, int(round(len(scans) * val_fraction)))
        val = [full[i] for i in sorted(order[:n_val])]
        train = [full[i] for i in sorted(order[n_val:])]
    else:
        train, val = [], []
        for scan, region in zip(scans, full):
            depth = region.shape[0]
            n_val = max(1, int(round(depth * val_fraction))) if val_fraction > 0 else 0
            if depth < 2 or n_val < 1 or depth - n_val < 1:
                single = "a single scan" if len(scans) == 1 else "a scan"
                raise TrainingError(f"{region.store}: {single} of {depth} slices cannot be split into "
                                    "training and validation")
            start = depth - n_val if len(scans) == 1 else _fair_share_slab(scan.labels, n_val, val_fraction)
            rest = region.box[1:]
            val.append(Region(region.store, (slice(start, start + n_val),) + rest))
            train += [Region(region.store, (slice(a, b),) + rest) for a, b in ((0, start), (start + n_val, depth))
                      if b > a]
    if not train:
        raise TrainingError("the training split is empty: add labelled scans or lower the validation fraction")
    return train, val


def _fair_share_slab(labels, width: int, share: float) -> int:
    """The start of the window of ``width`` indices along the first axis whose count of voxels of a
    class > 0 is nearest ``share`` of the scan's, among windows holding any (ties: the last); the
    last window when the scan holds no foreground. Read one chunk row at a time."""
    depth = labels.shape[0]
    step = (getattr(labels, "chunks", None) or (depth,))[0]
    per_index = np.zeros(depth, np.int64)
    for a in range(0, depth, step):
        block = np.asarray(labels[a:a + step])
        per_index[a:a + len(block)] = np.count_nonzero(block.reshape(len(block), -1), axis=1)
    windows = np.convolve(per_index, np.ones(width, np.int64), mode="valid")
    if not windows.any():
        return len(windows) - 1
    distance = np.where(windows > 0, np.abs(windows - share * per_index.sum()), np.inf)
    return int(len(windows) - 1 - np.argmin(distance[::-1]))


class PatchSampler:
    """Random patches (C, *patch) and their labels (*patch) from regions of scan groups.

    ``foreground`` of the patches are centred on a random foreground voxel (class > 0) found in a
    few random probes of the region, as nnU-Net oversamples foreground: small structures (tumours
    are 0.3-2% of a BraTS volume) would otherwise hardly be seen.
    """

    def __init__(self, regions: list[Region], arrays: dict[str, ScanArrays], patch: tuple[int, ...],
                 seed: int = 0, foreground: float = 0.33, pad: str = "reflect"):
        self.regions = regions
        self.pad = pad  # beyond a region smaller than the patch: the engine's read_tile padding
        self.arrays = arrays
        self.patch = patch
        self.rng = np.random.default_rng(seed)
        self.foreground = foreground
        weights = np.array([np.prod(r.shape) for r in regions], dtype=float)
        self.p = weights / weights.sum()

    def _origin(self, region: Region, centre: tuple[int, ...] | None) -> tuple[int, ...]:
        origin = []
        for axis, (s, p) in enumerate(zip(region.box, self.patch)):
            size = s.stop - s.start
            if size <= p:
                origin.append(s.start)
            elif centre is not None:
                origin.append(int(np.clip(centre[axis] - p // 2, s.start, s.stop - p)))
            else:
                origin.append(s.start + int(self.rng.integers(0, size - p + 1)))
        return tuple(origin)

    def _foreground_centre(self, region: Region) -> tuple[int, ...] | None:
        labels = self.arrays[region.store].labels
        for _ in range(4):  # probe a few random patch-sized windows for foreground
            box = tuple(slice(o, o + min(p, s.stop - o)) for o, p, s in
                        zip(self._origin(region, None), self.patch, region.box))
            hits = np.argwhere(np.asarray(labels[box]) > 0)
            if len(hits):
                pick = hits[self.rng.integers(len(hits))]
                return tuple(int(b.start + h) for b, h in zip(box, pick))
        return None

    def read(self, region: Region, origin: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        arrays = self.arrays[region.store]
        box = tuple(slice(o, min(o + p, s.stop)) for o, p, s in zip(origin, self.patch, region.box))
        image = np.asarray(arrays.image[(slice(None),) + box], dtype=np.float32)
        labels = np.asarray(arrays.labels[box], dtype=np.int64)
        pad = [(0, p - (b.stop - b.start)) for p, b in zip(self.patch, box)]
        if any(hi for _, hi in pad):  # region smaller than the patch: pad exactly as the engine does
            if self.pad == "constant":  # the engine pads the raw scan with 0: its normalised value here
                fill = arrays.image.fill if isinstance(arrays.image, NormalisedImage) else np.zeros(image.shape[0])
                image = np.stack([np.pad(c, pad, mode="constant", constant_values=f) for c, f in zip(image, fill)])
                labels = np.pad(labels, pad, mode="constant")
            else:  # mirrored per axis (numpy's reflect); an axis of size 1 repeats, as read_tile does
                from tasks.engine.tiles import reflect_indices

                for axis, (p, b) in enumerate(zip(self.patch, box)):
                    idx = reflect_indices(0, p, b.stop - b.start)
                    image, labels = np.take(image, idx, axis=axis + 1), np.take(labels, idx, axis=axis)
        return image, labels

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        region = self.regions[self.rng.choice(len(self.regions), p=self.p)]
        centre = self._foreground_centre(region) if self.rng.random() < self.foreground else None
        return self.read(region, self._origin(region, centre))

    def fixed(self, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """A deterministic set of patches (for validation): the same every epoch."""
        saved = self.rng
        self.rng = np.random.default_rng(12345)
        try:
            return [self.sample() for _ in range(count)]
        finally:
            self.rng = saved


def channel_statistics(sampler: PatchSampler, patches: int = 16) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation over a sample of training patches."""
    total = sq = count = 0
    for image, _ in sampler.fixed(patches):
        flat = image.reshape(image.shape[0], -1).astype(np.float64)
        total = total + flat.sum(1)
        sq = sq + (flat ** 2).sum(1)
        count += flat.shape[1]
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean ** 2, 1e-12))
    return [float(m) for m in mean], [float(s) for s in std]


class NormalisedImage:
    """A scan's image (C, *spatial), Zarr or in memory, read through that scan's normalisation: the
    per-scan kind (``scan_percentile``) differs per scan, so it is applied where the scan is known
    -- when a patch or a validation region is read -- and training, validation and calibration see
    what the engine feeds the network for that scan. Reads take every channel."""

    def __init__(self, image, normalization):
        self.image = image
        self.normalization = normalization  # models.card.Normalization of this scan (resolved)
        self.shape, self.ndim, self.nbytes = image.shape, image.ndim, image.nbytes
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if key[0] != slice(None):
            raise IndexError("a normalised image is read with all its channels (key[0] must be ':')")
        block = np.asarray(self.image[key], dtype=np.float32)
        return self.normalization.apply(block[None])[0]

    @property
    def fill(self) -> np.ndarray:
        """Per channel, what a raw 0 (the engine's constant padding) becomes."""
        zeros = np.zeros((1, self.shape[0]) + (1,) * (self.ndim - 1), np.float32)
        return self.normalization.apply(zeros).reshape(-1)


def per_scan_normalised(scans: list[ScanArrays], normalization) -> list[ScanArrays]:
    """``scans`` whose images read normalised with each scan's own statistics (``normalization`` is
    per scan: ``tasks.engine.scan_stats.for_scan`` resolves it from the scan's store, as the engine
    does at inference)."""
    from tasks.engine.scan_stats import for_scan

    return [ScanArrays(s.store, NormalisedImage(s.image, for_scan(s.store, normalization)[0]), s.labels)
            for s in scans]
