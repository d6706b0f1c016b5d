"""Training on the real sample data: bad input is refused before any epoch, splits never leak,
patches stay inside their region, instances and AP50 by hand, a short run learns, and (slow) the
CLI trains, registers a champion and infers with it."""

from __future__ import annotations

import shutil
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from data_catalog import DEFAULT_CATALOG_DIR, find_entry, load_entry
from tasks import storage
from tasks.errors import ScanError
from tasks.ingest import discover_scans, ingest_scan
from tasks.settings import scan_store
from tasks.training.data import (PatchSampler, Region, ScanArrays, TrainingError, channel_statistics,
                                 open_training_scan, split_regions)
from tasks.training.instances import instances_from_labels, mask_ap50
from tasks.training.loop import TrainConfig, train_semantic
from tasks.training.train import plan_training

EM = "em/isbi2012_train"
CHIPS = "satellite/spacenet1_rio/images"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def ingest_all(loaded, root: Path) -> list[str]:
    stores = []
    for spec in discover_scans(loaded):
        store = scan_store(loaded.entry.name, spec.scan_id, str(root))
        ingest_scan(spec, store)
        stores.append(store)
    return stores


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory):
    """The bundled EM, satellite and MRI samples ingested once, through the real catalog entries."""
    root = tmp_path_factory.mktemp("stores")
    stores = {}
    for name in ("isbi2012_em", "spacenet_rio", "brats2015_mri"):
        stores[name] = ingest_all(find_entry(name, DEFAULT_CATALOG_DIR), root)
    return root, stores


@pytest.fixture(scope="module")
def em_store(sample_root) -> str:
    (store,) = sample_root[1]["isbi2012_em"]
    return store


def write_entry(folder: Path, text: str):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "entry.yaml"
    path.write_text(textwrap.dedent(text))
    return load_entry(path)


def em_entry(folder: Path, scans: str, mapping: str = "{255: 0, 0: 1}", classes: str = "[interior, membrane]",
             name: str = "em_case", labels: bool = True, tile: str = "[64, 64]"):
    label_block = f"""
        labels:
          path: "{{dir}}/label"
          mapping: {mapping}
          classes: {classes}""" if labels else ""
    return write_entry(folder, f"""
        name: {name}
        modality: em
        scans: {{path: "{scans}", id: "{{parent}}"}}{label_block}
        reader: {{spacing: [50, 4, 4], unit: nanometer}}
        chunks: [8, 512, 512]
        tiling: {{tile: {tile}}}
    """)


def copy_em_stack(samples: Path, dest: Path, slices: list[int]) -> Path:
    """A stack folder of some of the sample's sections (image/ and label/ side by side)."""
    for kind in ("image", "label"):
        (dest / kind).mkdir(parents=True)
        for i in slices:
            shutil.copy(samples / EM / kind / f"{i}.png", dest / kind / f"{i}.png")
    return dest


@pytest.fixture
def no_epochs(monkeypatch):
    """Any training loop that starts fails the test: bad input must be refused before it."""
    import tasks.training.instances as instances
    import tasks.training.loop as loop
    import tasks.training.train as train

    def refuse(*args, **kwargs):
        raise AssertionError("an epoch started")

    for module in (loop, train):
        monkeypatch.setattr(module, "train_semantic", refuse)
    monkeypatch.setattr(instances, "train_maskrcnn", refuse)


# ------------------------------------------------------------------------------------ bad input


def test_dataset_without_labels(samples, tmp_path, no_epochs):
    from tasks.training.train import train_dataset

    loaded = em_entry(tmp_path / "cat", f"{samples}/{EM}/image", labels=False)
    with pytest.raises(TrainingError, match="has no labels section") as info:
        train_dataset(loaded, store_root=str(tmp_path / "stores"))
    assert "em_case" in str(info.value) and "\n" not in str(info.value)


def test_store_ingested_without_labels(samples, tmp_path, no_epochs):
    root = tmp_path / "stores"
    ingest_all(em_entry(tmp_path / "a", f"{samples}/{EM}/image", labels=False), root)
    with pytest.raises(TrainingError, match="has no labels"):
        plan_training(em_entry(tmp_path / "b", f"{samples}/{EM}/image"), None, 1, 1, store_root=str(root))


def test_store_not_ingested(samples, tmp_path, no_epochs):
    with pytest.raises(TrainingError, match="not a complete scan group; ingest it first"):
        plan_training(em_entry(tmp_path / "cat", f"{samples}/{EM}/image"), None, 1, 1,
                      store_root=str(tmp_path / "stores"))


