"""Per-scan intensity statistics for a per-scan normalisation (``Normalization.kind``
``scan_percentile``), computed once per scan, the same way in training and at inference.

Each channel's low and high percentiles over the scan's voxels, read from one pyramid level: the
coarsest level that still holds ``STATS_VOXELS`` voxels (level 0 when the scan is smaller), so a
10^10-voxel scan costs the read of about a million voxels and a SpaceNet chip is read whole.
Empty voxels are left out: those the source declares nodata on every channel (the engine's
``skip_empty="auto"`` rule), else, for unsigned-integer images, those that are 0 on every channel
-- optical imagery's undeclared fill (SpaceNet Rio chip 57 is 34 % such pixels and declares no
nodata); a real pixel black in every band is vanishingly rare. A swath's empty border would
otherwise pull the low percentile to the fill value and shift every real pixel of the scan
(measured: building IoU of chip 57 0.20 with the zeros counted).
A pyramid voxel is a block mean, so the percentiles of a large scan are those of a slightly
smoothed image; the 1st / 99th percentiles the recipe uses move little under that.

The values enter the prediction's parameters (``scan_normalization``) and so its digest: the same
scan and model always give the same numbers, and a prediction says which it was made with.
"""

from __future__ import annotations

import numpy as np

from models.card import Normalization
from tasks import storage

STATS_VOXELS = 1 << 20


def stats_level(group) -> int:
    """The coarsest pyramid level with at least ``min(STATS_VOXELS, level-0 voxels)`` voxels."""
    levels = sorted((int(k) for k in group["image"].array_keys() if k.isdigit()))
    need = min(STATS_VOXELS, int(np.prod(group["image/0"].shape[1:])))
    best = levels[0]
    for level in levels:
        if int(np.prod(group[f"image/{level}"].shape[1:])) >= need:
            best = level
    return best


def scan_percentiles(store: str, percentiles: list[float]) -> tuple[list[float], list[float], int]:
    """(low per channel, high per channel, pyramid level read) of the scan group at ``store``."""
    from tasks.engine.skip import resolve_rule

    group = storage.open_group(store, mode="r")
    level = stats_level(group)
    image = np.asarray(group[f"image/{level}"][...], dtype=np.float64)
    channels = image.shape[0]
    rule = resolve_rule("auto", storage.read_record(store) or {}, channels)
    if rule is None and np.issubdtype(group[f"image/{level}"].dtype, np.unsignedinteger):
        rule = resolve_rule(0.0, {}, channels)  # all bands 0: undeclared fill
    values = image.reshape(channels, -1)
    if rule is not None:
        keep = ~rule.empty(image).reshape(-1)
        if keep.any():
            values = values[:, keep]
    values = np.where(np.isfinite(values), values, np.nan)
    low, high = np.nanpercentile(values, percentiles, axis=1) if np.isfinite(values).any() else \
        (np.zeros(channels), np.zeros(channels))
    return [float(v) for v in np.nan_to_num(low)], [float(v) for v in np.nan_to_num(high)], level


def for_scan(store: str, normalization: Normalization) -> tuple[Normalization, dict | None]:
    """The normalisation to apply to ``store``'s tiles, and what a prediction records about it: the
    card's own normalisation and None when it is not per scan (old cards keep their digests)."""
    if not normalization.per_scan:
        return normalization, None
    low, high, level = scan_percentiles(store, list(normalization.percentiles or [1.0, 99.0]))
    resolved = normalization.for_scan(low, high)
    return resolved, {"kind": normalization.kind, "percentiles": list(normalization.percentiles or [1.0, 99.0]),
                      "low": resolved.low, "high": resolved.high, "level": level}
