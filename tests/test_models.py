"""The model zoo: output shapes of every builder (2D/3D, odd sizes, multi-band), DeepLab's output
stride, Mask R-CNN's two modes and its semantic wrapper, U-Net sizing, rebuilding from a card,
no weights downloaded, and the card's intensity normalisation -- numbers worked out by hand."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from models.card import ModelCard, Normalization
from models.maskrcnn import MaskRCNNSemantic
from models.unet import build_unet, unet_levels
from models.zoo import build, build_from_card

LOSSES = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
SMALL_RCNN = {"min_size": 64, "max_size": 128}  # the builder's own resize; keeps CPU tests fast


def _light(net):
    """Fewer region proposals and detections than the defaults (2000/1000 proposals, 100 detections):
    the same network, only cheaper to run on a shared CPU."""
    net.rpn._pre_nms_top_n = {"training": 200, "testing": 100}
    net.rpn._post_nms_top_n = {"training": 200, "testing": 100}
    net.roi_heads.detections_per_img = 10
    return net


@pytest.fixture(autouse=True)
def _few_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread is fastest
    yield
    torch.set_num_threads(old)


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Any attempt to fetch weights (torch.hub, torchvision's weight enums) or open a socket fails."""
    import torch.hub
    import torchvision._internally_replaced_utils as tv_utils
    import torchvision.models._api as tv_api

    def refuse(*args, **kwargs):
        raise AssertionError(f"a builder tried to download something: {args[:1]}")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached weights either
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(tv_utils, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --------------------------------------------------------------------------------------------- U-Net


@pytest.mark.parametrize("tile, expected", [
    ((64, 64), 5),        # 64 -> 32 -> 16 -> 8 -> 4: five levels, capped at max_levels=5 anyway
    ((32, 32), 4),        # 32 -> 16 -> 8 -> 4
    ((16, 16), 3),        # 16 -> 8 -> 4
    ((8, 8), 2),          # 8 -> 4
    ((7, 7), 1),          # 7 // 2 = 3 < 4: a single level
    ((4, 4), 1),
    ((1, 64, 64), 5),     # 2D-on-3D patch: the depth-1 axis does not count
    ((32, 96, 96), 4),    # BraTS tile: the smallest axis (32) decides
    ((256, 256), 5),      # capped at max_levels
])
def test_unet_levels_by_hand(tile, expected):
    assert unet_levels(tile) == expected


def test_unet_levels_max_levels():
    assert unet_levels((256, 256), max_levels=7) == 7  # 256 / 2**6 = 4
    assert unet_levels((256, 256), max_levels=8) == 7  # 256 / 2**7 = 2 < 4
    assert unet_levels((64, 64), max_levels=2) == 2


def test_unet_2d_shapes():
    net = build_unet(2, 1, 2, levels=3, base_channels=4).eval()
    assert list(net.channels) == [4, 8, 16] and list(net.strides) == [2, 2]
    with torch.no_grad():
        # divisible by 2**(3-1) = 4 but not by 8: non-square, not a power of two
        out = net(torch.rand(2, 1, 36, 44))
    assert out.shape == (2, 2, 36, 44)
    assert torch.isfinite(out).all()


def test_unet_3d_shapes():
    net = build_unet(3, 2, 5, levels=3, base_channels=4, num_res_units=1).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 2, 12, 20, 28))
    assert out.shape == (1, 5, 12, 20, 28)


def test_unet_explicit_channels():
    net = build_unet(2, 3, 4, channels=[2, 4, 8, 16], num_res_units=0).eval()
    assert list(net.channels) == [2, 4, 8, 16] and list(net.strides) == [2, 2, 2]
    with torch.no_grad():
        assert net(torch.rand(1, 3, 24, 40)).shape == (1, 4, 24, 40)


