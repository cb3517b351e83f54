"""Numba kernels of banded ("interval") attention, used by ``window`` and ``local``.

Both variants are special cases of one structure: query row i may attend the keys of one
contiguous interval [lo_i, hi_i) (intersected with a per-key validity flag), and lo_i, hi_i
never decrease with i.  A *tile* of consecutive query rows [i0, i1) then needs only the
contiguous key range [jlo, jhi) = [lo_{i0}, hi_{i1−1}), so its scores are one small dense
matrix product, done by BLAS through ``np.dot`` on contiguous 2-D slices:

    S_t = q[i0:i1] k[jlo:jhi]ᵀ                      (T, R)     then an explicit band mask
    P_t = masked row softmax(S_t · scale + bias)     (T, R)
    out[i0:i1] = P_t v[jlo:jhi]                      (T, Dv)

``bias`` depends only on the offset i − j: bias_ij = bias[b, i − j − off_min].

Backward (P recomputed from the saved log-sum-exp, as in FlashAttention; O(N) saved state):

    P_t  = exp(S_t · scale + bias − lse_i) on the band, 0 elsewhere
    dP_t = dout[i0:i1] v[jlo:jhi]ᵀ
    dS_t = P_t ⊙ (dP_t − δ_i),     δ_i = dout_i · out_i  (= Σ_j P_ij dP_ij)
    dq[i0:i1]   = dS_t k[jlo:jhi] · scale
    dk[jlo:jhi] += dS_tᵀ q[i0:i1] · scale,    dv[jlo:jhi] += P_tᵀ dout[i0:i1]

The key ranges of neighbouring tiles overlap, so dk/dv would race if all tiles ran at once.
Tiles are coloured into P *phases* (tile t runs in phase t mod P) such that the tiles of one
phase have disjoint key ranges; phases run one after the other and each key row receives its
contributions in a fixed order whatever the number of threads (no atomics; bit-identical
results with 1 or 2 threads).  The bias gradient is written per tile, ``dbias_part[b, t]``,
and summed over tiles by the caller in a fixed order.

NOTE: ``np.dot`` inside Numba calls SciPy's OpenBLAS.  When OpenBLAS itself is
multi-threaded, its threads fight the Numba threads (measured: 36 GF/s instead of 99 GF/s
on 2 cores); the callers pin it to one thread with ``blas_single_thread`` and the exps use
the vectorizable ``fast_exp`` (both from ``kernels/_math.py``, ≤ 1 ulp float32, ≤ 2 ulp
float64).  Reductions (row max, row sum, dk/dv accumulation) stay serial in index order.

Kernels take contiguous arrays, outputs first, and do no validation (the variant modules do).
"""

from __future__ import annotations

import numpy as np

from ._jit import kernel, prange
from ._math import blas_single_thread, fast_exp

__all__ = ["attend_band", "attend_band_bwd", "plan_phases", "blas_single_thread"]


@kernel
def attend_band(out, lse, q, k, v, tile_start, tile_jlo, tile_jhi, lo, hi, row_ok, key_ok,
                bias, has_bias, off_min, scale):
    """out_i = Σ_{j∈[lo_i,hi_i), key_ok} softmax_j(q_i·k_j·scale + bias[i−j−off_min]) v_j.

    out (BH, N, Dv), lse (BH, N); q (BH, N, D), k (BH, M, D), v (BH, M, Dv);
    tile_start (nt+1,), tile_jlo/tile_jhi (nt,), lo/hi (N,) int64; row_ok (BH, N) and
    key_ok (BH, M) bool; bias (BH, n_off); scale of q's dtype.
    """
    bh = q.shape[0]
    nt = tile_start.shape[0] - 1
    for task in prange(bh * nt):
        b = task // nt
        t = task - b * nt
        i0 = tile_start[t]
        i1 = tile_start[t + 1]
        jl = tile_jlo[t]
        jh = tile_jhi[t]
        if jh <= jl:
            for i in range(i0, i1):
                out[b, i, :] = 0
                lse[b, i] = -np.inf
            continue
        s = np.dot(q[b, i0:i1], k[b, jl:jh].T)                       # (T, R) raw scores
        for r in range(i1 - i0):
            i = i0 + r
            ca = max(lo[i], jl) - jl                                 # band of row i: columns
            ce = min(hi[i], jh) - jl                                 # [ca, ce) of the tile
            s[r, :ca] = 0
            s[r, ce:] = 0
            if not row_ok[b, i]:
                s[r, ca:ce] = 0
                lse[b, i] = -np.inf
                continue
            x = s[r, ca:ce]                                          # view: the band of row i
            ok = key_ok[b, jl + ca:jl + ce]
            nb = ce - ca
            for u in range(nb):                                      # x = q·k · scale + bias
                x[u] = x[u] * scale
            if has_bias:
                for u in range(nb):
                    x[u] += bias[b, i - jl - ca - u - off_min]
            for u in range(nb):                                      # padded key: −∞
                if not ok[u]:
                    x[u] = -np.inf
            mx = x[0] if nb > 0 else s[r, 0]                        # (dtype of s)
            for u in range(1, nb):                                   # row max (NaN wins)
                if x[u] > mx or x[u] != x[u]:
                    mx = x[u]
            if nb == 0 or mx == -np.inf:                             # no admissible key
                x[:] = 0
                lse[b, i] = -np.inf
                continue
            for u in range(nb):                                      # vectorized exp
                x[u] = fast_exp(x[u] - mx)
            z = 0.0                                                  # serial, fixed order
            for u in range(nb):
                z += x[u]
            for u in range(nb):
                x[u] = x[u] / z
            lse[b, i] = mx + np.log(z)
        out[b, i0:i1] = np.dot(s, v[b, jl:jh])                        # (T, Dv)


