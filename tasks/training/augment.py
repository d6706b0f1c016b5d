"""Photometric augmentation: the same ground under another sun, haze or sensor gain.

Scenes differ in brightness and colour balance far more than the few training scans show
(SpaceNet Rio: chip means from 75 to 100 in red). The network should learn shapes and textures,
not absolute brightness, so each patch gets, after normalisation (MONAI transforms):

- a gain per band (x * (1 + f), f in +-0.3): colour balance;
- a brightness shift of the whole patch by up to 0.5 of its standard deviation, then a shift per
  band of up to 0.1 (in normalised units): haze, sensor offset;
- a gamma curve (0.7-1.5) over the patch's range: contrast.

Ranges are relative to the normalised data, so they mean the same under ``zscore`` and
``scan_percentile``. Labels are untouched.
"""

from __future__ import annotations


def photometric_steps(keys: tuple[str, ...] = ("image",)) -> list:
    from monai.transforms import (RandAdjustContrastd, RandScaleIntensityd, RandShiftIntensityd,
                                  RandStdShiftIntensityd)

    keys = list(keys)
    return [RandScaleIntensityd(keys, factors=0.3, prob=0.8, channel_wise=True),
            RandStdShiftIntensityd(keys, factors=0.5, prob=0.8, channel_wise=True),
            RandShiftIntensityd(keys, offsets=0.1, prob=0.5, channel_wise=True),
            RandAdjustContrastd(keys, prob=0.5, gamma=(0.7, 1.5))]
