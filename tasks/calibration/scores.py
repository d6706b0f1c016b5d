"""Calibration scores of probability maps, accumulated chunk by chunk: ECE, Brier score, NLL.

ECE (expected calibration error; Guo et al. 2017, "On Calibration of Modern Neural Networks",
ICML, eq. 3; Naeini et al. 2015): the top-label confidence ``max_k p_k`` of every pixel falls in
one of 15 equal-width bins on [0, 1]; ECE = sum over bins of (n_b / N) * |accuracy_b - confidence_b|.
Bin edge convention: bin i holds confidences in [i/15, (i+1)/15) (left-closed), the last bin is
closed, [14/15, 1]; edges are the correctly rounded doubles i/15, and float32 inputs are widened to
float64 before binning.

Brier score (Brier 1950, multi-class form): mean over pixels of sum_k (p_k - y_k)^2, y one-hot.
For two classes this is twice scikit-learn's binary ``brier_score_loss`` (which scores p_1 only).
NLL: mean over pixels of -log(max(p_y, 1e-7)).

The state is per-bin sums (count, confidence, correct) plus the Brier and NLL sums, all float64 /
int64: accumulating chunk by chunk equals one pass over everything up to float rounding of the
sums, and two accumulators ``merge`` (Dask, several scans).
"""

from __future__ import annotations

import numpy as np

from tasks.errors import ScanError

EPS = 1e-7


class CalibrationError(ScanError):
    """A calibration input that cannot be used (constant scores, one class, NaN), in one line."""

    def __init__(self, problem: str, where: object = "calibration"):
        super().__init__(where, problem)


def _as_two_class(probs: np.ndarray) -> np.ndarray:
    """(1, N) foreground probabilities -> (2, N) [1 - p, p]; (K >= 2, N) unchanged."""
    if probs.shape[0] == 1:
        return np.concatenate([1.0 - probs, probs])
    return probs


class ReliabilityBins:
    """Streaming reliability bins and proper scores of (K, N) probabilities against (N,) labels."""

    def __init__(self, bins: int = 15):
        if bins < 1:
            raise ValueError(f"bins must be at least 1, got {bins}")
        self.bins = int(bins)
        self.edges = np.arange(self.bins + 1, dtype=np.float64) / self.bins
        # Sums of pixel weights (1 per pixel unless ``update`` is given weights), per bin:
        self.count = np.zeros(self.bins, np.float64)  # weight of the pixels in the bin
        self.confidence = np.zeros(self.bins, np.float64)  # weighted top-label confidences
        self.correct = np.zeros(self.bins, np.float64)  # weight of the pixels whose top label is right
        self.brier_sum = 0.0
        self.nll_sum = 0.0
        self.weight = 0.0
        self.pixels = 0

    def bin_of(self, confidence: np.ndarray) -> np.ndarray:
        """Bin index of each confidence: i where i/B <= c < (i+1)/B, the last bin closed at 1."""
        idx = np.searchsorted(self.edges, confidence, side="right") - 1
        return np.clip(idx, 0, self.bins - 1)

    def update(self, probs: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None,
               where: object = "probabilities") -> "ReliabilityBins":
        """Add pixels: ``probs`` (K, N) class probabilities (K == 1: foreground probability of a
        binary model), ``labels`` (N,) class indices in [0, K) (or {0, 1} for K == 1). ``weights``
        (N,), optional: a stratified sample's inverse inclusion rates, so scores estimate the population's."""
        probs = np.asarray(probs, dtype=np.float64)
        labels = np.asarray(labels).reshape(-1)
        if probs.ndim != 2 or probs.shape[1] != labels.size:
            raise CalibrationError(f"probabilities of shape {probs.shape} do not match {labels.size} labels", where)
        if labels.size == 0:
            return self
        if np.isnan(probs).any():
            raise CalibrationError(f"probabilities contain NaN ({int(np.isnan(probs).any(0).sum())} pixels)", where)
        probs = _as_two_class(probs)
        k = probs.shape[0]
        labels = labels.astype(np.int64)
        if labels.min() < 0 or labels.max() >= k:
            raise CalibrationError(f"labels hold values outside [0, {k - 1}] (min {labels.min()}, "
                                   f"max {labels.max()})", where)
        w = np.ones(labels.size) if weights is None else np.asarray(weights, np.float64).reshape(-1)
        if w.size != labels.size or not np.isfinite(w).all() or (w < 0).any():
            raise CalibrationError(f"weights must be {labels.size} finite values >= 0", where)
        cols = np.arange(labels.size)
        top = probs.argmax(0)
        conf = probs[top, cols]
        idx = self.bin_of(conf)
        self.count += np.bincount(idx, weights=w, minlength=self.bins)
        self.confidence += np.bincount(idx, weights=w * conf, minlength=self.bins)
        self.correct += np.bincount(idx, weights=w * (top == labels), minlength=self.bins)
        p_true = probs[labels, cols]
        # sum_k (p_k - y_k)^2 = sum_k p_k^2 - 2 p_y + 1
        self.brier_sum += float((w * ((probs ** 2).sum(0) - 2.0 * p_true + 1.0)).sum())
        self.nll_sum += float((w * -np.log(np.maximum(p_true, EPS))).sum())
        self.weight += float(w.sum())
        self.pixels += labels.size
        return self

    def merge(self, other: "ReliabilityBins") -> "ReliabilityBins":
        """Add another accumulator's pixels (same bin count) to this one."""
        if other.bins != self.bins:
            raise ValueError(f"cannot merge {other.bins} bins into {self.bins}")
        self.count += other.count
        self.confidence += other.confidence
        self.correct += other.correct
        self.brier_sum += other.brier_sum
        self.nll_sum += other.nll_sum
        self.weight += other.weight
        self.pixels += other.pixels
        return self

    def accuracy_per_bin(self) -> np.ndarray:
        """Fraction of correct top labels per bin (NaN for empty bins)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.correct / np.maximum(self.count, 1), np.nan)

    def confidence_per_bin(self) -> np.ndarray:
        """Mean top-label confidence per bin (NaN for empty bins)."""
        return np.where(self.count > 0, self.confidence / np.maximum(self.count, 1), np.nan)

    def scores(self) -> dict:
        """{"ece", "brier", "nll", "pixels"}; NaN scores when no pixel was added."""
        if self.weight <= 0:
            return {"ece": float("nan"), "brier": float("nan"), "nll": float("nan"), "pixels": int(self.pixels)}
        gap = np.abs(self.correct - self.confidence)  # n_b * |acc_b - conf_b|
        return {"ece": float(gap.sum() / self.weight), "brier": self.brier_sum / self.weight,
                "nll": self.nll_sum / self.weight, "pixels": int(self.pixels)}
