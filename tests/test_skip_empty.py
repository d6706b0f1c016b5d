"""Empty tiles are not run: which ones, what their voxels get, the lowest pyramid level never hiding
signal, and the digest/attributes.

The expectations are worked out without the engine's code: the engine runs with ``placement="monai"``
and the tiles are the windows MONAI's own ``sliding_window_inference`` visits (over the bounding box
of the non-empty voxels, found with numpy, as over an image of the box's size); the probabilities
are the network applied to the whole image at once. The network is pointwise (a 1x1 convolution),
so a voxel's blended probability is the softmax of its own logits whatever tiles cover it: every
voxel a run tile covers can be checked exactly, and every voxel that only skipped tiles cover must
be background with probability 1."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import rasterio
import torch
import zarr
from monai.inferers import sliding_window_inference

from tasks import storage
from tasks.engine.infer import EngineConfig, infer_scan
from tasks.engine.model_io import LoadedModel, ModelCard
from tasks.errors import ScanError
from tasks.ingest import ScanSpec, ingest_scan


CARD = ModelCard(classes=["background", "foreground"])  # no probe tile to learn the classes


class Pointwise(torch.nn.Module):
    """1x1 convolution to 2 classes, counting the tiles it sees."""

    def __init__(self, c_in: int, dims: int):
        super().__init__()
        torch.manual_seed(0)
        self.conv = (torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d)(c_in, 2, 1)
        self.tiles = 0

    def forward(self, x):
        self.tiles += x.shape[0]
        return self.conv(x)


def softmax_of(net: Pointwise, array: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits = net.conv(torch.from_numpy(array.astype(np.float32))[None])[0]
    return torch.softmax(logits, 0).numpy()


def nifti_scan(tmp_path: Path, array: np.ndarray, chunks, name="mri") -> str:
    src = tmp_path / f"{name}.nii"
    nib.save(nib.Nifti1Image(np.transpose(array, (3, 2, 1, 0)), np.eye(4)), src)
    store = str(tmp_path / f"{name}.zarr")
    ingest_scan(ScanSpec(name, "mri", (src,), chunks=chunks), store)
    return store


def geotiff_scan(tmp_path: Path, array: np.ndarray, nodata, chunks, name="sat") -> str:
    src = tmp_path / f"{name}.tif"
    with rasterio.open(src, "w", driver="GTiff", width=array.shape[2], height=array.shape[1], count=array.shape[0],
                       dtype=array.dtype.name, nodata=nodata) as dst:
        dst.write(array)
    store = str(tmp_path / f"{name}.zarr")
    ingest_scan(ScanSpec(name, "satellite", (src,), chunks=chunks), store)
    return store


def monai_windows(shape, tile, overlap=0.5, offset=None):
    """The windows (tuples of slices) MONAI's ``sliding_window_inference`` visits over an image of
    ``shape`` (>= the tile: MONAI would pad a smaller one), shifted by ``offset``."""
    assert all(n >= t for n, t in zip(shape, tile)), "a box thinner than the tile gets the engine's centred tile"
    offset = offset or [0] * len(shape)
    boxes = []

    def record(window, coords):
        boxes.extend(tuple(slice(int(s.start) + o, int(s.stop) + o) for s, o in zip(c[2:], offset)) for c in coords)
        return torch.zeros_like(window)

    sliding_window_inference(torch.zeros((1, 1, *shape)), tile, 8, record, overlap=overlap, with_coord=True)
    return boxes


def bounding_box(empty: np.ndarray):
    hits = np.nonzero(~empty)
    return [(int(i.min()), int(i.max()) + 1) for i in hits]


def expected(array: np.ndarray, empty: np.ndarray, tile, net: Pointwise):
    """(tiles over the whole scan, tiles over the box of the non-empty voxels, those of them that must
    run, probabilities every voxel must get), worked out from the voxels: a tile seeing only empty
    voxels is left out, and a voxel no run tile covers is background with probability 1."""
    box = bounding_box(empty)
    boxes = monai_windows([hi - lo for lo, hi in box], tile, offset=[lo for lo, _ in box])
    run = [b for b in boxes if not empty[b].all()]
    covered = np.zeros(array.shape[1:], bool)
    for b in run:
        covered[b] = True
    probs = softmax_of(net, array)
    probs[:, ~covered] = 0.0
    probs[0, ~covered] = 1.0
    return len(monai_windows(array.shape[1:], tile)), len(boxes), len(run), probs


def predicted(store: str) -> np.ndarray:
    return zarr.open_array(f"{store}/prediction/probabilities")[:]


def test_mri_background_tiles_are_not_run_and_are_background_with_probability_one(tmp_path):
    rng = np.random.default_rng(0)
    array = np.zeros((1, 24, 64, 64), np.float32)
    array[0, 4:14, 36:60, 8:30] = rng.random((10, 24, 22), dtype=np.float32) + 0.5  # the "head"
    store = nifti_scan(tmp_path, array, (8, 16, 16))
    net = Pointwise(1, 3)
    tile = (8, 16, 16)
    total, planned, must_run, want = expected(array, array[0] == 0, tile, net)
    assert 0 < must_run <= planned < total / 4  # the box leaves out most tiles

    result = infer_scan(store, LoadedModel(net, CARD, "pw"),
                        EngineConfig(tile=tile, placement="monai", skip_empty=0.0, output_dtype="float32"))
    assert net.tiles == result.model_calls == result.tiles == must_run
    assert result.tiles_skipped == planned - must_run
    assert np.abs(predicted(store) - want).max() <= 1e-6
    labels = zarr.open_array(f"{store}/prediction/labels")[:]
    assert np.array_equal(labels, want.argmax(0))
    attrs = storage.read_record(f"{store}/prediction")
    assert attrs["skip_empty"] == {"source": "background", "values": [0.0]}
    assert attrs[storage.COMPLETE_KEY]["tiles_skipped"] == planned - must_run
    assert attrs[storage.COMPLETE_KEY]["valid_region"] == [[4, 14], [36, 60], [8, 30]]


def test_corner_takes_each_channels_background_as_skull_stripped_z_scored_mri_has_it(tmp_path):
    rng = np.random.default_rng(3)
    background = np.array([-3.16, -1.37], np.float32)  # z-scored: the constant outside the brain, per channel
    array = np.broadcast_to(background[:, None, None, None], (2, 16, 48, 48)).copy()
    array[:, 2:10, 8:30, 20:44] = rng.normal(size=(2, 8, 22, 24)).astype(np.float32)
    store = nifti_scan(tmp_path, array, (8, 16, 16))
    net = Pointwise(2, 3)
    tile = (8, 16, 16)
    total, planned, must_run, want = expected(array, (array == background[:, None, None, None]).all(0), tile, net)
    assert 0 < must_run < total
    result = infer_scan(store, LoadedModel(net, CARD, "pw"),
                        EngineConfig(tile=tile, placement="monai", skip_empty="corner", output_dtype="float32"))
    assert result.tiles == must_run and result.tiles_skipped == planned - must_run
    assert np.abs(predicted(store) - want).max() <= 1e-5
    rule = storage.read_record(f"{store}/prediction")["skip_empty"]
    assert rule["source"] == "corner" and np.allclose(rule["values"], background)


def test_satellite_nodata_is_skipped_by_default_and_a_lone_pixel_the_pyramid_rounds_away_still_runs(tmp_path):
    rng = np.random.default_rng(1)
    array = np.zeros((3, 256, 256), np.uint16)  # nodata 0 on every band
    array[:, :100, :] = rng.integers(1, 50, (3, 100, 256), dtype=np.uint16)  # the swath
    array[:, 100:180, :60] = rng.integers(1, 50, (3, 80, 60), dtype=np.uint16)  # its ragged edge
    array[1, 220, 200] = 1  # one valid pixel deep in the nodata: the 4x4 block mean rounds it to 0
    store = geotiff_scan(tmp_path, array, 0, (64, 64))
    coarse = zarr.open_group(store, mode="r")["image"]
    lowest = coarse[str(max(int(k) for k in coarse.keys()))][...]
    assert lowest.shape[1] < 256 and not lowest[:, 220 * lowest.shape[1] // 256, 200 * lowest.shape[2] // 256].any()
    net = Pointwise(3, 2)
    tile = (64, 64)
    total, planned, must_run, want = expected(array, (array == 0).all(0), tile, net)
    assert any(b[0].start <= 220 < b[0].stop and b[1].start <= 200 < b[1].stop
               for b in monai_windows((256, 256), tile) if b[0].start >= 128)  # tiles there only see that pixel

    result = infer_scan(store, LoadedModel(net, CARD, "pw"),
                        EngineConfig(tile=tile, placement="monai", output_dtype="float32"))
    assert result.tiles == must_run and result.tiles_skipped == planned - must_run > 0
    # raw values up to 50: logits of that size round differently on one thread (a lane) than over the
    # whole image on two, by up to ~1.2e-6 in probability
    assert np.abs(predicted(store) - want).max() <= 2e-6
    assert storage.read_record(f"{store}/prediction")["skip_empty"] == {"source": "nodata", "values": [0.0] * 3}


def test_off_runs_every_tile_and_auto_without_nodata_keeps_the_digest(tmp_path):
    array = np.zeros((1, 16, 32, 32), np.float32)
    array[0, :4, :8, :8] = 1.0
    store = nifti_scan(tmp_path, array, (8, 16, 16))
    net = Pointwise(1, 3)
    tile = (8, 16, 16)
    total = len(monai_windows(array.shape[1:], tile))
    off = infer_scan(store, LoadedModel(net, CARD, "pw"), EngineConfig(tile=tile, placement="monai", skip_empty="off"))
    assert off.tiles == total and off.tiles_skipped == 0
    digest = storage.read_record(f"{store}/prediction")["digest"]
    # NIfTI declares no nodata: "auto" changes nothing, so the complete prediction is kept as it is
    again = infer_scan(store, LoadedModel(net, CARD, "pw"), EngineConfig(tile=tile, placement="monai"))
    assert again.status == "unchanged" and storage.read_record(f"{store}/prediction")["digest"] == digest
    # a background value does change the result: the prediction is replaced
    skipping = infer_scan(store, LoadedModel(net, CARD, "pw"), EngineConfig(tile=tile, placement="monai", skip_empty=0.0))
    assert skipping.status == "inferred" and skipping.tiles < total


def test_a_bad_setting_is_one_line_naming_the_store(tmp_path):
    store = nifti_scan(tmp_path, np.ones((1, 8, 16, 16), np.float32), (8, 16, 16))
    with pytest.raises(ScanError) as err:
        infer_scan(store, LoadedModel(Pointwise(1, 3), CARD, "pw"),
                   EngineConfig(tile=(8, 16, 16), placement="monai", skip_empty="nodata"))
    assert store in str(err.value) and "skip_empty" in str(err.value) and "\n" not in str(err.value)


def test_cli_and_catalog_take_the_setting(tmp_path):
    from pydantic import ValidationError
    from typer.testing import CliRunner

    from data_catalog.schema import Tiling
    from flows.cli import app

    assert Tiling().skip_empty == "auto" and Tiling(skip_empty=0).skip_empty == 0.0
    assert Tiling(skip_empty="off").skip_empty == "off"
    with pytest.raises(ValidationError):
        Tiling(skip_empty="nodata")

    array = np.zeros((1, 16, 32, 32), np.float32)
    array[0, :4, :6, :6] = 2.0
    array[0, 12:, 26:, 26:] = 3.0  # two corners: the box is the whole scan, the tiles between are empty
    store = nifti_scan(tmp_path, array, (8, 16, 16))
    model = tmp_path / "pw.pt"
    torch.jit.script(Pointwise(1, 3)).save(str(model))
    runner = CliRunner()
    bad = runner.invoke(app, ["infer", "--store", store, "--model", str(model), "--skip-empty", "zero"])
    assert bad.exit_code == 1 and "--skip-empty must be auto, off, corner or a number" in bad.output
    ok = runner.invoke(app, ["infer", "--store", store, "--model", str(model), "--tile", "8,16,16",
                             "--placement", "monai", "--skip-empty", "0"])
    assert ok.exit_code == 0, ok.output
    _, planned, run, _ = expected(array, array[0] == 0, (8, 16, 16), Pointwise(1, 3))
    assert f"{run} tiles, {planned - run} empty tiles skipped" in ok.output
    assert storage.read_record(f"{store}/prediction")["skip_empty"]["source"] == "background"


GDAL_FLOAT32_NODATA = float(np.finfo(np.float32).min)  # -3.4028235e38, GDAL's and ESRI's usual float32 nodata


def interior_swath(rng) -> np.ndarray:
    """A float32 raster of GDAL's nodata with data only in chunks touching no border (chunks 64x64)."""
    array = np.full((1, 256, 256), GDAL_FLOAT32_NODATA, np.float32)
    array[0, 90:160, 80:170] = rng.random((70, 90), dtype=np.float32) + 0.5
    return array


