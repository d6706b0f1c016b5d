"""The training recipe's pieces against independent references: whole-region validation equals
MONAI's sliding_window_inference; the validation budget; the batch prefetcher; ``--init-from``
(what loads, what is initialised, the one-line refusals before any epoch); ``--freeze encoder``
(frozen parameters and statistics do not change); the champion rule across validation protocols."""

from __future__ import annotations

import collections
import pickle

import numpy as np
import pytest
import torch

from tasks.training.data import Region, TrainingError
from tasks.training.init_from import apply_initial_weights, encoder_modules, read_initial_weights
from tasks.training.loop import BatchPrefetcher
from tasks.training.validation import predict_region, within_budget
from tests.compare import assert_labels_equal_where_decided


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def mlflow_home(tmp_path, monkeypatch):
    """A TILEWISE_HOME (embedded MLflow registry) of this test's own."""
    import os

    import mlflow
    import mlflow.models

    original_uri = os.environ.get("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("TILEWISE_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # MLflow's cwd-relative defaults (./mlruns) must not land in the repository
    monkeypatch.setattr(mlflow.models, "infer_pip_requirements",  # speed only: no pip subprocess per model
                        lambda model_uri, flavor, fallback=None, **kw: list(fallback or []))
    yield tmp_path
    monkeypatch.undo()
    mlflow.set_tracking_uri(original_uri)


@pytest.fixture(scope="module")
def sample_stores(tmp_path_factory):
    """The bundled SpaceNet chips ingested through their catalog entry."""
    from data_catalog import DEFAULT_CATALOG_DIR, find_entry
    from tasks.ingest import discover_scans, ingest_scan
    from tasks.settings import scan_store

    root = tmp_path_factory.mktemp("stores")
    stores = {}
    for name in ("spacenet_rio",):
        loaded = find_entry(name, DEFAULT_CATALOG_DIR)
        stores[name] = []
        for spec in discover_scans(loaded):
            stores[name].append(scan_store(name, spec.scan_id, str(root)))
            ingest_scan(spec, stores[name][-1])
    return stores


# ------------------------------------------------------------------------------ whole-region validation


@pytest.mark.parametrize("dims, shape, tile", [(2, (256, 192), (128, 64)), (3, (48, 64, 40), (16, 32, 40))])
def test_predict_region_equals_monai_sliding_window(dims, shape, tile):
    """Same tile starts (sizes where nnU-Net's even placement and MONAI's coincide), Gaussian
    weights, overlap 0.5: the argmax equals MONAI's wherever MONAI's top-two margin is decided."""
    from monai.inferers import sliding_window_inference

    from models.zoo import build
    from tasks.engine.runner import ModelRunner

    torch.manual_seed(0)
    net = build("unet", dims, 2, 3, base_channels=4, levels=3).eval()
    image = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
    ours = predict_region(ModelRunner(net, device="cpu"), image, tile, 0.5, lambda x: x, batch=3)
    with torch.no_grad():
        logits = sliding_window_inference(torch.from_numpy(image[None]), tile, 3, net, overlap=0.5,
                                          mode="gaussian", sigma_scale=0.125)[0]
    ref = torch.softmax(logits, 0).numpy()
    assert ours.shape == shape
    assert_labels_equal_where_decided(ours, ref.argmax(0), ref, tol=1e-5)


def test_predict_region_pads_a_region_smaller_than_the_tile():
    from models.zoo import build
    from tasks.engine.runner import ModelRunner

    torch.manual_seed(0)
    net = build("unet", 2, 1, 2, base_channels=4, levels=3).eval()
    image = np.random.default_rng(1).normal(size=(1, 40, 100)).astype(np.float32)
    out = predict_region(ModelRunner(net, device="cpu"), image, (64, 64), 0.5, lambda x: x)
    assert out.shape == (40, 100) and set(np.unique(out)) <= {0, 1}


def test_within_budget_keeps_small_regions_and_cuts_large_ones_into_slabs():
    small = [Region("a", (slice(0, 10), slice(0, 64), slice(0, 64)))]
    assert within_budget(small, (1, 64, 64), voxel_budget=10 * 64 * 64) == small
    big = [Region("a", (slice(100, 1100), slice(0, 64), slice(0, 64))),
           Region("b", (slice(0, 200), slice(0, 64), slice(0, 64)))]
    cut = within_budget(big, (4, 64, 64), voxel_budget=120 * 64 * 64)
    voxels = sum(np.prod(r.shape) for r in cut)
    assert voxels <= 120 * 64 * 64
    for r in cut:  # slabs one tile deep, inside their region, spread over all of it
        parent = next(b for b in big if b.store == r.store)
        assert r.shape[0] == 4 and parent.box[0].start <= r.box[0].start and r.box[0].stop <= parent.box[0].stop
        assert r.box[1:] == parent.box[1:]
    starts_a = [r.box[0].start for r in cut if r.store == "a"]
    assert starts_a[0] == 100 and starts_a[-1] == 1096 and len(starts_a) >= 10
    assert {r.store for r in cut} == {"a", "b"}


# ------------------------------------------------------------------------------------ prefetcher


def test_prefetcher_gives_the_batches_in_order_and_raises_the_producers_error():
    counter = iter(range(5))

    def make():
        n = next(counter)
        if n == 4:
            raise ValueError("bad patch")
        return n

    with BatchPrefetcher(make, depth=2) as prefetch:
        assert [prefetch.get() for _ in range(4)] == [0, 1, 2, 3]
        with pytest.raises(ValueError, match="bad patch"):
            prefetch.get()


# ------------------------------------------------------------------------------------ --init-from


def _deeplab(in_channels, classes):
    from models.zoo import build

    torch.manual_seed(in_channels * 10 + classes)
    return build("deeplab", 2, in_channels, classes, aspp_channels=16)


def test_init_from_loads_matching_layers_and_lists_the_rest(tmp_path):
    """A 1-band, 2-class DeepLab's weights into a 3-band, 4-class one: the first convolution and
    the last decoder layer differ in shape and keep their fresh values; everything else is loaded."""
    parent = _deeplab(1, 2)
    path = tmp_path / "parent.pt"
    torch.save(parent.state_dict(), path)
    child = _deeplab(3, 4)
    fresh = {k: v.clone() for k, v in child.state_dict().items()}
    report = apply_initial_weights(child, read_initial_weights(str(path), "deeplab"))
    expected_new = {"stem.0.weight", "decoder.6.weight", "decoder.6.bias"}
    assert set(report.initialised) == expected_new
    assert "shape (64, 1, 7, 7) there, (64, 3, 7, 7) here" == report.initialised["stem.0.weight"]
    assert report.unused == [] and len(report.loaded) == len(fresh) - 3 == report.total - 3
    after, theirs = child.state_dict(), parent.state_dict()
    for name in fresh:
        if name in expected_new:
            assert torch.equal(after[name], fresh[name]), name
        else:
            assert torch.equal(after[name], theirs[name]), name
    assert "loaded" in report.summary() and "stem.0.weight" in report.summary()


def test_init_from_safetensors_and_a_wrapped_checkpoint(tmp_path):
    from safetensors.torch import save_file

    parent = _deeplab(3, 2)
    save_file({k: v.contiguous() for k, v in parent.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in parent.state_dict().items()}},
               tmp_path / "ckpt.pth")
    for name in ("w.safetensors", "ckpt.pth"):
        child = _deeplab(3, 2)
        report = apply_initial_weights(child, read_initial_weights(str(tmp_path / name), "deeplab"))
        assert not report.initialised
        assert all(torch.equal(child.state_dict()[k], v) for k, v in parent.state_dict().items())


