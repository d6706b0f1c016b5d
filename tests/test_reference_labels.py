"""``labels/reference`` as an NGFF image-label (issue 20): what a new ingest writes, what an
independent OME-Zarr reader finds, and the in-place migration of stores ingested before."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import zarr

from tasks import storage
from tasks.ingest import LabelSpec, ScanSpec, ingest_scan
from tasks.ingest import reference as reference_mod
from tasks.ingest import to_zarr
from tasks.training.data import open_training_scan
from tests.test_export import _block_mode_reference as _block_mode

CLASSES = ("background", "core", "rim", "edge")
MAPPING = {0: 0, 10: 1, 20: 2, 30: 3}  # file values -> class indices: not the identity


def _scan(tmp_path, name="scan") -> tuple[ScanSpec, np.ndarray, str]:
    """A small MRI scan (anisotropic spacing: the pyramid has (1, 2, 2) and (2, 2, 2) steps) whose
    label file holds the catalog's file values; the expected reference in array order (Z, Y, X)."""
    rng = np.random.default_rng(5)
    shape_zyx = (14, 37, 42)
    values = np.array(sorted(MAPPING))
    ref_file = values[rng.integers(0, 4, shape_zyx)]
    ref_file[3:11, 5:30, 8:35] = 20  # a region, so the coarse levels are not all noise
    ref_file[5:9, 10:20, 12:24] = 10
    image = (rng.normal(0, 1, shape_zyx) + ref_file / 10).astype(np.float32)
    affine = np.diag([0.5, 0.5, 1.5, 1.0])  # (i, j, k) = (X, Y, Z): Z three times coarser
    img, lab = tmp_path / f"{name}.nii.gz", tmp_path / f"{name}_labels.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(image), affine), img)
    nib.save(nib.Nifti1Image(np.transpose(ref_file).astype(np.int16), affine), lab)
    spec = ScanSpec(name, "mri", (img,), dataset="synthetic", chunks=(4, 8, 8),
                    labels=LabelSpec((lab,), MAPPING, CLASSES))
    # the expected level 0: the label file read by nibabel, mapped by the catalog's mapping
    raw = np.transpose(np.asarray(nib.load(str(lab)).dataobj))
    expected = np.vectorize(MAPPING.__getitem__)(raw).astype(np.uint8)
    return spec, expected, str(tmp_path / f"{name}.zarr")