def test_label_files_of_another_shape(samples, tmp_path, no_epochs):
    stack = copy_em_stack(samples, tmp_path / "data" / "stack", [0, 1])
    for png in (stack / "label").iterdir():
        Image.open(png).crop((0, 0, 500, 512)).save(png)  # 512 rows x 500 columns
    loaded = em_entry(tmp_path / "cat", f"{tmp_path}/data/*/image")
    root = tmp_path / "stores"
    (spec,) = discover_scans(loaded)
    with pytest.raises(ScanError, match=r"does not match the image's spatial shape \(2, 512, 512\)"):
        ingest_scan(spec, scan_store("em_case", spec.scan_id, str(root)))
    with pytest.raises(TrainingError, match="ingest it first"):
        plan_training(loaded, None, 1, 1, store_root=str(root))


def test_scan_group_with_labels_of_another_shape(em_store, tmp_path, no_epochs):
    """A group written by hand (or by an older tilewise) that claims to be complete."""
    root = tmp_path / "stores"
    store = scan_store("em_case", "isbi2012_train", str(root))
    shutil.copytree(em_store, store)
    group = zarr.open_group(store, mode="r+")
    del group["labels/reference"]
    group["labels"].create_array("reference", shape=(8, 256, 512), dtype="uint8")
    # today's mark lists its arrays' shapes and would refuse this group; an older tilewise's did not
    attrs = dict(group.attrs["tilewise"])
    attrs["complete"] = {k: v for k, v in attrs["complete"].items() if k != storage.ARRAYS_KEY}
    group.attrs["tilewise"] = attrs
    assert storage.is_complete(store)
    loaded = em_entry(tmp_path / "cat", f"{DEFAULT_CATALOG_DIR}/samples/{EM}/image")
    with pytest.raises(TrainingError, match=r"labels shape \(8, 256, 512\) differs from the image's spatial "
                                            r"shape \(8, 512, 512\)"):
        plan_training(loaded, None, 1, 1, store_root=str(root))


def test_label_value_not_in_the_mapping(samples, tmp_path, no_epochs):
    stack = copy_em_stack(samples, tmp_path / "data" / "stack", [0, 1, 2, 3])
    label = np.array(Image.open(stack / "label" / "2.png"))
    label[100, 200] = 128
    Image.fromarray(label).save(stack / "label" / "2.png")
    loaded = em_entry(tmp_path / "cat", f"{tmp_path}/data/*/image")
    (spec,) = discover_scans(loaded)
    root = tmp_path / "stores"
    with pytest.raises(ScanError, match=r"label value 128 is not in the label mapping \(0, 255\)"):
        ingest_scan(spec, scan_store("em_case", spec.scan_id, str(root)))
    with pytest.raises(TrainingError, match="ingest it first"):
        plan_training(loaded, None, 1, 1, store_root=str(root))


def test_store_labels_beyond_the_catalog_classes(samples, tmp_path, no_epochs):
    """A store ingested under a three-class mapping, trained under a two-class one."""
    root = tmp_path / "stores"
    three = em_entry(tmp_path / "a", f"{samples}/{EM}/image", mapping="{255: 0, 0: 2}",
                     classes="[interior, other, membrane]")
    ingest_all(three, root)
    two = em_entry(tmp_path / "b", f"{samples}/{EM}/image")
    with pytest.raises(TrainingError, match="labels hold class indices >= 2, not in the label mapping"):
        plan_training(two, None, 1, 1, store_root=str(root))


def test_single_one_slice_scan_cannot_be_split(samples, tmp_path, no_epochs):
    copy_em_stack(samples, tmp_path / "data" / "stack", [3])
    loaded = em_entry(tmp_path / "cat", f"{tmp_path}/data/*/image")
    root = tmp_path / "stores"
    ingest_all(loaded, root)
    with pytest.raises(TrainingError, match="a single scan of 1 slices cannot be split"):
        plan_training(loaded, None, 1, 1, store_root=str(root))


