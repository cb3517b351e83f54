"""Numba kernels of banded ("interval") attention, serving ``window`` and ``local``.

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
Let P be the smallest distance such that tiles t and t + P have disjoint key ranges
(:func:`plan_phases`).  The backward cuts each batch·head's tiles into *blocks* of
L = max(16, 2P) consecutive tiles and runs in two parts: first every block's tiles after its
first P − 1, in order, all blocks at once (tiles of different blocks are then ≥ P apart),
then every block's first P − 1 tiles, in order, all blocks at once (≥ L − P + 2 ≥ P apart).
Each key row thus receives its contributions in one fixed order whatever the number of
threads (no atomics; bit-identical results with 1 or 2 threads), and consecutive tiles of a
block reuse the key rows (k, v, dk, dv) just touched, from cache.  The bias gradient is
written per tile, ``dbias_part[b, t]``, and summed over tiles by the caller in a fixed order.

Schedule: ``n_chunks`` contiguous runs of tasks ((batch·head, tile) in the forward,
(batch·head, block) in the backward; the callers pass the Numba thread count), handed to
``run_tasks`` (kernels/_jit.py), which runs them on that many threads; the kernels
themselves are ``serial`` (no ``prange``: no gufunc to compile, about half the compile
time).  Each run allocates its scratch tiles once and reuses them for all its tasks.  Every
task computes its tiles the same way whichever run holds it, so ``n_chunks`` never changes
a result.

SPEEDTIP: tiles are held transposed, Sᵀ = k q_tileᵀ (R, T), as in the forward of
``kernels/blocked.py``: each query's max and sum run down a column, serially in key order
per query (the order of a row-wise loop) but vectorized across the T queries; the band
becomes one range of queries per key row (lo, hi never decrease), so masking costs two range
fills per key row instead of a test per element; and the backward's five tile products are
faster in this orientation.
SPEEDTIP: loops that should vectorize run over views starting at index 0 (``x = st[jj, a:e]``,
``for u in range(e − a)``): with ``for u in range(a, e)`` Numba keeps its negative-index
wraparound check, which keeps LLVM from vectorizing the loop.  Tiles without padded keys,
empty rows or bias skip the select.
SPEEDTIP: no allocation per tile: ``np.dot`` writes into per-run scratch (and straight into
dq / out) through its ``out`` argument.
SPEEDTIP: Sᵀ = k q_tileᵀ and dPᵀ = v dout_tileᵀ take the tile's rows copied transposed into
scratch (:func:`_transposed`, (D, T) C-contiguous), not the transposed view: with the view,
SciPy's OpenBLAS skips its small-matrix kernels for a tile of this size and packs both
operands first (BENCHMARKS.md, "Tile products and OpenBLAS's small-matrix kernels").
Same bits.
SPEEDTIP: ``np.dot`` inside Numba calls SciPy's OpenBLAS.  When OpenBLAS itself is
multi-threaded, its threads fight the Numba threads; the callers pin it to one thread with
``blas_single_thread`` and the exps use the vectorizable ``fast_exp`` (both from
``kernels/_math.py``, ≤ 1 ulp float32, ≤ 2 ulp float64).
NOTE: reductions (row max, row sum, δ, dk/dv accumulation, bias gradient) stay serial in
index order; ``fastmath`` stays off (jit policy).
Measurements behind these choices: BENCHMARKS.md, "Band kernels: design measurements".

Kernels take contiguous arrays, outputs first, and do no validation; ``attention/_band.py``
builds their arguments (a ``BandPlan``) for both variants and is the only caller.
"""

from __future__ import annotations

import numba
import numpy as np

from ._jit import run_tasks, serial
from ._math import colmax, fast_exp

__all__ = ["attend_band", "attend_band_bwd", "plan_phases", "n_chunks"]

BLOCK_TILES = 16   # the backward's blocks of consecutive tiles (at least 2·n_phases)


def n_chunks() -> int:
    """The kernels' ``n_chunks`` argument: one run of tiles per Numba thread."""
    return numba.get_num_threads()


# ----------------------------------------------------------------------------- tile helpers


@serial
def _rows_seeing(ia, ib, j, lo, hi, i0, bq, key_real):
    """Advance the tile rows [ia, ib) that see key j (lo, hi rise with the row, so both ends
    only move forward as j grows): row i0 + r sees j iff lo[i0 + r] ≤ j < hi[i0 + r].
    Returns (ia, ib, a, e): [a, e) are the rows that score key j — [ia, ib), or none
    (a = e = bq) when j is a padded key."""
    while ia < bq and hi[i0 + ia] <= j:
        ia += 1
    while ib < bq and lo[i0 + ib] <= j:
        ib += 1
    if not key_real:
        return ia, ib, bq, bq
    return ia, ib, ia, max(ib, ia)


