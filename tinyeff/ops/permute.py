"""Gather by a permutation along the sequence axis, and its backward.

    y[..., s, :] = x[..., perm[..., s], :]                     (forward)
    dx[..., i, :] = dy[..., inv_perm[..., i], :]               (backward)

where ``inv_perm`` is the inverse permutation (``inv_perm[perm[s]] = s``).  A permutation
moves every row exactly once, so the adjoint of the gather is the gather by the inverse —
no scatter-add is needed (trax's ``permute_via_gather``, HF Reformer's ``ReverseSort``).

Shapes: x (..., N, F), perm (..., N) integer; the leading dimensions of x and perm
broadcast against each other, so one x (G, 1, N, F) can be gathered by r permutations
perm (G, r, N) into (G, r, N, F).  Used by :mod:`tinyeff.attention.lsh` (sort into buckets,
unsort the outputs).
"""

from __future__ import annotations

import numpy as np


def inverse(perm: np.ndarray) -> np.ndarray:
    """The inverse permutation along the last axis: ``inv[..., perm[..., s]] = s``."""
    inv = np.empty_like(perm)                                      # (..., N)
    ticker = np.broadcast_to(np.arange(perm.shape[-1], dtype=perm.dtype), perm.shape)
    np.put_along_axis(inv, perm, ticker, axis=-1)
    return inv


def forward(x: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """``y[..., s, :] = x[..., perm[..., s], :]`` for x (..., N, F), perm (..., N)."""
    return np.take_along_axis(x, perm[..., None], axis=-2)         # (..., N, F)


def backward(dy: np.ndarray, inv_perm: np.ndarray) -> np.ndarray:
    """Gradient of :func:`forward`: the gather by the inverse permutation.

    fwd: y = x[perm]   ->   bwd: dx = dy[inv_perm]   (each row of x went to exactly one slot)
    """
    return np.take_along_axis(dy, inv_perm[..., None], axis=-2)    # (..., N, F)
