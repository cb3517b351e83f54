"""FAVOR+ positive softmax features of a block of rows, and their derivative (Numba).

For rows x (R, D) and the (m, D) random features ω (tinyeff.ops.feature_maps.favor_softmax):

    x̂ = √scale · x,   a = x̂ ωᵀ − ‖x̂‖²/2  (m),   c = max_f a_f,   f = exp(a − c),   ℓ = c − ½ ln m
    dx = √scale (da ω − (Σ_f da_f) x̂),   da = df ∘ f      (the shift c held constant)

row by row in tasks of ``rows`` rows: one ``np.dot`` per task for x̂ ωᵀ (or da ω) and one
pass over the task's (rows, m) block for the shift and the vectorizable ``fast_exp``
(kernels/_math.py), where NumPy makes five passes over the whole array on one thread.  The
per-row work is :func:`tinyeff.kernels.favor_noncausal._features` and ``_dx``, the
non-causal FAVOR+ kernels' own.  Used by the causal chunked path of
tinyeff.attention._linear_engine (features of a chunk of rows, recomputed in the backward).
Tasks write disjoint rows and the blocks depend on ``rows`` only, so results are
bit-identical whatever the number of threads (the caller pins BLAS to one thread).
"""

from __future__ import annotations

import numpy as np

from ._jit import run_tasks, serial
from .favor_noncausal import _dx, _features

__all__ = ["favor_features", "favor_dx"]


@serial
def _features_tasks(lo, hi, f, ell, x, omega_t, root, half_log_m, rows):
    """Tasks lo … hi − 1 of :func:`favor_features`: rows task·rows … (task + 1)·rows − 1."""
    n, d = x.shape
    xh = np.empty((rows, d), dtype=x.dtype)                        # (T, D) x̂
    for task in range(lo, hi):
        r0 = task * rows
        r1 = min(r0 + rows, n)
        _features(f[r0:r1], ell[r0:r1], xh[:r1 - r0], x[r0:r1], omega_t, root, half_log_m)


def favor_features(f, ell, x, omega_t, root, half_log_m, rows):
    """f (R, m), ell (R): outputs, the features and log-scales of the rows of x (R, D).

    omega_t (D, m) = ωᵀ, root = √scale, half_log_m = ½ ln m (scalars of x's dtype).
    """
    run_tasks(_features_tasks, -(-x.shape[0] // rows), f, ell, x, omega_t, root, half_log_m,
              rows)


@serial
def _dx_tasks(lo, hi, dx, df, f, x, omega, root, rows):
    """Tasks lo … hi − 1 of :func:`favor_dx`."""
    n, d = x.shape
    xh = np.empty((rows, d), dtype=x.dtype)                        # (T, D) x̂
    for task in range(lo, hi):
        r0 = task * rows
        r1 = min(r0 + rows, n)
        for t in range(r1 - r0):
            for e in range(d):
                xh[t, e] = x[r0 + t, e] * root                     # fwd: x̂ = √scale · x
        _dx(dx[r0:r1], df[r0:r1], f[r0:r1], xh[:r1 - r0], omega, root)


def favor_dx(dx, df, f, x, omega, root, rows):
    """dx (R, D): output, the gradient of the rows of x from df (R, m), the gradient of their
    features f (R, m); df is overwritten (with da = df ∘ f).  omega (m, D), root = √scale."""
    run_tasks(_dx_tasks, -(-x.shape[0] // rows), dx, df, f, x, omega, root, rows)
