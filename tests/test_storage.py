"""The store contract around existing paths: tilewise replaces its own groups, never the user's files."""

from __future__ import annotations

import pytest

from tasks import storage
from tasks.errors import ScanError
from tasks.ingest import ScanSpec, ingest_scan

CHIP = "satellite/spacenet1_rio/images/3band_013022223130_Public_img53.tif"


def test_refuses_to_replace_a_folder_that_is_not_a_zarr_group(tmp_path, samples):
    target = tmp_path / "thesis"
    target.mkdir()
    (target / "chapter1.tex").write_text("precious")
    with pytest.raises(ScanError, match="is not a Zarr group; refusing to replace it"):
        ingest_scan(ScanSpec("s", "satellite", (samples / CHIP,)), str(target))
    assert (target / "chapter1.tex").read_text() == "precious"


def test_refuses_to_replace_a_file(tmp_path, samples):
    target = tmp_path / "notes.zarr"
    target.write_text("not a group")
    with pytest.raises(ScanError, match="refusing"):
        ingest_scan(ScanSpec("s", "satellite", (samples / CHIP,)), str(target))
    assert target.read_text() == "not a group"


def test_empty_folder_and_own_group_are_replaced(tmp_path, samples):
    target = tmp_path / "empty.zarr"
    target.mkdir()
    assert ingest_scan(ScanSpec("s", "satellite", (samples / CHIP,)), str(target)).status == "ingested"
    storage.clear_complete(str(target))  # now an incomplete group of ours: replaced, not refused
    assert ingest_scan(ScanSpec("s", "satellite", (samples / CHIP,)), str(target)).status == "ingested"
    assert storage.is_complete(str(target))


# ---- what the completion mark promises -----------------------------------------------------------

def _spec(samples) -> ScanSpec:
    return ScanSpec("s", "satellite", (samples / CHIP,), chunks=(64, 64))  # small chunks: a few levels


def _ingested(tmp_path, samples, name="s.zarr") -> str:
    store = str(tmp_path / name)
    assert ingest_scan(_spec(samples), store).status == "ingested"
    return store


def test_mark_lists_every_array_it_vouches_for_with_its_shape(tmp_path, samples):
    import zarr

    store = _ingested(tmp_path, samples)
    mark = storage.read_record(store)[storage.COMPLETE_KEY]
    group = zarr.open_group(store, mode="r")
    levels = [name for name, _ in group["image"].arrays()]
    assert sorted(mark["arrays"]) == sorted(f"image/{n}" for n in levels) and len(levels) >= 2
    for path, shape in mark["arrays"].items():
        assert tuple(shape) == group[path].shape


def test_mark_above_a_deleted_or_reshaped_array_is_not_complete(tmp_path, samples):
    import shutil

    import zarr

    store = _ingested(tmp_path, samples)
    shutil.rmtree(f"{store}/image/1")  # a coarse level, not only image/0 is checked
    assert storage.read_record(store)[storage.COMPLETE_KEY]  # the mark is still there...
    assert not storage.is_complete(store)  # ...but what it promises is not

    other = _ingested(tmp_path, samples, "t.zarr")
    level0 = zarr.open_array(f"{other}/image/0", mode="r")
    zarr.create_array(f"{other}/image/0", shape=(1, 8, 8), dtype=level0.dtype, overwrite=True)
    assert not storage.is_complete(other)


def test_the_reported_state_mark_without_image_is_reingested_not_unchanged(tmp_path, samples):
    """Issue 8: a concurrent ingest left the mark without image/0 and every later ingest said
    'unchanged'. Both the listed mark and an old mark (no list) now read as incomplete."""
    import shutil

    store = _ingested(tmp_path, samples)
    shutil.rmtree(f"{store}/image/0")
    assert ingest_scan(_spec(samples), store).status == "ingested"
    assert storage.is_complete(store)

    group = storage.open_group(store, mode="r+")  # a mark as written before it listed its arrays
    attrs = dict(group.attrs[storage.ATTRS_KEY])
    attrs[storage.COMPLETE_KEY] = {k: v for k, v in attrs[storage.COMPLETE_KEY].items() if k != "arrays"}
    group.attrs[storage.ATTRS_KEY] = attrs
    assert storage.is_complete(store)  # old mark, image/0 there: complete, as before
    assert ingest_scan(_spec(samples), store).status == "unchanged"
    shutil.rmtree(f"{store}/image/0")
    assert not storage.is_complete(store)
    assert ingest_scan(_spec(samples), store).status == "ingested"


def test_mark_is_refused_when_a_promised_array_is_missing(tmp_path):
    group = storage.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("probabilities", shape=(2, 4, 4), dtype="float32")
    with pytest.raises(ValueError, match="array 'labels' is missing"):
        storage.mark_complete(group, {"at": "now"}, arrays=("probabilities", "labels"))
    assert not storage.is_complete(str(tmp_path / "g.zarr"))  # nothing was written
    storage.mark_complete(group, {"at": "now"})  # default: every array there
    assert storage.read_record(str(tmp_path / "g.zarr"))[storage.COMPLETE_KEY]["arrays"] == {
        "probabilities": [2, 4, 4]}


# ---- "not there" versus "cannot tell" ------------------------------------------------------------

def test_read_record_none_only_for_a_group_that_is_not_there(tmp_path, samples):
    assert storage.read_record(str(tmp_path / "missing.zarr")) is None
    (tmp_path / "empty.zarr").mkdir()
    assert storage.read_record(str(tmp_path / "empty.zarr")) is None  # no zarr.json
    store = _ingested(tmp_path, samples)
    text = (tmp_path / "s.zarr" / "zarr.json").read_text()
    (tmp_path / "s.zarr" / "zarr.json").write_text(text[: len(text) // 2])  # a writer died mid-write
    assert storage.read_record(store) is None and not storage.is_complete(store)


def _eio(*_a, **_k):
    import errno

    raise OSError(errno.EIO, "Input/output error")


def test_read_record_and_is_complete_raise_on_an_io_error(tmp_path, samples, monkeypatch):
    """Running as root, chmod 000 does not stop reads: the store's reads are made to fail instead."""
    import pathlib

    store = _ingested(tmp_path, samples)
    real = pathlib.Path.read_bytes
    monkeypatch.setattr(pathlib.Path, "read_bytes",
                        lambda self: _eio() if str(self).startswith(store) else real(self))
    with pytest.raises(OSError, match="Input/output error"):
        storage.read_record(store)
    with pytest.raises(OSError, match="Input/output error"):
        storage.is_complete(store)
    monkeypatch.setattr(pathlib.Path, "read_bytes",  # only the level-0 metadata is unreadable
                        lambda self: _eio() if str(self) == f"{store}/image/0/zarr.json" else real(self))
    assert storage.read_record(store)[storage.COMPLETE_KEY]
    with pytest.raises(OSError, match="Input/output error"):
        storage.is_complete(store)
    with pytest.raises(OSError, match="Input/output error"):  # ingest stops; it neither skips nor deletes
        ingest_scan(_spec(samples), store)
    monkeypatch.undo()
    assert storage.is_complete(store)


def test_exists_is_false_only_for_no_such_file(tmp_path, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    assert storage.exists(str(tmp_path)) and not storage.exists(str(tmp_path / "nope"))
    monkeypatch.setattr(LocalFileSystem, "info", _eio)
    with pytest.raises(OSError, match="Input/output error"):
        storage.exists(str(tmp_path / "nope"))
