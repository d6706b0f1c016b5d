"""CPU inference backends (tasks.engine.backends): same logits as eager through the runner and the
engine, TTA and the 2D-on-3D squeeze, conversion once per module and tile shape, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from tasks.engine import backends
from tasks.engine.backends import BackendError
from tasks.engine.infer import EngineConfig, infer_scan
from tasks.engine.model_io import LoadedModel, ModelCard
from tasks.engine.runner import ModelRunner
from tests.test_engine import conv_net, make_scan

KEPT = [b for b in backends.OFFERED if b != "eager"]


def small_unet(spatial_dims: int):
    """A MONAI U-Net as the engine runs them (instance norm, PReLU, residual units), tiny."""
    from models.zoo import build

    torch.manual_seed(0)
    return build("unet", spatial_dims, 1, 3, channels=[4, 8], num_res_units=1).eval()


@pytest.fixture(scope="module")
def unet2d():
    return small_unet(2)


@pytest.fixture(scope="module")
def unet3d():
    return small_unet(3)


@pytest.mark.parametrize("backend", KEPT)
def test_runner_matches_eager_with_tta_squeeze_and_a_partial_batch(backend, unet2d):
    x = np.random.default_rng(0).standard_normal((3, 1, 1, 32, 32)).astype(np.float32)  # 2D model, 3D scan
    for tta in (False, True):
        eager = ModelRunner(unet2d, squeeze_axis=2, tta=tta)
        other = ModelRunner(unet2d, squeeze_axis=2, tta=tta, backend=backend)
        for batch in (x, x[:1]):  # the last batch of a scan is often partial: the batch axis is dynamic
            want, got = eager(batch), other(batch)
            assert got.shape == want.shape == (len(batch), 3, 1, 32, 32) and got.dtype == np.float32
            assert np.abs(got - want).max() <= 1e-3
        assert other._fn is not unet2d  # the backend ran, not the module


@pytest.mark.parametrize("backend", KEPT)
def test_runner_matches_eager_3d_with_tta(backend, unet3d):
    x = np.random.default_rng(1).standard_normal((2, 1, 16, 16, 16)).astype(np.float32)
    want = ModelRunner(unet3d, tta=True)(x)
    got = ModelRunner(unet3d, tta=True, backend=backend)(x)
    assert np.abs(got - want).max() <= 1e-3


@pytest.mark.parametrize("backend", KEPT)
def test_torchscript_module_is_converted_too(backend, unet2d):
    scripted = torch.jit.script(unet2d)  # what tilewise infer --model file.pt loads
    x = np.random.default_rng(2).standard_normal((2, 1, 32, 32)).astype(np.float32)
    want = ModelRunner(unet2d)(x)
    runner = ModelRunner(scripted, backend=backend)
    assert np.abs(runner(x) - want).max() <= 1e-3
    assert runner._fn is not scripted


@pytest.mark.parametrize("backend", KEPT)
def test_infer_scan_matches_eager_and_keeps_the_digest(backend, tmp_path, unet2d, monkeypatch):
    array = np.random.default_rng(3).random((1, 3, 40, 30), dtype=np.float32)
    card = ModelCard(spatial_dims=2, classes=["a", "b", "c"])
    cfg = dict(tile=(16, 16), output_dtype="float32", batch=4)
    eager_store = make_scan(tmp_path, array, (2, 16, 16), name="eager")
    infer_scan(eager_store, LoadedModel(unet2d, card, "unet2d"), EngineConfig(**cfg))
    built = []
    real = backends._BUILDERS[backend]
    monkeypatch.setitem(backends._BUILDERS, backend, lambda m, x: built.append(tuple(x.shape)) or real(m, x))
    backends._cache.pop(unet2d, None)

    store = make_scan(tmp_path, array, (2, 16, 16), name="other")
    res = infer_scan(store, LoadedModel(unet2d, card, "unet2d"), EngineConfig(**cfg, backend=backend))
    assert res.status == "inferred" and built == [(4, 1, 16, 16)]  # converted once, for the squeezed tile
    want = zarr.open_array(f"{eager_store}/prediction/probabilities")[:]
    got = zarr.open_array(f"{store}/prediction/probabilities")[:]
    assert np.abs(got - want).max() <= 1e-3
    assert (zarr.open_array(f"{store}/prediction/labels")[:] == zarr.open_array(f"{eager_store}/prediction/labels")[:]).mean() > 0.999
    # the backend is not in the digest: eager sees the prediction as its own
    assert infer_scan(store, LoadedModel(unet2d, card, "unet2d"), EngineConfig(**cfg)).status == "unchanged"
    # another run of the same module and tile (the nightly's next scan) reuses the conversion
    store2 = make_scan(tmp_path, array, (2, 16, 16), name="again")
    infer_scan(store2, LoadedModel(unet2d, card, "unet2d"), EngineConfig(**cfg, backend=backend))
    assert built == [(4, 1, 16, 16)]


@pytest.mark.parametrize("backend, options, message", [
    ("nope", {}, "--backend 'nope' is not offered"),
    ("compile", {}, "--backend 'compile' is not offered (measured"),
    ("onnx", {}, "--backend 'onnx' is not offered (measured"),
    ("openvino", {"amp": "bf16"}, "--amp bf16 needs --backend eager"),
    ("openvino", {"channels_last": True}, "does not take --channels-last"),
    ("openvino", {"device": "cuda"}, "runs on the CPU only"),
])
def test_unusable_backend_is_a_one_line_error(backend, options, message):
    with pytest.raises(BackendError) as err:
        ModelRunner(conv_net(2, 1, 2), backend=backend, **options)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_backend_that_is_not_installed_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(BackendError, match=r"^--backend openvino needs openvino: pip install 'tilewise\[openvino\]'$"):
        ModelRunner(conv_net(2, 1, 2), backend="openvino")


def test_a_model_that_does_not_export_is_a_one_line_error():
    class Unexportable(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.svd(x)[0]  # no ONNX operator for it

    runner = ModelRunner(Unexportable(), backend="openvino")
    with pytest.raises(BackendError, match=r"^--backend: ONNX export of the model failed") as err:
        runner(np.zeros((1, 1, 8, 8), np.float32))
    assert "\x1b" not in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("args, message", [
    (["--backend", "nope"], "--backend 'nope' is not offered"),
    (["--backend", "openvino", "--amp", "bf16"], "--amp bf16 needs --backend eager"),
    (["--backend", "openvino", "--mode", "instances"], "instance inference (Mask R-CNN) runs eager"),
])
def test_cli_refuses_an_unusable_backend(args, message, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["infer", "--store", str(tmp_path / "x.zarr"), "--model", "m.pt", *args])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output


def test_backend_is_not_in_the_digest():
    assert "backend" not in EngineConfig(backend="openvino").result_fields()