def test_scans_with_different_channel_counts(samples, tmp_path, no_epochs):
    """Two chips, RGB and a single band: one network cannot take both; say so before training."""
    import rasterio

    images, masks = tmp_path / "sat" / "images", tmp_path / "sat" / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    rgb = samples / CHIPS / "3band_013022223130_Public_img54.tif"
    shutil.copy(rgb, images / "a_rgb.tif")
    shutil.copy(samples / CHIPS / ".." / "masks" / rgb.name, masks / "a_rgb.tif")
    with rasterio.open(samples / CHIPS / "3band_013022223130_Public_img53.tif") as src:
        profile = {**src.profile, "count": 1}
        red = src.read(1)
    with rasterio.open(images / "b_red.tif", "w", **profile) as dst:
        dst.write(red, 1)
    shutil.copy(samples / CHIPS / ".." / "masks" / "3band_013022223130_Public_img53.tif", masks / "b_red.tif")
    loaded = write_entry(tmp_path / "cat", f"""
        name: sat_case
        modality: satellite
        scans: {{path: "{images}/*.tif"}}
        labels: {{path: "{{dir}}/../masks/{{name}}", mapping: {{0: 0, 255: 1}}, classes: [background, building]}}
        tiling: {{tile: [64, 64]}}
    """)
    root = tmp_path / "stores"
    ingest_all(loaded, root)
    with pytest.raises(TrainingError, match="channel"):
        plan_training(loaded, "deeplab", 1, 1, store_root=str(root))


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no such file or registered model"),
    (lambda p: torch.save({"w": torch.zeros(3)}, p), "architecture mismatch"),
    (lambda p: torch.save({"w": torch.nn.Linear(2, 2)}, p), "refused: the pickle holds more than weights"),
])
def test_init_from_is_refused_before_any_epoch(samples, tmp_path, em_store, make, message, no_epochs):
    """tilewise train --init-from with unusable weights: one line, raised by train_dataset before
    the loop (no_epochs fails the test if an epoch starts) and before any MLflow run."""
    from tasks.training.train import train_dataset

    root = tmp_path / "stores"
    shutil.copytree(em_store, scan_store("em_case", "isbi2012_train", str(root)))
    loaded = em_entry(tmp_path / "cat", f"{samples}/{EM}/image")
    weights = tmp_path / "weights.pt"
    make(weights)
    with pytest.raises(TrainingError, match=message) as info:
        train_dataset(loaded, epochs=1, max_minutes=1, store_root=str(root), init_from=str(weights))
    assert "\n" not in str(info.value)


def test_tile_that_the_unet_cannot_take(samples, tmp_path, em_store, no_epochs):
    """tiling.tile [100, 100]: refuse it up front, or build a U-Net that runs on 100 x 100 patches
    (unet_levels gives 5 levels, which needs sizes divisible by 16)."""
    from models.zoo import build

    root = tmp_path / "stores"
    shutil.copytree(em_store, scan_store("em_case", "isbi2012_train", str(root)))
    loaded = em_entry(tmp_path / "cat", f"{samples}/{EM}/image", tile="[100, 100]")
    try:
        config = plan_training(loaded, None, 1, 1, store_root=str(root)).config
    except TrainingError:
        return
    net = build(config.architecture, config.spatial_dims, config.in_channels, len(config.classes),
                **{**config.architecture_args, "base_channels": 2}).eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(1, config.in_channels, *config.patch[1:]))
    except RuntimeError as exc:
        pytest.fail(f"plan_training accepted patch {config.patch} with U-Net args {config.architecture_args}, "
                    f"which fail on the first batch: {exc}")
    assert out.shape == (1, 2, 100, 100)


# ---------------------------------------------------------------------------------------- splits


def _covers(regions):
    return sorted((r.store, tuple((s.start, s.stop) for s in r.box)) for r in regions)


def test_split_by_scan(sample_root):
    _, stores = sample_root
    chips = [open_training_scan(s, 2) for s in stores["spacenet_rio"]]
    assert len(chips) == 3
    seen_val = set()
    for seed in range(6):
        train, val = split_regions(chips, seed=seed, by="scan")
        assert len(val) == 1 and len(train) == 2  # max(1, round(3 * 0.25)) = 1
        assert {r.store for r in train}.isdisjoint({r.store for r in val})
        assert {r.store for r in train + val} == set(stores["spacenet_rio"])
        for r in train + val:  # whole scans
            assert r.box == (slice(0, 406), slice(0, 438))
        seen_val.add(val[0].store)
        assert _covers(split_regions(chips, seed=seed, by="scan")[1]) == _covers(val)  # deterministic
    assert len(seen_val) > 1  # the seed decides

    with pytest.raises(TrainingError, match="training split is empty"):
        split_regions(chips, val_fraction=1.0, by="scan")


def test_few_scans_each_give_a_slab_with_a_fair_share_of_their_foreground(sample_root):
    """Below four scans every scan gives validation voxels: a quarter of its slices whose foreground
    is nearest a quarter of the scan's (not the most: that left training a quarter of each
    tumour), found here by brute force over every window."""
    _, stores = sample_root
    brats = [open_training_scan(s, 5) for s in stores["brats2015_mri"]]
    assert len(brats) == 2
    train, val = split_regions(brats)
    assert len(val) == 2 and {r.store for r in val} == {s.store for s in brats}
    for scan in brats:
        labels = np.asarray(scan.labels[...])
        depth, width = labels.shape[0], int(round(labels.shape[0] * 0.25))
        total = np.count_nonzero(labels)
        counts = [np.count_nonzero(labels[a:a + width]) for a in range(depth - width + 1)]
        gap = min(abs(c - total / 4) for c in counts if c > 0)
        best = max(a for a, c in enumerate(counts) if c > 0 and abs(c - total / 4) == gap)
        mine = [r for r in val if r.store == scan.store]
        assert [r.box[0] for r in mine] == [slice(best, best + width)]
        assert 0 < counts[best] < 0.5 * total  # validation has foreground; training keeps most of it
        # training takes the rest of the scan, disjoint from validation, together the whole scan
        pieces = sorted((r.box[0].start, r.box[0].stop) for r in train if r.store == scan.store)
        covered = sorted(pieces + [(best, best + width)])
        assert covered[0][0] == 0 and covered[-1][1] == depth
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))


