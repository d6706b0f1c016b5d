"""The dense CRF: hand-checkable cases on one block, and the region-by-region pass over a stored
prediction (shapes, a result equal to the whole-image CRF away from the borders when the halo
covers the kernels, resume, and the one-line refusals)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from tasks import storage
from tasks.errors import ScanError
from tasks.refine.crf import CrfParams, dense_crf


def _noisy_majority(shape, majority: int, k: int, seed: int = 0) -> np.ndarray:
    """Probabilities favouring ``majority`` on ~80 % of pixels, another class on the rest."""
    rng = np.random.default_rng(seed)
    probs = rng.uniform(0.05, 0.2, size=(k, *shape)).astype(np.float32)
    probs[majority] += 0.5
    flip = rng.random(shape) < 0.2
    other = (majority + 1) % k
    probs[other][flip] += 0.6
    return probs / probs.sum(0, keepdims=True)


@pytest.mark.parametrize("shape, k, channels", [((48, 64), 2, 1), ((48, 64), 3, 3), ((6, 24, 32), 3, 2)])
def test_uniform_region_keeps_or_gains_its_majority_class_mass(shape, k, channels):
    """A region of one colour: nothing in the image separates its pixels, so the pairwise terms
    can only pull them together: the majority class's total probability never drops, the
    minority flips fade, the output keeps the shape and sums to 1 over the classes."""
    probs = _noisy_majority(shape, majority=1, k=k)
    image = np.full((channels, *shape), 0.7, np.float32)
    q = dense_crf(probs, image, CrfParams(iterations=5))
    assert q.shape == probs.shape and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-4)
    assert q[1].sum() >= probs[1].sum()
    assert (q.argmax(0) == 1).mean() > (probs.argmax(0) == 1).mean()


def test_a_colour_edge_keeps_two_regions_apart():
    """Left half dark, right half bright; the probabilities slightly favour class 0 on the left and
    class 1 on the right, with noise: after the CRF each half is its own class everywhere."""
    rng = np.random.default_rng(3)
    image = np.zeros((1, 40, 80), np.float32)
    image[:, :, 40:] = 4.0
    p1 = np.where(np.arange(80) < 40, 0.4, 0.6)[None, :].repeat(40, 0) + rng.normal(0, 0.15, (40, 80))
    p1 = np.clip(p1, 0.05, 0.95).astype(np.float32)
    probs = np.stack([1 - p1, p1])
    q = dense_crf(probs, image, CrfParams(iterations=10, appearance_sigma=20))
    labels = q.argmax(0)
    assert (labels[:, :38] == 0).all() and (labels[:, 42:] == 1).all()
    assert (probs.argmax(0)[:, :40] == 1).any()  # the input was not already clean


def test_one_foreground_probability_comes_back_as_one():
    p = _noisy_majority((32, 32), majority=1, k=2)[1:]
    q = dense_crf(p, np.zeros((1, 32, 32), np.float32))
    assert q.shape == (1, 32, 32) and q.sum() >= p.sum()


# ------------------------------------------------------------------------------ over a stored prediction


def _scan_with_prediction(root, probs: np.ndarray, image: np.ndarray, chunks, tile) -> str:
    """A complete scan group with a complete prediction, written with the storage helpers."""
    store = str(root / "scan.zarr")
    g = storage.open_group(store, mode="w")
    img = g.create_array("image/0", shape=image.shape, dtype="float32", chunks=(1, *chunks))
    img[...] = image
    storage.mark_complete(g, {"at": "now"}, ["image/0"])
    pred = storage.open_group(f"{store}/prediction", mode="w")
    a = pred.create_array("probabilities", shape=probs.shape, dtype="float32", chunks=(1, *chunks))
    a[...] = probs
    lab = pred.create_array("labels", shape=probs.shape[1:], dtype="uint8", chunks=chunks)
    lab[...] = probs.argmax(0)
    pred.attrs[storage.ATTRS_KEY] = {"kind": "prediction", "digest": "d1", "classes": ["a", "b"],
                                     "params": {"tile": list(tile)}}
    storage.mark_complete(pred, {"at": "now"}, ["probabilities", "labels"])
    return store


def test_regions_with_a_halo_equal_the_whole_image_crf(tmp_path):
    """Chunks of 32 x 32 refined one by one with their halo give the whole-image CRF's answer:
    the halo (2 appearance sigmas) holds nearly all the kernels' weight."""
    from tasks.refine.regions import crf_url, refine_prediction

    rng = np.random.default_rng(0)
    image = np.zeros((1, 96, 96), np.float32)
    image[:, 30:70, 20:60] = 3.0  # a bright square
    p1 = np.where(image[0] > 0, 0.65, 0.35) + rng.normal(0, 0.2, (96, 96))
    p1 = np.clip(p1, 0.02, 0.98).astype(np.float32)
    probs = np.stack([1 - p1, p1])
    store = _scan_with_prediction(tmp_path, probs, image, (32, 32), (64, 64))
    params = CrfParams(iterations=5, appearance_sigma=8.0, appearance_intensity=0.5)
    result = refine_prediction(store, params)
    assert result.status == "refined" and result.chunks == 9
    assert storage.is_complete(crf_url(store))
    got = zarr.open_array(f"{crf_url(store)}/probabilities")[...]
    labels = zarr.open_array(f"{crf_url(store)}/labels")[...]
    assert got.shape == probs.shape and labels.shape == (96, 96)
    np.testing.assert_array_equal(labels, got.argmax(0))
    # the whole image at once, with the same statistics (the scan's mean and std)
    x = (image - image.mean()) / image.std()
    whole = dense_crf(probs, x, params)
    assert (labels == whole.argmax(0)).mean() > 0.995
    assert np.abs(got - whole).max() < 0.05
    assert (labels[30:70, 20:60] == 1).mean() > (probs.argmax(0)[30:70, 20:60] == 1).mean()
    # the same parameters again: nothing to do; other parameters: replaced
    assert refine_prediction(store, params).status == "unchanged"
    assert refine_prediction(store, CrfParams(iterations=2, appearance_sigma=8.0)).status == "refined"


def test_a_2d_models_stack_is_refined_section_by_section(tmp_path):
    """Tiles of depth 1 (a 2D model over a stack): each section is its own 2D CRF; a section's
    result does not depend on its neighbours."""
    from tasks.refine.regions import crf_url, refine_prediction

    rng = np.random.default_rng(1)
    image = rng.normal(size=(1, 4, 40, 40)).astype(np.float32)
    probs = np.stack([np.full((4, 40, 40), 0.5, np.float32)] * 2)
    probs[1] += rng.normal(0, 0.1, (4, 40, 40)).astype(np.float32)
    probs[0] = 1 - probs[1]
    probs[:, 2] = probs[:, 2, ::-1]  # neighbours unlike each other
    store = _scan_with_prediction(tmp_path, probs, image, (2, 40, 40), (1, 64, 64))
    params = CrfParams(iterations=3, appearance_sigma=5.0)
    refine_prediction(store, params)
    got = zarr.open_array(f"{crf_url(store)}/probabilities")[...]
    x = (image - image.mean()) / image.std()
    for z in range(4):
        np.testing.assert_allclose(got[:, z], dense_crf(probs[:, z], x[:, z], params), atol=1e-5)


def test_refusals_are_one_line(tmp_path):
    from tasks.refine.regions import refine_prediction

    store = str(tmp_path / "none.zarr")
    with pytest.raises(ScanError, match="no complete prediction to refine") as info:
        refine_prediction(store)
    assert "\n" not in str(info.value)