def test_unet_levels_give_a_network_that_runs_on_its_tile():
    for tile in [(64, 64), (48, 80), (16, 32, 32)]:
        levels = unet_levels(tile)
        net = build_unet(len(tile), 1, 2, levels=levels, base_channels=2, num_res_units=0).eval()
        with torch.no_grad():
            assert net(torch.zeros(1, 1, *tile)).shape == (1, 2, *tile)


# ------------------------------------------------------------------------------------------ DeepLab


def _encoder_shapes(net, x):
    """Spatial shapes of what enters ASPP (the encoder's output) and the low-level branch."""
    seen = {}
    hooks = [net.aspp.register_forward_hook(lambda m, i, o: seen.__setitem__("high", tuple(i[0].shape))),
             net.low_level.register_forward_hook(lambda m, i, o: seen.__setitem__("low", tuple(i[0].shape)))]
    try:
        with torch.no_grad():
            out = net(x)
    finally:
        for h in hooks:
            h.remove()
    return out, seen


@pytest.mark.parametrize("channels", [1, 3, 13])
def test_deeplab_odd_sizes_and_bands(channels):
    torch.manual_seed(0)
    net = build("deeplab", 2, channels, 3, aspp_channels=32).eval()
    x = torch.rand(2, channels, 65, 71)
    out, seen = _encoder_shapes(net, x)
    assert out.shape == (2, 3, 65, 71)
    assert torch.isfinite(out).all()
    # Output stride 16: the stem (conv s2, max-pool s2) and layer2/layer3 (s2) each take ceil(n / 2):
    # 65 -> 33 -> 17 -> 9 -> 5 and 71 -> 36 -> 18 -> 9 -> 5; layer4 is dilated (no stride).
    assert seen["high"] == (2, 512, 5, 5)
    # the decoder's low-level features are at stride 4: 17 x 18
    assert seen["low"] == (2, 64, 17, 18)


def test_deeplab_output_stride_8():
    net = build("deeplab", 2, 1, 2, output_stride=8, aspp_channels=16).eval()
    out, seen = _encoder_shapes(net, torch.rand(1, 1, 65, 71))
    assert out.shape == (1, 2, 65, 71)
    assert seen["high"] == (1, 512, 9, 9)  # layer3 dilated too: stops at 65 -> 9, 71 -> 9


def test_deeplab_rejects_bad_output_stride():
    with pytest.raises(ValueError, match="output_stride"):
        build("deeplab", 2, 3, 2, output_stride=32)


def test_deeplab_and_maskrcnn_are_2d_only():
    with pytest.raises(ValueError, match="2D only"):
        build("deeplab", 3, 1, 2)
    with pytest.raises(ValueError, match="unknown architecture"):
        build("segformer", 2, 1, 2)


# --------------------------------------------------------------------------------------- Mask R-CNN


def test_maskrcnn_eval_returns_detections_per_image():
    torch.manual_seed(0)
    net = _light(build("maskrcnn", 2, 1, 3, **SMALL_RCNN)).eval()
    images = [torch.rand(1, 61, 75), torch.rand(1, 50, 64)]
    with torch.no_grad():
        out = net(images)
    assert len(out) == 2
    for det, image in zip(out, images):
        assert set(det) == {"boxes", "labels", "scores", "masks"}
        n = len(det["scores"])
        assert det["boxes"].shape == (n, 4)
        assert det["labels"].shape == (n,)
        assert det["masks"].shape == (n, 1, *image.shape[1:])  # masks at each image's own size
        if n:
            assert ((det["labels"] >= 1) & (det["labels"] <= 2)).all()
            assert ((det["scores"] >= 0) & (det["scores"] <= 1)).all()