def test_a_slab_with_foreground_is_preferred_to_an_empty_one_nearer_the_share():
    """One foreground slice of 8: a quarter of it is nearer 0 voxels than all of them, but a
    validation slab without foreground scores nothing; the slab that holds it is taken (the last
    of those, ties). A scan without foreground gives its last slab."""
    from tasks.training.data import ScanArrays

    labels = np.zeros((8, 4, 4), np.uint8)
    labels[2, 1, 1] = 1
    empty = np.zeros((8, 4, 4), np.uint8)
    scans = [ScanArrays("a", np.zeros((1, 8, 4, 4), np.float32), labels),
             ScanArrays("b", np.zeros((1, 8, 4, 4), np.float32), empty)]
    _, val = split_regions(scans)
    assert [(r.store, r.box[0]) for r in val] == [("a", slice(2, 4)), ("b", slice(6, 8))]


def test_split_single_stack_by_slices(em_store):
    scan = open_training_scan(em_store, 2)
    train, val = split_regions([scan])
    # 8 sections, 25 % held out: round(2.0) = 2 sections at the end
    assert _covers(train) == [(em_store, ((0, 6), (0, 512), (0, 512)))]
    assert _covers(val) == [(em_store, ((6, 8), (0, 512), (0, 512)))]
    train, val = split_regions([scan], val_fraction=0.5)
    assert train[0].box[0] == slice(0, 4) and val[0].box[0] == slice(4, 8)
    with pytest.raises(TrainingError, match="cannot be split"):
        split_regions([scan], val_fraction=0.0)
    with pytest.raises(TrainingError, match="no labelled scans"):
        split_regions([])


def test_split_single_raster_by_rows(sample_root):
    _, stores = sample_root
    chip = open_training_scan(stores["spacenet_rio"][0], 2)
    train, val = split_regions([chip])
    # 406 rows: round(101.5) = 102 held out, rows 304..406
    assert train[0].box == (slice(0, 304), slice(0, 438))
    assert val[0].box == (slice(304, 406), slice(0, 438))


# -------------------------------------------------------------------------------------- sampling


class Recording:
    """An array that records every box read from it."""

    def __init__(self, array: np.ndarray, reads: list, spatial_from: int):
        self.array, self.reads, self.spatial_from = array, reads, spatial_from
        self.shape, self.ndim = array.shape, array.ndim

    def __getitem__(self, key):
        self.reads.append(tuple((k.start, k.stop) for k in key[self.spatial_from:]))
        return self.array[key]


def _in_memory(store: str, reads: list | None = None) -> ScanArrays:
    group = zarr.open_group(store, mode="r")
    image, labels = group["image/0"][:], storage.reference(group)[:]
    if reads is not None:
        return ScanArrays(store, Recording(image, reads, 1), Recording(labels, reads, 0))
    return ScanArrays(store, image, labels)


@pytest.mark.parametrize("box, patch", [
    ((slice(0, 6), slice(0, 512), slice(0, 512)), (1, 64, 64)),
    ((slice(2, 5), slice(100, 300), slice(37, 450)), (1, 48, 80)),
    ((slice(6, 8), slice(0, 512), slice(0, 512)), (3, 32, 32)),      # deeper than the region: padded
    ((slice(1, 7), slice(400, 450), slice(10, 40)), (1, 64, 64)),    # smaller than the patch: padded
])
def test_patch_sampler_stays_inside_its_region(em_store, box, patch):
    reads: list = []
    arrays = _in_memory(em_store, reads)
    region = Region(em_store, box)
    sampler = PatchSampler([region], {em_store: arrays}, patch, seed=3, foreground=0.5)
    full_image = arrays.image.array
    full_labels = arrays.labels.array
    for _ in range(40):
        before = len(reads)
        image, labels = sampler.sample()
        assert image.shape == (1, *patch) and image.dtype == np.float32
        assert labels.shape == patch and labels.dtype == np.int64
        assert len(reads) > before
        last = reads[-1]  # the patch itself (earlier reads: foreground probes)
        for (lo, hi), s in zip(last, box):
            assert s.start <= lo < hi <= s.stop
        if all(hi - lo == p for (lo, hi), p in zip(last, patch)):  # no padding: exactly the stored voxels
            sl = tuple(slice(lo, hi) for lo, hi in last)
            np.testing.assert_array_equal(image, full_image[(slice(None),) + sl])
            np.testing.assert_array_equal(labels, full_labels[sl])
    for read in reads:
        for (lo, hi), s in zip(read, box):
            assert s.start <= lo < hi <= s.stop, (read, box)