@kernel
def attend_band_bwd(dq, dk, dv, dbias_part, dout, delta, lse, q, k, v, tile_start, tile_jlo,
                    tile_jhi, n_phases, lo, hi, row_ok, key_ok, bias, has_bias, off_min, scale):
    """Backward of :func:`attend_band`; dk and dv must be zero on entry (they accumulate).

    dq (BH, N, D), dk (BH, M, D), dv (BH, M, Dv), dbias_part (BH, nt, n_off) zeroed;
    dout (BH, N, Dv), delta (BH, N) = Σ_d dout·out, lse (BH, N) from the forward.
    """
    bh = q.shape[0]
    nt = tile_start.shape[0] - 1
    for ph in range(n_phases):
        ntp = (nt - ph + n_phases - 1) // n_phases                   # tiles ph, ph + P, …
        for task in prange(bh * ntp):
            b = task // ntp
            t = ph + n_phases * (task - b * ntp)
            i0 = tile_start[t]
            i1 = tile_start[t + 1]
            jl = tile_jlo[t]
            jh = tile_jhi[t]
            if jh <= jl:
                continue
            s = np.dot(q[b, i0:i1], k[b, jl:jh].T)                   # (T, R) raw scores
            dp = np.dot(dout[b, i0:i1], v[b, jl:jh].T)               # (T, R)
            for r in range(i1 - i0):
                i = i0 + r
                ca = max(lo[i], jl) - jl
                ce = min(hi[i], jh) - jl
                li = lse[b, i]
                di = delta[b, i]
                s[r, :ca] = 0                                        # outside the band
                s[r, ce:] = 0
                dp[r, :ca] = 0
                dp[r, ce:] = 0
                if not row_ok[b, i] or li == -np.inf:                # empty or skipped row
                    s[r, ca:ce] = 0
                    dp[r, ca:ce] = 0
                    continue
                x = s[r, ca:ce]                                      # views: band of row i
                g = dp[r, ca:ce]
                ok = key_ok[b, jl + ca:jl + ce]
                nb = ce - ca
                for u in range(nb):
                    x[u] = x[u] * scale
                if has_bias:
                    for u in range(nb):
                        x[u] += bias[b, i - jl - ca - u - off_min]
                for u in range(nb):                                  # padded key: p = 0
                    if not ok[u]:
                        x[u] = -np.inf
                for u in range(nb):
                    # fwd: p = exp(x − max) / z  ==  exp(x − lse)
                    x[u] = fast_exp(x[u] - li)
                    # fwd: p = softmax(x)  ->  ds = p (dp − Σ_j p dp)
                    g[u] = x[u] * (g[u] - di)
                if has_bias:
                    # fwd: x += bias[i − j − off_min]
                    for u in range(nb):
                        dbias_part[b, t, i - jl - ca - u - off_min] += g[u]
                for u in range(nb):
                    g[u] = g[u] * scale                              # ds · scale
            # fwd: x = (q kᵀ) · scale   (dp now holds ds · scale)
            dq[b, i0:i1] = np.dot(dp, k[b, jl:jh])                    # (T, D)
            dk[b, jl:jh] += np.dot(dp.T, q[b, i0:i1])                 # (R, D)
            # fwd: out = p v
            dv[b, jl:jh] += np.dot(s.T, dout[b, i0:i1])               # (R, Dv)


def plan_phases(tile_jlo: np.ndarray, tile_jhi: np.ndarray) -> int:
    """Smallest P such that tiles t and t + P (hence t and t + 2P, …) have disjoint key ranges.

    The ranges must be non-decreasing in both ends (as every interval pattern here is).
    Empty ranges never conflict.
    """
    nt = tile_jlo.shape[0]
    if nt == 0:
        return 1
    # first tile t' > t whose range starts at or after the end of tile t's range
    first_free = np.searchsorted(tile_jlo, tile_jhi, side="left")   # (nt,)
    first_free = np.maximum(first_free, np.arange(1, nt + 1))
    empty = tile_jhi <= tile_jlo
    need = np.where(empty, 1, first_free - np.arange(nt))            # (nt,)
    return int(max(1, need.max()))