@pytest.mark.parametrize("channels", [1, 13])
def test_maskrcnn_train_returns_the_five_losses(channels):
    torch.manual_seed(0)
    net = _light(build("maskrcnn", 2, channels, 3, **SMALL_RCNN)).train()
    mask = torch.zeros(2, 64, 80, dtype=torch.uint8)
    mask[0, 10:30, 12:40] = 1
    mask[1, 40:60, 50:70] = 1
    target = {"boxes": torch.tensor([[12.0, 10, 40, 30], [50, 40, 70, 60]]), "labels": torch.tensor([1, 2]),
              "masks": mask}
    losses = net([torch.rand(channels, 64, 80)], [target])
    assert set(losses) == LOSSES
    for name, value in losses.items():
        assert value.ndim == 0 and torch.isfinite(value), name
    sum(losses.values()).backward()
    first = net.backbone.body["0"][0]
    assert first.in_channels == channels and first.weight.grad is not None


class _StubDetector(torch.nn.Module):
    """Fixed detections, to check MaskRCNNSemantic's arithmetic by hand."""

    def __init__(self, detections):
        super().__init__()
        self.detections = detections

    def forward(self, images):
        assert len(images) == len(self.detections)
        return self.detections


def test_maskrcnn_semantic_by_hand():
    m1 = torch.zeros(1, 2, 3)
    m1[0, 0] = torch.tensor([1.0, 0.5, 0.0])
    m2 = torch.ones(1, 2, 3)  # label 2, but its score 0.4 is below the 0.5 threshold: ignored
    m3 = torch.zeros(1, 2, 3)
    m3[0, 1] = torch.tensor([0.0, 1.0, 1.0])  # label 1 again: the maximum over instances counts
    det = {"masks": torch.stack([m1, m2, m3]), "labels": torch.tensor([1, 2, 1]),
           "scores": torch.tensor([0.9, 0.4, 0.6])}
    wrapper = MaskRCNNSemantic(_StubDetector([det]), num_classes=3)
    out = wrapper(torch.zeros(1, 1, 2, 3))
    assert out.shape == (1, 3, 2, 3)
    p1 = torch.tensor([[0.9, 0.45, 0.0], [0.0, 0.6, 0.6]])
    expected = torch.stack([1 - p1, p1, torch.zeros(2, 3)]).clamp(1e-4, 1 - 1e-4).log()[None]
    torch.testing.assert_close(out, expected)


def test_maskrcnn_semantic_shape_with_a_real_detector():
    torch.manual_seed(0)
    wrapper = MaskRCNNSemantic(_light(build("maskrcnn", 2, 2, 4, **SMALL_RCNN)), num_classes=4)
    with torch.no_grad():
        out = wrapper(torch.rand(2, 2, 45, 57))
    assert out.shape == (2, 4, 45, 57)
    assert torch.isfinite(out).all() and (out <= 0).all()  # log-probabilities


# ----------------------------------------------------------------------------- card and rebuilding


@pytest.mark.parametrize("card", [
    ModelCard(architecture="unet", architecture_args={"levels": 3, "base_channels": 4}, in_channels=2,
              classes=["bg", "a", "b"], spatial_dims=3),
    ModelCard(architecture="unet", architecture_args={"channels": [4, 8], "num_res_units": 1}, in_channels=1,
              classes=["bg", "a"], spatial_dims=2),
    ModelCard(architecture="unet", architecture_args={"levels": 4, "base_channels": 4, "num_res_units": 1,
                                                      "deep_supervision": True}, in_channels=2,
              classes=["bg", "a", "b"], spatial_dims=3),
    ModelCard(architecture="deeplab", architecture_args={"aspp_channels": 16}, in_channels=13,
              classes=["bg", "a"], spatial_dims=2),
    ModelCard(architecture="maskrcnn", architecture_args=dict(SMALL_RCNN), in_channels=1,
              classes=["bg", "cell"], spatial_dims=2),
], ids=["unet3d", "unet2d-channels", "unet3d-deep-supervision", "deeplab-13band", "maskrcnn"])
def test_build_from_card_rebuilds_the_same_architecture(card):
    original = build(card.architecture, card.spatial_dims, card.in_channels, len(card.classes),
                     **card.architecture_args)
    # through JSON, as the card travels
    rebuilt = build_from_card(ModelCard.model_validate_json(card.model_dump_json()))
    a, b = original.state_dict(), rebuilt.state_dict()
    assert list(a) == list(b)
    assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items()}
    assert all(a[k].dtype == b[k].dtype for k in a)
    rebuilt.load_state_dict(a, strict=True)


