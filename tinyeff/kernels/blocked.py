"""Blocked exact attention with an online softmax (the FlashAttention algorithm), in Numba.

Same definition as :func:`tinyeff.attention.full._forward_ref`, computed tile by tile so the
(N, M) score matrix never exists: O(N·M·D) time, O((N + M)·D) memory.

Forward (Dao et al. 2022, "FlashAttention", Alg. 1; Dao 2023, "FlashAttention-2", Alg. 1).
For a query tile I and key tiles J = J₁, J₂, … in order, with running row maximum m,
running row sum l and unnormalised output acc (all starting at −∞, 0, 0)::

    S     = q_I k_Jᵀ · scale + rel_bias[i − j + M − 1],  −∞ where (i, j) is not allowed
    m'    = max(m, rowmax S)                     (a row with m' = −∞ so far is skipped)
    P̃     = exp(S − m')                          (T_q, T_k)
    l     = exp(m − m') · l + rowsum P̃
    acc   = exp(m − m') · acc + P̃ v_J            (T_q, Dv)
    then  out_I = acc / l,   lse_I = m + log l   (l = 0: fully masked row -> out 0, lse −∞)

Backward (FlashAttention-2, Alg. 2, without atomics).  With δ_i = Σ_d dout_id · out_id
(precomputed once, O(N·Dv)), every tile recomputes its probabilities from the saved lse::

    P  = exp(S − lse_I)          dP = dout_I v_Jᵀ          dS = P ∘ (dP − δ_I)
    dv_J += Pᵀ dout_I            dk_J += dSᵀ q_I · scale     dq_I += dS k_J · scale
    drel[i − j + M − 1] += dS_ij

Causal diagonal tiles.  Query tile I and key tile J share one grid, so the causal mask
leaves a tile with J < I whole and cuts the tile J = I to a triangle.  That tile is taken
in bands of ``band`` keys [b₀, b₁), each scored against the queries i ≥ b₀ only (the same
steps as a tile, forward and backward): with t/band bands the products cover
(1 + band/t)/2 of the square instead of all of it.  The results differ from one whole tile
by the order of the float sums only.  The rel_bias gradient pass takes every tile whole.

Parallel schedule (tasks over independent outputs only; no atomics).  Each pass is a list
of tasks; the pass's function hands them to ``run_tasks`` (kernels/_jit.py), which runs one
block of consecutive tasks per Numba thread through a ``serial`` kernel (``_fwd_tasks``, …)
that loops over its block.  The passes' tasks:

* forward: (batch·head, query tile);
* backward, two passes: dq over (batch·head, query tile), then dk/dv over (batch·head, key
  tile), each recomputing P and dS (7 tile products in all);
* backward, fused: one task per batch·head, one thread owning a whole head, so P and dS are
  computed once per tile (5 tile products).  Used when the heads alone keep every thread
  busy; both schedules visit the tiles in the same order and call the same tile products,
  so their results are bit-identical (tested), and so is the result for any thread count;
* rel_bias gradient: (batch·head, tile diagonal qt − kt); each diagonal sums its tiles
  into its own buffer (2T − 1 offsets), and the buffers are added in a fixed order.

SPEEDTIP: ``serial`` kernels over blocks of tasks compile without the gufunc that every
``prange`` loop adds (kernels/_jit.py), so this module compiles in well under the time of
the same loops under ``prange``; the price is one Python call per pass and thread.  The
loop over a block sits in the task kernel itself: a kernel that calls another links in and
re-optimizes the callee's code, so a thin loop kernel around a per-task helper would
compile each task body once more.
SPEEDTIP: the tile products are ``np.dot`` on 2-D tiles, which Numba hands to BLAS (the
``gemm`` of SciPy's OpenBLAS); hand-written loops are an order of magnitude slower.  BLAS's
own threads inside the task threads oversubscribe the cores, so the wrappers run the
kernels under :func:`tinyeff.kernels.blas_single_thread`.
SPEEDTIP: ``math.exp`` is a scalar libm call; :func:`fast_exp` (``kernels/_math.py``) is a
branch-free Cephes-style exp that LLVM vectorizes (≤ 1 ulp in float32, ≤ 2 ulp in float64;
it flushes results below 4e-38 (float32) / 1e-307 (float64) to zero).
SPEEDTIP: the forward holds each tile transposed, Sᵀ = k_J q_Iᵀ (T_k, T_q), in one
scratch buffer per task: each query's max and sum then run down a column, still serially
in key order per query (same bits as row-wise loops) but vectorized across queries, and
causal / key-padding masks cost one range per key row instead of a test per element.  The
backward keeps row-major tiles (faster there).  Measurements: BENCHMARKS.md ("Blocked
kernel: design measurements").
SPEEDTIP: a tile that no mask cuts and no rel_bias shifts skips the logits pass: the
forward takes the column maxima of the raw products, m = scale · max S_raw (equal to
max (S_raw · scale) for scale > 0, rounding being monotone), and both passes form
S_raw · scale inside the exp, the same float as before, so the results are bit-identical
to a logits pass (measured: BENCHMARKS.md).
NOTE: ``fastmath`` stays off (jit policy): reductions (row max, row sum) run serially in
index order, so results do not depend on vector width or thread count.
"""

