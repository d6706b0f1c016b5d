"""Instance inference over tiles (tasks/instances/detect.py) with an injected deterministic
detector that reads object ids out of the image: the stored instances equal the drawn objects
(up to renumbering) for several tile sizes, in 2D and over a stack with a 2D model; resume after a
crash re-uses the cached tiles; nodata tiles are skipped; bad input is one line and never marked
complete; the real torchvision Mask R-CNN path writes a consistent result."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import zarr
from rasterio.transform import from_origin
from scipy import ndimage

from models.card import LoadedModel, ModelCard
from tasks import storage
from tasks.engine.infer import EngineConfig, infer_scan
from tasks.errors import ScanError
from tasks.ingest import ScanSpec, ingest_scan
from tasks.instances import store as inst_store
from tasks.instances.detect import infer_instances
from tasks.instances.merge import Detection
from tests.test_engine import make_scan
from tests.test_instances_components import same_objects

CLASSES = ["background", "a", "b"]


def instance_model(tile=(64, 64), dims=2) -> LoadedModel:
    card = ModelCard(architecture="maskrcnn", classes=CLASSES, in_channels=1, spatial_dims=dims, tile=list(tile))
    return LoadedModel(module=None, card=card, identity="test:perfect-detector")


class PerfectDetector:
    """Sees object ids in channel 0 of each tile: one detection per id, score and class from the id."""

    def __init__(self, fail_after: int | None = None):
        self.calls, self.tiles, self.fail_after = 0, 0, fail_after

    def __call__(self, batch: np.ndarray) -> list[list[Detection]]:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("killed")
        self.calls += 1
        self.tiles += len(batch)
        out = []
        for tile in batch:
            ids = np.rint(tile[0]).astype(np.int64)
            out.append([Detection(ids == v, 1.0 - v / 10_000, 1 + v % 2) for v in np.unique(ids) if v > 0])
        return out


def drawn(shape=(200, 230), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = np.zeros(shape, np.int64)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for v in range(1, 40):
        cy, cx, r = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(3, 12)
        ids[((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (ids == 0)] = v
    ids[90:96, 3:225] = 40  # longer than any tile
    return ids


def geotiff_scan(tmp_path, ids: np.ndarray, nodata: float | None = None, name="scene") -> str:
    src = tmp_path / f"{name}.tif"
    with rasterio.open(src, "w", driver="GTiff", width=ids.shape[1], height=ids.shape[0], count=1, dtype="float32",
                       crs="EPSG:32633", transform=from_origin(500000, 4000000, 0.5, 0.5), nodata=nodata) as dst:
        dst.write(ids.astype(np.float32)[None])
    store = str(tmp_path / f"{name}.zarr")
    ingest_scan(ScanSpec(name, "satellite", (src,), chunks=(64, 64)), store)
    return store


@pytest.mark.parametrize("tile", [(48, 48), (64, 96)])
def test_instances_equal_the_drawn_objects(tmp_path, tile):
    ids = drawn()
    store = geotiff_scan(tmp_path, ids)
    result = infer_instances(store, instance_model(tile), EngineConfig(overlap=0.25, pad="constant"),
                             detector=PerfectDetector())
    objects = len(np.unique(ids)) - 1
    assert result.status == "inferred" and result.instances == objects and result.large_instances >= 1
    got = zarr.open_array(f"{store}/prediction/instances")[...]
    same_objects(got, ids)
    assert sorted(np.unique(got[got > 0])) == list(range(1, objects + 1))  # ids unique and consecutive
    labels = zarr.open_array(f"{store}/prediction/labels")[...]
    np.testing.assert_array_equal(labels, np.where(ids > 0, 1 + ids % 2, 0))
    table = pq.read_table(inst_store.table_url(store)).to_pydict()
    for i, area, score in zip(table["id"], table["area"], table["score"]):
        original = np.bincount(ids[got == i]).argmax()
        assert area == (ids == original).sum() and score == pytest.approx(1 - original / 10_000)
    assert storage.is_complete(f"{store}/prediction") and inst_store.instances_complete(store)
    assert not storage.exists(f"{store}/prediction/.detections")  # the cache goes once complete
    again = infer_instances(store, instance_model(tile), EngineConfig(overlap=0.25, pad="constant"),
                            detector=PerfectDetector())
    assert again.status == "unchanged"


def test_resume_after_a_crash_reuses_cached_tiles(tmp_path):
    ids = drawn(seed=1)
    store = geotiff_scan(tmp_path, ids)
    config = EngineConfig(overlap=0.5, pad="constant", batch=2)
    crashing = PerfectDetector(fail_after=5)
    with pytest.raises(RuntimeError, match="killed"):
        infer_instances(store, instance_model(), config, detector=crashing)
    assert not storage.is_complete(f"{store}/prediction") and not inst_store.instances_complete(store)
    second = PerfectDetector()
    result = infer_instances(store, instance_model(), config, detector=second)
    assert result.status == "resumed" and result.cached_tiles == crashing.tiles
    assert second.tiles == result.tiles - crashing.tiles  # every tile seen once over the two runs
    resumed = zarr.open_array(f"{store}/prediction/instances")[...]
    fresh = geotiff_scan(tmp_path, ids, name="fresh")
    infer_instances(fresh, instance_model(), config, detector=PerfectDetector())
    np.testing.assert_array_equal(resumed, zarr.open_array(f"{fresh}/prediction/instances")[...])


def test_nodata_tiles_are_skipped_and_counted_and_no_detection_is_valid(tmp_path):
    ids = drawn(seed=2)
    ids[:, 120:] = -1  # the east half is nodata
    store = geotiff_scan(tmp_path, ids, nodata=-1)
    detector = PerfectDetector()
    result = infer_instances(store, instance_model(), EngineConfig(overlap=0.25, pad="constant"), detector=detector)
    assert result.skipped_nodata > 0 and detector.tiles == result.tiles - result.skipped_nodata
    empty = geotiff_scan(tmp_path, np.zeros((100, 100)), name="empty")
    result = infer_instances(empty, instance_model(), EngineConfig(overlap=0.25), detector=PerfectDetector())
    assert result.instances == 0 and inst_store.instances_complete(empty)
    assert not zarr.open_array(f"{empty}/prediction/instances")[...].any()
    assert pq.read_table(inst_store.table_url(empty)).num_rows == 0


def test_too_many_instances_is_one_line_and_nothing_is_complete(tmp_path, monkeypatch):
    store = geotiff_scan(tmp_path, drawn(seed=3))
    monkeypatch.setattr(inst_store, "MAX_ID", 10)
    with pytest.raises(ScanError, match="more than 10 instances"):
        infer_instances(store, instance_model(), EngineConfig(overlap=0.25), detector=PerfectDetector())
    assert not storage.is_complete(f"{store}/prediction") and not inst_store.instances_complete(store)


def test_semantic_model_in_instance_mode_and_the_reverse(tmp_path):
    store = geotiff_scan(tmp_path, drawn(seed=4))
    semantic = LoadedModel(module=None, card=ModelCard(architecture="unet", classes=CLASSES), identity="test:unet")
    with pytest.raises(ScanError, match="is a semantic model"):
        infer_instances(store, semantic, EngineConfig(overlap=0.25), detector=PerfectDetector())
    with pytest.raises(ScanError, match="is an instance model"):
        infer_scan(store, instance_model(), EngineConfig(overlap=0.25))
    assert storage.read_record(f"{store}/prediction") is None


def test_a_stack_with_a_2d_model_is_linked_across_sections(tmp_path):
    columns = np.zeros((5, 90, 100), np.int64)
    yy, xx = np.mgrid[:90, :100]
    for v, (y, x) in enumerate([(20, 20), (50, 70), (70, 30), (45, 45)], start=1):
        for z in range(5):
            columns[z][((yy - y) ** 2 + (xx - x - z) ** 2 <= 64) & (columns[z] == 0)] = v
    store = make_scan(tmp_path, columns[None].astype(np.float32), (2, 32, 32))
    result = infer_instances(store, instance_model((40, 40)), EngineConfig(overlap=0.25, pad="constant"),
                             detector=PerfectDetector())
    got = zarr.open_array(f"{store}/prediction/instances")[...]
    same_objects(got, ndimage.label(columns > 0)[0])
    assert result.instances == 4


def test_real_mask_rcnn_writes_a_consistent_result(tmp_path):
    import torch

    from models.zoo import build

    torch.manual_seed(0)
    net = build("maskrcnn", 2, 1, 3, min_size=64, max_size=64).eval()
    model = LoadedModel(module=net, card=instance_model().card, identity="test:random-maskrcnn")
    store = geotiff_scan(tmp_path, drawn(seed=5))
    result = infer_instances(store, model, EngineConfig(overlap=0.25), score_threshold=0.0)
    got = zarr.open_array(f"{store}/prediction/instances")[...]
    table = pq.read_table(inst_store.table_url(store)).to_pydict()
    assert result.model_calls > 0 and result.instances == len(table["id"])
    assert table["id"] == sorted(np.unique(got[got > 0]).tolist())
    counts = dict(zip(*np.unique(got[got > 0], return_counts=True)))
    assert all(counts[i] == a for i, a in zip(table["id"], table["area"]))


def test_an_object_hidden_by_a_better_one_leaves_no_gap_in_the_ids(tmp_path):
    ids = np.zeros((100, 100), np.int64)
    ids[10:30, 10:30] = 1
    ids[60:80, 60:80] = 2

    def detector(batch):  # object 1, and a lower-scoring duplicate inside it that keeps no pixel
        out = []
        for tile in batch:
            found = np.rint(tile[0]).astype(np.int64)
            dets = [Detection(found == v, 0.9, 1) for v in np.unique(found) if v > 0]
            dets += [Detection(found == 1, 0.3, 2)] if (found == 1).any() else []
            out.append(dets)
        return out

    store = geotiff_scan(tmp_path, ids)
    result = infer_instances(store, instance_model((64, 64)), EngineConfig(overlap=0.25, pad="constant"),
                             detector=detector)
    got = zarr.open_array(f"{store}/prediction/instances")[...]
    table = pq.read_table(inst_store.table_url(store)).to_pydict()
    assert result.instances == 2 and sorted(np.unique(got[got > 0])) == [1, 2] == table["id"]
    assert table["class"] == [1, 1] and inst_store.read_instances_record(store)["complete"]["count"] == 2
