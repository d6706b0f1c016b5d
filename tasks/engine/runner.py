"""Running the network on batches of tiles: device, mixed precision, flip TTA, output checks."""

from __future__ import annotations

import itertools
from typing import Literal

import numpy as np

AmpMode = Literal["bf16", "fp16", "none"]


class ModelOutputError(Exception):
    """The model's output is unusable; the engine reports it against the scan's store."""


def pick_device(requested: str | None) -> str:
    import torch

    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


class ModelRunner:
    """Calls ``module`` on (B, C, *tile) float32 batches and returns (B, K, *tile) float32 logits.

    ``squeeze_axis``: a 2D model over a 3D scan gets tiles of depth 1; that axis is dropped before
    the call and restored after. The output is checked: a dict (torchvision segmentation models)
    gives its ``out`` entry; shape must be (B, K, *tile); NaN or Inf is an error, not a result.
    """

    def __init__(self, module, *, device: str | None = None, amp: AmpMode = "none", tta: bool = False,
                 channels_last: bool = False, squeeze_axis: int | None = None, backend: str = "eager"):
        import torch

        from tasks.engine.backends import check_backend

        check_backend(backend, device=device, amp=amp, channels_last=channels_last)
        self.torch = torch
        self.device = torch.device(pick_device(device))
        self.module = module.to(self.device).eval()
        self.backend = backend
        self._fn, self._fn_shape = None, None  # the backend's forward, built for a (C, *tile) shape
        self.amp = amp
        self.tta = tta
        self.channels_last = channels_last
        self.squeeze_axis = squeeze_axis
        self.calls = 0  # tiles through the model (TTA flips not counted)

    def _forward(self, x):
        torch = self.torch
        if self._fn_shape != tuple(x.shape[1:]):
            from tasks.engine.backends import build_forward

            self._fn, self._fn_shape = build_forward(self.backend, self.module, x), tuple(x.shape[1:])
        out = self._fn(x)
        if isinstance(out, dict):
            out = out["out"] if "out" in out else next(iter(out.values()))
        elif isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise ModelOutputError(f"model returned {type(out).__name__}, expected a tensor (B, K, ...)")
        return out

    def __call__(self, batch: np.ndarray, where: str = "") -> np.ndarray:
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(batch))
        if self.squeeze_axis is not None:
            x = x.squeeze(self.squeeze_axis)
        spatial_dims = x.ndim - 2
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and spatial_dims in (2, 3):
            x = x.contiguous(memory_format=torch.channels_last if spatial_dims == 2 else torch.channels_last_3d)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)
        flips = [()]
        if self.tta:
            axes = range(2, 2 + spatial_dims)
            flips = [c for r in range(spatial_dims + 1) for c in itertools.combinations(axes, r)]
        total = None
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=dtype or torch.float32,
                                                    enabled=dtype is not None):
            for axes in flips:
                xi = torch.flip(x, axes) if axes else x
                out = self._forward(xi)
                self._check(out, x, where)
                out = out.float()
                out = torch.flip(out, axes) if axes else out
                total = out if total is None else total + out
        logits = total / len(flips) if len(flips) > 1 else total
        # the sum is finite only if every value is (cheap); the full check never runs on good output
        if not bool(torch.isfinite(logits.sum())) and not bool(torch.isfinite(logits).all()):
            raise ModelOutputError(f"model produced NaN or Inf logits{where}")
        if self.squeeze_axis is not None:
            logits = logits.unsqueeze(self.squeeze_axis)
        self.calls += batch.shape[0]
        return logits.cpu().numpy()

    def _check(self, out, x, where: str) -> None:
        if not out.is_floating_point():
            raise ModelOutputError(f"model output has dtype {out.dtype}, expected floating point logits{where}")
        want = "(" + ", ".join([str(x.shape[0]), "K", *(str(n) for n in x.shape[2:])]) + ")"
        if out.ndim != x.ndim or out.shape[0] != x.shape[0] or tuple(out.shape[2:]) != tuple(x.shape[2:]):
            raise ModelOutputError(f"model output has shape {tuple(out.shape)}, expected {want}{where}")
