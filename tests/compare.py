"""Comparing results of two implementations of the same float computation.

Two implementations (MONAI and tilewise, one process and two Dask workers) agree to about 1e-7, not
bit for bit: summation order and threading differ. Where two classes' probabilities are within that
of each other, argmax may pick either, and both are right. So labels are compared only where the
reference's top-two margin exceeds the numeric tolerance; the test says how many pixels that excludes.
"""

from __future__ import annotations

import numpy as np


def top_two_margin(probs: np.ndarray) -> np.ndarray:
    """(K, *spatial) probabilities -> (*spatial) difference between the largest and second largest."""
    if probs.shape[0] < 2:
        return np.full(probs.shape[1:], np.inf, dtype=np.float64)
    part = np.partition(probs.astype(np.float64), -2, axis=0)
    return part[-1] - part[-2]


def assert_labels_equal_where_decided(labels: np.ndarray, ref_labels: np.ndarray, ref_probs: np.ndarray,
                                      tol: float, max_undecided: float = 1e-3) -> None:
    """``labels == ref_labels`` wherever ``ref_probs``' top-two margin exceeds ``tol``; the pixels left
    out (near-ties) must be rare (at most ``max_undecided`` of them), or the comparison means nothing."""
    decided = top_two_margin(ref_probs) > tol
    assert decided.mean() >= 1 - max_undecided, f"{(~decided).sum()} near-ties of {decided.size} pixels"
    np.testing.assert_array_equal(labels[decided], ref_labels[decided])
