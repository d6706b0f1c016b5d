"""Blending weights and the step from blended logits to probabilities (pure numpy).

The Gaussian importance map is nnU-Net's and MONAI's (``monai.data.utils.compute_importance_map``):
a separable Gaussian centred on the tile with sigma = ``sigma_scale`` * tile size per axis,
normalised to a peak of 1, and clamped below at max(min, 1e-3) so border voxels never get zero
weight. Logits are weighted by it, summed over tiles in float32 and divided by the summed weights;
softmax (or sigmoid for a single output channel) comes after blending, as in both references.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

BlendMode = Literal["gaussian", "constant"]


def importance_map(tile: tuple[int, ...], mode: BlendMode = "gaussian", sigma_scale: float = 0.125) -> np.ndarray:
    """Weights of shape ``tile`` (float32)."""
    if mode == "constant":
        weights = np.ones(tile, dtype=np.float32)
    else:
        weights = np.ones((), dtype=np.float32)
        for size in tile:
            sigma = size * sigma_scale
            x = np.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1, dtype=np.float32)
            g = np.exp(x**2 / np.float32(-2 * sigma**2)).astype(np.float32)
            weights = weights[..., None] * g
    floor = max(float(weights.min()), 1e-3)
    return np.maximum(weights, np.float32(floor)).astype(np.float32)


def chunk_weights(plan, index: tuple[int, ...], importance: np.ndarray, skipped=frozenset()) -> np.ndarray:
    """The sum of the importance maps of the tiles that cover output chunk ``index`` of ``plan``
    (a ``TilePlan``), leaving out the ``skipped`` tile origins: the blending denominator, made from
    the plan when the chunk is written instead of being accumulated beside the logits."""
    shape = tuple(b.stop - b.start for b in plan.chunk_box(index))
    out = np.zeros(shape, np.float32)
    for origin in plan.tiles_of_chunk(index):
        if origin not in skipped:
            chunk_sl, tile_sl = plan.overlap(origin, index)
            out[chunk_sl] += importance[tile_sl]
    return out


class ChunkWeights:
    """:func:`chunk_weights` of a plan's chunks, each with the mask of its voxels that no tile
    covers (weight 0, set to 1 so the division stays finite), computed once per pattern: the
    weights depend only on the chunk's extent and where its tiles start relative to it, and on a
    regular grid few patterns repeat (16384² at 256² tiles, step 192, chunks 512²: 9 inside the
    scan). Chunks under a skipped tile are computed each time. The arrays handed out are shared and
    read-only. Thread-safe; holds at most ``budget_bytes`` of patterns (least recently used out)."""

    def __init__(self, plan, importance: np.ndarray, skipped=frozenset(), budget_bytes: int = 32 << 20):
        import threading
        from collections import OrderedDict

        self.plan, self.importance, self.skipped = plan, importance, skipped
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        per_entry = int(np.prod(plan.chunks)) * 5  # float32 weights + bool mask
        self._entries = max(4, budget_bytes // max(per_entry, 1))

    def __call__(self, index: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray | None]:
        """(weights, uncovered or None) of chunk ``index``."""
        box = self.plan.chunk_box(index)
        origins = list(self.plan.tiles_of_chunk(index))
        key = None
        if not (self.skipped and any(o in self.skipped for o in origins)):
            key = (tuple(b.stop - b.start for b in box),
                   tuple(tuple(o[a] - box[a].start for o in origins) for a in range(len(box))))
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
                    return hit
        weights = chunk_weights(self.plan, index, self.importance, self.skipped)
        uncovered = weights == 0  # outside the planned region, or under skipped tiles only
        if uncovered.any():
            weights[uncovered] = 1.0  # their logits are 0: no NaN; the caller overwrites them
        else:
            uncovered = None
        entry = (weights, uncovered)
        if key is not None:
            weights.setflags(write=False)
            if uncovered is not None:
                uncovered.setflags(write=False)
            with self._lock:
                self._cache[key] = entry
                while len(self._cache) > self._entries:
                    self._cache.popitem(last=False)
        return entry


def probabilities(summed_logits: np.ndarray, summed_weights: np.ndarray, inplace: bool = False) -> np.ndarray:
    """Blended logits (K, ...) / weights (...) → class probabilities (K, ...), float32.

    K == 1: sigmoid (one foreground class); K > 1: softmax over K, computed stably. ``inplace``
    (float32 input): the result is written over ``summed_logits``, which is returned.
    """
    if inplace:
        logits = summed_logits
        logits /= summed_weights[None]
    else:
        logits = summed_logits / summed_weights[None]
    if logits.shape[0] == 1:
        np.negative(logits, out=logits)
        np.exp(logits, out=logits)
        logits += 1.0
        np.reciprocal(logits, out=logits)
        return logits.astype(np.float32, copy=False)
    logits -= logits.max(axis=0, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=0, keepdims=True)
    return logits.astype(np.float32, copy=False)


def two_class_probabilities(summed_difference: np.ndarray, summed_weights: np.ndarray) -> np.ndarray:
    """Two classes from the blended logit of class 1 minus class 0 (1, ...): the softmax of (0, d),
    which is (sigmoid(-d), sigmoid(d)), written straight into a (2, ...) float32 array. Each is
    computed from its own sigmoid, so a tiny probability keeps its precision (1 - p would not)."""
    d = summed_difference[0] / summed_weights
    out = np.empty((2, *d.shape), np.float32)
    with np.errstate(over="ignore"):  # exp(±d) overflows to inf for |d| > 88: the probability is then 0
        np.exp(d, out=out[0])
        np.negative(d, out=d)
        np.exp(d, out=out[1])
    out += 1.0
    np.reciprocal(out, out=out)
    return out


def labels_from(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Class index per voxel: argmax over K, or probability >= threshold for one class."""
    if probs.shape[0] == 1:
        return (probs[0] >= threshold).astype(np.uint8)
    if probs.shape[0] == 2:  # class 1 where it is strictly larger: a tie keeps class 0, as argmax does
        return np.greater(probs[1], probs[0]).view(np.uint8)
    # argmax over a leading axis of a few classes, as K - 1 vectorised comparisons (numpy's argmax
    # along axis 0 is several times slower); a tie keeps the lower class, as argmax does
    labels = np.zeros(probs.shape[1:], np.uint8)
    best = probs[0].copy()
    for k in range(1, probs.shape[0]):
        better = probs[k] > best
        labels[better] = k
        np.maximum(best, probs[k], out=best)
    return labels