def _ome_labels(store: str) -> dict:
    """{name: node} of every label image an OME-Zarr reader opened at the store's root finds."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    nodes = list(Reader(parse_url(store, mode="r"))())
    return {n.metadata["name"]: n for n in nodes if n.load(Label) is not None}


def _check_reference_pyramid(store: str, expected: np.ndarray) -> None:
    group = zarr.open_group(store, mode="r")
    found = _ome_labels(store)
    assert "reference" in found
    node = found["reference"]
    levels = [np.asarray(d) for d in node.data]
    image_levels = sorted(group["image"].array_keys(), key=int)
    assert len(levels) == len(image_levels) > 2
    assert [lv.shape for lv in levels] == [group["image"][n].shape[1:] for n in image_levels]
    np.testing.assert_array_equal(levels[0], expected)
    scales = [t[0]["scale"] for t in node.metadata["coordinateTransformations"]]
    for n in range(1, len(levels)):
        factors = tuple(int(round(a / b)) for a, b in zip(scales[n], scales[n - 1]))
        np.testing.assert_array_equal(levels[n], _block_mode(levels[n - 1], factors), err_msg=f"level {n}")
    assert {k: p["class"] for k, p in node.metadata["properties"].items()} == dict(enumerate(CLASSES))
    assert set(node.metadata["color"]) == {0, 1, 2, 3}  # a colour per class (0 transparent)


def test_a_new_store_has_an_ngff_reference_readers_find_beside_the_image(tmp_path):
    spec, expected, store = _scan(tmp_path)
    assert ingest_scan(spec, store).status == "ingested"
    _check_reference_pyramid(store, expected)
    assert storage.is_complete(store)
    assert zarr.open_group(store, mode="r")["labels"].attrs["ome"]["labels"] == ["reference"]
    # every reader opens level 0 through the one accessor
    group = storage.open_group(store)
    np.testing.assert_array_equal(storage.reference(group)[...], expected)
    assert storage.reference_record(group)["class_voxels"] == np.bincount(expected.ravel(), minlength=4).tolist()
    np.testing.assert_array_equal(open_training_scan(store, 4).labels[...], expected)


def _to_old_layout(store: str) -> None:
    """Rewrite ``store`` as ingest wrote it before issue 20: ``labels/reference`` a plain uint8 array
    carrying the tilewise attributes, not listed in ``labels/``, the mark vouching for it."""
    group = zarr.open_group(store, mode="r+")
    level0 = group["labels/reference/0"]
    data, chunks, dims = level0[...], level0.chunks, level0.metadata.dimension_names
    info = {k: v for k, v in group["labels/reference"].attrs["tilewise"].items() if k != "kind"}
    mark = dict(group.attrs["tilewise"]["complete"])
    del group["labels/reference"]
    del group["labels"].attrs["ome"]
    array = group["labels"].create_array("reference", shape=data.shape, dtype="uint8", chunks=chunks,
                                         compressors=to_zarr.COMPRESSOR, fill_value=0, dimension_names=dims)
    array[...] = data
    array.attrs["tilewise"] = info
    levels = sorted(group["image"].array_keys(), key=int)
    storage.mark_complete(group, {k: v for k, v in mark.items() if k != "arrays"},
                          arrays=[f"image/{n}" for n in levels] + ["labels/reference"])


def _old_store(tmp_path, with_prediction: bool = True) -> tuple[ScanSpec, np.ndarray, str]:
    from tasks.export.ngff import write_label_image

    spec, expected, store = _scan(tmp_path)
    ingest_scan(spec, store)
    _to_old_layout(store)
    if with_prediction:  # a prediction's label image, listed, as infer wrote it beside an old reference
        group = zarr.open_group(store, mode="r+")
        write_label_image(group, "prediction", group["labels/reference"], list(CLASSES), {"kind": "test"})
    group = zarr.open_group(store, mode="r")
    assert isinstance(group["labels/reference"], zarr.Array) and storage.is_complete(store)
    assert "reference" not in _ome_labels(store)
    return spec, expected, store


def _no_rewrite(monkeypatch) -> list:
    """Make a re-ingest impossible and record which sources ingest opens."""
    opened = []
    real = to_zarr.open_reader

    def recording(sources, kind):
        opened.append([str(s) for s in sources])
        return real(sources, kind)

    def refuse(*args, **kwargs):
        raise AssertionError("re-ingested")

    monkeypatch.setattr(to_zarr, "open_reader", recording)
    monkeypatch.setattr(to_zarr, "_write_scan", refuse)
    return opened


def test_an_old_store_is_migrated_by_the_next_ingest_without_reading_its_labels(tmp_path, monkeypatch):
    spec, expected, store = _old_store(tmp_path)
    # before: every reader still reads the old layout
    np.testing.assert_array_equal(storage.reference(storage.open_group(store))[...], expected)
    np.testing.assert_array_equal(open_training_scan(store, 4).labels[...], expected)
    opened = _no_rewrite(monkeypatch)

    result = ingest_scan(spec, store)

    assert result.status == "unchanged"
    assert opened == [[str(p) for p in spec.sources]]  # the image's header, as any unchanged ingest
    _check_reference_pyramid(store, expected)
    assert storage.is_complete(store)
    group = zarr.open_group(store, mode="r")
    assert group["labels"].attrs["ome"]["labels"] == ["reference", "prediction"]  # the prediction kept
    promised = group.attrs["tilewise"]["complete"]["arrays"]
    assert "labels/reference" not in promised and promised["labels/reference/0"] == list(expected.shape)
    assert "reference-migrating" not in group["labels"]
    np.testing.assert_array_equal(open_training_scan(store, 4).labels[...], expected)
    assert storage.reference_record(group)["class_voxels"] == np.bincount(expected.ravel(), minlength=4).tolist()
    # once migrated, nothing more to do
    assert ingest_scan(spec, store).status == "unchanged"
    assert not reference_mod.needs_migration(store)


def _crash_at(monkeypatch, where: str) -> None:
    def fail(*args, **kwargs):
        raise OSError(f"crash at {where}")

    if where.startswith("move"):  # the first or the second rename of the swap
        real, calls = reference_mod._move, []

        def move(*args):
            calls.append(args)
            if len(calls) == int(where[-1]):
                fail()
            real(*args)

        monkeypatch.setattr(reference_mod, "_move", move)
    elif where == "pyramid":
        monkeypatch.setattr(reference_mod, "write_label_levels", fail)
    elif where == "list":
        monkeypatch.setattr(reference_mod, "list_label_image", fail)
    elif where == "mark":
        monkeypatch.setattr(reference_mod.storage, "mark_complete", fail)


@pytest.mark.parametrize("where", ["pyramid", "move1", "move2", "list", "mark"])
def test_an_interrupted_migration_leaves_the_group_readable_or_incomplete(tmp_path, monkeypatch, where):
    spec, expected, store = _old_store(tmp_path)
    with monkeypatch.context() as patch:
        _crash_at(patch, where)
        with pytest.raises(OSError, match="crash at"):
            ingest_scan(spec, store)
    if storage.is_complete(store):  # complete: every promised array there, the reference whole
        group = storage.open_group(store)
        np.testing.assert_array_equal(storage.reference(group)[...], expected)
        np.testing.assert_array_equal(open_training_scan(store, 4).labels[...], expected)
    else:
        assert where != "pyramid"  # before the swap the old layout stays complete
    # the next ingest finishes the job: migrated in place, or re-ingested from the sources
    result = ingest_scan(spec, store)
    assert result.status == ("unchanged" if where == "pyramid" else "ingested")
    _check_reference_pyramid(store, expected)
    assert storage.is_complete(store)


def test_an_old_store_on_object_storage_is_migrated_too(tmp_path, s3, monkeypatch):
    """The swap's moves are copies and deletes on S3: the same group comes out."""
    spec, expected, _ = _scan(tmp_path)
    store = f"{s3.url}/stores/scan.zarr"
    assert ingest_scan(spec, store).status == "ingested"
    _to_old_layout(store)
    assert isinstance(zarr.open_group(store, mode="r")["labels/reference"], zarr.Array)
    _no_rewrite(monkeypatch)

    assert ingest_scan(spec, store).status == "unchanged"

    group = zarr.open_group(store, mode="r")
    levels = sorted(group["image"].array_keys(), key=int)
    assert sorted(group["labels/reference"].array_keys(), key=int) == levels
    assert "reference-migrating" not in group["labels"]
    np.testing.assert_array_equal(storage.reference(group)[...], expected)
    np.testing.assert_array_equal(group["labels/reference/1"][...], _block_mode(expected, (1, 2, 2)))
    assert group["labels"].attrs["ome"]["labels"] == ["reference"]
    assert storage.is_complete(store)