def test_cli_float32_gdal_nodata_with_data_in_interior_chunks_runs_the_tiles_over_the_data(tmp_path):
    # The pyramid once summed float32 in float32: nodata became -inf at every level above 0, the skip
    # rule took -inf for data, never read the interior chunks at level 0 and planned 0 tiles.
    from typer.testing import CliRunner

    from flows.cli import app

    array = interior_swath(np.random.default_rng(5))
    src = tmp_path / "swath.tif"
    with rasterio.open(src, "w", driver="GTiff", width=256, height=256, count=1, dtype="float32",
                       nodata=GDAL_FLOAT32_NODATA) as dst:
        dst.write(array)
    store = str(tmp_path / "swath.zarr")
    model = tmp_path / "pw.pt"
    torch.jit.script(Pointwise(1, 2)).save(str(model))
    runner = CliRunner()
    ingested = runner.invoke(app, ["ingest", str(src), "--store", store, "--modality", "satellite", "--chunks", "64,64"])
    assert ingested.exit_code == 0, ingested.output
    ran = runner.invoke(app, ["infer", "--store", store, "--model", str(model), "--tile", "64,64",
                              "--placement", "monai", "--dtype", "float32"])
    assert ran.exit_code == 0, ran.output
    _, planned, must_run, want = expected(array, array[0] == GDAL_FLOAT32_NODATA, (64, 64), Pointwise(1, 2))
    assert must_run > 0 and f"({must_run} tiles" in ran.output
    probs = predicted(store)
    assert probs[1, 90:160, 80:170].min() > 0  # not all background
    assert np.abs(probs - want).max() <= 1e-6
    assert storage.read_record(f"{store}/prediction")["skip_empty"]["source"] == "nodata"


