"""The calibration maps: fit on (K, N) probabilities and labels, apply to (K, *spatial) maps.

- ``cubic``: the ISBI 2012 winner's monotone cubic (``cubic.py``) on the foreground score.
- ``isotonic``: isotonic regression (Zadrozny & Elkan 2002) with scikit-learn, stored as its
  breakpoints and applied by linear interpolation (``np.interp``, constant beyond the ends, as
  ``IsotonicRegression(out_of_bounds="clip")`` predicts).
- ``temperature``: temperature scaling (Guo et al. 2017): softmax(z / T). The stored maps are
  softmax outputs, so log p = z - logsumexp(z) and softmax(log p / T) == softmax(z / T): the same map
  without the logits. T is found by a bounded 1-D search on log T minimising the (weighted) NLL.
- ``ovr-cubic``: one monotone cubic per class (class k against the rest), then renormalised.
- ``identity``: the probabilities as they are (what ``auto`` keeps when nothing beats them).

Binary methods (cubic, isotonic) act on the foreground score: p[1] for K == 2 (p[0] = 1 - p[1]),
p[0] for K == 1 (a sigmoid output).
"""

from __future__ import annotations

import numpy as np

from tasks.calibration.cubic import cubic_apply, fit_monotone_cubic
from tasks.calibration.scores import CalibrationError

BINARY = ("cubic", "isotonic")
METHODS = ("cubic", "isotonic", "temperature", "ovr-cubic", "identity")
TINY = float(np.finfo(np.float32).tiny)
LOG_T_BOUNDS = (np.log(0.02), np.log(50.0))


def foreground_index(k: int) -> int:
    return 0 if k == 1 else 1


def _log_probs(probs: np.ndarray) -> np.ndarray:
    """(K, ...) probabilities -> log-probabilities of (2, ...) [1 - p, p] for K == 1, else (K, ...)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.shape[0] == 1:
        p = np.concatenate([1.0 - p, p])
    return np.log(np.maximum(p, TINY))


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=0, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=0, keepdims=True)
    return z


def fit_temperature(probs: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    """T minimising the weighted NLL of softmax(log p / T) over pixels; ``probs`` (K, N)."""
    from scipy.optimize import minimize_scalar

    logp = _log_probs(probs)
    cols = np.arange(labels.size)
    w = weights / weights.sum()

    def nll(log_t: float) -> float:
        z = logp / np.exp(log_t)
        z = z - z.max(axis=0, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=0))
        return float((w * (lse - z[labels, cols])).sum())

    res = minimize_scalar(nll, bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-6})
    return float(np.exp(res.x))


def fit_method(method: str, probs: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> dict:
    """Parameters of ``method`` fitted on ``probs`` (K, N) float, ``labels`` (N,) int, ``weights`` (N,)."""
    k = probs.shape[0]
    if method in BINARY and k > 2:
        raise CalibrationError(f"'{method}' calibrates a binary output; this model has {k} classes "
                               "(use temperature or ovr-cubic)")
    if method == "identity":
        return {}
    if method == "temperature":
        return {"temperature": fit_temperature(probs, labels, weights)}
    if method == "ovr-cubic":
        coeffs = [fit_monotone_cubic(probs[c], labels == c, weights).tolist() for c in range(k)]
        return {"coefficients": coeffs}
    score = probs[foreground_index(k)]
    target = (labels == 1).astype(np.float64)
    if method == "cubic":
        return {"coefficients": fit_monotone_cubic(score, target, weights).tolist()}
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0, increasing=True)
        iso.fit(np.asarray(score, np.float64), target, sample_weight=weights)
        return {"x": iso.X_thresholds_.tolist(), "y": iso.y_thresholds_.tolist()}
    raise CalibrationError(f"unknown calibration method '{method}' (one of {', '.join(METHODS)})")


def apply_method(method: str, params: dict, probs: np.ndarray) -> np.ndarray:
    """Calibrated (K, *spatial) float32 probabilities (summing to 1 per pixel for K >= 2)."""
    probs = np.asarray(probs)
    k = probs.shape[0]
    if method == "identity":
        return probs.astype(np.float32, copy=False)
    if method == "temperature":
        out = _softmax(_log_probs(probs) / params["temperature"])
        return (out[1:] if k == 1 else out).astype(np.float32)
    if method == "ovr-cubic":
        out = np.stack([cubic_apply(c, probs[i]) for i, c in enumerate(params["coefficients"])])
        out = np.maximum(out, 1e-7)  # every class keeps a little mass, so the sum is never 0
        return (out / out.sum(axis=0, keepdims=True)).astype(np.float32)
    if method not in BINARY:
        raise CalibrationError(f"unknown calibration method '{method}' (one of {', '.join(METHODS)})")
    if k > 2:
        raise CalibrationError(f"'{method}' calibrator is binary; these probabilities have {k} classes")
    score = probs[foreground_index(k)]
    if method == "cubic":
        fg = cubic_apply(params["coefficients"], score)
    else:
        fg = np.interp(np.asarray(score, np.float64), params["x"], params["y"])
    fg = fg.astype(np.float32)
    return fg[None] if k == 1 else np.stack([np.float32(1.0) - fg, fg])