@serial
def _transposed(buf, x):
    """xᵀ (C, T) of a tile x (T, C), written C-contiguous into the scratch buf (≥ C·T)."""
    t, c = x.shape
    xt = buf[:c * t].reshape((c, t))
    for r in range(t):
        for u in range(c):
            xt[u, r] = x[r, u]
    return xt


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
              off_min, scale, buf, qbuf, mx, tmp, msub, z):
    """One tile of :func:`attend_band`: rows [i0, i1) against keys [jl, jh), jh > jl."""
    bq = i1 - i0
    bk = jh - jl
    zero = scale - scale                       # 0 in scale's dtype (scale * 0 is float64)
    raw = not has_bias and scale > 0           # S · scale formed inside the exp pass
    st = buf[:bk * bq].reshape((bk, bq))                           # (R, T) scratch
    np.dot(k[b, jl:jh], _transposed(qbuf, q[b, i0:i1]), st)        # raw Sᵀ
    ia = 0                                     # rows [ia, ib) of the tile see key j
    ib = 0
    for jj in range(bk):
        j = jl + jj
        ia, ib, a, e = _rows_seeing(ia, ib, j, lo, hi, i0, bq, key_ok[b, j])  # padded: −∞
        st[jj, :a] = -np.inf
        st[jj, e:] = -np.inf
        if has_bias:
            x = st[jj, a:e]                                        # view: rows seeing j
            off = i0 + a - j - off_min         # bias index of (i0 + a, j)
            for ii in range(e - a):
                x[ii] = x[ii] * scale + bias[b, off + ii]
        elif not raw:
            x = st[jj, a:e]
            for ii in range(e - a):
                x[ii] = x[ii] * scale
    for ii in range(bq):
        if not row_ok[b, i0 + ii]:             # skipped row: nothing allowed
            for jj in range(bk):
                st[jj, ii] = -np.inf
    mx[:bq] = -np.inf
    colmax(mx, tmp, mx, st)                    # row max (per column of Sᵀ)
    if raw:                                    # max(x · scale) = max(x) · scale, scale > 0
        for ii in range(bq):
            mx[ii] = mx[ii] * scale
    for ii in range(bq):                       # no admissible key: subtract 0, P̃ = 0
        z[ii] = 0
        msub[ii] = zero if mx[ii] == -np.inf else mx[ii]
    one = scale if raw else zero + np.float32(1)   # the factor S still needs, in S's dtype
    for jj in range(bk):                       # P̃ = exp(S − max), z = Σ_j P̃ in key order
        row = st[jj]
        for ii in range(bq):
            ex = fast_exp(row[ii] * one - msub[ii])
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


@serial
def _fwd_runs(c_lo, c_hi, nch, out, lse, q, k, v, tile_start, tile_jlo, tile_jhi, lo, hi,
              row_ok, key_ok, bias, has_bias, off_min, scale):
    """Runs c_lo … c_hi − 1 of the ``nch`` runs of :func:`attend_band`."""
    bh = q.shape[0]
    m = k.shape[1]
    nt = tile_start.shape[0] - 1
    dt = out.dtype
    tq, tk = _tile_extent(tile_start, tile_jlo, tile_jhi)
    ntask = bh * nt
    for c in range(c_lo, c_hi):
        buf = np.empty(tq * tk, dtype=dt)                          # (R·T,) Sᵀ, then P̃ᵀ
        qbuf = np.empty(q.shape[2] * tq, dtype=dt)                 # (D·T,) q tileᵀ
        mx = np.empty(tq, dtype=dt)                                # (T,) row max
        tmp = np.empty(tq, dtype=dt)                               # (T,) scratch of colmax
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
                      has_bias, off_min, scale, buf, qbuf, mx, tmp, msub, z)


def attend_band(out, lse, q, k, v, tile_start, tile_jlo, tile_jhi, lo, hi, row_ok, key_ok,
                bias, has_bias, off_min, scale, n_chunks):
    """out_i = Σ_{j∈[lo_i,hi_i), key_ok} softmax_j(q_i·k_j·scale + bias[i−j−off_min]) v_j.

    out (BH, N, Dv), lse (BH, N); q (BH, N, D), k (BH, M, D), v (BH, M, Dv);
    tile_start (nt+1,), tile_jlo/tile_jhi (nt,), lo/hi (N,) int64; row_ok (BH, N) and
    key_ok (BH, M) bool; bias (BH, n_off); scale of q's dtype; n_chunks >= 1 runs of tasks
    (the thread count; no effect on the result).
    """
    nch = max(1, min(q.shape[0] * (tile_start.shape[0] - 1), n_chunks))
    run_tasks(_fwd_runs, nch, nch, out, lse, q, k, v, tile_start, tile_jlo, tile_jhi, lo, hi,
              row_ok, key_ok, bias, has_bias, off_min, scale)


