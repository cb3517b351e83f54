"""FAVOR+ positive softmax features of a block of rows, and their derivative (Numba).

For rows x (R, D) and the (m, D) random features ω (tinyeff.ops.feature_maps.favor_softmax):

    x̂ = √scale · x,   a = x̂ ωᵀ − ‖x̂‖²/2  (m),   c = max_f a_f,   f = exp(a − c),   ℓ = c − ½ ln m
    dx = √scale (da ω − (Σ_f da_f) x̂),   da = df ∘ f      (the shift c held constant)

(da ω and Σ_f da_f as one product, da [ω | 1])

row by row in tasks of ``rows`` rows: one ``np.dot`` per task for x̂ ωᵀ (or da ω) and one
pass over the task's (rows, m) block for the shift and the vectorizable ``fast_exp``
(kernels/_math.py), where NumPy makes five passes over the whole array on one thread.  The
features are :func:`tinyeff.kernels.favor_noncausal._features`, the non-causal FAVOR+
kernels' own.  Used by the causal chunked path of
tinyeff.attention._linear_engine (features of a chunk of rows, recomputed in the backward;
the backward's dq forms the features of its rows in the same task as their dx).
Both run through one task kernel (``grad`` selects the branch), which compiles once.
Tasks write disjoint rows and the blocks depend on ``rows`` only, so results are
bit-identical whatever the number of threads (the caller pins BLAS to one thread).
"""

from __future__ import annotations

import numpy as np

from ._jit import run_tasks, serial
from .favor_noncausal import _features

__all__ = ["favor_features", "favor_dx"]


@serial
def _rows_tasks(lo, hi, grad, dx, f, ell, df, x, omega, omega_t, root, half_log_m, rows):
    """Tasks lo … hi − 1 (rows task·rows … (task + 1)·rows − 1) of :func:`favor_features`
    (grad False: f, ell) or of :func:`favor_dx` (grad True: dx from df, and f, or with an
    empty f the features formed here, task by task).  One kernel for both, so that the path
    compiles one."""
    n, d = x.shape
    nf = omega.shape[0]
    xh = np.empty((rows, d), dtype=x.dtype)                        # (T, D) x̂
    dxa = np.empty((rows, omega.shape[1]), dtype=x.dtype)          # (T, D + 1)
    form = grad and f.shape[0] == 0                                # features formed here
    fs = np.empty((rows if form else 0, nf), dtype=x.dtype)        # (T, m) their f
    es = np.empty(rows if form else 0, dtype=x.dtype)              # (T) their ℓ
    for task in range(lo, hi):
        r0 = task * rows
        r1 = min(r0 + rows, n)
        if not grad:
            _features(f[r0:r1], ell[r0:r1], xh[:r1 - r0], x[r0:r1], omega_t, root,
                      half_log_m)
            continue
        if form:
            ft = fs[:r1 - r0]
            _features(ft, es[:r1 - r0], xh[:r1 - r0], x[r0:r1], omega_t, root, half_log_m)
        else:
            ft = f[r0:r1]
        da = df[r0:r1]
        for t in range(r1 - r0):
            for u in range(da.shape[1]):
                da[t, u] = da[t, u] * ft[t, u]                     # fwd: f = exp(a − c)
        # fwd: a = x̂ ωᵀ − ‖x̂‖²/2:  [da ω, Σ_f da_f] in one product with ω' = [ω | 1]
        np.dot(da, omega, dxa[:r1 - r0])
        for t in range(r1 - r0):
            s = dxa[t, d]
            for e in range(d):                                     # fwd: x̂ = √scale · x
                dx[r0 + t, e] = (dxa[t, e] - s * (x[r0 + t, e] * root)) * root


def favor_features(f, ell, x, omega, omega_t, root, half_log_m, rows):
    """f (R, m), ell (R): outputs, the features and log-scales of the rows of x (R, D).

    omega (m, D + 1) = [ω | 1], omega_t (D, m) = ωᵀ, root = √scale, half_log_m = ½ ln m (scalars of
    x's dtype); rows: rows per task.
    """
    run_tasks(_rows_tasks, -(-x.shape[0] // rows), False, x[:0], f, ell, f[:0], x, omega,
              omega_t, root, half_log_m, rows)


def favor_dx(dx, df, f, x, omega, omega_t, root, half_log_m, rows):
    """dx (R, D): output, the gradient of the rows of x from df (R, m), the gradient of their
    features f (R, m) (or f of shape (0, m): the features are formed here, a task of rows at
    a time, never stored whole); df is overwritten (with da = df ∘ f).  Other arguments as in
    :func:`favor_features`."""
    run_tasks(_rows_tasks, -(-x.shape[0] // rows), True, dx, f, np.empty(0, f.dtype), df, x, omega,
              omega_t, root, half_log_m, rows)