from __future__ import annotations

import numpy as np

from ._jit import run_tasks, serial
from ._math import add_rows, colmax, fast_exp, nanmax

# ----------------------------------------------------------------------------- tile helpers


@serial
def _first_query(bh, j, i0, bq, kpad, causal, has_kpad):
    """First column ii of a query tile [i0, i0 + bq) that may see key j (bq if none)."""
    if has_kpad and not kpad[bh, j]:
        return bq
    if causal:                                 # i >= j  <=>  ii >= j − i0
        return min(max(j - i0, 0), bq)
    return 0


@serial
def _tile_view(buf, bk, bq):
    """The first bk·bq entries of a flat scratch buffer as a C-contiguous (bk, bq) tile."""
    return buf[:bk * bq].reshape((bk, bq))


@serial
def _logits(s, bh, i0, j0, m, kpad, rel, scale, causal, has_kpad, has_rel):
    """In place: s = s · scale + rel_bias[i − j + M − 1], −∞ where (i, j) is not allowed."""
    bq, bk = s.shape
    for ii in range(bq):
        i = i0 + ii
        for jj in range(bk):
            j = j0 + jj
            x = s[ii, jj] * scale
            if has_rel:
                x += rel[bh, i - j + m - 1]
            if (has_kpad and not kpad[bh, j]) or (causal and j > i):
                s[ii, jj] = -np.inf
            else:
                s[ii, jj] = x


@serial
def _uncut(i0, j1, causal, has_kpad, has_rel):
    """True when no mask cuts and no rel_bias shifts a tile of queries i >= i0 and keys
    j < j1: every score is S_raw · scale (causally, its last key j1 − 1 is at most i0)."""
    return not has_kpad and not has_rel and not (causal and j1 - 1 > i0)


@serial
def _bwd_tile(q, k, v, dout, lse, delta, kpad, rel, bh, i0, i1, j0, j1, scale, causal,
              has_kpad, has_rel):
    """Recompute one tile: returns P (T_q, T_k) and dS = P ∘ (dP − δ) (T_q, T_k)."""
    m = k.shape[1]
    p = np.dot(q[bh, i0:i1], k[bh, j0:j1].T)                       # (T_q, T_k) raw scores
    if _uncut(i0, j1, causal, has_kpad, has_rel):
        f = scale                              # S = S_raw · scale, formed below
    else:
        _logits(p, bh, i0, j0, m, kpad, rel, scale, causal, has_kpad, has_rel)
        f = (scale - scale) + np.float32(1)   # S formed: × 1 (scale's float type)
    ds = np.dot(dout[bh, i0:i1], v[bh, j0:j1].T)                   # (T_q, T_k) dP
    for ii in range(i1 - i0):
        lse_i = lse[bh, i0 + ii]
        d_i = delta[bh, i0 + ii]
        if lse_i == -np.inf:                   # fully masked row: P = 0, dS = 0
            for jj in range(j1 - j0):
                p[ii, jj] = 0
                ds[ii, jj] = 0
            continue
        for jj in range(j1 - j0):
            # fwd: P = exp(S − lse)
            pij = fast_exp(p[ii, jj] * f - lse_i)
            p[ii, jj] = pij
            # fwd: out = P v  and  P = softmax(S)  ->  dS = P ∘ (dP − δ)
            ds[ii, jj] = pij * (ds[ii, jj] - d_i)
    return p, ds