def test_build_from_card_needs_the_architecture_fields():
    with pytest.raises(ValueError, match="lacks"):
        build_from_card(ModelCard(in_channels=1, classes=["a", "b"], spatial_dims=2))
    with pytest.raises(ValueError, match="lacks"):
        build_from_card(ModelCard(architecture="unet", in_channels=1, spatial_dims=2))


def test_builders_download_nothing(no_network):
    with pytest.raises(AssertionError):  # the guard itself works
        socket.create_connection(("example.org", 80))
    build("unet", 2, 1, 2, levels=2, base_channels=2)
    build("unet", 3, 1, 2, levels=2, base_channels=2)
    for bands in (1, 3):
        build("deeplab", 2, bands, 2, aspp_channels=8)
    build("deeplab", 2, 3, 2, backbone="resnet50", aspp_channels=8)
    build("maskrcnn", 2, 3, 2)
    build("maskrcnn", 2, 1, 2, backbone="resnet50")


# ---------------------------------------------------------------------------------- normalisation


def _batch() -> np.ndarray:
    b = np.zeros((2, 2, 2, 3), np.float32)
    b[0, 0] = [[0, 2, 4], [6, 8, 10]]
    b[0, 1] = [[1, 1, 1], [3, 3, 3]]
    b[1] = b[0] + 10
    return b


def test_normalization_zscore_by_hand():
    out = Normalization(kind="zscore", mean=[4.0, 2.0], std=[2.0, 1.0]).apply(_batch())
    want0 = np.array([[-2, -1, 0], [1, 2, 3]], np.float32)
    want1 = np.array([[-1, -1, -1], [1, 1, 1]], np.float32)
    np.testing.assert_allclose(out[0, 0], want0)
    np.testing.assert_allclose(out[0, 1], want1)
    np.testing.assert_allclose(out[1, 0], want0 + 5)  # (x + 10 - 4) / 2
    np.testing.assert_allclose(out[1, 1], want1 + 10)  # (x + 10 - 2) / 1
    assert out.dtype == np.float32


def test_normalization_minmax_by_hand():
    out = Normalization(kind="minmax", low=[0.0, 1.0], high=[10.0, 3.0]).apply(_batch())
    np.testing.assert_allclose(out[0, 0], [[0, 0.2, 0.4], [0.6, 0.8, 1.0]], rtol=1e-6)
    np.testing.assert_allclose(out[0, 1], [[0, 0, 0], [1, 1, 1]])
    np.testing.assert_allclose(out[1, 0], [[1, 1.2, 1.4], [1.6, 1.8, 2.0]], rtol=1e-6)
    np.testing.assert_allclose(out[1, 1], [[5, 5, 5], [6, 6, 6]])


def test_normalization_3d_and_none():
    vol = _batch()[:, :, None]  # (B, C, Z=1, Y, X)
    out = Normalization(kind="zscore", mean=[4.0, 2.0], std=[2.0, 1.0]).apply(vol)
    assert out.shape == (2, 2, 1, 2, 3)
    np.testing.assert_allclose(out[0, 0, 0], [[-2, -1, 0], [1, 2, 3]])
    same = _batch()
    np.testing.assert_array_equal(Normalization().apply(same), _batch())


def test_deeply_supervised_unet_gives_heads_in_training_and_one_output_in_eval():
    net = build("unet", 3, 2, 3, levels=4, base_channels=4, num_res_units=1, deep_supervision=True)
    x = torch.randn(1, 2, 16, 16, 16)
    assert tuple(net.train()(x).shape) == (1, 3, 3, 16, 16, 16)  # main + 2 heads, full resolution
    assert tuple(net.eval()(x).shape) == (1, 3, 16, 16, 16)