def test_patch_sampler_fixed_is_deterministic(em_store):
    arrays = {em_store: _in_memory(em_store)}
    region = Region(em_store, (slice(6, 8), slice(0, 512), slice(0, 512)))
    a = PatchSampler([region], arrays, (1, 32, 32), seed=0)
    b = PatchSampler([region], arrays, (1, 32, 32), seed=99)
    first, second = a.fixed(5), b.fixed(5)
    for (i1, l1), (i2, l2) in zip(first, second):
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(l1, l2)
    # fixed() leaves the sampler's own random stream where it was
    c = PatchSampler([region], arrays, (1, 32, 32), seed=0)
    np.testing.assert_array_equal(a.sample()[0], c.sample()[0])


def test_foreground_oversampling(em_store):
    """The centre voxel of a patch is foreground (membrane) about as often as membrane covers the
    region when sampling uniformly, and far more often when oversampling."""
    arrays = {em_store: _in_memory(em_store)}
    region = Region(em_store, (slice(0, 6), slice(0, 512), slice(0, 512)))
    membrane = float((arrays[em_store].labels[0:6] > 0).mean())
    assert 0.2 < membrane < 0.3

    def centre_rate(foreground: float) -> float:
        sampler = PatchSampler([region], arrays, (1, 32, 32), seed=7, foreground=foreground)
        return float(np.mean([sampler.sample()[1][0, 16, 16] > 0 for _ in range(300)]))

    uniform, default, always = centre_rate(0.0), centre_rate(0.33), centre_rate(1.0)
    assert abs(uniform - membrane) < 0.08
    assert always > 0.8
    assert default > uniform + 0.1


def test_channel_statistics(em_store):
    arrays = {em_store: _in_memory(em_store)}
    sampler = PatchSampler([Region(em_store, (slice(0, 6), slice(0, 512), slice(0, 512)))], arrays, (1, 64, 64))
    mean, std = channel_statistics(sampler, patches=8)
    pixels = np.concatenate([img.ravel() for img, _ in sampler.fixed(8)]).astype(np.float64)
    np.testing.assert_allclose(mean, [pixels.mean()], rtol=1e-9)
    np.testing.assert_allclose(std, [pixels.std()], rtol=1e-6)


# ----------------------------------------------------------------------------- instances and AP50


def test_instances_from_labels_by_hand():
    lab = np.zeros((10, 12), np.int64)
    lab[1:4, 1:5] = 1          # 3 x 4 rectangle: area 12
    lab[6:9, 0:2] = 1          # L-shape: 3 x 2 block ...
    lab[8, 2:5] = 1            # ... plus a foot: area 6 + 3 = 9
    lab[0, 8] = 1              # 1 pixel
    lab[1, 9] = 1              # touches the previous one only diagonally: separate with 4-connectivity
    lab[5:9, 8:11] = 2         # class 2 block 4 x 3: area 12
    lab[2:4, 10:12] = 3        # class 3 is not an instance class
    found = instances_from_labels(lab, {1: 1, 2: 5}, min_area=1)
    boxes = {tuple(b) for b in found["boxes"].astype(int).tolist()}
    assert boxes == {(1, 1, 5, 4), (0, 6, 5, 9), (8, 0, 9, 1), (9, 1, 10, 2), (8, 5, 11, 9)}
    assert len(found["labels"]) == 5
    assert sorted(found["labels"].tolist()) == [1, 1, 1, 1, 5]
    assert found["masks"].shape == (5, 10, 12) and found["masks"].dtype == np.uint8
    areas = sorted(int(m.sum()) for m in found["masks"])
    assert areas == [1, 1, 9, 12, 12]
    for box, mask in zip(found["boxes"].astype(int), found["masks"]):
        x0, y0, x1, y1 = box
        ys, xs = np.nonzero(mask)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    # min_area drops the two single pixels and keeps area 9 >= 9
    kept = instances_from_labels(lab, {1: 1, 2: 5}, min_area=9)
    assert sorted(int(m.sum()) for m in kept["masks"]) == [9, 12, 12]
    assert len(instances_from_labels(lab, {1: 1}, min_area=10)["labels"]) == 1
    empty = instances_from_labels(np.zeros((4, 5), np.int64), {1: 1})
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 4, 5)


