"""tasks.chunk_io: chunks encoded in the calling thread are the chunks zarr itself writes.

The reference is zarr-python writing the same data through its own codec pipeline into a twin
array: every stored chunk file must be byte for byte the same, the same chunks must be absent
(all fill value), and zarr must read the direct writes back as the data.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

import tasks.codecs  # noqa: F401  (the process's codec pipeline, as in the engine)
from tasks.chunk_io import ChunkCodec
from tasks.export.ngff import COMPRESSOR as LABEL_COMPRESSOR
from tasks.ingest.to_zarr import COMPRESSOR, PYRAMID_COMPRESSOR


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != "zarr.json"}


def _data(shape, dtype, rng):
    if np.dtype(dtype).kind == "f":
        x = rng.random(shape).astype(dtype)
        x[..., : shape[-1] // 3] = 0  # some chunks all fill value
        return x
    x = (rng.random(shape) > 0.7).astype(dtype) * 3
    x[..., : shape[-1] // 2] = 0
    return x


@pytest.mark.parametrize("dtype,chunks,shape,compressor", [
    ("float16", (1, 64, 64), (2, 150, 200), COMPRESSOR),  # probabilities: edge chunks on both axes
    ("float32", (1, 64, 64), (1, 128, 130), COMPRESSOR),
    ("uint8", (64, 64), (150, 200), LABEL_COMPRESSOR),  # labels and their pyramid (bitshuffle)
    ("uint8", (16, 32, 32), (40, 70, 64), PYRAMID_COMPRESSOR),
    ("uint16", (32, 32), (70, 64), BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle")),
])
def test_direct_chunks_are_zarrs_own_bytes(tmp_path, dtype, chunks, shape, compressor):
    rng = np.random.default_rng(0)
    data = _data(shape, dtype, rng)
    ref = zarr.create_array(store=str(tmp_path / "ref"), shape=shape, chunks=chunks, dtype=dtype,
                            compressors=compressor, fill_value=0)
    ref[...] = data
    out = zarr.create_array(store=str(tmp_path / "out"), shape=shape, chunks=chunks, dtype=dtype,
                            compressors=compressor, fill_value=0)
    codec = ChunkCodec.for_array(out)
    assert codec is not None
    for coords in itertools.product(*(range(-(-n // c)) for n, c in zip(shape, chunks))):
        box = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(coords, chunks, shape))
        codec.write(coords, data[box])
    want, got = _files(tmp_path / "ref"), _files(tmp_path / "out")
    assert got.keys() == want.keys() and len(want) > 0  # the same chunks stored, the all-zero ones absent
    assert all(got[k] == want[k] for k in want)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "out"), mode="r")[...], data)
    for coords in itertools.product(*(range(-(-n // c)) for n, c in zip(shape, chunks))):  # and read back
        box = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(coords, chunks, shape))
        got_chunk = ChunkCodec.for_array(ref).read(coords)
        assert got_chunk.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got_chunk, data[box])


def test_a_nan_filled_array_leaves_its_all_nan_chunks_unstored_as_zarr_does(tmp_path):
    data = np.full((2, 100, 100), np.nan, np.float32)
    data[1, 70:, 70:] = 1.5
    for name, direct in (("ref", False), ("out", True)):
        arr = zarr.create_array(store=str(tmp_path / name), shape=data.shape, chunks=(1, 64, 64), dtype="float32",
                                compressors=COMPRESSOR, fill_value=np.nan)
        if direct:
            codec = ChunkCodec.for_array(arr)
            for coords in itertools.product(range(2), range(2), range(2)):
                box = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(coords, (1, 64, 64), data.shape))
                codec.write(coords, data[box])
        else:
            arr[...] = data
    want, got = _files(tmp_path / "ref"), _files(tmp_path / "out")
    assert got == want and len(want) == 1
    np.testing.assert_array_equal(ChunkCodec.for_array(zarr.open_array(str(tmp_path / "out"))).read((0, 0, 0)),
                                  data[:1, :64, :64])


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_zero_filled_float_array_stores_what_zarr_stores(tmp_path, dtype):
    """A zero fill is compared by its bits, as zarr compares it: a chunk of -0.0 is stored, and so
    is a chunk holding one subnormal, -inf or NaN among zeros; only all +0.0 chunks are not."""
    tiny = np.finfo(dtype).smallest_subnormal
    data = np.zeros((1, 64, 320), dtype)
    data[0, :, 64:128] = -0.0
    data[0, 5, 130] = tiny
    data[0, 9, 200] = -np.inf
    data[0, 3, 300] = np.nan
    files = {}
    for name, direct in (("ref", False), ("out", True)):
        arr = zarr.create_array(store=str(tmp_path / name), shape=data.shape, chunks=(1, 64, 64), dtype=dtype,
                                compressors=COMPRESSOR, fill_value=0)
        if direct:
            codec = ChunkCodec.for_array(arr)
            for x in range(5):
                codec.write((0, 0, x), data[:, :, x * 64:(x + 1) * 64])
        else:
            arr[...] = data
        files[name] = _files(tmp_path / name)
    assert files["out"] == files["ref"]
    assert sorted(files["ref"]) == ["c/0/0/1", "c/0/0/2", "c/0/0/3", "c/0/0/4"]


def test_write_box_covers_every_class_and_an_emptied_chunk_is_removed(tmp_path):
    out = zarr.create_array(store=str(tmp_path / "p"), shape=(3, 100, 100), chunks=(1, 64, 64), dtype="float16",
                            compressors=COMPRESSOR, fill_value=0)
    codec = ChunkCodec.for_array(out)
    block = np.random.default_rng(1).random((3, 36, 64)).astype("float16") + np.float16(0.1)
    codec.write_box((slice(0, 3), slice(64, 100), slice(0, 64)), block)
    np.testing.assert_array_equal(out[:, 64:, :64], block)
    codec.write((1, 1, 0), np.zeros((1, 36, 64), "float16"))  # rewritten as all fill value: no chunk left
    assert not (tmp_path / "p" / "c" / "1" / "1" / "0").exists()
    assert not out[1, 64:, :64].any() and out[2, 64:, :64].all()
    with pytest.raises(ValueError, match="whole chunks"):
        codec.write_box((slice(0, 3), slice(32, 96), slice(0, 64)), np.ones((3, 64, 64), "float16"))


def test_a_chunk_written_again_is_replaced_whole(tmp_path):
    """Chunk files are written in place (no temporary file and rename, see ``_put_file``): a
    shorter encoding over a longer one leaves nothing of the old bytes, and no stray file."""
    out = zarr.create_array(store=str(tmp_path / "g" / "a"), shape=(64, 64), chunks=(64, 64), dtype="float32",
                            compressors=COMPRESSOR, fill_value=0)
    codec = ChunkCodec.for_array(out)
    noisy = np.random.default_rng(2).random((64, 64)).astype("float32")
    long = codec.write((0, 0), noisy)
    short = codec.write((0, 0), np.full((64, 64), 0.5, "float32"))
    assert len(short) < len(long) // 10
    assert (tmp_path / "g" / "a" / "c" / "0" / "0").read_bytes() == short
    np.testing.assert_array_equal(out[...], 0.5)
    assert sorted(p.name for p in (tmp_path / "g" / "a").rglob("*") if p.is_file()) == ["0", "zarr.json"]


def test_a_read_only_array_is_not_written(tmp_path):
    zarr.create_array(store=str(tmp_path / "r"), shape=(64, 64), chunks=(64, 64), dtype="uint8",
                      compressors=COMPRESSOR, fill_value=0)
    codec = ChunkCodec.for_array(zarr.open_array(str(tmp_path / "r"), mode="r"))
    with pytest.raises(ValueError, match="read-only"):
        codec.write((0, 0), np.ones((64, 64), "uint8"))
    assert not (tmp_path / "r" / "c").exists()


def test_arrays_zarr_must_write_get_no_direct_codec(tmp_path):
    other = zarr.create_array(store=str(tmp_path / "z"), shape=(10, 10), chunks=(5, 5), dtype="uint8",
                              compressors=ZstdCodec(), fill_value=0)
    assert ChunkCodec.for_array(other) is None  # not blosc
    sharded = zarr.create_array(store=str(tmp_path / "s"), shape=(16, 16), chunks=(4, 4), shards=(8, 8),
                                dtype="uint8", compressors=COMPRESSOR, fill_value=0)
    assert ChunkCodec.for_array(sharded) is None


def _chunk_files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.name != "zarr.json"}


@pytest.mark.parametrize("kind", ["mri", "satellite", "em"])
def test_ingest_writes_the_chunks_zarr_writes(tmp_path, monkeypatch, kind):
    """Ingest with its chunks encoded in its own threads and ingest through zarr's pipeline (the
    direct codec switched off) store the same chunks, byte for byte, at every pyramid level --
    edge chunks on every axis included."""
    import nibabel as nib
    import rasterio
    import tifffile
    from rasterio.transform import from_origin

    import tasks.ingest.to_zarr as to_zarr
    from tasks.ingest.discover import ScanSpec

    rng = np.random.default_rng(3)
    if kind == "mri":
        src = tmp_path / "v.nii.gz"
        vol = rng.normal(100, 20, (70, 90, 45)).astype(np.float32)
        vol[:20] = 0
        nib.save(nib.Nifti1Image(vol, np.eye(4)), src)
    elif kind == "satellite":
        src = tmp_path / "r.tif"
        with rasterio.open(src, "w", driver="GTiff", width=700, height=530, count=3, dtype="uint16",
                           crs="EPSG:32633", transform=from_origin(0, 0, 1, 1)) as dst:
            dst.write(rng.integers(0, 4000, (3, 530, 700), dtype=np.uint16))
    else:
        src = tmp_path / "stack"
        src.mkdir()
        for z in range(5):
            tifffile.imwrite(src / f"s{z:02d}.tif", rng.integers(0, 255, (300, 410), dtype=np.uint8))
    calls = []
    real = to_zarr._submit_chunks
    monkeypatch.setattr(to_zarr, "_submit_chunks", lambda *a, **k: calls.append(1) or real(*a, **k))
    to_zarr.ingest_scan(ScanSpec("direct", kind, (src,)), str(tmp_path / "direct.zarr"))
    assert calls  # the direct path ran
    monkeypatch.setattr(to_zarr.ChunkCodec, "for_array", classmethod(lambda cls, array: None))
    to_zarr.ingest_scan(ScanSpec("direct", kind, (src,)), str(tmp_path / "zarr.zarr"))
    want = _chunk_files(tmp_path / "zarr.zarr" / "image")
    got = _chunk_files(tmp_path / "direct.zarr" / "image")
    assert len(want) > 4 and got.keys() == want.keys()
    assert [k for k in want if got[k] != want[k]] == []