@serial
def _bands(tile, band, i0, i1, j0, j1, causal):
    """(stop, step): key tile [j0, j1) against query tile [i0, i1) is taken as keys
    [j0, stop) in steps of ``step`` keys.

    On a causal diagonal tile (j0 = i0) key j is seen by queries i >= j only, so each band
    of ``band`` keys [b0, b1) is scored against queries [b0, i1) alone, and keys j >= i1
    (a short last query tile) by none.  Other tiles are taken whole (each of their queries
    sees every key or, causally, none).
    """
    if causal and j0 == i0:
        return min(j1, i1), min(band, tile)
    return j1, tile


@serial
def _fwd_keys(buf, acc, pv, m_run, l_run, m_new, m_tmp, m_sub, r_sum, m_neg, q, k, v, kpad, rel,
              bh, i0, i1, j0, j1, scale, causal, has_kpad, has_rel):
    """Fold keys [j0, j1) into the running max, sum and output of queries [i0, i1).

    acc (T_q, Dv), pv (T_q, Dv), m_run … r_sum (T_q,): the query rows' state and scratch
    (T_q = i1 − i0); buf: the task's scratch, holding Sᵀ then P̃ᵀ (T_k, T_q).
    """
    m = k.shape[1]
    bq = i1 - i0
    bk = j1 - j0
    dv = v.shape[2]
    st = _tile_view(buf, bk, bq)                                   # (T_k, T_q)
    np.dot(k[bh, j0:j1], q[bh, i0:i1].T, st)                       # raw Sᵀ
    # a tile no mask cuts and no bias shifts, scale > 0: max_j (S_raw · scale) is
    # scale · max_j S_raw (rounding is monotone), and S_raw · scale is formed in the exp pass
    if _uncut(i0, j1, causal, has_kpad, has_rel) and scale > 0:
        colmax(m_new, m_tmp, m_neg, st)       # max_j S_raw per query
        for ii in range(bq):
            m_new[ii] = nanmax(m_run[ii], m_new[ii] * scale)
        f = scale
    else:
        for jj in range(bk):                   # logits in place
            j = j0 + jj
            c0 = _first_query(bh, j, i0, bq, kpad, causal, has_kpad)
            row = st[jj]
            for ii in range(c0):
                row[ii] = -np.inf
            off = i0 - j + m - 1                                   # rel_bias index of (i0, j)
            if has_rel:
                for ii in range(c0, bq):
                    row[ii] = row[ii] * scale + rel[bh, off + ii]
            else:
                for ii in range(c0, bq):
                    row[ii] = row[ii] * scale
        colmax(m_new, m_tmp, m_run, st)       # running max per query, key order
        f = (scale - scale) + np.float32(1)   # S already formed: × 1 (scale's float type)
    for ii in range(bq):                       # nothing allowed so far: subtract 0, P̃ = 0
        r_sum[ii] = 0
        if m_new[ii] == -np.inf:
            m_sub[ii] = 0
        else:
            m_sub[ii] = m_new[ii]
    for jj in range(bk):
        row = st[jj]
        for ii in range(bq):
            e = fast_exp(row[ii] * f - m_sub[ii])
            row[ii] = e
            r_sum[ii] += e
    for ii in range(bq):
        alpha = fast_exp(m_run[ii] - m_sub[ii])
        l_run[ii] = l_run[ii] * alpha + r_sum[ii]
        if alpha != 1:
            for c in range(dv):
                acc[ii, c] *= alpha
        m_run[ii] = m_new[ii]
    np.dot(st.T, v[bh, j0:j1], pv)                                 # (T_q, Dv)
    add_rows(acc, pv)