def _square(y: int, x: int, h: int = 10, w: int = 10, size: int = 40) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[y:y + h, x:x + w] = True
    return m


def _pred(masks, scores, labels=None):
    masks = np.asarray(masks, bool).reshape(-1, 40, 40)
    return {"masks": masks, "scores": np.asarray(scores, np.float32),
            "labels": np.asarray(labels if labels is not None else [1] * len(masks), np.int64)}


def _truth(masks, labels=None):
    masks = np.asarray(masks, bool).reshape(-1, 40, 40)
    return {"masks": masks, "labels": np.asarray(labels if labels is not None else [1] * len(masks), np.int64)}


A, B, C = _square(0, 0), _square(20, 20), _square(0, 25)


def test_mask_ap50_extremes():
    truth = [_truth([A, B])]
    assert mask_ap50([_pred([A, B], [0.9, 0.8])], truth) == pytest.approx(1.0)
    assert mask_ap50([_pred([], [])], truth) == 0.0
    assert mask_ap50([_pred([C], [0.9])], truth) == 0.0  # a detection that overlaps nothing
    assert mask_ap50([_pred([A], [0.9])], [_truth([])]) == 0.0  # no true instance at all


def test_mask_ap50_by_hand():
    # 101 recall points 0.00, 0.01, ..., 1.00; precision interpolated as the best at recall >= r.
    # 2 true instances, 1 correct detection: precision 1 up to recall 0.5 (51 points), 0 above.
    truth = [_truth([A, B])]
    assert mask_ap50([_pred([A], [0.9])], truth) == pytest.approx(51 / 101)
    # a false positive ranked first: precision 1/2 at recall 0.5
    assert mask_ap50([_pred([C, A], [0.9, 0.8])], truth) == pytest.approx(0.5 * 51 / 101)
    # ranked after the hit it costs nothing
    assert mask_ap50([_pred([A, C], [0.9, 0.8])], truth) == pytest.approx(51 / 101)
    # hit, miss, hit: precisions 1, 1/2, 2/3 -> 1 up to recall 0.5, 2/3 for the 50 points above
    assert mask_ap50([_pred([A, C, B], [0.9, 0.8, 0.7])], truth) == pytest.approx((51 + 50 * 2 / 3) / 101)
    # IoU 0.625 counts at 0.5; IoU 0.4 does not
    iou06 = _square(0, 0, 10, 16)  # intersection 100, union 160: IoU 0.625
    assert mask_ap50([_pred([iou06], [0.9])], [_truth([A])]) == pytest.approx(1.0)
    iou04 = _square(0, 0, 10, 25)  # 100 / 250 = 0.4
    assert mask_ap50([_pred([iou04], [0.9])], [_truth([A])]) == 0.0
    # the class must match
    assert mask_ap50([_pred([A], [0.9], [2])], [_truth([A], [1])]) == 0.0
    # two images, one instance each, both found: 1.0; one found: 51/101
    assert mask_ap50([_pred([A], [0.9]), _pred([B], [0.8])], [_truth([A]), _truth([B])]) == pytest.approx(1.0)
    assert mask_ap50([_pred([A], [0.9]), _pred([], [])], [_truth([A]), _truth([B])]) == pytest.approx(51 / 101)


# ------------------------------------------------------------------------------------- learning


def test_short_training_beats_fixed_baselines_on_held_out_sections(em_store):
    """40 steps on the first six sample sections; scored on the last two (never sampled) by
    whole-section sliding windows: the membrane Dice must beat the constant "all membrane" answer
    (2m / (1 + m), m the membrane share: ~0.36 here) and the untrained network by a wide margin, and
    the validation rows must be what fit() selected on."""
    from monai.utils import set_determinism

    from models.card import Normalization
    from models.zoo import build
    from tasks.training.validation import WholeRegionValidation, validate

    scan = open_training_scan(em_store, 2)
    arrays = {em_store: scan}
    train_regions, val_regions = split_regions([scan])
    patch = (1, 128, 128)
    train_sampler = PatchSampler(train_regions, arrays, patch, seed=0)
    mean, std = channel_statistics(train_sampler)
    norm = Normalization(kind="zscore", mean=mean, std=std)

    def normalise(batch):
        return norm.apply(batch.astype(np.float32))

    config = TrainConfig(architecture="unet", spatial_dims=2, patch=patch, in_channels=1,
                         classes=("interior", "membrane"), epochs=4, iterations_per_epoch=10, batch=4,
                         lr=5e-3, patience=10, architecture_args={"levels": 4, "base_channels": 8})
    validation = WholeRegionValidation(val_regions, patch, 2, overlap=0.25)
    # the untrained network train_semantic starts from: same seeding, same builder
    set_determinism(seed=config.seed)
    torch.manual_seed(config.seed)
    untrained = build("unet", 2, 1, 2, **config.architecture_args).eval()
    (untrained_dice,), _ = validate(untrained, validation, arrays, 2, normalise)

    t0 = time.perf_counter()
    rows = []
    outcome = train_semantic(config, train_sampler, validation, arrays, normalise, on_epoch=rows.append)
    assert time.perf_counter() - t0 < 120
    assert rows == outcome.history and len(rows) == 4
    assert outcome.stopped == "epochs done"
    assert outcome.metric_name == "val_dice" and outcome.best_metric == max(r["val_dice"] for r in rows)
    assert all(r["val_dice"] == r["val_dice_membrane"] for r in rows)  # one foreground class

    truth = np.asarray(scan.labels[val_regions[0].box])
    share = float((truth == 1).mean())
    constant = 2 * share / (1 + share)
    (trained_dice,), counts = validate(outcome.network, validation, arrays, 2, normalise)
    assert trained_dice == pytest.approx(outcome.best_metric)  # the best state is the one returned
    assert counts["reference"][1] == int((truth == 1).sum())  # every held-out pixel was scored
    assert trained_dice >= 0.6 and trained_dice > constant + 0.2, (trained_dice, constant)
    assert trained_dice > untrained_dice + 0.15, (trained_dice, untrained_dice)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


