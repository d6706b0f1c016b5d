"""Running the network on batches of tiles: device, mixed precision, flip TTA, output checks."""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
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
        self._lock = threading.Lock()  # lanes (``Lanes``) call the runner from two threads

    def _forward(self, x):
        torch = self.torch
        with self._lock:
            if self._fn_shape != tuple(x.shape[1:]):
                from tasks.engine.backends import build_forward

                self._fn, self._fn_shape = build_forward(self.backend, self.module, x), tuple(x.shape[1:])
            fn = self._fn
        out = fn(x)
        if isinstance(out, dict):
            out = out["out"] if "out" in out else next(iter(out.values()))
        elif isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise ModelOutputError(f"model returned {type(out).__name__}, expected a tensor (B, K, ...)")
        return out

    def __call__(self, batch: np.ndarray, where: str = "", *, pad: int = 0) -> np.ndarray:
        """The batch's logits; its last ``pad`` tiles are copies that fill a lane's part (``Lanes``):
        run, but neither counted nor returned."""
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
        with self._lock:
            self.calls += batch.shape[0] - pad
        out = logits.cpu().numpy()
        return out[:len(out) - pad] if pad else out

    def _check(self, out, x, where: str) -> None:
        if not out.is_floating_point():
            raise ModelOutputError(f"model output has dtype {out.dtype}, expected floating point logits{where}")
        want = "(" + ", ".join([str(x.shape[0]), "K", *(str(n) for n in x.shape[2:])]) + ")"
        if out.ndim != x.ndim or out.shape[0] != x.shape[0] or tuple(out.shape[2:]) != tuple(x.shape[2:]):
            raise ModelOutputError(f"model output has shape {tuple(out.shape)}, expected {want}{where}")


CPU_LANES_ENV = "TILEWISE_CPU_LANES"


def cpu_lanes(runner: ModelRunner, batch: int) -> int:
    """How many lanes a batch is split over (``Lanes``): on a CPU, with the eager backend and two or
    more intra-op threads, ``TILEWISE_CPU_LANES`` (default 2; at most the threads and the batch);
    else 1 (a GPU queues its own work; ONNX Runtime and OpenVINO size their own threads)."""
    if runner.device.type != "cpu" or runner.backend != "eager" or runner.torch.get_num_threads() < 2:
        return 1
    try:
        wanted = int(os.environ.get(CPU_LANES_ENV, "2"))
    except ValueError:
        wanted = 2
    return max(1, min(wanted, runner.torch.get_num_threads(), batch))


class Lanes:
    """Runs the model's batches over ``n`` lanes at once, each lane a thread with ``threads // n`` of
    torch's intra-op threads (restored on exit). ``submit`` queues a batch and returns at once;
    ``result()`` of what it returns gives the batch's logits, in its order.

    On a CPU one forward over every core synchronises its threads at each operator, and any other
    thread of the engine (reads, blending, encodes) that takes a core for a moment stalls them all.
    Parts of a batch on one thread each do not: on 2 cores the engine ran the 2D U-Net over 4096^2
    in 6.45-6.58 s against 7.2-7.95 s, the 3D U-Net over 256^3 in 17.7-17.9 s against 18.8-20.0 s.
    With ``depth`` batches queued, a lane that a side thread slowed down leaves the next batch's
    parts to the other lane instead of idling it until the batch's end: 2D 6.4-8.5 s -> 6.0-6.9 s
    (seven alternating pairs), 3D unchanged (docs/limits.md).

    Every part has the same size, ``ceil(batch / n)`` tiles, a short one filled with copies of its
    last tile: a forward's rounding depends on the batch's size, so a tile's logits are then the
    same whatever batch it fell in (nodata tiles skipped, a region, a stripe's last batch).
    ``n`` = 1 runs in the calling thread on every thread, one batch at a time.
    """

    def __init__(self, runner: ModelRunner, n: int, batch: int):
        self.runner, self.n = runner, max(1, n)
        self.part = -(-max(1, batch) // self.n)
        self.depth = 2 if self.n > 1 else 1  # batches in flight: the next one queued behind
        self._pool: ThreadPoolExecutor | None = None
        self._threads = 0

    def __enter__(self) -> "Lanes":
        if self.n > 1:
            torch = self.runner.torch
            self._threads = torch.get_num_threads()
            # per thread (OpenMP): each lane sets its own count when it starts
            self._pool = ThreadPoolExecutor(self.n, thread_name_prefix="tilewise-lane",
                                            initializer=torch.set_num_threads,
                                            initargs=(max(1, self._threads // self.n),))
        return self

    def submit(self, batch: np.ndarray, where: str = "") -> "_Logits":
        """The batch queued over the lanes (with one lane: run now)."""
        if self._pool is None:
            done: Future = Future()
            try:
                done.set_result(self.runner(batch, where=where))
            except Exception as exc:  # raised by result(), as a lane's is
                done.set_exception(exc)
            return _Logits([done])
        parts = []
        for start in range(0, len(batch), self.part):
            part = batch[start:start + self.part]
            pad = self.part - len(part)
            if pad:
                part = np.concatenate([part, np.repeat(part[-1:], pad, axis=0)])
            parts.append(self._pool.submit(self.runner, part, where=where, pad=pad))
        return _Logits(parts)

    def run(self, batch: np.ndarray, where: str = "") -> np.ndarray:
        """The batch's logits, in its order (a lane's error is raised here)."""
        return self.submit(batch, where).result()

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self.runner.torch.set_num_threads(self._threads)


class _Logits:
    """A batch's logits, in order, from the futures of its parts (one part with one lane)."""

    def __init__(self, parts: list[Future]):
        self.parts = parts

    def result(self) -> np.ndarray:
        wait_futures(self.parts)  # every part done, even after one failed: no lane left on it
        out = [p.result() for p in self.parts]
        return out[0] if len(out) == 1 else np.concatenate(out)