@serial
def _zigzag(r, n):
    """0, n−1, 1, n−2, …: pairs cheap and expensive causal tiles in each contiguous chunk."""
    return r // 2 if r % 2 == 0 else n - 1 - r // 2


@serial
def _q_tiles_of_key_tile(kt, tile, n, causal):
    """First query tile that sees key tile kt (causal: the tile holding row j0)."""
    return min(kt, (n + tile - 1) // tile) if causal else 0


# ----------------------------------------------------------------------------- kernels


@serial
def _fwd_tasks(lo, hi, out, lse, q, k, v, kpad, rel, scale, causal, has_kpad, has_rel, tile,
               band):
    """Tasks lo … hi − 1, each (batch·head, query tile), of :func:`flash_fwd`."""
    for t in range(lo, hi):
        n = q.shape[1]
        m = k.shape[1]
        dv = v.shape[2]
        dt = out.dtype
        nqt = (n + tile - 1) // tile
        bh = t // nqt
        qt = _zigzag(t % nqt, nqt)
        i0 = qt * tile
        i1 = min(i0 + tile, n)
        bq = i1 - i0
        buf = np.empty(tile * tile, dtype=dt)                      # (T_k·T_q,) Sᵀ, then P̃ᵀ
        pv = np.empty((bq, dv), dtype=dt)                          # (T_q, Dv) P̃ v_J
        acc = np.zeros((bq, dv), dtype=dt)                         # (T_q, Dv)
        m_run = np.full(bq, -np.inf, dtype=dt)                     # (T_q,) running max
        l_run = np.zeros(bq, dtype=dt)                             # (T_q,) running sum
        m_new = np.empty(bq, dtype=dt)                             # (T_q,) max with tile J
        m_tmp = np.empty(bq, dtype=dt)                             # (T_q,) scratch of colmax
        m_sub = np.empty(bq, dtype=dt)                             # (T_q,) m_new, −∞ -> 0
        r_sum = np.empty(bq, dtype=dt)                             # (T_q,) rowsum P̃
        m_neg = np.full(bq, -np.inf, dtype=dt)                     # (T_q,) −∞
        kend = min(m, i1) if causal else m                         # causal: keys j < i1
        for j0 in range(0, kend, tile):
            j1 = min(j0 + tile, m)
            stop, step = _bands(tile, band, i0, i1, j0, j1, causal)
            for b0 in range(j0, stop, step):   # the diagonal tile in bands (see _bands)
                b1 = min(b0 + step, stop)
                a = max(b0 - i0, 0) if causal else 0               # queries i >= b0 only
                _fwd_keys(buf, acc[a:], pv[a:], m_run[a:], l_run[a:], m_new[a:], m_tmp[a:],
                          m_sub[a:], r_sum[a:], m_neg[a:], q, k, v, kpad, rel, bh, i0 + a, i1,
                          b0, b1, scale, causal, has_kpad, has_rel)
        for ii in range(bq):
            if l_run[ii] == 0:                 # fully masked row
                lse[bh, i0 + ii] = -np.inf
                for c in range(dv):
                    out[bh, i0 + ii, c] = 0
            else:
                lse[bh, i0 + ii] = m_run[ii] + np.log(l_run[ii])
                for c in range(dv):
                    out[bh, i0 + ii, c] = acc[ii, c] / l_run[ii]


def flash_fwd(out, lse, q, k, v, kpad, rel, scale, causal, has_kpad, has_rel, tile, band):
    """out = softmax(q kᵀ·scale + bias, allowed) v and its log-sum-exp, tile by tile.

    out (BH, N, Dv), lse (BH, N); q (BH, N, D), k (BH, M, D), v (BH, M, Dv);
    kpad (BH, M) bool, rel (BH, N + M − 1) (ignored unless has_kpad / has_rel); tile: queries
    and keys per tile; band: keys per band of a causal diagonal tile (module docstring).
    One task per (batch·head, query tile), ``run_tasks`` over them.  Tiles are held
    transposed, Sᵀ (T_k, T_q), so each query's max and sum run down a column: a serial
    reduction per query in key order that vectorizes across queries.
    """
    bhs, n, _ = q.shape
    nqt = (n + tile - 1) // tile
    run_tasks(_fwd_tasks, bhs * nqt, out, lse, q, k, v, kpad, rel, scale, causal, has_kpad,
              has_rel, tile, band)


@serial
def _dq_tasks(lo, hi, dq, q, k, v, dout, lse, delta, kpad, rel, scale, causal, has_kpad,
              has_rel, tile, band):
    """Tasks lo … hi − 1, each (batch·head, query tile), of :func:`flash_bwd_dq`."""
    for t in range(lo, hi):
        n, d = q.shape[1], q.shape[2]
        m = k.shape[1]
        nqt = (n + tile - 1) // tile
        bh = t // nqt
        qt = _zigzag(t % nqt, nqt)
        i0 = qt * tile
        i1 = min(i0 + tile, n)
        acc = np.zeros((i1 - i0, d), dtype=dq.dtype)               # (T_q, D)
        kend = min(m, i1) if causal else m
        for j0 in range(0, kend, tile):
            j1 = min(j0 + tile, m)
            stop, step = _bands(tile, band, i0, i1, j0, j1, causal)
            for b0 in range(j0, stop, step):   # the diagonal tile in bands (see _bands)
                b1 = min(b0 + step, stop)
                a0 = max(b0, i0) if causal else i0                 # queries i >= b0 only
                p, ds = _bwd_tile(q, k, v, dout, lse, delta, kpad, rel, bh, a0, i1, b0, b1,
                                  scale, causal, has_kpad, has_rel)
                # fwd: S = q kᵀ · scale  ->  dq = dS k · scale
                add_rows(acc[a0 - i0:], np.dot(ds, k[bh, b0:b1]))  # (T_q, D)
        for ii in range(i1 - i0):
            for c in range(d):
                dq[bh, i0 + ii, c] = acc[ii, c] * scale


def flash_bwd_dq(dq, q, k, v, dout, lse, delta, kpad, rel, scale, causal, has_kpad, has_rel,
                 tile, band):
    """dq = (P ∘ (dP − δ)) k · scale, one task per (batch·head, query tile).

    dq (BH, N, D); delta (BH, N) = rowsum(dout ∘ out); the rest as in :func:`flash_fwd`.
    """
    bhs, n, _ = q.shape
    nqt = (n + tile - 1) // tile
    run_tasks(_dq_tasks, bhs * nqt, dq, q, k, v, dout, lse, delta, kpad, rel, scale, causal,
              has_kpad, has_rel, tile, band)


@serial
def _dkdv_tasks(lo, hi, dk, dv, q, k, v, dout, lse, delta, kpad, rel, scale, causal,
                has_kpad, has_rel, tile, band):
    """Tasks lo … hi − 1, each (batch·head, key tile), of :func:`flash_bwd_dkdv`."""
    for t in range(lo, hi):
        n, d = q.shape[1], q.shape[2]
        m = k.shape[1]
        nkt = (m + tile - 1) // tile
        nqt = (n + tile - 1) // tile
        bh = t // nkt
        kt = _zigzag(t % nkt, nkt)
        j0 = kt * tile
        j1 = min(j0 + tile, m)
        acc_k = np.zeros((j1 - j0, d), dtype=dk.dtype)             # (T_k, D)
        acc_v = np.zeros((j1 - j0, dv.shape[2]), dtype=dv.dtype)   # (T_k, Dv)
        for qt in range(_q_tiles_of_key_tile(kt, tile, n, causal), nqt):
            i0 = qt * tile
            i1 = min(i0 + tile, n)
            stop, step = _bands(tile, band, i0, i1, j0, j1, causal)
            for b0 in range(j0, stop, step):   # the diagonal tile in bands (see _bands)
                b1 = min(b0 + step, stop)
                a0 = max(b0, i0) if causal else i0                 # queries i >= b0 only
                p, ds = _bwd_tile(q, k, v, dout, lse, delta, kpad, rel, bh, a0, i1, b0, b1,
                                  scale, causal, has_kpad, has_rel)
                # fwd: out = P v  ->  dv = Pᵀ dout
                add_rows(acc_v[b0 - j0:b1 - j0], np.dot(p.T, dout[bh, a0:i1]))  # (T_k, Dv)
                # fwd: S = q kᵀ · scale  ->  dk = dSᵀ q · scale
                add_rows(acc_k[b0 - j0:b1 - j0], np.dot(ds.T, q[bh, a0:i1]))    # (T_k, D)
        for jj in range(j1 - j0):
            for c in range(d):
                dk[bh, j0 + jj, c] = acc_k[jj, c] * scale
            for c in range(dv.shape[2]):
                dv[bh, j0 + jj, c] = acc_v[jj, c]


def flash_bwd_dkdv(dk, dv, q, k, v, dout, lse, delta, kpad, rel, scale, causal, has_kpad,
                   has_rel, tile, band):
    """dk = dSᵀ q · scale and dv = Pᵀ dout, one task per (batch·head, key tile).

    dk (BH, M, D), dv (BH, M, Dv); the rest as in :func:`flash_bwd_dq`.
    """
    bhs = q.shape[0]
    m = k.shape[1]
    nkt = (m + tile - 1) // tile
    run_tasks(_dkdv_tasks, bhs * nkt, dk, dv, q, k, v, dout, lse, delta, kpad, rel, scale,
              causal, has_kpad, has_rel, tile, band)


@serial
def _fused_heads(lo, hi, dq, dk, dv, q, k, v, dout, lse, delta, kpad, rel, scale, causal,
                 has_kpad, has_rel, tile, band):
    """Batch·heads lo … hi − 1 of :func:`flash_bwd_fused`."""
    for bh in range(lo, hi):
        n, d = q.shape[1], q.shape[2]
        m = k.shape[1]
        nkt = (m + tile - 1) // tile
        nqt = (n + tile - 1) // tile
        for kt in range(nkt):
            j0 = kt * tile
            j1 = min(j0 + tile, m)
            acc_k = np.zeros((j1 - j0, d), dtype=dk.dtype)         # (T_k, D)
            acc_v = np.zeros((j1 - j0, dv.shape[2]), dtype=dv.dtype)  # (T_k, Dv)
            for qt in range(_q_tiles_of_key_tile(kt, tile, n, causal), nqt):
                i0 = qt * tile
                i1 = min(i0 + tile, n)
                stop, step = _bands(tile, band, i0, i1, j0, j1, causal)
                for b0 in range(j0, stop, step):
                    b1 = min(b0 + step, stop)
                    a0 = max(b0, i0) if causal else i0
                    p, ds = _bwd_tile(q, k, v, dout, lse, delta, kpad, rel, bh, a0, i1, b0,
                                      b1, scale, causal, has_kpad, has_rel)
                    add_rows(acc_v[b0 - j0:b1 - j0], np.dot(p.T, dout[bh, a0:i1]))
                    add_rows(acc_k[b0 - j0:b1 - j0], np.dot(ds.T, q[bh, a0:i1]))
                    add_rows(dq[bh, a0:i1], np.dot(ds, k[bh, b0:b1]))
            for jj in range(j1 - j0):
                for c in range(d):
                    dk[bh, j0 + jj, c] = acc_k[jj, c] * scale
                for c in range(dv.shape[2]):
                    dv[bh, j0 + jj, c] = acc_v[jj, c]
        for i in range(n):
            for c in range(d):
                dq[bh, i, c] = dq[bh, i, c] * scale


def flash_bwd_fused(dq, dk, dv, q, k, v, dout, lse, delta, kpad, rel, scale, causal,
                    has_kpad, has_rel, tile, band):
    """dq, dk, dv in one pass per batch·head (P and dS computed once per tile).

    One task per batch·head.  Same tiles, same products and same accumulation orders as
    :func:`flash_bwd_dq` then :func:`flash_bwd_dkdv`, hence the same bits.  dq must arrive
    zero-filled.
    """
    run_tasks(_fused_heads, q.shape[0], dq, dk, dv, q, k, v, dout, lse, delta, kpad, rel,
              scale, causal, has_kpad, has_rel, tile, band)


@serial
def _rel_tasks(lo, hi, parts, q, k, v, dout, lse, delta, kpad, rel, scale, causal, has_kpad,
               tile):
    """Tasks lo … hi − 1, each (batch·head, tile diagonal), of :func:`flash_bwd_rel_parts`."""
    for t in range(lo, hi):
        n = q.shape[1]
        m = k.shape[1]
        nkt = (m + tile - 1) // tile
        nqt = (n + tile - 1) // tile
        ndiag = nqt + nkt - 1
        bh = t // ndiag
        diag = t % ndiag - (nkt - 1)
        for qt in range(max(0, diag), min(nqt, nkt + diag)):
            kt = qt - diag
            i0 = qt * tile
            i1 = min(i0 + tile, n)
            j0 = kt * tile
            j1 = min(j0 + tile, m)
            if causal and j0 > i1 - 1:
                continue
            p, ds = _bwd_tile(q, k, v, dout, lse, delta, kpad, rel, bh, i0, i1, j0, j1,
                              scale, causal, has_kpad, True)
            for ii in range(i1 - i0):
                for jj in range(j1 - j0):
                    # fwd: S_ij += rel_bias[i − j + M − 1]  ->  drel[i − j + M − 1] += dS_ij
                    parts[bh, t % ndiag, ii - jj + tile - 1] += ds[ii, jj]


def flash_bwd_rel_parts(parts, q, k, v, dout, lse, delta, kpad, rel, scale, causal,
                        has_kpad, tile):
    """Diagonal sums of dS per (batch·head, tile diagonal): the rel_bias gradient, in parts.

    parts (BH, nqt + nkt − 1, 2·tile − 1), zero-filled; diagonal t holds the tiles with
    qt − kt = t − (nkt − 1), and entry o the offsets (i − i0) − (j − j0) = o − (tile − 1).
    One task per (batch·head, tile diagonal), each writing its own row of parts.
    """
    bhs, n, _ = q.shape
    m = k.shape[1]
    nkt = (m + tile - 1) // tile
    nqt = (n + tile - 1) // tile
    run_tasks(_rel_tasks, bhs * (nqt + nkt - 1), parts, q, k, v, dout, lse, delta, kpad, rel,
              scale, causal, has_kpad, tile)


@serial
def flash_bwd_rel_combine(drel, parts, n, m, tile):
    """drel[bh, i − j + M − 1] = Σ over tile diagonals (ascending) of their parts."""
    bhs = parts.shape[0]
    nkt = (m + tile - 1) // tile
    ndiag = parts.shape[1]
    for bh in range(bhs):
        for t in range(ndiag):
            diag = t - (nkt - 1)
            base = diag * tile + m - 1 - (tile - 1)     # offset index of entry o = 0
            for o in range(2 * tile - 1):
                idx = base + o
                if 0 <= idx < n + m - 1:
                    drel[bh, idx] += parts[bh, t, o]