class _NotWeights:
    def __init__(self):
        self.payload = "anything"


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no such file or registered model"),
    (lambda p: p.write_text("hello, not a checkpoint"), "not a PyTorch weights file"),
    (lambda p: torch.save([torch.zeros(2)], p), "not a state dict"),
    (lambda p: torch.save({"a": 1, "b": "x"}, p), "not a state dict"),
    (lambda p: torch.save({"net": _NotWeights()}, p), "refused: the pickle holds more than weights"),
    (lambda p: p.write_bytes(pickle.dumps(collections.OrderedDict(x=_NotWeights()))),
     "refused: the pickle holds more than weights"),
])
def test_init_from_bad_files_are_refused_in_one_line(tmp_path, make, message):
    path = tmp_path / "weights.pt"
    make(path)
    with pytest.raises(TrainingError) as info:
        read_initial_weights(str(path), "unet")
    text = str(info.value)
    assert message in text and "\n" not in text and str(path) in text


def test_init_from_an_architecture_mismatch_is_refused(tmp_path):
    from models.zoo import build

    path = tmp_path / "unet.pt"
    torch.save(build("unet", 2, 1, 2, base_channels=4, levels=3).state_dict(), path)
    with pytest.raises(TrainingError, match="architecture mismatch"):
        apply_initial_weights(_deeplab(1, 2), read_initial_weights(str(path), "deeplab"))


def test_init_from_a_missing_registered_model(mlflow_home):
    with pytest.raises(TrainingError, match=r"--init-from models:/nope@champion: .*no registered model"):
        read_initial_weights("models:/nope@champion", "unet")


def test_init_from_a_registered_model_of_another_architecture(mlflow_home):
    import mlflow

    from models import registry
    from models.card import ModelCard

    net = _deeplab(1, 2)
    card = ModelCard(architecture="deeplab", architecture_args={"aspp_channels": 16}, in_channels=1,
                     classes=["background", "road"], spatial_dims=2, tile=[64, 64])
    with mlflow.start_run(experiment_id=registry.experiment_id("toy")) as run:
        info = registry.log_model(net, card, np.zeros((1, 1, 64, 64), np.float32))
        registry.register_and_promote("toy-deeplab", info.model_uri, run.info.run_id, "val_dice", 0.5)
    parent = read_initial_weights("models:/toy-deeplab@champion", "deeplab")
    assert parent.resolved == "models:/toy-deeplab/1" and parent.architecture_args == {"aspp_channels": 16}
    child = _deeplab(3, 2)  # the same DeepLab on three bands: all but the first convolution load
    report = apply_initial_weights(child, parent)
    assert set(report.initialised) == {"stem.0.weight"}
    with pytest.raises(TrainingError, match="a deeplab model; this training builds a unet"):
        read_initial_weights("models:/toy-deeplab/1", "unet")


