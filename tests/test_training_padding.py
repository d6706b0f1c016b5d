"""Training patches beyond a region smaller than the patch are padded as the engine pads its tiles
(issue 11: training padded with "edge" on every axis as soon as one axis had size 1, where the
engine mirrors each axis on its own)."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.engine.tiles import read_tile
from tasks.training.data import PatchSampler, Region, ScanArrays


@pytest.mark.parametrize("pad", ["reflect", "constant"])
@pytest.mark.parametrize("shape", [(1, 5, 7), (3, 5, 7), (4, 1, 6)])
def test_patch_padding_equals_the_engine_tile(pad, shape):
    rng = np.random.default_rng(0)
    image = rng.random((2, *shape), dtype=np.float32)
    labels = rng.integers(1, 4, shape)  # no zeros: constant padding is visible in the labels too
    region = Region("s", tuple(slice(0, n) for n in shape))
    patch = (4, 8, 12)
    sampler = PatchSampler([region], {"s": ScanArrays("s", image, labels)}, patch, pad=pad)
    got_image, got_labels = sampler.read(region, (0, 0, 0))
    np.testing.assert_array_equal(got_image, read_tile(image, (0, 0, 0), patch, pad))
    want_labels = read_tile(labels[None].astype(np.float32), (0, 0, 0), patch, pad)[0]
    np.testing.assert_array_equal(got_labels, want_labels.astype(np.int64))
