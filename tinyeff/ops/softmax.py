"""Row softmax over the allowed entries, and its backward.

    p_ij = exp(s_ij − c_i) / Σ_{j' ∈ A(i)} exp(s_ij' − c_i)   for j ∈ A(i), else 0,
    c_i  = max_{j ∈ A(i)} s_ij      (a constant: it cancels in p, so no gradient flows through it)
    lse_i = c_i + log Σ_{j ∈ A(i)} exp(s_ij − c_i)

A(i) is the set of allowed keys of row i: the entries where ``allowed`` is True and the
score is not −inf.  A row with an empty A(i) ("fully masked") gets p = 0, lse = −inf, and a
zero gradient — PyTorch's ``_safe_softmax`` convention (since 2024); the plain math softmax
would give NaN there.  NaN scores propagate as NaN to their row.
"""

from __future__ import annotations

import numpy as np


def forward(s: np.ndarray, allowed: np.ndarray | None = None):
    """Masked, stabilized row softmax over the last axis.

    Parameters
    ----------
    s : (..., N, M) float scores.
    allowed : boolean array broadcastable to s, or None (all allowed).

    Returns
    -------
    p : (..., N, M) probabilities, rows of a fully masked row are 0.
    lse : (..., N) log-sum-exp over the allowed entries (−inf for a fully masked row).
    """
    if allowed is not None:
        s = np.where(allowed, s, -np.inf)                          # (..., N, M)
    if s.shape[-1] == 0:
        return np.zeros_like(s), np.full(s.shape[:-1], -np.inf, dtype=s.dtype)
    c = s.max(axis=-1, keepdims=True)                              # (..., N, 1)
    c = np.where(c == -np.inf, 0, c)                               # empty row: any finite shift
    e = np.exp(s - c)                                              # (..., N, M), 0 where masked
    z = e.sum(axis=-1, keepdims=True)                              # (..., N, 1)
    p = e / np.where(z > 0, z, 1)                                  # (..., N, M)
    with np.errstate(divide="ignore"):
        lse = (c + np.log(z))[..., 0]                              # (..., N), −inf if z == 0
    return p, lse


def backward(dp: np.ndarray, p: np.ndarray) -> np.ndarray:
    """ds for p = softmax(s):  ds_ij = p_ij (dp_ij − Σ_j' p_ij' dp_ij').

    Masked entries have p = 0 and so receive ds = 0; a fully masked row gets ds = 0.
    """
    # fwd: p = e / z  ->  bwd: ds = p * (dp - <dp, p>_row)
    return p * (dp - np.sum(dp * p, axis=-1, keepdims=True))    # (..., N, M)
