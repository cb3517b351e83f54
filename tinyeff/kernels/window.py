"""Numba kernels of banded ("interval") attention, used by ``window`` and ``local``.

Both variants are special cases of one structure: query row i may attend the keys of one
contiguous interval [lo_i, hi_i) (intersected with a per-key validity flag), and lo_i, hi_i
never decrease with i.  A *tile* of consecutive query rows [i0, i1) then needs only the
contiguous key range [jlo, jhi) = [lo_{i0}, hi_{i1−1}), so its scores are one small dense
matrix product, done by BLAS through ``np.dot`` on contiguous 2-D slices:

    S_t = q[i0:i1] k[jlo:jhi]ᵀ · scale + bias        (T, R), −∞ outside the band
    P̃_t = exp(S_t − rowmax S_t),   z = rowsum P̃_t     (T, R)
    out[i0:i1] = (P̃_t v[jlo:jhi]) / z,   lse = rowmax + log z

``bias`` depends only on the offset i − j: bias_ij = bias[b, i − j − off_min].

Backward (P recomputed from the saved log-sum-exp, as in FlashAttention; O(N) saved state):

    P_t  = exp(S_t − lse_i) on the band, 0 elsewhere
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

Schedule: ``prange`` over ``n_chunks`` contiguous runs of (batch·head, tile) tasks (the
callers pass the Numba thread count); each run allocates its scratch tiles once and reuses
them for all its tasks.  Every task computes its tile the same way whichever run holds it,
so ``n_chunks`` never changes a result.

SPEEDTIP: the forward holds each tile transposed, Sᵀ = k q_tileᵀ (R, T), as the blocked
kernel of ``kernels/blocked.py`` does: each query's max and sum then run down a column,
serially in key order per query (the same order as a row-wise loop) but vectorized across
the T queries, and the band becomes one range of queries per key row (lo, hi never
decrease), so masking costs two range fills per key row instead of a test per element.
SPEEDTIP: loops that should vectorize run over views starting at index 0 (``x = s[r, a:e]``,
``for u in range(e − a)``): a loop ``for u in range(a, e)`` keeps Numba's negative-index
wraparound check, which stops LLVM from vectorizing it (measured 10 ns against 1.8 ns per
element for the backward's exp loop).  Tiles whose keys are all valid and carry no bias
(every tile of the bench's ``local``) skip the per-key select.
SPEEDTIP: fresh scratch per task (two 192 KiB tiles plus the products' outputs) measured
slower, mostly from page faults once glibc returns freed blocks to the system; ``np.dot``
writes into the scratch (and into dq directly) through its ``out`` argument.
SPEEDTIP: ``np.dot`` inside Numba calls SciPy's OpenBLAS.  When OpenBLAS itself is
multi-threaded, its threads fight the Numba threads (measured: 36 GF/s instead of 99 GF/s
on 2 cores); the callers pin it to one thread with ``blas_single_thread`` and the exps use
the vectorizable ``fast_exp`` (both from ``kernels/_math.py``, ≤ 1 ulp float32, ≤ 2 ulp
float64).
NOTE: reductions (row max, row sum, δ, dk/dv accumulation, bias gradient) stay serial in
index order; ``fastmath`` stays off (jit policy).

Kernels take contiguous arrays, outputs first, and do no validation (the variant modules do).
"""

from __future__ import annotations

import numba
import numpy as np

from ._jit import kernel, prange, serial
from ._math import blas_single_thread, fast_exp

__all__ = ["attend_band", "attend_band_bwd", "plan_phases", "n_chunks", "blas_single_thread"]


def n_chunks() -> int:
    """The kernels' ``n_chunks`` argument: one run of tiles per Numba thread."""
    return numba.get_num_threads()


# ----------------------------------------------------------------------------- tile helpers


@serial
def _nanmax(a, b):
    """max(a, b) that propagates NaN (as NumPy's max does)."""
    return a if (a >= b or a != a) else b


