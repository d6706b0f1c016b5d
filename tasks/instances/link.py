"""Joining per-section instances of a (Z, Y, X) stack into 3D objects, by overlap.

For stacks predicted section by section (a 2D model; EM serial sections): an instance a of section
z and b of section z + 1 are the same object when they overlap by at least ``min_ios`` of the
smaller (``|a ∩ b| / min(|a|, |b|)``) and each is the other's best match (largest overlap): mutual
best matches, so one large object cannot swallow its neighbours in the next section, and a split
or a merge between sections keeps the best-matching continuation only. Links are transitive along
z (union-find). New ids are 1..N, consecutive, in order of first appearance (raster order).

Memory: two sections at a time (read in chunk-deep slabs) and a few integers per id.
"""

from __future__ import annotations

import numpy as np
import zarr


def _slabs(array: zarr.Array):
    depth = array.chunks[0]
    for z0 in range(0, array.shape[0], depth):
        slab = np.asarray(array[z0: min(z0 + depth, array.shape[0])])
        yield from slab


def _best(pairs: np.ndarray, counts: np.ndarray, key: int) -> dict[int, tuple[int, int]]:
    """For each id in row ``key`` of ``pairs``: (partner, overlap) with the largest overlap."""
    order = np.lexsort((-counts, pairs[key]))
    best: dict[int, tuple[int, int]] = {}
    for i in order:
        k = int(pairs[key, i])
        if k not in best:
            best[k] = (int(pairs[1 - key, i]), int(counts[i]))
    return best


def link_sections(array: zarr.Array, *, min_ios: float = 0.5) -> np.ndarray:
    """Lookup old id -> new id (0 -> 0) joining ``array``'s per-section ids across sections."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = 0
    area = np.zeros(1, np.int64)
    first = []  # ids in raster order of first appearance
    edges = []
    previous = None
    for section in _slabs(array):
        section = section.astype(np.int64)
        top = int(section.max())
        if top + 1 > len(area):
            area = np.concatenate([area, np.zeros(top + 1 - len(area), np.int64)])
        area += np.bincount(section.ravel(), minlength=len(area))[: len(area)]
        values = section[section > 0]
        _, where = np.unique(values, return_index=True)
        first.extend(values[np.sort(where)].tolist())
        n = max(n, top)
        if previous is not None:
            both = (previous > 0) & (section > 0)
            if both.any():
                pairs, counts = np.unique(np.stack([previous[both], section[both]]), axis=1, return_counts=True)
                down, up = _best(pairs, counts, 0), _best(pairs, counts, 1)
                for a, (b, overlap) in down.items():
                    if up.get(b, (None,))[0] == a and overlap / min(area[a], area[b]) >= min_ios:
                        edges.append((a, b))
        previous = section
    if not first:
        return np.zeros(n + 1, np.uint32)
    e = np.asarray(edges, np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(e), np.int8), (e[:, 0], e[:, 1])), shape=(n + 1, n + 1))
    _, component = connected_components(graph, directed=False)
    new = {}
    lookup = np.zeros(n + 1, np.uint32)
    for old in first:
        c = component[old]
        if c not in new:
            new[c] = len(new) + 1
        lookup[old] = new[c]
    return lookup


def relabel(source: zarr.Array, lookup: np.ndarray, out: zarr.Array) -> None:
    """``out = lookup[source]``, slab by slab (``out`` may be ``source``)."""
    depth = source.chunks[0]
    for z0 in range(0, source.shape[0], depth):
        z1 = min(z0 + depth, source.shape[0])
        out[z0:z1] = lookup[np.asarray(source[z0:z1])]
