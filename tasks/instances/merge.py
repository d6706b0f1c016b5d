"""Merging per-tile detections into whole-scan instances, streamed in tile order.

The rule (tiles come in ``TilePlan.tiles()`` raster order; every pixel of the scan lies in at least
one tile, neighbouring tiles overlap):

1. A detection's mask is moved to scan coordinates; pixels the plan padded (outside the scan) are
   dropped; an empty mask is dropped.
2. Two detections of *different, overlapping* tiles A and B are the same object when their masks
   agree where both tiles looked: inside the shared region R = A ∩ B,
   ``|a ∩ b| / min(|a ∩ R|, |b ∩ R|) >= min_ios`` (intersection over the smaller, both non-empty in
   R). Only R counts because each tile sees only its own part of an object: a building cut by A's
   edge is a fragment in A and whole in B, and the two agree exactly on R.
3. Matches are transitive (union-find): an object crossing many tiles is the union of all its
   pieces, whatever its size. Merged: the union of the masks, the maximum score, the class of the
   best-scoring piece. Two detections of the same tile are never matched with each other (the
   detector's own non-maximum suppression decided they differ); they can still end up in one
   instance through a third piece that both match (a neighbour that saw one object where this tile
   saw two).
4. An instance is finished, and returned, as soon as every tile of the plan that intersects its
   bounding box has been added: no later piece can touch it. Only unfinished instances are held.

Why not the alternatives: SAHI merges by box overlap only (two objects sharing a box merge; a mask
cut at the tile edge stays cut); StarDist's ``predict_instances_big`` gives each object to the one
tile owning its centre and refuses objects wider than the overlap; Cellpose's distributed mode cuts
cells at block faces; TIAToolbox predicts the seams again. Here the tiled result is, for a
deterministic model that sees each object's pixels the same way in every tile, exactly the result
of one tile covering the scan (tests/test_instances_merge.py), and objects of any size come out
whole (they are counted in ``large_instances``: wider than the overlap along some axis).

Memory: the open instances (their masks, cropped to their boxes) and the pieces that make them; an
object spanning the whole scan is held until its last tile (it must be whole to be written).
Coordinates: spatial, array order ((Z, Y, X) or (Y, X)), voxels of level 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tasks.engine.plan import TilePlan


@dataclass
class Detection:
    """One object found in one tile, in tile coordinates."""

    mask: np.ndarray  # bool, the tile's spatial shape
    score: float
    label: int  # class index


@dataclass
class Instance:
    """A finished object, in scan coordinates: its box is ``lo .. lo + mask.shape``."""

    lo: tuple[int, ...]
    mask: np.ndarray  # bool, the box's shape
    score: float
    label: int
    tiles: int  # tile detections merged into it

    @property
    def hi(self) -> tuple[int, ...]:
        return tuple(a + n for a, n in zip(self.lo, self.mask.shape))


@dataclass
class _Piece:
    lo: tuple[int, ...]
    mask: np.ndarray  # bool, tight box
    tile_lo: tuple[int, ...]  # the tile's region inside the scan
    tile_hi: tuple[int, ...]
    tile: int
    score: float
    label: int
    order: int

    @property
    def hi(self) -> tuple[int, ...]:
        return tuple(a + n for a, n in zip(self.lo, self.mask.shape))


@dataclass
class _Open:
    pieces: list[_Piece] = field(default_factory=list)
    lo: tuple[int, ...] = ()
    hi: tuple[int, ...] = ()
    last: int = -1  # the raster-last plan tile touching the box: finished once it is added

    def add(self, piece: _Piece) -> None:
        self.pieces.append(piece)
        self.lo = piece.lo if not self.lo else tuple(map(min, self.lo, piece.lo))
        self.hi = piece.hi if not self.hi else tuple(map(max, self.hi, piece.hi))


def _overlap(a_lo, a_hi, b_lo, b_hi) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    lo = tuple(map(max, a_lo, b_lo))
    hi = tuple(map(min, a_hi, b_hi))
    return None if any(h <= l for l, h in zip(lo, hi)) else (lo, hi)


def _crop(piece: _Piece, lo, hi) -> np.ndarray:
    return piece.mask[tuple(slice(l - p, h - p) for l, h, p in zip(lo, hi, piece.lo))]


def pieces_match(a: _Piece, b: _Piece, min_ios: float) -> bool:
    """Rule 2: intersection over the smaller, counted inside the two tiles' shared region."""
    if a.tile == b.tile:
        return False
    shared = _overlap(a.tile_lo, a.tile_hi, b.tile_lo, b.tile_hi)
    if shared is None or _overlap(a.lo, a.hi, b.lo, b.hi) is None:
        return False
    a_in = _overlap(a.lo, a.hi, *shared)
    b_in = _overlap(b.lo, b.hi, *shared)
    if a_in is None or b_in is None:
        return False
    size_a = int(_crop(a, *a_in).sum())
    size_b = int(_crop(b, *b_in).sum())
    both = _overlap(*a_in, *b_in)
    if not size_a or not size_b or both is None:
        return False
    inter = int(np.logical_and(_crop(a, *both), _crop(b, *both)).sum())
    return inter / min(size_a, size_b) >= min_ios