@serial
def _colmax(res, tmp, st):
    """res[ii] = max(st[0, ii], st[1, ii], …) (−∞ for no rows), NaN-propagating.

    SPEEDTIP: two rows per step into the other buffer (a one-row update compiles to a
    masked store, microcoded on AMD Zen; see ``kernels/blocked.py``).
    """
    bk, bq = st.shape
    for ii in range(bq):
        res[ii] = -np.inf
    for jj in range(0, bk - 1, 2):
        r0 = st[jj]
        r1 = st[jj + 1]
        for ii in range(bq):
            tmp[ii] = _nanmax(_nanmax(res[ii], r0[ii]), r1[ii])
        for ii in range(bq):
            res[ii] = tmp[ii]
    if bk % 2 == 1:
        r0 = st[bk - 1]
        for ii in range(bq):
            tmp[ii] = _nanmax(res[ii], r0[ii])
        for ii in range(bq):
            res[ii] = tmp[ii]


@serial
def _tile_extent(tile_start, tile_jlo, tile_jhi):
    """(most query rows, most keys) of any tile: the scratch sizes."""
    tq = 1
    tk = 1
    for t in range(tile_start.shape[0] - 1):
        tq = max(tq, tile_start[t + 1] - tile_start[t])
        tk = max(tk, tile_jhi[t] - tile_jlo[t])
    return tq, tk


@serial
def _fwd_tile(out, lse, q, k, v, b, i0, i1, jl, jh, lo, hi, row_ok, key_ok, bias, has_bias,
              off_min, scale, buf, mx, tmp, msub, z):
    """One tile of :func:`attend_band`: rows [i0, i1) against keys [jl, jh), jh > jl."""
    bq = i1 - i0
    bk = jh - jl
    zero = scale * 0
    st = buf[:bk * bq].reshape((bk, bq))                           # (R, T) scratch
    np.dot(k[b, jl:jh], q[b, i0:i1].T, st)                         # raw Sᵀ
    ia = 0                                     # rows [ia, ib) of the tile see key j
    ib = 0
    for jj in range(bk):
        j = jl + jj
        while ia < bq and hi[i0 + ia] <= j:
            ia += 1
        while ib < bq and lo[i0 + ib] <= j:
            ib += 1
        a = ia
        e = max(ib, ia)
        if not key_ok[b, j]:                   # padded key: −∞ for every row
            a = bq
            e = bq
        st[jj, :a] = -np.inf
        st[jj, e:] = -np.inf
        x = st[jj, a:e]                                            # view: rows seeing j
        if has_bias:
            off = i0 + a - j - off_min         # bias index of (i0 + a, j)
            for ii in range(e - a):
                x[ii] = x[ii] * scale + bias[b, off + ii]
        else:
            for ii in range(e - a):
                x[ii] = x[ii] * scale
    for ii in range(bq):
        if not row_ok[b, i0 + ii]:             # skipped row: nothing allowed
            for jj in range(bk):
                st[jj, ii] = -np.inf
    _colmax(mx, tmp, st)                       # row max (per column of Sᵀ)
    for ii in range(bq):                       # no admissible key: subtract 0, P̃ = 0
        z[ii] = 0
        msub[ii] = zero if mx[ii] == -np.inf else mx[ii]
    for jj in range(bk):                       # P̃ = exp(S − max), z = Σ_j P̃ in key order
        row = st[jj]
        for ii in range(bq):
            ex = fast_exp(row[ii] - msub[ii])
            row[ii] = ex
            z[ii] += ex
    o = out[b, i0:i1]                                              # (T, Dv)
    np.dot(st.T, v[b, jl:jh], o)                                   # P̃ v
    for ii in range(bq):
        zi = z[ii]
        if zi == 0:                            # no admissible key
            lse[b, i0 + ii] = -np.inf
            o[ii, :] = 0
        else:
            lse[b, i0 + ii] = mx[ii] + np.log(zi)
            oi = o[ii]
            for c in range(oi.shape[0]):
                oi[c] = oi[c] / zi


