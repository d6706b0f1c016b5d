"""The prediction's NGFF label pyramid, written by the engine as label chunks finish: every level
is the block mode of the level above (a Python loop over blocks as the reference), level 0 is the
prediction's labels, and a resumed run (which writes the pyramid after the run) gives the same."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from tasks import storage
from tasks.engine.infer import EngineConfig, infer_scan
from tasks.engine.label_pyramid import LabelPyramid
from tasks.engine.model_io import LoadedModel, ModelCard
from tasks.export import ngff
from tests.test_engine import CountingModel, conv_net, make_scan
from tests.test_export import _block_mode_reference

CASES = {  # (C, *spatial) shape with odd sizes (ragged blocks at the far edges), chunks, tile
    "2d": ((1, 150, 133), (32, 32), (32, 32)),
    "3d": ((1, 37, 70, 66), (8, 32, 32), (8, 32, 32)),
}


def _levels(store: str) -> list[np.ndarray]:
    group = zarr.open_group(store, mode="r")
    paths = ngff.label_levels(group)
    return [group[f"labels/prediction/{p}"][...] for p in paths]


def _factors(store: str) -> list[tuple[int, ...]]:
    return ngff.spatial_levels(zarr.open_group(store, mode="r"))[2]


def _assert_pyramid(store: str) -> None:
    levels = _levels(store)
    assert len(levels) >= 3, "a pyramid of at least three levels, or the test proves little"
    np.testing.assert_array_equal(levels[0], zarr.open_array(f"{store}/prediction/labels")[...])
    for n, f in enumerate(_factors(store), start=1):
        np.testing.assert_array_equal(levels[n], _block_mode_reference(levels[n - 1], f))
    assert len(np.unique(levels[1])) > 1, "labels of more than one class: the mode has something to decide"
    listed = zarr.open_group(store, mode="r")["labels"].attrs["ome"]["labels"]
    assert "prediction" in listed


@pytest.mark.parametrize("case", CASES)
def test_streamed_pyramid_is_the_block_mode_of_each_level_above(tmp_path, monkeypatch, case):
    shape, chunks, tile = CASES[case]
    array = np.random.default_rng(5).random(shape, dtype=np.float32)
    store = make_scan(tmp_path, array, chunks)
    assert LabelPyramid.applies(zarr.open_group(store, mode="r"))

    def no_second_pass(*a, **k):
        raise AssertionError("the pyramid was computed again after the run")

    monkeypatch.setattr(ngff, "downsample_mode", no_second_pass)  # the after-run path only
    infer_scan(store, LoadedModel(conv_net(len(tile), 1, 3), ModelCard(), "m"), EngineConfig(tile=tile))
    monkeypatch.undo()
    assert storage.is_complete(f"{store}/prediction")
    _assert_pyramid(store)


def test_a_resumed_run_writes_the_same_pyramid_after_the_run(tmp_path):
    shape, chunks, tile = CASES["3d"]
    array = np.random.default_rng(6).random(shape, dtype=np.float32)
    net = conv_net(3, 1, 3)
    reference = make_scan(tmp_path, array, chunks, "reference")
    infer_scan(reference, LoadedModel(net, ModelCard(), "m"), EngineConfig(tile=tile))

    store = make_scan(tmp_path, array, chunks, "crashy")
    with pytest.raises(RuntimeError, match="injected crash"):  # after 20 batches of 4 tiles
        infer_scan(store, LoadedModel(CountingModel(net, fail_after=80), ModelCard(), "m"), EngineConfig(tile=tile))
    listed = zarr.open_group(store, mode="r").get("labels")
    assert listed is None or "prediction" not in listed.attrs.get("ome", {}).get("labels", []), \
        "a half-written label image is never listed"
    assert infer_scan(store, LoadedModel(net, ModelCard(), "m"), EngineConfig(tile=tile)).status == "resumed"
    _assert_pyramid(store)
    for mine, ref in zip(_levels(store), _levels(reference)):
        np.testing.assert_array_equal(mine, ref)


def test_level_zero_holds_the_labels_encoded_bytes(tmp_path):
    shape, chunks, tile = CASES["2d"]
    store = make_scan(tmp_path, np.random.default_rng(7).random(shape, dtype=np.float32), chunks)
    infer_scan(store, LoadedModel(conv_net(2, 1, 3), ModelCard(), "m"), EngineConfig(tile=tile))
    src = sorted(p.relative_to(tmp_path / "scan.zarr/prediction/labels")
                 for p in (tmp_path / "scan.zarr/prediction/labels/c").rglob("*") if p.is_file())
    dst_root = tmp_path / "scan.zarr/labels/prediction/0"
    assert src, "chunks were written"
    for rel in src:
        assert (dst_root / rel).read_bytes() == (tmp_path / "scan.zarr/prediction/labels" / rel).read_bytes()