# ------------------------------------------------------------------------------------ end to end


@pytest.fixture
def own_home(tmp_path, monkeypatch):
    """A TILEWISE_HOME (stores, embedded MLflow) of this test's own."""
    import os

    import mlflow

    original_uri = os.environ.get("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("TILEWISE_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("TILEWISE_STORE_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)  # MLflow's cwd-relative defaults (./mlruns) must not land in the repository
    yield tmp_path
    monkeypatch.undo()
    mlflow.set_tracking_uri(original_uri)  # registry.client() exports MLFLOW_TRACKING_URI; undo that


@pytest.mark.slow
def test_cli_train_then_infer_with_the_champion(prefect_server, own_home, monkeypatch):
    import mlflow.models
    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from flows.cli import app
    from models import registry

    tmp_path = own_home
    # speed only: no subprocess to guess the MLflow model's pip requirements
    monkeypatch.setattr(mlflow.models, "infer_pip_requirements",
                        lambda model_uri, flavor, fallback=None, **kw: list(fallback or []))
    runner = CliRunner()
    result = runner.invoke(app, ["train", "isbi2012_em", "--epochs", "2", "--max-minutes", "0.5"])
    assert result.exit_code == 0, result.output
    assert "trained isbi2012_em-unet/1" in result.output

    c = MlflowClient(tracking_uri=registry.tracking_uri(), registry_uri=registry.tracking_uri())
    champion = c.get_model_version_by_alias("isbi2012_em-unet", "champion")
    assert str(champion.version) == "1"
    assert champion.tags["promotion"].startswith("champion: first version")
    run = c.get_run(champion.run_id)
    assert run.data.tags["tilewise.promotion"] == champion.tags["promotion"]
    assert "val_dice" in run.data.metrics

    store = scan_store("isbi2012_em", "isbi2012_train")
    assert store.startswith(str(tmp_path)) and storage.is_complete(store)
    result = runner.invoke(app, ["infer", "--store", store, "--model", "models:/isbi2012_em-unet@champion"])
    assert result.exit_code == 0, result.output
    assert storage.is_complete(store + "/prediction")
    assert storage.read_record(store + "/prediction")["model"] == "models:/isbi2012_em-unet/1"
    labels = zarr.open_array(f"{store}/prediction/labels", mode="r")
    assert labels.shape == (8, 512, 512)


# ------------------------------------------------------------------------------------ progress (issue 8)


class _StopAfterEpochs(Exception):
    pass


def test_epoch_log_records_carry_the_row(sample_root, own_home, monkeypatch, caplog):
    """train_dataset logs one INFO line per epoch on tasks.training.train, with the row attached for the CLI bar."""
    import dataclasses
    import logging

    import tasks.training.train as train
    from tasks.training.loop import train_semantic as real

    loaded = find_entry("isbi2012_em", DEFAULT_CATALOG_DIR)

    def tiny(config, *args, **kwargs):  # the real loop, few small steps; stop before model logging
        kwargs.pop("network")  # a small fresh one instead
        real(dataclasses.replace(config, iterations_per_epoch=2, batch=2, val_patches=2,
                                 architecture_args={"levels": 3, "base_channels": 4}), *args, **kwargs)
        raise _StopAfterEpochs

    monkeypatch.setattr(train, "train_semantic", tiny)
    with caplog.at_level(logging.INFO, logger="tasks.training.train"), pytest.raises(_StopAfterEpochs):
        train.train_dataset(loaded, architecture="unet", epochs=2, max_minutes=5,
                            store_root=str(sample_root[0]))
    records = [r for r in caplog.records if hasattr(r, "tilewise_epoch")]
    assert [r.tilewise_epoch["epoch"] for r in records] == [0, 1]
    for k, r in enumerate(records, start=1):
        assert r.name == "tasks.training.train" and r.levelno == logging.INFO
        assert r.tilewise_epochs == 2 and r.tilewise_metric == "val_dice" and r.tilewise_max_minutes == 5
        row = r.tilewise_epoch
        assert np.isfinite(row["train_loss"]) and 0 <= row["val_dice"] <= 1 and row["seconds"] > 0
        message = r.getMessage()
        assert f"epoch {k}/2:" in message
        assert f"train_loss={row['train_loss']:.4f}" in message and f"val_dice={row['val_dice']:.4f}" in message


def _epoch_record(epoch: int, epochs: int = 3, loss: float = 0.5, dice: float = 0.25, seconds: float = 30.0):
    import logging

    record = logging.LogRecord("tasks.training.train", logging.INFO, __file__, 0, "epoch", (), None)
    record.tilewise_epoch = {"epoch": epoch, "train_loss": loss, "val_dice": dice, "seconds": seconds}
    record.tilewise_epochs, record.tilewise_metric, record.tilewise_max_minutes = epochs, "val_dice", 1.5
    return record


def test_progress_handler_advances_one_step_per_epoch():
    import io
    import logging

    from rich.console import Console

    from flows.progress import EpochProgressHandler, epoch_progress, make_progress

    console = Console(file=io.StringIO(), force_terminal=True, width=160)
    progress = make_progress(console)
    handler = EpochProgressHandler(progress)
    handler.handle(logging.LogRecord("tasks.training.train", logging.INFO, __file__, 0, "no row", (), None))
    assert progress.tasks == []  # records without an epoch row draw nothing
    seen = []
    for epoch in range(3):
        handler.handle(_epoch_record(epoch, loss=0.5 - 0.1 * epoch, dice=0.2 * (epoch + 1), seconds=30.0 * (epoch + 1)))
        (task,) = progress.tasks
        seen.append((task.completed, task.total, task.fields["status"]))
    assert seen == [(1, 3, "loss 0.5000 · val_dice 0.2000 · 0.5/1.5 min"),
                    (2, 3, "loss 0.4000 · val_dice 0.4000 · 1.0/1.5 min"),
                    (3, 3, "loss 0.3000 · val_dice 0.6000 · 1.5/1.5 min")]
    assert progress.tasks[0].finished

    # installed on a terminal (the bar is drawn, the handler removed afterwards), not otherwise
    logger = logging.getLogger("tasks.training")
    before = list(logger.handlers)
    with epoch_progress(console) as live:
        assert live is not None and len(logger.handlers) == len(before) + 1
        logging.getLogger("tasks.training.train").handle(_epoch_record(0, epochs=2))
        assert live.tasks[0].completed == 1 and live.tasks[0].total == 2
    assert logger.handlers == before
    assert "1/2" in console.file.getvalue() and "val_dice 0.2500" in console.file.getvalue()
    plain = Console(file=io.StringIO(), force_terminal=False)
    with epoch_progress(plain) as live:
        assert live is None and logger.handlers == before
    assert plain.file.getvalue() == ""


def test_console_lines_of_epochs_stay_out_of_the_live_bar():
    """While the bar is shown, the root logger's console handlers (Prefect's, in the CLI) skip epoch
    records, which would print into the bar; other lines pass, and afterwards epoch lines pass again."""
    import io
    import logging

    from rich.console import Console

    from flows.progress import epoch_progress

    bar = Console(file=io.StringIO(), force_terminal=True, width=100)
    lines = io.StringIO()
    console_handler = logging.StreamHandler(lines)
    root, log = logging.getLogger(), logging.getLogger("tasks.training.train")
    root.addHandler(console_handler)
    level, root_level = log.level, root.level
    log.setLevel(logging.INFO)
    epoch = {"tilewise_epoch": {"epoch": 0, "train_loss": 0.5, "val_dice": 0.25}, "tilewise_epochs": 2,
             "tilewise_metric": "val_dice", "tilewise_max_minutes": 1.0}
    try:
        with epoch_progress(bar):
            log.info("epoch line", extra=epoch)
            log.info("another line")
        log.info("epoch line after", extra=epoch)
    finally:
        root.removeHandler(console_handler)
        log.setLevel(level)
        root.setLevel(root_level)
    assert lines.getvalue().splitlines() == ["another line", "epoch line after"]
    assert "loss 0.5000" in bar.file.getvalue()
