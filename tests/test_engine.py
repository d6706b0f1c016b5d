"""The inference engine against MONAI's sliding_window_inference and against hand-computed plans;
resume after an injected failure; spilling; bad input."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import rasterio
import torch
import zarr
from monai.inferers import sliding_window_inference

from tasks import storage
from tests.compare import assert_labels_equal_where_decided
from tasks.engine.blend import importance_map
from tasks.engine.infer import EngineConfig, infer_scan, prepare
from tasks.engine.model_io import LoadedModel, ModelCard, Normalization
from tasks.engine.plan import even_starts, monai_starts
from tasks.engine.runner import ModelRunner
from tasks.errors import ScanError
from tasks.ingest import ScanSpec, ingest_scan


def make_scan(tmp_path: Path, array: np.ndarray, chunks: tuple[int, ...], name: str = "scan") -> str:
    """A complete scan group holding ``array`` (C, *spatial) through the real ingest path."""
    if array.ndim == 4:  # (C, Z, Y, X) -> NIfTI (i, j, k, t)
        src = tmp_path / f"{name}.nii"
        nib.save(nib.Nifti1Image(np.transpose(array, (3, 2, 1, 0)), np.eye(4)), src)
        spec = ScanSpec(name, "mri", (src,), chunks=chunks)
    else:  # (C, Y, X) -> GeoTIFF bands
        src = tmp_path / f"{name}.tif"
        with rasterio.open(src, "w", driver="GTiff", width=array.shape[2], height=array.shape[1],
                           count=array.shape[0], dtype="float32") as dst:
            dst.write(array)
        spec = ScanSpec(name, "satellite", (src,), chunks=chunks)
    store = str(tmp_path / f"{name}.zarr")
    with pytest.warns(UserWarning) if array.ndim == 3 else _nothing():
        ingest_scan(spec, store)
    return store


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def conv_net(spatial_dims: int, c_in: int, k: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d if spatial_dims == 2 else torch.nn.Conv3d
    return torch.nn.Sequential(conv(c_in, 6, 3, padding=1), torch.nn.Tanh(), conv(6, k, 3, padding=1)).eval()


def monai_probs(array: np.ndarray, tile, net, overlap: float, pad: str, mode: str = "gaussian") -> np.ndarray:
    with torch.no_grad():
        out = sliding_window_inference(torch.from_numpy(array)[None], tile, 2, net, overlap=overlap, mode=mode,
                                       padding_mode=pad)
    return torch.softmax(out, 1)[0].numpy()


def predicted(store: str) -> np.ndarray:
    return zarr.open_array(f"{store}/prediction/probabilities")[:]


CASES = [
    # (C, spatial), chunks, tile, overlap, pad
    pytest.param((1, 50, 61), (16, 16), (16, 24), 0.5, "constant", id="2d-not-divisible"),
    pytest.param((3, 37, 29), (16, 16), (16, 16), 0.25, "reflect", id="2d-multichannel"),
    pytest.param((1, 10, 61), (8, 32), (16, 24), 0.5, "reflect", id="2d-smaller-than-tile"),
    pytest.param((2, 20, 33, 41), (8, 16, 16), (8, 16, 12), 0.5, "constant", id="3d-anisotropic-multichannel"),
    pytest.param((1, 5, 9, 40), (4, 8, 8), (8, 16, 12), 0.5, "reflect", id="3d-smaller-than-tile"),
    pytest.param((1, 24, 24, 24), (8, 8, 8), (12, 12, 12), 0.7, "constant", id="3d-overlap-0.7"),
]


@pytest.mark.parametrize("shape, chunks, tile, overlap, pad", CASES)
def test_equals_monai_sliding_window_inference(tmp_path, torch_threads, shape, chunks, tile, overlap, pad):
    """(On two threads each batch of 3 runs as two lanes' parts of 2, one filled with a copy.)"""
    rng = np.random.default_rng(1)
    array = rng.random(shape, dtype=np.float32)
    net = conv_net(len(shape) - 1, shape[0], 3)
    store = make_scan(tmp_path, array, chunks)
    config = EngineConfig(tile=tile, overlap=overlap, placement="monai", pad=pad, output_dtype="float32", batch=3)
    result = infer_scan(store, LoadedModel(net, ModelCard(), "net"), config)
    assert result.status == "inferred" and storage.is_complete(f"{store}/prediction")
    ours = predicted(store)
    ref = monai_probs(array, tile, net, overlap, pad)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-5
    labels = zarr.open_array(f"{store}/prediction/labels")[:]
    # Argmax of two float computations that agree to 1e-5 may differ where two classes are within 1e-5
    # (a near-tie, e.g. 1 voxel of 13,824 in 3d-overlap-0.7): compare the labels elsewhere.
    assert_labels_equal_where_decided(labels, ref.argmax(0), ref, tol=1e-5)
    # every tile computed exactly once
    expected_tiles = np.prod([len(monai_starts(max(n, t), t, overlap)) for n, t in zip(shape[1:], tile)])
    assert result.model_calls == result.tiles == expected_tiles


def test_even_placement_matches_nnunet_numbers():
    # nnU-Net: ceil((100-32)/16)+1 = 6 steps over 68 voxels: 68/5 = 13.6 -> round(13.6*i)
    assert even_starts(100, 32, 0.5) == [0, 14, 27, 41, 54, 68]
    assert even_starts(32, 32, 0.5) == [0]
    assert even_starts(33, 32, 0.5) == [0, 1]
    assert monai_starts(100, 32, 0.5) == [0, 16, 32, 48, 64, 68]


def test_even_placement_equals_dense_reference(tmp_path):
    """Default placement against a plain in-memory implementation of the same blending."""
    rng = np.random.default_rng(2)
    array = rng.random((2, 45, 70), dtype=np.float32)
    net = conv_net(2, 2, 2)
    store = make_scan(tmp_path, array, (16, 32))
    tile = (20, 24)
    infer_scan(store, LoadedModel(net, ModelCard(), "net"), EngineConfig(tile=tile, output_dtype="float32"))
    acc = np.zeros((2, 45, 70)), np.zeros((45, 70))
    w = importance_map(tile)
    for y, x in itertools.product(even_starts(45, 20, 0.5), even_starts(70, 24, 0.5)):
        with torch.no_grad():
            logits = net(torch.from_numpy(array[None, :, y:y + 20, x:x + 24]))[0].numpy()
        acc[0][:, y:y + 20, x:x + 24] += logits * w
        acc[1][y:y + 20, x:x + 24] += w
    blended = acc[0] / acc[1]
    ref = np.exp(blended) / np.exp(blended).sum(0)
    assert np.abs(predicted(store) - ref).max() <= 1e-5


def test_flip_tta_equals_average_of_flipped_monai_runs(tmp_path):
    # 48 = 16 + 4 * 8: the tile grid is symmetric, so flipping the scan maps tiles onto tiles.
    rng = np.random.default_rng(3)
    array = rng.random((1, 48, 48), dtype=np.float32)
    net = conv_net(2, 1, 2)
    store = make_scan(tmp_path, array, (16, 16))
    infer_scan(store, LoadedModel(net, ModelCard(), "net"),
               EngineConfig(tile=(16, 16), placement="monai", pad="constant", tta=True, output_dtype="float32"))
    total = 0
    for axes in [(), (2,), (3,), (2, 3)]:
        x = torch.from_numpy(array)[None]
        x = torch.flip(x, axes) if axes else x
        with torch.no_grad():
            out = sliding_window_inference(x, (16, 16), 2, net, overlap=0.5, mode="gaussian")
        total = total + (torch.flip(out, axes) if axes else out)
    ref = torch.softmax(total / 4, 1)[0].numpy()
    assert np.abs(predicted(store) - ref).max() <= 1e-5


def test_2d_model_on_3d_stack_runs_slice_by_slice(tmp_path):
    rng = np.random.default_rng(4)
    array = rng.random((1, 3, 40, 30), dtype=np.float32)
    net = conv_net(2, 1, 2)
    store = make_scan(tmp_path, array, (2, 16, 16))
    card = ModelCard(spatial_dims=2, classes=["a", "b"])
    infer_scan(store, LoadedModel(net, card, "net2d"),
               EngineConfig(tile=(16, 16), placement="monai", pad="reflect", output_dtype="float32"))
    ours = predicted(store)
    for z in range(3):
        ref = monai_probs(array[:, z], (16, 16), net, 0.5, "reflect")
        assert np.abs(ours[:, z] - ref).max() <= 1e-5
    assert zarr.open_group(f"{store}/prediction").attrs["tilewise"]["classes"] == ["a", "b"]


def test_normalisation_from_the_card_is_applied(tmp_path):
    rng = np.random.default_rng(5)
    array = (rng.random((1, 32, 32), dtype=np.float32) * 200 + 50).astype(np.float32)
    net = conv_net(2, 1, 2)
    store = make_scan(tmp_path, array, (16, 16))
    card = ModelCard(normalization=Normalization(kind="zscore", mean=[100.0], std=[40.0]))
    infer_scan(store, LoadedModel(net, card, "n"), EngineConfig(tile=(16, 16), placement="monai", pad="constant",
                                                               output_dtype="float32"))
    # 32 = 16 + 2 * 8: no padding, so normalising the whole array first is the same as per tile
    ref = monai_probs((array - 100.0) / 40.0, (16, 16), net, 0.5, "constant")
    assert np.abs(predicted(store) - ref).max() <= 1e-5


class CountingModel(torch.nn.Module):
    """Wraps a net; counts tiles; raises once ``fail_after`` tiles have run (an injected crash).
    Counts under a lock: on a CPU with two lanes (``TILEWISE_CPU_LANES``) it is called from two
    threads, each with part of a batch."""

    def __init__(self, net, fail_after: int | None = None):
        super().__init__()
        self.net = net
        self.fail_after = fail_after
        self.tiles = 0
        self._lock = threading.Lock()

    def forward(self, x):
        with self._lock:
            if self.fail_after is not None and self.tiles >= self.fail_after:
                raise RuntimeError("injected crash")
            self.tiles += x.shape[0]
        return self.net(x)


def test_resume_skips_finished_chunks_and_matches_uninterrupted_run(tmp_path, torch_threads):
    rng = np.random.default_rng(6)
    array = rng.random((1, 24, 40, 40), dtype=np.float32)
    net = conv_net(3, 1, 2)
    config = EngineConfig(tile=(8, 16, 16), batch=2, output_dtype="float32")
    reference = make_scan(tmp_path, array, (8, 16, 16), "reference")
    full = infer_scan(reference, LoadedModel(CountingModel(net), ModelCard(), "m"), config)

    store = make_scan(tmp_path, array, (8, 16, 16), "crashy")
    # The crash comes once 28 tiles ran (a one-tile probe, then batches of 2): in the 15th batch on
    # one thread. On two lanes (one tile each) the lane that reaches the model first may hold the
    # next batch's tile, so it comes in the 14th or the 15th; either way the first 12 batches,
    # which finish the first row of chunks, ran and were blended.
    crashing = CountingModel(net, fail_after=28)
    with pytest.raises(RuntimeError, match="injected crash"):
        infer_scan(store, LoadedModel(crashing, ModelCard(), "m"), config)
    assert not storage.is_complete(f"{store}/prediction")
    done = zarr.open_array(f"{store}/prediction/done")[:].astype(bool)
    assert 0 < done.sum() < done.size

    # the tiles a resume must run: those overlapping at least one chunk that is not done
    prep = prepare(store, LoadedModel(net, ModelCard(), "m"), config)
    needed = [o for o in prep.plan.tiles() if any(not done[c] for c in prep.plan.chunks_of_tile(o))]
    assert len(needed) < full.tiles

    counting = CountingModel(net)
    resumed = infer_scan(store, LoadedModel(counting, ModelCard(), "m"), config)
    assert resumed.status == "resumed"
    assert counting.tiles == len(needed)
    assert storage.is_complete(f"{store}/prediction")
    assert np.abs(predicted(store) - predicted(reference)).max() <= 1e-5

    again = CountingModel(net)
    assert infer_scan(store, LoadedModel(again, ModelCard(), "m"), config).status == "unchanged"
    assert again.tiles == 0


def test_other_parameters_replace_the_prediction(tmp_path):
    array = np.random.default_rng(7).random((1, 32, 32), dtype=np.float32)
    net = conv_net(2, 1, 2)
    store = make_scan(tmp_path, array, (16, 16))
    model = LoadedModel(net, ModelCard(), "m")
    infer_scan(store, model, EngineConfig(tile=(16, 16), output_dtype="float32"))
    first = predicted(store)
    result = infer_scan(store, model, EngineConfig(tile=(16, 16), blend="constant", output_dtype="float32"))
    assert result.status == "inferred"
    assert np.abs(predicted(store) - first).max() > 1e-4


def test_spilling_to_disk_keeps_the_result(tmp_path):
    array = np.random.default_rng(8).random((1, 16, 48, 48), dtype=np.float32)
    net = conv_net(3, 1, 2)
    a = make_scan(tmp_path, array, (8, 8, 8), "a")
    b = make_scan(tmp_path, array, (8, 8, 8), "b")
    config = EngineConfig(tile=(8, 16, 16), output_dtype="float32")
    roomy = infer_scan(a, LoadedModel(net, ModelCard(), "m"), config)
    tight = infer_scan(b, LoadedModel(net, ModelCard(), "m"),
                       EngineConfig(tile=(8, 16, 16), output_dtype="float32", memory_budget_mb=0))
    assert roomy.spills == 0 and tight.spills > 0
    assert np.array_equal(predicted(a), predicted(b))


class _TwoLogits(torch.nn.Module):
    """(x, -x): no weights, no activations worth counting; what tracemalloc sees is the engine's."""

    def forward(self, x):
        return torch.cat([x, -x], 1)


def test_working_memory_measured_by_tracemalloc_stays_flat_and_under_a_quarter_of_monais(tmp_path):
    """Traced (numpy) memory of a whole run, longer scans the same cross-section: the input cache,
    the live output chunks and the label pyramid must not grow with the length of the scan, and stay
    under a quarter of what an in-memory run such as MONAI's needs at least: the input, K summed
    logits and the weight map, all float32 ((C + K + 1) x voxels x 4 bytes, K = 2 here)."""
    import tracemalloc

    config = EngineConfig(tile=(16, 32, 32), output_dtype="float32")
    peaks = {}
    for depth in (32, 128):
        array = np.random.default_rng(9).random((1, depth, 128, 128), dtype=np.float32)
        store = make_scan(tmp_path, array, (8, 32, 32), f"d{depth}")
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            infer_scan(store, LoadedModel(_TwoLogits(), ModelCard(classes=["a", "b"]), "m"), config)
            peaks[depth] = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
    monai_needs = (1 + 2 + 1) * 128 * 128 * 128 * 4
    assert peaks[128] <= 1.3 * peaks[32], peaks
    assert peaks[128] <= 0.25 * monai_needs, (peaks, monai_needs)


# ---- bad input: one line naming the store and the problem; nothing marked complete ------------

class BadModel(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        if self.kind == "shape":
            return x[:, :, ::2]
        if self.kind == "dtype":
            return (x > 0.5).long()
        if self.kind == "nan":
            return torch.full_like(x, float("nan"))
        return "nothing"


@pytest.mark.parametrize("kind, message", [
    ("shape", "model output has shape"),
    ("dtype", "expected floating point logits"),
    ("nan", "NaN or Inf"),
    ("type", "expected a tensor"),
])
def test_bad_model_output(tmp_path, torch_threads, kind, message):  # on two threads raised in a lane
    store = make_scan(tmp_path, np.ones((1, 20, 20), np.float32), (16, 16))
    with pytest.raises(ScanError) as info:
        infer_scan(store, LoadedModel(BadModel(kind), ModelCard(), "bad"), EngineConfig(tile=(8, 8)))
    assert str(info.value).startswith(f"{store}: ") and message in str(info.value)
    assert "\n" not in str(info.value)
    assert not storage.is_complete(f"{store}/prediction")


@pytest.mark.parametrize("config, card, message", [
    (EngineConfig(tile=(0, 8)), ModelCard(), "tile sizes must be positive"),
    (EngineConfig(tile=(-4, 8)), ModelCard(), "tile sizes must be positive"),
    (EngineConfig(tile=(8, 8, 8)), ModelCard(), "spatial axes"),
    (EngineConfig(tile=(8, 8), overlap=1.0), ModelCard(), "overlap must be in [0, 1)"),
    (EngineConfig(tile=(8, 8), overlap=-0.1), ModelCard(), "overlap must be in [0, 1)"),
    (EngineConfig(tile=(8, 8)), ModelCard(in_channels=3), "takes 3 input channels but the image has 1"),
])
def test_bad_options(tmp_path, config, card, message):
    store = make_scan(tmp_path, np.ones((1, 20, 20), np.float32), (16, 16))
    with pytest.raises(ScanError) as info:
        infer_scan(store, LoadedModel(conv_net(2, 1, 2), card, "m"), config)
    assert str(info.value) == f"{store}: {str(info.value).split(': ', 1)[1]}" and message in str(info.value)
    assert not storage.is_complete(f"{store}/prediction")


def test_incomplete_store_is_refused(tmp_path):
    store = make_scan(tmp_path, np.ones((1, 20, 20), np.float32), (16, 16))
    storage.clear_complete(store)
    with pytest.raises(ScanError, match="not a complete scan group"):
        infer_scan(store, LoadedModel(conv_net(2, 1, 2), ModelCard(), "m"), EngineConfig(tile=(8, 8)))
    assert not storage.exists(f"{store}/prediction")


def test_runner_counts_tiles_not_flips():
    runner = ModelRunner(conv_net(2, 1, 2), device="cpu", tta=True)
    out = runner(np.zeros((3, 1, 8, 8), np.float32))
    assert out.shape == (3, 2, 8, 8) and runner.calls == 3


def test_a_finished_prediction_is_an_ngff_label_image_readers_find_from_the_scan_root(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    array = np.random.default_rng(11).random((1, 40, 36), dtype=np.float32)
    store = make_scan(tmp_path, array, (16, 16))
    infer_scan(store, LoadedModel(conv_net(2, 1, 3), ModelCard(), "m"), EngineConfig(tile=(16, 16)))
    nodes = list(Reader(parse_url(store))())  # an independent reader, opened at the root
    label_nodes = [n for n in nodes if "image-label" in n.zarr.root_attrs.get("ome", n.zarr.root_attrs)]
    assert len(label_nodes) == 1
    level0 = np.asarray(label_nodes[0].data[0]).reshape(array.shape[1:])
    np.testing.assert_array_equal(level0, zarr.open_array(f"{store}/prediction/labels")[:])


@pytest.mark.parametrize("shape,tile,chunks,region", [
    ((700, 530), (128, 96), (64, 100), None),  # steps that do not divide the chunks: many patterns
    ((90, 70, 64), (32, 32, 32), (16, 32, 20), None),
    ((300, 300), (64, 64), (50, 50), ((40, 210), (0, 300))),  # a region: chunks outside it uncovered
])
def test_chunk_weights_each_pattern_once_equal_the_tiles_painted_over_the_scan(shape, tile, chunks, region):
    """The blending denominators ChunkWeights hands out (cached by pattern, an LRU small enough to
    evict) equal the importance maps painted tile by tile over the whole scan; voxels no tile
    covers are flagged and given weight 1; tiles marked skipped are left out."""
    from tasks.engine.blend import ChunkWeights
    from tasks.engine.plan import plan_tiles

    plan = plan_tiles(shape, tile, 0.5, chunks, "even", region)
    imp = importance_map(tile)
    origins = list(plan.tiles())
    skipped = set(origins[1::7])
    for skip in (frozenset(), skipped):
        painted = np.zeros(shape, np.float64)
        for o in origins:
            if o in skip:
                continue
            dst = tuple(slice(max(a, 0), min(a + t, n)) for a, t, n in zip(o, tile, shape))
            src = tuple(slice(d.start - a, d.stop - a) for d, a in zip(dst, o))
            painted[dst] += imp[src]
        weights = ChunkWeights(plan, imp, skip, budget_bytes=4 * int(np.prod(chunks)) * 5)
        for _ in range(2):  # the second pass reads what the first cached (or evicted)
            for index in itertools.product(*(range(g) for g in plan.chunk_grid)):
                box = plan.chunk_box(index)
                w, uncovered = weights(index)
                want = painted[box]
                np.testing.assert_allclose(w[want > 0], want[want > 0], rtol=1e-5)
                assert (uncovered is None) == bool((want > 0).all())
                if uncovered is not None:
                    assert np.array_equal(uncovered, want == 0) and (w[uncovered] == 1).all()
                assert not w.flags.writeable or skip  # shared, read-only where cached


def test_two_class_labels_take_class_1_only_where_strictly_larger():
    from tasks.engine.blend import labels_from

    probs = np.array([[0.5, 0.2, 0.9, np.nan], [0.5, 0.8, 0.1, 0.3]], np.float32)
    np.testing.assert_array_equal(labels_from(probs), np.argmax(np.nan_to_num(probs, nan=-1), axis=0) * [1, 1, 1, 0])
    assert labels_from(probs).dtype == np.uint8 and labels_from(probs).tolist() == [0, 1, 0, 0]