@serial
def _bwd_tile(dq, dk, dv, dbias_part, dout, out, lse, q, k, v, b, t, i0, i1, jl, jh, lo, hi,
              row_ok, key_ok, bias, has_bias, off_min, scale, sbuf, gbuf, kbuf, vbuf, qbuf,
              dbuf, lt, dl, live):
    """One tile of :func:`attend_band_bwd`: rows [i0, i1) against keys [jl, jh), jh > jl.

    Held transposed like the forward's tiles: Sᵀ, dPᵀ (R, T), one key per row.
    """
    bq = i1 - i0
    bk = jh - jl
    d = q.shape[2]
    ddv = v.shape[2]
    zero = scale - scale                       # 0 in scale's dtype (scale * 0 is float64)
    st = sbuf[:bk * bq].reshape((bk, bq))                          # (R, T) scratch
    gt = gbuf[:bk * bq].reshape((bk, bq))                          # (R, T) scratch
    np.dot(k[b, jl:jh], _transposed(qbuf, q[b, i0:i1]), st)        # raw Sᵀ
    np.dot(v[b, jl:jh], _transposed(dbuf, dout[b, i0:i1]), gt)     # dPᵀ
    any_dead = False
    for r in range(bq):                        # per query: lse, δ, live
        i = i0 + r
        acc = 0.0                              # δ_i = dout_i · out_i, serial in float64
        for c in range(ddv):
            acc += np.float64(dout[b, i, c]) * np.float64(out[b, i, c])
        dl[r] = acc                            # rounded to the dtype
        lt[r] = lse[b, i]
        live[r] = row_ok[b, i] and lse[b, i] != -np.inf   # empty or skipped rows: P = 0
        any_dead = any_dead or not live[r]
    ia = 0                                     # rows [ia, ib) of the tile see key j
    ib = 0
    for jj in range(bk):
        j = jl + jj
        ia, ib, a, e = _rows_seeing(ia, ib, j, lo, hi, i0, bq, key_ok[b, j])  # padded: P = 0
        st[jj, :a] = 0                         # outside the band
        st[jj, e:] = 0
        gt[jj, :a] = 0
        gt[jj, e:] = 0
        x = st[jj, a:e]                                            # views: rows seeing j
        g = gt[jj, a:e]
        lr = lt[a:e]
        dr = dl[a:e]
        ok = live[a:e]
        nb = e - a
        if has_bias:
            off = i0 + a - j - off_min         # bias index of (i0 + a, j)
            db = dbias_part[b, t, off:off + nb]
            for u in range(nb):
                # fwd: p = exp(x − max) / z  ==  exp(x − lse),  x = q·k · scale + bias
                p = fast_exp(x[u] * scale + bias[b, off + u] - lr[u]) if ok[u] else zero
                x[u] = p
                # fwd: p = softmax(x)  ->  ds = p (dp − Σ_j p dp)
                g[u] = p * (g[u] - dr[u]) if ok[u] else zero
            for u in range(nb):
                # fwd: x += bias[i − j − off_min]
                db[u] += g[u]
            for u in range(nb):
                g[u] = g[u] * scale            # ds · scale
        elif any_dead:
            for u in range(nb):
                p = fast_exp(x[u] * scale - lr[u]) if ok[u] else zero
                x[u] = p
                g[u] = (p * (g[u] - dr[u])) * scale if ok[u] else zero
        else:
            for u in range(nb):
                # fwd: p = exp(x − max) / z  ==  exp(x − lse),  x = q·k · scale
                p = fast_exp(x[u] * scale - lr[u])
                x[u] = p
                # fwd: p = softmax(x)  ->  ds = p (dp − Σ_j p dp), then · scale
                g[u] = (p * (g[u] - dr[u])) * scale
    # fwd: x = (q kᵀ) · scale   (gt now holds dSᵀ · scale)
    np.dot(gt.T, k[b, jl:jh], dq[b, i0:i1])                        # (T, D)
    tkk = kbuf[:bk * d].reshape((bk, d))
    np.dot(gt, q[b, i0:i1], tkk)                                   # (R, D)
    for jj in range(bk):
        acc_k = dk[b, jl + jj]
        add_k = tkk[jj]
        for c in range(d):
            acc_k[c] += add_k[c]
    # fwd: out = p v
    tvv = vbuf[:bk * ddv].reshape((bk, ddv))
    np.dot(st, dout[b, i0:i1], tvv)                                # (R, Dv)
    for jj in range(bk):
        acc_v = dv[b, jl + jj]
        add_v = tvv[jj]
        for c in range(ddv):
            acc_v[c] += add_v[c]


