"""Reformer LSH hashing: bucket ids, the sort by (bucket, position), and their checks.

The hashing half of :mod:`tinyeff.attention.lsh` (the attention over the sorted chunks and
its backward stay there).  With rotations R (D, r, nb/2) shared by all batch dimensions:

    h_r(x) = argmax([x R_r ; −x R_r])  ∈ [0, nb)         ties -> the first (lowest) index;
            products in float64 whatever the input dtype
    π_r    = stable sort of positions by h_r               (i.e. by (bucket, position))

:func:`hash_buckets` is the definition in NumPy; :func:`hash_numba` computes the same ids
through the kernel's float32 filter with an error bound (``tinyeff/kernels/lsh_hash.py``), and
:func:`sort_numba` the same permutation as a stable ``np.argsort``.  :func:`check_hashing`
validates the ``rotations`` / ``buckets`` / ``n_buckets`` options of ``lsh.forward``.
Bucket ids carry no gradient.
"""

from __future__ import annotations

import numpy as np

from .. import _checks

__all__ = ["suggest_n_buckets", "hash_buckets", "hash_margin", "hash_numba", "sort_numba",
           "check_hashing"]


def suggest_n_buckets(n: int, chunk_len: int) -> int:
    """trax's rule: 2·max(1, N // chunk_len) buckets (average bucket = half a chunk)."""
    return 2 * max(1, n // chunk_len)


def hash_buckets(qk: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """(..., N, D), (D, r, nb/2) -> (..., r, N) int64: argmax([x R_r ; −x R_r]) in float64."""
    proj = np.einsum("...nd,drh->...rnh", qk.astype(np.float64),
                     rotations.astype(np.float64))                 # (..., r, N, nb/2)
    both = np.concatenate([proj, -proj], axis=-1)                  # (..., r, N, nb)
    return np.argmax(both, axis=-1).astype(np.int64)               # first maximum wins


def hash_margin(qk: np.ndarray, rotations: np.ndarray) -> float:
    """Smallest gap between the best and second-best projection of any position and round,
    relative to ‖qk‖; a ±ε perturbation cannot change a bucket whose gap exceeds ~ε·‖R‖."""
    proj = np.einsum("...nd,drh->...rnh", qk.astype(np.float64),
                     rotations.astype(np.float64))                 # (..., r, N, nb/2)
    both = np.sort(np.concatenate([proj, -proj], axis=-1), axis=-1)  # (..., r, N, nb)
    norm = np.linalg.norm(qk.astype(np.float64), axis=-1)[..., None, :]  # (..., 1, N)
    gap = (both[..., -1] - both[..., -2]) / np.maximum(norm, 1e-300)
    return float(gap.min(initial=np.inf))


# ----------------------------------------------------------------------------- Numba wrappers

def hash_numba(x, rotations, n_hashes):
    """Buckets through ``K.hash_argmax``: a float32 filter whose error bound decides which
    products are recomputed exactly (in order, in float64), so the result is the definition's."""
    from ..kernels import blas_single_thread
    from ..kernels import lsh as K
    g, n, d = x.shape
    bk = np.empty((g, n_hashes, n), dtype=np.int64)                # (G, r, N)
    rot = rotations.astype(np.float64).transpose(1, 0, 2)          # (r, D, nb/2) a view
    rot32 = np.ascontiguousarray(rot, dtype=np.float32)            # (r, D, nb/2) rounded
    rot_t = np.ascontiguousarray(rot.transpose(0, 2, 1))           # (r, nb/2, D) a copy
    with np.errstate(over="ignore", invalid="ignore"):
        col = np.sqrt(np.sum(rot * rot, axis=1)).max(axis=1)       # (r,) max_h ‖R_h‖
        big = np.abs(rot).max(axis=(1, 2))                         # (r,) max |R|
    # |p_h − e_h| ≤ |fl32 − exact| + |fl64 − exact|.  The float32 product sums D products of
    # the rounded x and R in any order (BLAS): ≤ γ_D + 2 roundings ≤ (D + 3)·2⁻²⁴ relative to
    # Σ_d |x_d R_dh| ≤ ‖x‖·‖R_h‖; the float64 one in order: ≤ D·2⁻⁵³; float32 underflow adds
    # ≤ 2⁻¹⁵⁰ per rounding (D4 = D rounded up to a multiple of 4, to spare); ×2 to spare
    d4 = -(-d // 4) * 4
    tol = 2.0 * (((d4 + 3) * 2.0**-24 + d * 2.0**-53) * col + d4 * 2.0**-149)  # (r,)
    tol_abs = 2.0 * d4 * 2.0**-149 * (1.0 + big)                   # (r,)
    x = np.require(x, requirements="CW")
    with np.errstate(over="ignore"):                               # beyond float32: inf
        x32 = x if x.dtype == np.float32 else x.astype(np.float32)  # (G, N, D) rounded
    with blas_single_thread():
        K.hash_argmax(bk, x, x32, rot32, rot_t, tol, tol_abs)
    return bk


# Kernel inputs go through np.require(..., "CW"): C-contiguous and writeable (a read-only
# input is copied), so read-only inputs reuse the kernels compiled for writeable ones.

def sort_numba(bk, n_slots):
    """perm, inv_perm (G, r, N) of the stable sort of ``bk`` by (bucket, position) through
    ``K.sort_buckets`` (a counting sort over ``n_slots`` buckets)."""
    from ..kernels import lsh as K
    perm = np.empty_like(bk)                                       # (G, r, N)
    inv_perm = np.empty_like(bk)                                   # (G, r, N)
    K.sort_buckets(perm, inv_perm, np.require(bk, requirements="CW"),
                   np.empty(n_slots + 1, np.int64))
    return perm, inv_perm


# ----------------------------------------------------------------------------- validation

def check_hashing(rotations, buckets, n_buckets, batch, n, d, dtype):
    """Validate rotations / buckets / n_buckets; return (n_hashes, n_buckets)."""
    if n_buckets is not None:
        n_buckets = _checks.integer(n_buckets, "n_buckets", minimum=2)
        if n_buckets % 2:
            raise ValueError(f"n_buckets must be even, got {n_buckets}")
    n_hashes = None
    if rotations is not None:
        _checks.float_array(rotations, "rotations", dtype=dtype)
        if rotations.ndim != 3 or rotations.shape[0] != d or 0 in rotations.shape:
            raise ValueError(f"rotations must have shape (D, n_hashes, n_buckets/2) with "
                             f"D = {d}, got {rotations.shape}")
        n_hashes = rotations.shape[1]
        if n_buckets is not None and n_buckets != 2 * rotations.shape[2]:
            raise ValueError(f"n_buckets = {n_buckets} does not match rotations "
                             f"{rotations.shape} (n_buckets = 2 * rotations.shape[2])")
        n_buckets = 2 * rotations.shape[2]
    elif buckets is None:
        raise TypeError("rotations is required (draw it with lsh.draw_random_options), "
                        "unless buckets= is given")
    if buckets is not None:
        if not isinstance(buckets, np.ndarray) or buckets.dtype.kind not in "iu":
            raise TypeError(f"buckets must be an integer numpy.ndarray, got "
                            f"{type(buckets).__name__} {getattr(buckets, 'dtype', '')}")
        if n_buckets is None:
            raise TypeError("n_buckets is required when buckets= is given without rotations")
        r = buckets.shape[-2] if buckets.ndim >= 2 else 0
        if (buckets.shape != (*batch, r, n) or r < 1
                or (n_hashes is not None and r != n_hashes)):
            raise ValueError(f"buckets must have shape (..., n_hashes, N) = "
                             f"{(*batch, n_hashes or 'r', n)}, got {buckets.shape}")
        if buckets.size and (buckets.min() < 0 or buckets.max() > n_buckets):
            raise ValueError(f"buckets must lie in [0, n_buckets] = [0, {n_buckets}], got "
                             f"[{buckets.min()}, {buckets.max()}]")
        n_hashes = r
    return n_hashes, n_buckets