class TileMerger:
    """Feed every tile of ``plan`` in ``plan.tiles()`` order (an empty list for a skipped tile);
    :meth:`add` returns the instances that tile finished, :meth:`finish` the rest."""

    def __init__(self, plan: TilePlan, *, min_ios: float = 0.5):
        self.plan = plan
        self.min_ios = float(min_ios)
        self._starts = [np.asarray([s - p for s in starts]) for starts, p in zip(plan.starts, plan.pad_before)]
        self._grid = tuple(len(s) for s in plan.starts)
        self._next = 0  # index of the next tile expected
        self._open: dict[int, _Open] = {}
        self._key = 0
        self._order = 0
        self.peak_open = 0
        self.large_instances = 0
        # the narrowest overlap between neighbouring tiles, per axis: objects wider are "large"
        self._overlap_width = [min((int(t - (b - a)) for a, b in zip(s, s[1:])), default=t)
                               for s, t in zip(self._starts, plan.tile)]

    @property
    def open_count(self) -> int:
        return len(self._open)

    def open_boxes(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """Bounding boxes (lo, hi) of the unfinished instances: what later pieces may still grow."""
        return [(inst.lo, inst.hi) for inst in self._open.values()]

    def _tile_index(self, origin: tuple[int, ...]) -> int:
        idx = []
        for axis, o in enumerate(origin):
            hits = np.flatnonzero(self._starts[axis] == o)
            if not len(hits):
                raise ValueError(f"tile origin {origin} is not a tile of the plan")
            idx.append(int(hits[0]))
        return int(np.ravel_multi_index(idx, self._grid))

    def _last_tile(self, lo, hi) -> int:
        """The raster-last tile of the plan that intersects the box [lo, hi)."""
        idx = []
        for axis, (a, b) in enumerate(zip(lo, hi)):
            hits = np.flatnonzero((self._starts[axis] < b) & (self._starts[axis] + self.plan.tile[axis] > a))
            idx.append(int(hits[-1]))
        return int(np.ravel_multi_index(idx, self._grid))

    def _pieces(self, origin, tile_number, detections) -> list[_Piece]:
        shape = self.plan.shape
        t_lo = tuple(max(o, 0) for o in origin)
        t_hi = tuple(min(o + t, n) for o, t, n in zip(origin, self.plan.tile, shape))
        inside = tuple(slice(a - o, b - o) for a, b, o in zip(t_lo, t_hi, origin))
        out = []
        for det in detections:
            mask = np.asarray(det.mask, dtype=bool)
            if mask.shape != tuple(self.plan.tile):
                raise ValueError(f"a detection mask of shape {mask.shape} in a tile of {tuple(self.plan.tile)}")
            mask = mask[inside]
            found = [np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
                     for axis in range(mask.ndim)]
            if any(not len(f) for f in found):
                continue
            box = tuple(slice(int(f[0]), int(f[-1]) + 1) for f in found)
            lo = tuple(a + s.start for a, s in zip(t_lo, box))
            out.append(_Piece(lo, mask[box].copy(), t_lo, t_hi, tile_number, float(det.score), int(det.label),
                              self._order))
            self._order += 1
        return out

    def add(self, origin: tuple[int, ...], detections: list[Detection]) -> list[Instance]:
        origin = tuple(int(o) for o in origin)
        number = self._tile_index(origin)
        if number != self._next:
            raise ValueError(f"tiles must come in plan order: expected tile {self._next}, got {number} at {origin}")
        self._next += 1
        pieces = self._pieces(origin, number, detections)
        # boxes of the objects open before this tile (a piece never matches a piece of its own tile,
        # so what this tile adds to an object does not change which pieces can match)
        keys = list(self._open)
        if keys and pieces:
            lo = np.asarray([self._open[k].lo for k in keys])
            hi = np.asarray([self._open[k].hi for k in keys])
        moved: dict[int, int] = {}  # objects merged during this tile -> the one they went into
        touched = set()
        for piece in pieces:
            partners: list[int] = []
            if keys:
                near = np.flatnonzero(np.all((lo < np.asarray(piece.hi)) & (hi > np.asarray(piece.lo)), axis=1))
                for i in near:
                    key = keys[i]
                    while key in moved:
                        key = moved[key]
                    if key in partners or key not in self._open:
                        continue
                    if any(pieces_match(piece, other, self.min_ios) for other in self._open[key].pieces
                           if other.tile != number):
                        partners.append(key)
            if not partners:
                self._key += 1
                self._open[self._key] = target = _Open()
                partners = [self._key]
            else:
                target = self._open[partners[0]]
                for key in partners[1:]:  # the piece joins two objects: they are one
                    for other in self._open.pop(key).pieces:
                        target.add(other)
                    moved[key] = partners[0]
            target.add(piece)
            touched.add(partners[0])
        for key in touched:
            if key in self._open:
                inst = self._open[key]
                inst.last = self._last_tile(inst.lo, inst.hi)
        self.peak_open = max(self.peak_open, len(self._open))
        done = [key for key, inst in self._open.items() if inst.last <= number]
        return self._close(done)

    def finish(self) -> list[Instance]:
        """Every instance still open (call after the last tile)."""
        return self._close(list(self._open))

    def _close(self, keys: list[int]) -> list[Instance]:
        out = []
        for key in keys:
            inst = self._open.pop(key)
            mask = np.zeros([b - a for a, b in zip(inst.lo, inst.hi)], dtype=bool)
            for p in inst.pieces:
                mask[tuple(slice(a - b, a - b + n) for a, b, n in zip(p.lo, inst.lo, p.mask.shape))] |= p.mask
            best = max(inst.pieces, key=lambda p: (p.score, -p.order))
            extent = [b - a for a, b in zip(inst.lo, inst.hi)]
            if any(e > w for e, w in zip(extent, self._overlap_width)) and len({p.tile for p in inst.pieces}) > 1:
                self.large_instances += 1
            out.append((min(p.order for p in inst.pieces),
                        Instance(inst.lo, mask, best.score, best.label, len(inst.pieces))))
        out.sort(key=lambda item: (item[1].lo, item[0]))  # deterministic: by box corner, then arrival
        return [inst for _, inst in out]