# ------------------------------------------------------------------------------------ --freeze


@pytest.mark.parametrize("architecture", ["unet", "deeplab"])
def test_encoder_modules_cover_the_contracting_path_only(architecture):
    from models.zoo import build

    net = (build("unet", 2, 1, 2, base_channels=4, levels=4) if architecture == "unet" else _deeplab(1, 2))
    encoder = {id(p) for m in encoder_modules(architecture, net) for p in m.parameters()}
    names = [n for n, p in net.named_parameters() if id(p) in encoder]
    rest = [n for n, p in net.named_parameters() if id(p) not in encoder]
    assert names and rest
    if architecture == "deeplab":
        assert all(n.split(".")[0] in ("stem", "layer1", "layer2", "layer3", "layer4") for n in names)
        assert all(n.split(".")[0] in ("aspp", "low_level", "decoder") for n in rest)
    else:  # the down blocks and the bottom; every up block (and the output) stays trainable
        x = torch.randn(1, 1, 32, 32)
        feats = []
        hooks = [m.register_forward_hook(lambda m, i, o: feats.append(o.shape[1])) for m in
                 encoder_modules(architecture, net)]
        net(x)
        for h in hooks:
            h.remove()
        assert feats == [4, 8, 16, 32]  # channels of the contracting path, in order, then the bottom


def test_frozen_encoder_does_not_change_for_the_first_epochs(sample_stores):
    """Two epochs, encoder frozen for the first: after epoch 0 every encoder parameter and
    normalisation statistic equals its start, the decoder's changed; after epoch 1 both changed."""
    from models.card import Normalization
    from models.zoo import build
    from tasks.training.data import PatchSampler, in_memory, open_training_scan, split_regions
    from tasks.training.loop import TrainConfig, train_semantic
    from tasks.training.validation import WholeRegionValidation

    store = sample_stores["spacenet_rio"][0]
    scan = in_memory([open_training_scan(store, 2)])[0]
    train_r, val_r = split_regions([scan])
    config = TrainConfig(architecture="deeplab", spatial_dims=2, patch=(64, 64), in_channels=3,
                         classes=("background", "building"), epochs=2, iterations_per_epoch=3, batch=2,
                         architecture_args={"aspp_channels": 16}, freeze="encoder", freeze_epochs=1)
    torch.manual_seed(0)
    net = build("deeplab", 2, 3, 2, aspp_channels=16)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    encoder = encoder_modules("deeplab", net)
    enc_names = {f"{prefix}.{n}" for prefix in ("stem", "layer1", "layer2", "layer3", "layer4")
                 for n in getattr(net, prefix).state_dict()}
    snapshots = []
    norm = Normalization(kind="zscore", mean=[100.0] * 3, std=[50.0] * 3)
    train_semantic(config, PatchSampler(train_r, {store: scan}, (64, 64)),
                   WholeRegionValidation(val_r, (64, 64), None, overlap=0.0, batch=4), {store: scan},
                   lambda b: norm.apply(b.astype(np.float32)),
                   on_epoch=lambda row: snapshots.append({k: v.clone() for k, v in net.state_dict().items()}),
                   network=net, frozen=encoder)
    first, second = snapshots
    assert enc_names and all(torch.equal(first[k], start[k]) for k in enc_names)
    decoder = [k for k in start if k.startswith("decoder") and start[k].is_floating_point()]
    assert any(not torch.equal(first[k], start[k]) for k in decoder)
    assert any(not torch.equal(second[k], start[k]) for k in enc_names if start[k].is_floating_point())


# ------------------------------------------------------------------------------------ champion rule


def test_a_champion_validated_another_way_is_not_compared(mlflow_home):
    import mlflow

    from models import registry
    from models.card import ModelCard
    from models.zoo import build

    net = build("unet", 2, 1, 2, base_channels=4, levels=3)
    card = ModelCard(architecture="unet", architecture_args={"base_channels": 4, "levels": 3}, in_channels=1,
                     classes=["a", "b"], spatial_dims=2, tile=[64, 64])
    decisions = []
    for value, protocol in ((0.9, None), (0.5, "whole-regions"), (0.4, "whole-regions")):
        with mlflow.start_run(experiment_id=registry.experiment_id("toy")) as run:
            info = registry.log_model(net, card, np.zeros((1, 1, 64, 64), np.float32))
            decisions.append(registry.register_and_promote("toy-unet", info.model_uri, run.info.run_id, "val_dice",
                                                           value, protocol=protocol, tags={"parent": "x"}))
    assert [d.alias for d in decisions] == ["champion", "champion", "challenger"]
    assert "no comparable val_dice" in decisions[1].decision
    tags = registry.describe("models:/toy-unet/2")["tags"]
    assert tags["metric_protocol"] == "whole-regions" and tags["parent"] == "x"

