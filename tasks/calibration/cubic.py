"""The ISBI 2012 winner's calibration: a monotone cubic polynomial fitted by least squares from the
network's foreground score to the label (Ciresan, Giusti, Gambardella, Schmidhuber 2012, "Deep
Neural Networks Segment Neuronal Membranes in Electron Microscopy Images", NIPS, section 2.3).

The cubic is written in Bernstein form on [0, 1],

    f(s) = sum_{i=0..3} c_i * C(3, i) * s^i * (1 - s)^(3 - i),

whose derivative is f'(s) = 3 * sum_{i=0..2} (c_{i+1} - c_i) * C(2, i) * s^i * (1 - s)^(2 - i).
With 0 <= c_0 <= c_1 <= c_2 <= c_3 <= 1 the derivative's Bernstein coefficients are >= 0, so f is
non-decreasing on the whole of [0, 1] (not only on a grid), and f(s) lies in [c_0, c_3] within [0, 1]
(a Bernstein polynomial lies in the convex hull of its coefficients).

The fit minimises sum_j w_j (f(s_j) - y_j)^2 under those five inequalities. scipy's ``lsq_linear``
takes bounds only, so the exact constrained optimum is found by a short cascade of bounded problems
(``method="bvls"``, an exact active-set solver): relax the top constraint c_3 <= 1 (increments
d_i >= 0); if the optimum breaks it, an optimum has c_3 = 1 (convexity: the segment from any
constrained optimum to the relaxed one stays feasible up to c_3 = 1 and never gets worse), so fix it
and relax c_0 >= 0 instead; and so on, at most four bounded solves.
"""

from __future__ import annotations

import numpy as np

BINOMIAL = np.array([1.0, 3.0, 3.0, 1.0])


def bernstein_basis(s: np.ndarray) -> np.ndarray:
    """(N, 4) degree-3 Bernstein basis at scores ``s`` (clipped to [0, 1])."""
    s = np.clip(np.asarray(s, dtype=np.float64).reshape(-1), 0.0, 1.0)
    i = np.arange(4)
    return BINOMIAL * s[:, None] ** i * (1.0 - s[:, None]) ** (3 - i)


def derivative_coefficients(coeffs: np.ndarray) -> np.ndarray:
    """Bernstein coefficients (degree 2) of f'(s): 3 * (c_{i+1} - c_i)."""
    return 3.0 * np.diff(np.asarray(coeffs, dtype=np.float64))


def cubic_apply(coeffs: np.ndarray, s: np.ndarray) -> np.ndarray:
    """f(s) for scores ``s`` of any shape (clipped to [0, 1]), float64, by de Casteljau's algorithm."""
    s = np.clip(np.asarray(s, dtype=np.float64), 0.0, 1.0)
    b = [np.full_like(s, c) for c in np.asarray(coeffs, dtype=np.float64)]
    for level in range(3, 0, -1):
        b = [(1.0 - s) * b[i] + s * b[i + 1] for i in range(level)]
    return b[0]


def _solve(basis: np.ndarray, y: np.ndarray, fixed: np.ndarray, to_c: np.ndarray, lower, upper) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients c = fixed + to_c @ v with v in [lower, upper] minimising ||basis @ c - y||^2."""
    from scipy.optimize import lsq_linear

    a = basis @ to_c
    if a.shape[1] == 0:
        return fixed.copy(), np.zeros(0)
    v = lsq_linear(a, y - basis @ fixed, bounds=(lower, upper), method="bvls").x
    # bvls may return a bound as -1e-17: clip, so the increments are exactly non-negative and the
    # coefficients built from them exactly non-decreasing (seen: diff -1.4e-17 on a fresh clone).
    v = np.clip(v, lower, upper)
    return fixed + to_c @ v, v


def fit_monotone_cubic(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """The four Bernstein coefficients 0 <= c_0 <= ... <= c_3 <= 1 of the weighted least-squares
    monotone cubic from ``scores`` (N,) in [0, 1] to ``labels`` (N,) in {0, 1} (see module docstring)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    w = np.ones_like(s) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    root = np.sqrt(w / w.mean())
    basis = bernstein_basis(s) * root[:, None]
    y = y * root
    inf = np.inf
    # 1. c = cumsum(d), d >= 0: c_0 >= 0 and monotone; c_3 <= 1 relaxed.
    lower_tri = np.tril(np.ones((4, 4)))
    _, d = _solve(basis, y, np.zeros(4), lower_tri, np.zeros(4), np.full(4, inf))
    c = np.cumsum(d)
    if c[3] <= 1.0:
        return c
    # 2. c_3 = 1, c_i = c_{i+1} - e_{i+1}, e >= 0: monotone; c_0 >= 0 relaxed.
    from_top = np.array([[-1.0, -1.0, -1.0], [0.0, -1.0, -1.0], [0.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    _, e = _solve(basis, y, np.ones(4), from_top, np.zeros(3), np.full(3, inf))
    c = np.array([1.0, 1.0, 1.0, 1.0])
    for i in (2, 1, 0):
        c[i] = c[i + 1] - e[i]
    if c[0] >= 0.0:
        return c
    # 3. c_0 = 0, c_3 = 1, c_1 = d_1, c_2 = d_1 + d_2, d >= 0: c_2 <= 1 relaxed.
    middle = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    _, d = _solve(basis, y, np.array([0.0, 0.0, 0.0, 1.0]), middle, np.zeros(2), np.full(2, inf))
    c = np.array([0.0, d[0], d[0] + d[1], 1.0])
    if c[2] <= 1.0:
        return c
    # 4. c_0 = 0, c_2 = c_3 = 1, c_1 in [0, 1]: a box.
    _, v = _solve(basis, y, np.array([0.0, 0.0, 1.0, 1.0]), np.array([[0.0], [1.0], [0.0], [0.0]]),
                  np.zeros(1), np.ones(1))
    return np.array([0.0, float(v[0]), 1.0, 1.0])
