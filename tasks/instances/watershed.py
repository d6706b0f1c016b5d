"""EM cells from a calibrated membrane probability: a seeded watershed, section by section.

The usual connectomics step after a membrane classifier (e.g. the ISBI 2012 and CREMI pipelines):
seeds are the connected components of confident cell interior (membrane probability below
``seed_threshold``), grown by ``skimage.segmentation.watershed`` over the membrane probability as
the elevation, within the pixels the prediction calls interior (probability < 0.5): membrane pixels
stay 0 (the panoptic output's "stuff"). Cells smaller than ``min_size`` pixels are removed.

Bounded: one section (Y, X) of the probability at a time (a 4096² section is 64 MiB of float32).
Ids are unique over the stack (offset per section); with ``link`` the cells of a (Z, Y, X) stack
are then joined across sections by overlap (tasks/instances/link.py) into 3D objects.
"""

from __future__ import annotations

import numpy as np
import zarr

from tasks.instances import store as inst_store


def cells_in_section(membrane: np.ndarray, *, seed_threshold: float = 0.3, min_size: int = 16,
                     median: int = 0) -> np.ndarray:
    """(Y, X) membrane probability -> cell ids 1..n (int64), 0 on membrane. ``median`` > 1: the
    probability is median-filtered first (``median`` x ``median``), as the ISBI 2012 winner
    (Ciresan et al.) smoothed its membrane map before thresholding."""
    from scipy import ndimage
    from skimage.segmentation import watershed

    membrane = np.asarray(membrane, np.float32)
    if median > 1:
        membrane = ndimage.median_filter(membrane, size=median, mode="reflect")
    markers, _ = ndimage.label(membrane < seed_threshold)
    cells = watershed(membrane, markers, mask=membrane < 0.5)
    sizes = np.bincount(cells.ravel())
    small = sizes < min_size
    small[0] = False
    cells[small[cells]] = 0
    keep = np.flatnonzero(sizes >= min_size)
    keep = keep[keep > 0]
    lookup = np.zeros(len(sizes), np.int64)
    lookup[keep] = np.arange(1, len(keep) + 1)
    return lookup[cells]


def watershed_cells(probabilities: zarr.Array, membrane_class: int, out: zarr.Array, *,
                    seed_threshold: float = 0.3, min_size: int = 16, link: bool = True,
                    where: str | None = None, median: int = 0) -> int:
    """Cells of ``probabilities`` ((K, Z, Y, X) or (K, Y, X)) into ``out`` (uint32, spatial shape).
    Returns the number of cells (after linking, for a stack)."""
    spatial = tuple(probabilities.shape[1:])
    if tuple(out.shape) != spatial:
        raise ValueError(f"out shape {out.shape} differs from the prediction's {spatial}")
    sections = spatial[0] if len(spatial) == 3 else 1
    depth = out.chunks[0] if len(spatial) == 3 else 1
    total = 0
    for z0 in range(0, sections, depth):  # one chunk-deep slab written at a time, filled section by section
        z1 = min(z0 + depth, sections)
        slab = np.zeros((z1 - z0, *spatial[-2:]), np.uint32) if len(spatial) == 3 else None
        for z in range(z0, z1):
            p = probabilities[membrane_class, z] if len(spatial) == 3 else probabilities[membrane_class]
            cells = cells_in_section(np.asarray(p), seed_threshold=seed_threshold, min_size=min_size, median=median)
            n = int(cells.max())
            inst_store.check_count(where or str(out.store), total + n)
            ids = np.where(cells > 0, cells + total, 0).astype(np.uint32)
            total += n
            if slab is None:
                out[...] = ids
            else:
                slab[z - z0] = ids
        if slab is not None:
            out[z0:z1] = slab
    if link and len(spatial) == 3 and sections > 1:
        from tasks.instances.link import link_sections, relabel

        lookup = link_sections(out)
        relabel(out, lookup, out)
        return int(lookup.max())
    return total
