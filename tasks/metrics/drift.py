"""Drift: a prediction whose foreground fraction is far outside what the model's validation saw.

A model that meets a scene unlike its training scenes can paint it all one class (SpaceNet Rio,
issue 19: every pixel of a bright chip "building", validation Dice 0.69). No label is needed to
see that: the fraction of the scan predicted foreground (any class > 0) is compared with the
fractions the model's validation scans held, reference and predicted, recorded in its card
(``validation_foreground``) and copied by the engine into the prediction's attributes.

"Far" (``is_far``): with ``lo`` and ``hi`` the smallest and largest of those fractions, a
prediction is flagged when its fraction ``f``

- exceeds ``RATIO`` x ``hi`` *and* ``hi + MARGIN``, or
- is under ``lo / RATIO`` *and* ``lo - MARGIN``.

Why both: scenes legitimately differ several-fold in how much foreground they hold (Rio chips:
0.3 % to 30 % building), so only a change of scale beyond the validation range counts (RATIO 2);
and for rare classes a ratio alone would trip on noise (0.4 % against 0.1 % is 4x but nothing a
user should act on), so the fraction must also move by MARGIN (10 points) in absolute terms. A
scan with no foreground at all is flagged only when every validation scan held more than 10 %
(a building-free scene is normal for a building model validated on 3-30 %), and a model that
calls a scene all foreground is flagged whenever its validation scans held under half.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from tasks import storage

RATIO = 2.0
MARGIN = 0.10


@dataclass(frozen=True)
class Drift:
    fraction: float  # of the scan's voxels predicted foreground
    low: float  # the validation range it is compared with
    high: float
    far: bool
    message: str  # one line: what is off and what to do, or "within the validation range"

    def record(self) -> dict:
        return asdict(self)


def validation_range(validation_foreground: dict) -> tuple[float, float] | None:
    """(lo, hi) over the reference and predicted fractions of every validation scan; None if none."""
    values = [float(v) for scan in (validation_foreground or {}).values() for v in scan.values()
              if v is not None and np.isfinite(v)]
    return (min(values), max(values)) if values else None


def is_far(fraction: float, low: float, high: float) -> bool:
    above = fraction > RATIO * high and fraction > high + MARGIN
    below = fraction < low / RATIO and fraction < low - MARGIN
    return bool(above or below)


def foreground_drift(fraction: float, validation_foreground: dict | None) -> Drift | None:
    """The drift of a prediction with ``fraction`` foreground; None when the model recorded no
    validation fractions (older models, TorchScript files without them in their card)."""
    bounds = validation_range(validation_foreground or {})
    if bounds is None:
        return None
    low, high = bounds
    far = is_far(fraction, low, high)
    if far:
        message = (f"foreground on {fraction:.1%} of the scan, far outside the {low:.1%}-{high:.1%} of the "
                   f"model's validation scans: the scan may be unlike the training data (brightness, sensor, "
                   f"season); check the prediction before using it")
    else:
        message = f"foreground {fraction:.1%}, within reach of the validation's {low:.1%}-{high:.1%}"
    return Drift(float(fraction), low, high, far, message)


def predicted_fraction(store: str) -> float:
    """Fraction of ``store``'s ``prediction/labels`` that is foreground (> 0), read chunk row by
    chunk row (bounded memory)."""
    labels = storage.open_group(f"{str(store).rstrip('/')}/prediction", mode="r")["labels"]
    step = labels.chunks[0]
    fore = 0
    for start in range(0, labels.shape[0], step):
        fore += int(np.count_nonzero(np.asarray(labels[start:start + step])))
    return fore / max(int(np.prod(labels.shape)), 1)


_CACHE: dict[tuple[str, str], Drift | None] = {}


def prediction_drift(store: str) -> Drift | None:
    """The drift of ``store``'s complete prediction against the validation fractions its attributes
    carry; None without them or without a complete prediction. Memoised per prediction digest (the
    nightly summary asks for each scan more than once; a new prediction has a new digest)."""
    record = storage.read_record(f"{str(store).rstrip('/')}/prediction") or {}
    if not record.get(storage.COMPLETE_KEY) or not record.get("validation_foreground"):
        return None
    key = (str(store), str(record.get("digest")))
    if key not in _CACHE:
        _CACHE[key] = foreground_drift(predicted_fraction(store), record["validation_foreground"])
    return _CACHE[key]
