"""Surface metrics of 3D label volumes: HD95 and surface Dice, in physical units (MONAI).

- HD95: the 95th percentile Hausdorff distance, ``monai.metrics.compute_hausdorff_distance(...,
  percentile=95)``: the larger of the two directed 95th percentiles of the distances from the
  surface voxels of one mask to the nearest surface voxel of the other (Huttenlocher et al. 1993;
  the percentile form as in the BraTS challenge).
- Surface Dice at tolerance tau (Nikolov et al. 2021, "Clinically applicable segmentation of head
  and neck anatomy for radiotherapy", arXiv:1809.04430): the fraction of both surfaces lying within
  tau of the other, ``monai.metrics.compute_surface_dice(..., class_thresholds=[tau])``.

Distances use the scan's pixel size (``spacing``, array order (Z, Y, X)), so they are in the
scan's unit (millimetre for MRI); without a spacing they are in voxels. Default tolerance: 1 unit.

Conventions (MONAI's, passed on; tested):
- both masks of a class empty: HD95 and surface Dice undefined (NaN, ``null`` in JSON);
- exactly one empty: surface Dice 0; HD95 undefined (NaN/``null``: there is no surface to
  measure to; MONAI returns NaN with a warning, silenced here). The per-class voxel counts in the
  report say which mask was empty.

These metrics need the whole volume in memory (a distance transform is global). A volume larger
than ``max_voxels`` is evaluated on the finest pyramid level under the bound: both label volumes
are subsampled by striding (every f-th voxel, the nearest-neighbour choice for labels, which keeps
class indices) to that level's shape, and the distances use that level's spacing. The output says
so (``surface_level``, ``surface_spacing``).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from models.quiet import ignore_warnings

# MONAI's surface distances hold a few float arrays of the whole volume plus KD-trees of the
# surfaces: measured 1.7 GB of working memory at 64 Mi voxels, so 16 Mi (a whole 240 x 240 x 155
# BraTS volume is 8.9 M) keeps evaluate near 0.5 GB; larger volumes use a pyramid level.
DEFAULT_MAX_VOXELS = 16 * 2**20
DEFAULT_TOLERANCE = 1.0


def choose_level(shapes: Sequence[Sequence[int]], max_voxels: int = DEFAULT_MAX_VOXELS) -> int:
    """The finest pyramid level (0 = full resolution) whose voxel count is at most ``max_voxels``;
    the coarsest level if none is."""
    for level, shape in enumerate(shapes):
        if math.prod(shape) <= max_voxels:
            return level
    return len(shapes) - 1


def strided_read(array, factors: Sequence[int], rows: int | None = None) -> np.ndarray:
    """Every ``factors[a]``-th voxel of a (Z, Y, X) array (Zarr or NumPy), read one slab of
    ``rows`` planes of the first axis at a time (default: the array's chunk depth), so only the
    subsampled result and one slab are in memory. The result has shape ``ceil(n_a / f_a)``, the
    shape of a pyramid level made by halving (tasks/ingest/pyramid.py)."""
    factors = tuple(int(f) for f in factors)
    shape = tuple(array.shape)
    out = np.empty(tuple(-(-n // f) for n, f in zip(shape, factors)), dtype=array.dtype)
    step = rows or (getattr(array, "chunks", None) or (shape[0],))[0]
    step = max(factors[0], step - step % factors[0])  # slabs start on a kept plane
    rest = tuple(slice(None, None, f) for f in factors[1:])
    for start in range(0, shape[0], step):
        slab = np.asarray(array[(slice(start, min(start + step, shape[0])),)])
        out[start // factors[0]: -(-min(start + step, shape[0]) // factors[0])] = slab[(slice(None, None, factors[0]),) + rest]
    return out


def surface_scores(reference: np.ndarray, prediction: np.ndarray, class_indices: Sequence[int],
                   spacing: Sequence[float] | None = None, tolerance: float = DEFAULT_TOLERANCE
                   ) -> dict[int, dict[str, float]]:
    """HD95 and surface Dice per class index, for two (Z, Y, X) label volumes held in memory.

    Returns ``{k: {"hd95": float, "surface_dice": float}}`` (NaN where undefined, see the module
    docstring). ``spacing`` is the physical voxel size in array order; ``tolerance`` is in the same
    unit."""
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    # MONAI warns on an empty mask (NaN here, as documented) and on an argument its own helper
    # passes (deprecated since 1.5): those two ignored for good, not under catch_warnings (see
    # models.quiet: two task threads in it in turn leave every warning ignored).
    ignore_warnings(UserWarning, r"the (ground truth|prediction) of class \d+ is all 0", r"monai\.metrics")
    ignore_warnings(FutureWarning, r".*always_return_as_numpy", r"monai\.")
    reference, prediction = np.asarray(reference), np.asarray(prediction)
    if reference.shape != prediction.shape:
        raise ValueError(f"reference shape {reference.shape} != prediction shape {prediction.shape}")
    spacing = [float(s) for s in spacing] if spacing is not None else [1.0] * reference.ndim
    results: dict[int, dict[str, float]] = {}
    for k in class_indices:
        # One class at a time, (B=1, C=1, Z, Y, X) booleans: memory is two masks, not K of them.
        ref = torch.from_numpy(reference == k)[None, None]
        pred = torch.from_numpy(prediction == k)[None, None]
        if not ref.any() and not pred.any():
            results[int(k)] = {"hd95": math.nan, "surface_dice": math.nan}
            continue
        hd = compute_hausdorff_distance(pred, ref, include_background=True, percentile=95, spacing=spacing)
        sd = compute_surface_dice(pred, ref, class_thresholds=[float(tolerance)], include_background=True,
                                  spacing=spacing)
        hd95 = float(hd.item())
        results[int(k)] = {"hd95": hd95 if math.isfinite(hd95) else math.nan, "surface_dice": float(sd.item())}
    return results