@kernel
def attend_band(out, lse, q, k, v, tile_start, tile_jlo, tile_jhi, lo, hi, row_ok, key_ok,
                bias, has_bias, off_min, scale, n_chunks):
    """out_i = Σ_{j∈[lo_i,hi_i), key_ok} softmax_j(q_i·k_j·scale + bias[i−j−off_min]) v_j.

    out (BH, N, Dv), lse (BH, N); q (BH, N, D), k (BH, M, D), v (BH, M, Dv);
    tile_start (nt+1,), tile_jlo/tile_jhi (nt,), lo/hi (N,) int64; row_ok (BH, N) and
    key_ok (BH, M) bool; bias (BH, n_off); scale of q's dtype; n_chunks >= 1 runs of tasks
    (the thread count; no effect on the result).
    """
    bh = q.shape[0]
    m = k.shape[1]
    nt = tile_start.shape[0] - 1
    dt = out.dtype
    tq, tk = _tile_extent(tile_start, tile_jlo, tile_jhi)
    ntask = bh * nt
    nch = max(1, min(ntask, n_chunks))
    for c in prange(nch):
        buf = np.empty(tq * tk, dtype=dt)                          # (R·T,) Sᵀ, then P̃ᵀ
        mx = np.empty(tq, dtype=dt)                                # (T,) row max
        tmp = np.empty(tq, dtype=dt)                               # (T,) scratch of _colmax
        msub = np.empty(tq, dtype=dt)                              # (T,) max, −∞ -> 0
        z = np.empty(tq, dtype=dt)                                 # (T,) row sum of P̃
        for task in range(c * ntask // nch, (c + 1) * ntask // nch):
            b = task // nt
            t = task - b * nt
            i0 = tile_start[t]
            i1 = tile_start[t + 1]
            jl = min(tile_jlo[t], m)           # (a band may run past the last key)
            jh = min(tile_jhi[t], m)
            if jh <= jl:                       # no key at all
                for i in range(i0, i1):
                    out[b, i, :] = 0
                    lse[b, i] = -np.inf
                continue
            _fwd_tile(out, lse, q, k, v, b, i0, i1, jl, jh, lo, hi, row_ok, key_ok, bias,
                      has_bias, off_min, scale, buf, mx, tmp, msub, z)


@serial
def _bwd_tile(dq, dk, dv, dbias_part, dout, out, lse, q, k, v, b, t, i0, i1, jl, jh, lo, hi,
              row_ok, key_ok, bias, has_bias, off_min, scale, sbuf, gbuf, kbuf, vbuf, dl):
    """One tile of :func:`attend_band_bwd`: rows [i0, i1) against keys [jl, jh), jh > jl."""
    bq = i1 - i0
    bk = jh - jl
    d = q.shape[2]
    ddv = v.shape[2]
    zero = scale * 0
    s = sbuf[:bq * bk].reshape((bq, bk))                           # (T, R) scratch
    dp = gbuf[:bq * bk].reshape((bq, bk))                          # (T, R) scratch
    np.dot(q[b, i0:i1], k[b, jl:jh].T, s)                          # raw scores
    np.dot(dout[b, i0:i1], v[b, jl:jh].T, dp)                      # dP
    all_ok = True
    for jj in range(bk):
        all_ok = all_ok and key_ok[b, jl + jj]
    for r in range(bq):
        i = i0 + r
        li = lse[b, i]
        acc = 0.0                              # δ_i = dout_i · out_i, serial in float64
        for c in range(ddv):
            acc += np.float64(dout[b, i, c]) * np.float64(out[b, i, c])
        dl[r] = acc                            # rounded to the dtype
        di = dl[r]
        ca = min(max(lo[i] - jl, 0), bk)       # band of row i: columns [ca, ce)
        ce = max(min(hi[i] - jl, bk), ca)
        if not row_ok[b, i] or li == -np.inf:  # empty or skipped row
            ca = bk
            ce = bk
        s[r, :ca] = 0                          # outside the band: P = 0, dS = 0
        s[r, ce:] = 0
        dp[r, :ca] = 0
        dp[r, ce:] = 0
        x = s[r, ca:ce]                                            # views: band of row i
        g = dp[r, ca:ce]
        ok = key_ok[b, jl + ca:jl + ce]
        nb = ce - ca
        if has_bias:
            off = i - jl - ca - off_min        # bias index of (i, jl + ca)
            for u in range(nb):
                # fwd: p = exp(x − max) / z  ==  exp(x − lse),  x = q·k · scale + bias
                p = fast_exp(x[u] * scale + bias[b, off - u] - li) if ok[u] else zero
                x[u] = p
                # fwd: p = softmax(x)  ->  ds = p (dp − Σ_j p dp)
                g[u] = p * (g[u] - di)
            for u in range(nb):
                # fwd: x += bias[i − j − off_min]
                dbias_part[b, t, off - u] += g[u]
            for u in range(nb):
                g[u] = g[u] * scale            # ds · scale
        elif all_ok:
            for u in range(nb):
                # fwd: p = exp(x − max) / z  ==  exp(x − lse),  x = q·k · scale
                p = fast_exp(x[u] * scale - li)
                x[u] = p
                # fwd: p = softmax(x)  ->  ds = p (dp − Σ_j p dp), then · scale
                g[u] = (p * (g[u] - di)) * scale
        else:
            for u in range(nb):                # padded key: p = 0
                p = fast_exp(x[u] * scale - li) if ok[u] else zero
                x[u] = p
                g[u] = (p * (g[u] - di)) * scale
    # fwd: x = (q kᵀ) · scale   (dp now holds ds · scale)
    np.dot(dp, k[b, jl:jh], dq[b, i0:i1])                          # (T, D)
    tkk = kbuf[:bk * d].reshape((bk, d))
    np.dot(dp.T, q[b, i0:i1], tkk)                                 # (R, D)
    for jj in range(bk):
        acc_k = dk[b, jl + jj]
        add_k = tkk[jj]
        for c in range(d):
            acc_k[c] += add_k[c]
    # fwd: out = p v
    tvv = vbuf[:bk * ddv].reshape((bk, ddv))
    np.dot(s.T, dout[b, i0:i1], tvv)                               # (R, Dv)
    for jj in range(bk):
        acc_v = dv[b, jl + jj]
        add_v = tvv[jj]
        for c in range(ddv):
            acc_v[c] += add_v[c]


@kernel
def attend_band_bwd(dq, dk, dv, dbias_part, dout, out, lse, q, k, v, tile_start, tile_jlo,
                    tile_jhi, n_phases, lo, hi, row_ok, key_ok, bias, has_bias, off_min, scale,
                    n_chunks):
    """Backward of :func:`attend_band`; dq, dk and dv must be zero on entry.

    dq (BH, N, D), dk (BH, M, D), dv (BH, M, Dv), dbias_part (BH, nt, n_off) zeroed;
    dout (BH, N, Dv); out (BH, N, Dv) and lse (BH, N) from the forward (δ_i = dout_i · out_i
    is formed here, in float64, once per row).
    """
    bh = q.shape[0]
    m = k.shape[1]
    d = q.shape[2]
    ddv = v.shape[2]
    nt = tile_start.shape[0] - 1
    dt = dq.dtype
    tq, tk = _tile_extent(tile_start, tile_jlo, tile_jhi)
    for ph in range(n_phases):
        ntp = (nt - ph + n_phases - 1) // n_phases                 # tiles ph, ph + P, …
        ntask = bh * ntp
        nch = max(1, min(ntask, n_chunks))
        for c in prange(nch):
            sbuf = np.empty(tq * tk, dtype=dt)                     # (T·R,) scores, then P
            gbuf = np.empty(tq * tk, dtype=dt)                     # (T·R,) dP, then dS·scale
            kbuf = np.empty(tk * d, dtype=dt)                      # (R·D,) dk of a tile
            vbuf = np.empty(tk * ddv, dtype=dt)                    # (R·Dv,) dv of a tile
            dl = np.empty(tq, dtype=dt)                            # (T,) δ of the tile rows
            for task in range(c * ntask // nch, (c + 1) * ntask // nch):
                b = task // ntp
                t = ph + n_phases * (task - b * ntp)
                jl = min(tile_jlo[t], m)       # (a band may run past the last key)
                jh = min(tile_jhi[t], m)
                if jh <= jl:
                    continue
                _bwd_tile(dq, dk, dv, dbias_part, dout, out, lse, q, k, v, b, t,
                          tile_start[t], tile_start[t + 1], jl, jh, lo, hi, row_ok, key_ok,
                          bias, has_bias, off_min, scale, sbuf, gbuf, kbuf, vbuf, dl)


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
