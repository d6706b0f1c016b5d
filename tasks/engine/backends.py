"""CPU inference backends for the engine's model calls: eager PyTorch (the default) or another
runtime that runs the same network faster on a CPU.

A backend turns the module into a function of one (B, C, *tile) float32 CPU tensor that returns
the (B, K, *tile) logits tensor (the ``out`` entry of a dict output, the first of a tuple). It is
built once per :class:`~tasks.engine.runner.ModelRunner`, on the first batch, for that batch's
tile shape; the batch axis stays dynamic (the last, partial batch and the TTA flips reuse it).

* ``eager``:    the module itself.
* ``openvino``: the module exported to ONNX (``torch.onnx.export``, dynamic batch axis) into a
                temporary file, compiled by OpenVINO for the CPU with float32 inference precision
                (OpenVINO would otherwise pick bf16 on CPUs with AMX / AVX512-BF16) and torch's
                thread count.
* ``onnx``:     the same ONNX file run by ONNX Runtime's CPU provider. Measured, not offered: no
                faster than eager on the U-Nets (``benchmarks/backends.py``).
* ``compile``:  ``torch.compile(module)`` (inductor; needs a C++ compiler). Measured, not offered:
                slower than eager on the 3D U-Net and DeepLab, and a 40-50 s compile per run.

``OFFERED`` lists the backends the engine accepts; the others stay for the benchmark (the bar:
>= 1.3x eager's speed on the main models, results within 1e-3 of eager's). OpenVINO runs on the
CPU only, in float32, without channels-last; asking for a GPU, ``amp`` or ``channels_last`` with
it is an error, not a silent fallback. Its logits differ from eager's by up to ~3e-4 of their
scale (2e-3 on the 3D U-Net's logits of magnitude 7; 1.3e-4 on the probabilities written).
Measured gain (benchmarks/backends.py, 2 shared cores): 1.4-1.6x on DeepLab v3+ always, and
1.5-1.7x on the U-Nets at 1 thread; at 2 threads on the U-Nets only when the CPU is contended
(eager's OpenMP threads then stall), none on a quiet CPU for the 3D U-Net (0.86x).

Exports are cached per (module, backend, tile shape, channels) for the life of the module, so
the runs of one process over many scans (the nightly, a Dask worker) export once.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from typing import Callable

BACKENDS = ("eager", "compile", "onnx", "openvino")
OFFERED = ("eager", "openvino")
_PACKAGES = {"onnx": ("onnxruntime", "onnx", "onnxscript"), "openvino": ("openvino", "onnx", "onnxscript")}
_EXTRA = {"onnx": "onnx", "openvino": "openvino"}


class BackendError(ValueError):
    """A backend that is unknown, not installed, not combinable with the other options, or that
    could not convert the model. The message is one line and names the option."""


def check_backend(name: str, *, device: str | None = None, amp: str = "none",
                  channels_last: bool = False) -> None:
    """Raise :class:`BackendError` unless ``name`` is offered, installed and fits the options."""
    if name not in OFFERED:
        hint = " (measured, did not pass the bar: see benchmarks/backends.py)" if name in BACKENDS else ""
        raise BackendError(f"--backend {name!r} is not offered{hint}; choose one of: {', '.join(OFFERED)}")
    if name == "eager":
        return
    import importlib.util

    missing = [p for p in _PACKAGES.get(name, ()) if importlib.util.find_spec(p) is None]
    if missing:
        raise BackendError(f"--backend {name} needs {', '.join(missing)}: "
                           f"pip install 'tilewise[{_EXTRA[name]}]'")
    if device not in (None, "cpu") and not str(device).startswith("cpu"):
        raise BackendError(f"--backend {name} runs on the CPU only; got --device {device}")
    if amp != "none":
        raise BackendError(f"--backend {name} runs in float32; --amp {amp} needs --backend eager")
    if channels_last:
        raise BackendError(f"--backend {name} does not take --channels-last (eager only)")


_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def build_forward(name: str, module, example) -> Callable:
    """A function of (B, C, *tile) float32 CPU tensors for backend ``name``, converted for the
    tile shape of ``example``; cached per module, backend and (C, *tile)."""
    if name == "eager":
        return module
    key = (name, tuple(example.shape[1:]))
    try:
        per_module = _cache.setdefault(module, {})
    except TypeError:  # not weak-referenceable: no cache
        per_module = {}
    if key not in per_module:
        per_module[key] = _BUILDERS[name](module, example)
    return per_module[key]


def _compile(module, example):
    import torch

    return torch.compile(module)


class _FirstOutput:
    """The module's logits as its only output: ONNX flattens a dict or tuple into several."""

    def __new__(cls, module):
        import torch

        class FirstOutput(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                out = self.inner(x)
                if isinstance(out, dict):
                    out = out["out"] if "out" in out else next(iter(out.values()))
                elif isinstance(out, (tuple, list)):
                    out = out[0]
                return out

        return FirstOutput(module).eval()


def export_onnx(module, example, path: str) -> None:
    """Export ``module`` to ONNX at ``path`` with a dynamic batch axis. An ``nn.Module`` goes
    through the dynamo exporter; a TorchScript module (``torch.jit.load``) through the TorchScript
    exporter, the only one that takes it."""
    import torch

    from models.quiet import ignore_warnings, quiet

    scripted = isinstance(module, torch.jit.ScriptModule)
    wrapped = module if scripted else _FirstOutput(module)
    x = example[:1].contiguous()
    # The exporters' own warnings (their passes, the legacy exporter's deprecation) ignored by
    # named filters, not under catch_warnings: see models.quiet.
    ignore_warnings(Warning, module=r"torch\.onnx")
    ignore_warnings(DeprecationWarning, r"You are using the legacy TorchScript-based ONNX export")
    try:
        with quiet():
            if scripted:
                torch.onnx.export(wrapped, (x,), path, input_names=["x"], output_names=["y"], dynamo=False,
                                  dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17)
            else:
                torch.onnx.export(wrapped, (x,), path, input_names=["x"], output_names=["y"], dynamo=True,
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
                                  opset_version=18, verbose=False)
    except Exception as exc:  # noqa: BLE001 - any exporter failure is the same one-line error
        import re

        first = re.sub(r"\x1b\[[0-9;]*m", "", (str(exc).strip().splitlines() or [""])[0])[:200]
        raise BackendError(f"--backend: ONNX export of the model failed ({type(exc).__name__}: {first})") from None


def _exported(module, example) -> str:
    fd, path = tempfile.mkstemp(prefix="tilewise-", suffix=".onnx")
    os.close(fd)
    export_onnx(module, example, path)
    return path


def _onnx(module, example):
    import onnxruntime as ort
    import torch

    path = _exported(module, example)
    try:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    finally:
        _unlink(path)

    def forward(x):
        return torch.from_numpy(session.run(None, {"x": x.detach().numpy()})[0])

    return forward


def _openvino(module, example):
    import openvino as ov
    import torch

    path = _exported(module, example)
    try:
        core = ov.Core()
        compiled = core.compile_model(core.read_model(path), "CPU",
                                      {"INFERENCE_PRECISION_HINT": "f32",
                                       "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    finally:
        _unlink(path)
    request = compiled.create_infer_request()

    def forward(x):
        # the request owns its output buffer: copy it before the next call overwrites it
        return torch.from_numpy(request.infer({0: x.detach().numpy()})[0].copy())

    return forward


def _unlink(path: str) -> None:
    for p in (path, path + ".data"):
        try:
            os.unlink(p)
        except OSError:
            pass


_BUILDERS = {"compile": _compile, "onnx": _onnx, "openvino": _openvino}