def test_a_store_ingested_with_float32_pyramid_sums_is_still_read_right(tmp_path):
    # Stores ingested before the pyramid summed in float64 hold -inf where nodata blocks overflowed:
    # the skip rule must not take that for data (nor anything else that is not finite).
    array = interior_swath(np.random.default_rng(6))
    store = geotiff_scan(tmp_path, array, GDAL_FLOAT32_NODATA, (64, 64))
    group = zarr.open_group(store, mode="r+")
    level = array
    for name in ("1", "2"):  # what the float32 sums wrote: 2x2 block sums in float32, in that order, / 4
        with np.errstate(over="ignore"):
            level = (level[:, ::2, ::2] + level[:, ::2, 1::2] + level[:, 1::2, ::2] + level[:, 1::2, 1::2]) / np.float32(4)
        assert group[f"image/{name}"].shape == level.shape
        group[f"image/{name}"][...] = level
    assert np.isneginf(level).mean() > 0.9
    net = Pointwise(1, 2)
    _, planned, must_run, want = expected(array, array[0] == GDAL_FLOAT32_NODATA, (64, 64), net)
    result = infer_scan(store, LoadedModel(net, CARD, "pw"),
                        EngineConfig(tile=(64, 64), placement="monai", output_dtype="float32"))
    assert result.tiles == must_run > 0 and result.tiles_skipped == planned - must_run
    assert np.abs(predicted(store) - want).max() <= 1e-6