@serial
def _zero_runs(c_lo, c_hi, nzero, dk, dv):
    """Runs c_lo … c_hi − 1 of the ``nzero`` runs that set dk, dv to 0 (they accumulate)."""
    bh, m = dk.shape[:2]
    for c in range(c_lo, c_hi):
        for r in range(c * (bh * m) // nzero, (c + 1) * (bh * m) // nzero):
            dk[r // m, r % m, :] = 0
            dv[r // m, r % m, :] = 0


@serial
def _bwd_runs(c_lo, c_hi, nch, part, dq, dk, dv, dbias_part, dout, out, lse, q, k, v,
              tile_start, tile_jlo, tile_jhi, lo, hi, row_ok, key_ok, bias, has_bias, off_min,
              n_phases, span, scale):
    """Runs c_lo … c_hi − 1 of the ``nch`` runs of part 1 (block bodies) or 2 (their first
    P − 1 tiles) of :func:`attend_band_bwd`; blocks of ``span`` tiles."""
    bh = q.shape[0]
    m = k.shape[1]
    d = q.shape[2]
    ddv = v.shape[2]
    nt = tile_start.shape[0] - 1
    dt = dq.dtype
    tq, tk = _tile_extent(tile_start, tile_jlo, tile_jhi)
    nblk = (nt + span - 1) // span
    ntask = bh * nblk
    for c in range(c_lo, c_hi):
        sbuf = np.empty(tq * tk, dtype=dt)                         # (T·R,) scores, then P
        gbuf = np.empty(tq * tk, dtype=dt)                         # (T·R,) dP, then dS·scale
        kbuf = np.empty(tk * d, dtype=dt)                          # (R·D,) dk of a tile
        vbuf = np.empty(tk * ddv, dtype=dt)                        # (R·Dv,) dv of a tile
        qbuf = np.empty(d * tq, dtype=dt)                          # (D·T,) q tileᵀ
        dbuf = np.empty(ddv * tq, dtype=dt)                        # (Dv·T,) dout tileᵀ
        lt = np.empty(tq, dtype=dt)                                # (T,) lse of the tile rows
        dl = np.empty(tq, dtype=dt)                                # (T,) δ of the tile rows
        live = np.empty(tq, dtype=np.bool_)                        # (T,) rows with a key
        for task in range(c * ntask // nch, (c + 1) * ntask // nch):
            b = task // nblk
            ta = (task - b * nblk) * span
            tb = min(ta + span, nt)
            head = min(ta + n_phases - 1, tb)
            t_first, t_end = (head, tb) if part == 1 else (ta, head)
            for t in range(t_first, t_end):
                jl = min(tile_jlo[t], m)       # (a band may run past the last key)
                jh = min(tile_jhi[t], m)
                if jh <= jl:                   # no key: dq = 0 (no product writes it)
                    dq[b, tile_start[t]:tile_start[t + 1], :] = 0
                    continue
                _bwd_tile(dq, dk, dv, dbias_part, dout, out, lse, q, k, v, b, t,
                          tile_start[t], tile_start[t + 1], jl, jh, lo, hi, row_ok,
                          key_ok, bias, has_bias, off_min, scale, sbuf, gbuf, kbuf, vbuf,
                          qbuf, dbuf, lt, dl, live)


def attend_band_bwd(dq, dk, dv, dbias_part, dout, out, lse, q, k, v, tile_start, tile_jlo,
                    tile_jhi, lo, hi, row_ok, key_ok, bias, has_bias, off_min, n_phases, scale,
                    n_chunks):
    """Backward of :func:`attend_band`.

    dq (BH, N, D), dk (BH, M, D), dv (BH, M, Dv) may arrive uninitialised (``np.empty``: the
    kernel zeroes dk, dv and the dq rows of key-less tiles, in parallel, instead of a serial
    ``np.zeros`` in the caller); dbias_part (BH, nt, n_off) zeroed;
    dout (BH, N, Dv); out (BH, N, Dv) and lse (BH, N) from the forward (δ_i = dout_i · out_i
    is formed here, in float64, once per row); the band arguments as in :func:`attend_band`;
    n_phases from :func:`plan_phases` of the tile key ranges.  Three passes, each over
    ``n_chunks`` runs: dk, dv = 0; the block bodies; their first P − 1 tiles.
    """
    bh, m = k.shape[:2]
    nt = tile_start.shape[0] - 1
    span = max(BLOCK_TILES, 2 * n_phases)      # tiles per block
    nblk = (nt + span - 1) // span
    nzero = max(1, min(bh * m, n_chunks))
    run_tasks(_zero_runs, nzero, nzero, dk, dv)
    nch = max(1, min(bh * nblk, n_chunks))
    for part in (1, 2):
        run_tasks(_bwd_runs, nch, nch, part, dq, dk, dv, dbias_part, dout, out, lse, q, k, v,
                  tile_start, tile_jlo, tile_jhi, lo, hi, row_ok, key_ok, bias, has_bias,
                  off_min, n_phases, span, scale)


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
