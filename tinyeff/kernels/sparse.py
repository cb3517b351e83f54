"""Numba kernels of sparse (CSR-pattern) attention.

Attention on a pattern with nnz stored entries, batch items bh = 0 … BH − 1 and G pattern
groups (G = 1: one pattern shared by every batch item; G = H: per-head patterns, stacked
block-diagonally so that group g owns rows g·N … g·N + N − 1 and columns g·M … g·M + M − 1
of one (G·N, G·M) pattern, and batch item bh uses group g = bh mod G).  Per-entry arrays
(scores, probabilities, their gradients) are (BH / G, nnz): entry e of batch item bh lives
at [bh // G, e].  The math, entry by entry (e = (i, j) a stored entry of row i):

    s_e   = scale · q_i·k_j + rel[i − j + M − 1]          (−inf where key j is padding)
    p_e   = exp(s_e − c_i) / Σ_{e' ∈ row i} exp(s_e' − c_i),   c_i = max s_e'
    out_i = Σ_{e ∈ row i} p_e v_j
    dp_e  = dout_i·v_j;   ds_e = p_e (dp_e − Σ_row p dp);   dq_i = scale Σ_row ds_e k_j
    dv_j  = Σ_{e ∈ col j} p_e dout_i;   dk_j = scale Σ_{e ∈ col j} ds_e q_i
    drel[i − j + M − 1] += ds_e

The schedule (a *plan*, :class:`tinyeff.kernels.sparse_plan.Plan`, built once per pattern
by the kernels of that module) sorts every entry into one of three kinds:

* dense: consecutive query rows [r0, r1) form a *tile* with one contiguous key range
  [jlo, jhi) (the hull of the rows' longest runs of consecutive keys, e.g. BigBird's or
  Longformer's window); a row's entries inside the range are a contiguous span
  [ea_i, eb_i) of its CSR entries, and go through BLAS products on contiguous slices, as in
  the ``window`` kernel:

      S = q[r0:r1] k[jlo:jhi]ᵀ      s_e = scale · S[i − r0, j − jlo]
      out[r0:r1] = P̂ v[jlo:jhi]     (P̂: the tile's p in a zeroed (T, R) array)
      dP = dout[r0:r1] v[jlo:jhi]ᵀ,  dq[r0:r1] += dŜ k[jlo:jhi],
      dk[jlo:jhi] += dŜᵀ q[r0:r1],   dv[jlo:jhi] += P̂ᵀ dout[r0:r1]   (dŜ = ds·scale)

* heavy: keys stored by a large share of the rows outside their ranges (global tokens)
  are gathered into a small (Gc, D) block per tile and go through products as well; their
  dk, dv are two (Gc × N)·(N × D) products per batch item at the end (:func:`heavy_bwd`);
* scattered: everything else (random keys) is computed entry by entry, *blocked*
  (:func:`scattered_dot`, :func:`scattered_axpy`, :func:`cols_bwd_scattered`, in
  :mod:`tinyeff.kernels.sparse_scattered` and re-exported here): a task owns a
  chunk of rows and walks the keys in blocks, so that the rows of k and v it gathers come
  from cache rather than memory (the row's entries are visited in key order whatever the
  block size).

Key ranges of different tiles overlap, so the backward runs the tiles in *phases* (tiles of
one phase have disjoint ranges; phases run one after the other).  The scattered entries'
dk, dv walk a transposed list of the scattered entries column by column; their p and
ds·scale are written in that column order by the dq pass.  No atomics, every sum in a
fixed order: the bits do not depend on the thread count.

A dense product multiplies every key of the range with every row of the tile, so a non-
finite input would leak (0 · NaN) into rows or keys that do not store it.  A tile whose
factors of a product are not all finite (v[jlo:jhi] in the forward; q, dout of its rows or
k[jlo:jhi] in the backward; likewise the heavy keys) computes those parts entry by entry.
The wrappers' ``finite`` argument (the caller has checked the inputs) selects kernels
compiled without these checks and fallbacks: a first call compiles only what it can run.

NOTE: ``np.dot`` inside the kernels calls SciPy's OpenBLAS: the callers run them under
``blas_single_thread`` (kernels/_math.py; BLAS threads inside the task threads oversubscribe
the cores).  The exps use the vectorizable ``fast_exp`` (≤ 1 ulp float32, ≤ 2 ulp float64).
NOTE: fastmath stays off (−inf marks padded keys), except in the scattered kernels and
:func:`_finite`, which opt in to reassociation only (SPEEDTIP in ``sparse_scattered.py``).
The reference (NumPy/SciPy) sums in its own order: kernel/reference parity is to rounding,
thread-count identity is exact.
"""

from __future__ import annotations

import numba
import numpy as np

from ._jit import run_tasks, serial
from ._math import add_rows, fast_exp, rowmax
from .sparse_scattered import DOT_FLAGS, axpy, cols_bwd_scattered, scattered_axpy, scattered_dot

__all__ = ["cols_bwd_scattered", "heavy_bwd", "rel_bias_bwd_csr", "scattered_axpy",
           "scattered_dot", "tiles_bwd", "tiles_fwd"]

# ---------------------------------------------------------------------- tile helpers


@numba.njit(cache=True, parallel=False, fastmath=DOT_FLAGS, nogil=True)
def _finite(a):
    """True iff every element of the 2-D array a is finite (Σ a·0 is 0, else NaN)."""
    acc = a.dtype.type(0)
    for r in range(a.shape[0]):
        for c in range(a.shape[1]):
            acc += a[r, c] * 0
    return acc == 0


@numba.njit(inline="always")
def _lane_dot(x, y, product):
    """Σ_u x[u] y[u] (``product``) or Σ_u x[u], in eight lanes: lane l sums the entries
    u ≡ l (mod 8) in order, then ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)).

    SPEEDTIP: one running sum waits on each add in turn (fastmath is off, so LLVM keeps
    that order); eight independent sums do not.  The order is fixed by the code, so the
    result does not depend on the thread count or the machine."""
    n = x.shape[0]
    z = x.dtype.type(0)
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = z
    for u in range(0, n - 7, 8):
        if product:
            s0 += x[u] * y[u]
            s1 += x[u + 1] * y[u + 1]
            s2 += x[u + 2] * y[u + 2]
            s3 += x[u + 3] * y[u + 3]
            s4 += x[u + 4] * y[u + 4]
            s5 += x[u + 5] * y[u + 5]
            s6 += x[u + 6] * y[u + 6]
            s7 += x[u + 7] * y[u + 7]
        else:
            s0 += x[u]
            s1 += x[u + 1]
            s2 += x[u + 2]
            s3 += x[u + 3]
            s4 += x[u + 4]
            s5 += x[u + 5]
            s6 += x[u + 6]
            s7 += x[u + 7]
    for u in range(n - n % 8, n):
        s0 += x[u] * y[u] if product else x[u]
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@numba.njit(inline="always")
def _row_softmax(x):
    """In place: x = softmax(x) over one row's stored entries; returns lse.

    The max propagates NaN (as the reference's np.maximum); a row with no entry or only
    −inf scores gives x = 0 and lse = −inf.
    """
    c = rowmax(x)
    if c == -np.inf:
        for u in range(x.shape[0]):
            x[u] = 0
        return c
    for u in range(x.shape[0]):                  # vectorized exp
        x[u] = fast_exp(x[u] - c)
    z = _lane_dot(x, x, False)
    for u in range(x.shape[0]):
        x[u] = x[u] / z
    return c + np.log(z)


@numba.njit(inline="always")
def _gather_dense(dst, src_row, indices, ea, eb, off, a):
    """dst[e] = a · src_row[indices[e] − off] for e in [ea, eb) (a contiguous copy when the
    span holds consecutive keys, as a window's does)."""
    nb = eb - ea
    if nb <= 0:
        return
    c0 = indices[ea] - off
    if indices[eb - 1] - indices[ea] == nb - 1:
        for u in range(nb):
            dst[ea + u] = a * src_row[c0 + u]
    else:
        for e in range(ea, eb):
            dst[e] = a * src_row[indices[e] - off]


@numba.njit(inline="always")
def _scatter_dense(dst_row, src, indices, ea, eb, off, a):
    """dst_row = 0, then dst_row[indices[e] − off] = a · src[e] for e in [ea, eb)."""
    for u in range(dst_row.shape[0]):
        dst_row[u] = 0
    nb = eb - ea
    if nb <= 0:
        return
    c0 = indices[ea] - off
    if indices[eb - 1] - indices[ea] == nb - 1:
        for u in range(nb):
            dst_row[c0 + u] = a * src[ea + u]
    else:
        for e in range(ea, eb):
            dst_row[indices[e] - off] = a * src[e]


@numba.njit(inline="always")
def _zero(a):
    """a = 0 for a 2-D array (a loop: the slice assignment ``a[:, :] = 0`` compiles
    broadcasting code, SPEEDTIP in kernels/_jit.py)."""
    for r in range(a.shape[0]):
        for c in range(a.shape[1]):
            a[r, c] = 0


@numba.njit(inline="always")
def _gather_rows(dst, src, cols, shift):
    """dst[h] = src[cols[h] − shift] (the heavy keys of a group, contiguous).  A loop: the
    row assignment ``dst[h] = src[…]`` compiles broadcasting checks (seconds, SPEEDTIP in
    kernels/_jit.py)."""
    for h in range(dst.shape[0]):
        s = src[cols[h] - shift]
        for c in range(dst.shape[1]):
            dst[h, c] = s[c]

# ---------------------------------------------------------------------- forward


@numba.njit(inline="always")
def _tile_geometry(t, bo, tile_start, tile_jlo, tile_jhi, n, m, groups):
    """Tile t of batch item bo·G + g: rows [r0, r1) of the stacked (G·N) rows, nr = r1 − r0,
    the group g, the batch slice bh, the first row i0 within the slice, the stacked key
    ``off`` of tile column 0, the same key jl within the slice, and the dense span length."""
    r0, r1 = tile_start[t], tile_start[t + 1]
    g = r0 // n
    off = tile_jlo[t]                                      # stacked key of tile column 0
    return (r0, r1, r1 - r0, g, bo * groups + g, r0 - g * n, off, off - g * m,
            max(tile_jhi[t] - off, 0))


@numba.njit(inline="always")
def _heavy_keys(kb, vb, heavy_ptr, heavy_cols, g, m):
    """The heavy keys of group g gathered into contiguous (Gc, D) and (Gc, Dv) blocks."""
    h0, h1 = heavy_ptr[g], heavy_ptr[g + 1]
    kh = np.empty((h1 - h0, kb.shape[1]), dtype=kb.dtype)                   # (Gc, D)
    vh = np.empty((h1 - h0, vb.shape[1]), dtype=vb.dtype)                   # (Gc, Dv)
    _gather_rows(kh, kb, heavy_cols[h0:h1], g * m)
    _gather_rows(vh, vb, heavy_cols[h0:h1], g * m)
    return kh, vh


def _tiles_fwd_kernel(finite, has_rel, has_kpad):
    """The task kernel with ``finite`` (as :func:`_tiles_bwd_kernel`), ``has_rel`` and
    ``has_kpad`` (a bias, a key padding mask given) compile-time constants: only the
    branches a call can take are compiled."""

    @serial
    def _tiles_fwd_tasks(lo, hi, out, lse, p, q, k, v, rel, kpad, indptr, indices, row_ea,
                         row_eb, tile_start, tile_jlo, tile_jhi, heavy_ptr, heavy_cols, hv_ptr,
                         hv_e, hv_r, hv_h, groups, scale):
        """Tasks lo … hi − 1 (batch item, tile) of :func:`tiles_fwd`."""
        nt = tile_start.shape[0] - 1
        for task in range(lo, hi):
            bo = task // nt
            t = task - bo * nt
            _, n, d = q.shape
            m = v.shape[1]
            one = q.dtype.type(1)
            r0, r1, nr, g, bh, i0, off, jl, nrng = _tile_geometry(t, bo, tile_start, tile_jlo,
                                                                   tile_jhi, n, m, groups)
            qb, kb, vb, pb = q[bh], k[bh], v[bh], p[bo]
            qt = qb[i0:i0 + nr]
            # fwd: s_e = scale · q_i·k_j — the range and the heavy keys by products
            st = np.empty((nr, nrng), dtype=q.dtype)                            # (T, R)
            np.dot(qt, kb[jl:jl + nrng].T, st)
            kh, vh = _heavy_keys(kb, vb, heavy_ptr, heavy_cols, g, m)           # (Gc, D), (Gc, Dv)
            nh = kh.shape[0]
            sh = np.empty((nr, nh), dtype=q.dtype)                              # (T, Gc)
            np.dot(qt, kh.T, sh)
            for u in range(hv_ptr[t], hv_ptr[t + 1]):
                pb[hv_e[u]] = sh[hv_r[u], hv_h[u]] * scale
            for row in range(r0, r1):
                i = row - g * n
                r = row - r0
                e0, ea, eb, e1 = indptr[row], row_ea[row], row_eb[row], indptr[row + 1]
                _gather_dense(pb, st[r], indices, ea, eb, off, scale)
                if has_rel:                                    # + rel[i − j + M − 1]
                    for e in range(e0, e1):
                        pb[e] += rel[bh, i - (indices[e] - g * m) + m - 1]
                if has_kpad:                                   # padded key: −inf
                    for e in range(e0, e1):
                        if not kpad[bh, indices[e] - g * m]:
                            pb[e] = -np.inf
                # fwd: p_e = exp(s_e − c_i) / z_i
                lse[bh, i] = _row_softmax(pb[e0:e1])
            # fwd: out_i = Σ_e p_e v_j — products where every factor is finite (0 · NaN would
            # reach rows that do not store the key), else entry by entry
            if nrng > 0:
                if finite or _finite(vb[jl:jl + nrng]):
                    for r in range(nr):
                        _scatter_dense(st[r], pb, indices, row_ea[r0 + r], row_eb[r0 + r], off,
                                       one)
                    np.dot(st, vb[jl:jl + nrng], out[bh, i0:i0 + nr])                  # (T, Dv)
                elif not finite:
                    for row in range(r0, r1):
                        for e in range(row_ea[row], row_eb[row]):
                            axpy(out[bh, row - g * n], pb[e], vb[indices[e] - g * m])
            if nh > 0:
                if finite or _finite(vh):
                    _zero(sh)
                    for u in range(hv_ptr[t], hv_ptr[t + 1]):
                        sh[hv_r[u], hv_h[u]] = pb[hv_e[u]]
                    oh = np.empty((nr, vh.shape[1]), dtype=q.dtype)                 # (T, Dv)
                    np.dot(sh, vh, oh)
                    add_rows(out[bh, i0:i0 + nr], oh)
                elif not finite:
                    for u in range(hv_ptr[t], hv_ptr[t + 1]):
                        e = hv_e[u]
                        axpy(out[bh, i0 + hv_r[u]], pb[e], vb[indices[e] - g * m])

    return _tiles_fwd_tasks


_TILES_FWD_TASKS = {(f, r, k): _tiles_fwd_kernel(f, r, k)     # (finite, has_rel, has_kpad)
                    for f in (False, True) for r in (False, True) for k in (False, True)}


def tiles_fwd(out, lse, p, q, k, v, rel, kpad, indptr, indices, row_ea, row_eb, tile_start,
              tile_jlo, tile_jhi, heavy_ptr, heavy_cols, hv_ptr, hv_e, hv_r, hv_h, groups,
              scale, finite):
    """Forward on every tile: dense and heavy scores, the row softmax (the scattered scores
    are in p already, from :func:`scattered_dot`), out = the dense and heavy parts of P v
    (the scattered part is added by :func:`scattered_axpy`).

    out (BH, N, Dv) zero-filled on entry; lse (BH, N); p (BH/G, nnz);
    q (BH, N, D); k (BH, M, D); v (BH, M, Dv) with D, Dv > 0; rel (BH, N + M − 1) or
    (0, 0); kpad (BH, M) bool (True = real key) or (0, 0); the plan arrays: tiles, dense
    spans, heavy keys of group g = heavy_cols[heavy_ptr[g]:heavy_ptr[g + 1]] and tile t's
    heavy entries u ∈ [hv_ptr[t], hv_ptr[t + 1]): CSR entry hv_e[u] of the tile's row
    hv_r[u], key number hv_h[u] of its group's heavy keys.  ``finite``: v is known to be
    finite (no tile is checked; with False a tile whose v is not finite computes P v
    entry by entry).
    """
    kernel = _TILES_FWD_TASKS[bool(finite), rel.shape[0] > 0, kpad.shape[0] > 0]
    run_tasks(kernel, p.shape[0] * (tile_start.shape[0] - 1), out, lse, p, q, k, v, rel, kpad,
              indptr, indices, row_ea, row_eb, tile_start, tile_jlo, tile_jhi, heavy_ptr,
              heavy_cols, hv_ptr, hv_e, hv_r, hv_h, groups, scale)


# ---------------------------------------------------------------------- backward


def _tiles_bwd_kernel(finite):
    """The task kernel with ``finite`` a compile-time constant: True when the caller has
    checked that q, k, v (and dout) are finite, so that the entry-by-entry fallbacks for
    non-finite factors are not compiled (they would never run); False checks every tile."""

    @serial
    def _tiles_bwd_tasks(lo, hi, a, ntp, dq, dk, dv, ds, ph, dsh, dout, p, q, k, v, indptr,
                         indices, row_ea, row_eb, tile_start, tile_jlo, tile_jhi, phase_tiles,
                         heavy_ptr, heavy_cols, hv_ptr, hv_e, hv_r, hv_h, groups, scale, per_item):
        """Tasks lo … hi − 1 of one round of :func:`tiles_bwd`: (batch item, group) with
        ``per_item``, else (batch item, tile phase_tiles[a + …] of the ntp tiles of a phase)."""
        n_rows = q.shape[1]
        for task in range(lo, hi):
            if per_item:                        # (batch item, group): its tiles in phase order
                bo = task // groups
                grp = task - bo * groups
                u0, u1 = 0, phase_tiles.shape[0]
            else:                               # (batch item, tile of the phase)
                bo = task // ntp
                grp = -1
                u0 = a + task - bo * ntp
                u1 = u0 + 1
            for slot in range(u0, u1):
                t = phase_tiles[slot]
                if grp < 0 or tile_start[t] // n_rows == grp:
                    _, n, d = q.shape
                    m = v.shape[1]
                    one = q.dtype.type(1)
                    r0, r1, nr, g, bh, i0, off, jl, nrng = _tile_geometry(
                        t, bo, tile_start, tile_jlo, tile_jhi, n, m, groups)
                    qb, kb, vb, dob, pb, dsb = q[bh], k[bh], v[bh], dout[bh], p[bo], ds[bo]
                    qt, dot_ = qb[i0:i0 + nr], dob[i0:i0 + nr]
                    # fwd: out_i = Σ_e p_e v_j   -> dp_e = dout_i · v_j (range and heavy keys:
                    # products)
                    dpt = np.empty((nr, nrng), dtype=q.dtype)                           # (T, R)
                    np.dot(dot_, vb[jl:jl + nrng].T, dpt)
                    kh, vh = _heavy_keys(kb, vb, heavy_ptr, heavy_cols, g, m)  # (Gc, D), (Gc, Dv)
                    nh = kh.shape[0]
                    dph = np.empty((nr, nh), dtype=q.dtype)                             # (T, Gc)
                    np.dot(dot_, vh.T, dph)
                    # accumulating products need finite factors (else 0 · NaN leaks)
                    dense_g = nrng > 0 and (finite or (_finite(qt) and _finite(dot_)
                                                       and _finite(kb[jl:jl + nrng])))
                    heavy_g = nh > 0 and (finite or _finite(kh))
                    # (T, R) P̂: every row is set below (_scatter_dense zeroes it first)
                    pt = np.empty((nr if dense_g else 0, nrng), dtype=q.dtype)
                    for u in range(hv_ptr[t], hv_ptr[t + 1]):
                        dsb[hv_e[u]] = dph[hv_r[u], hv_h[u]]
                    for row in range(r0, r1):
                        i = row - g * n
                        r = row - r0
                        e0, ea, eb, e1 = indptr[row], row_ea[row], row_eb[row], indptr[row + 1]
                        _gather_dense(dsb, dpt[r], indices, ea, eb, off, one)
                        # fwd: p_e = exp(s_e − c_i) / z_i  -> ds_e = p_e (dp_e − Σ_row p dp)
                        delta = _lane_dot(pb[e0:e1], dsb[e0:e1], True)
                        for e in range(e0, e1):
                            dsb[e] = pb[e] * (dsb[e] - delta)
                        # fwd: s_e = scale · q_i·k_j + …  -> dq_i = scale Σ_e ds_e k_j,
                        #                                    dk_j = scale Σ_e ds_e q_i
                        # fwd: out_i = Σ_e p_e v_j        -> dv_j = Σ_e p_e dout_i
                        if dense_g:
                            _scatter_dense(dpt[r], dsb, indices, ea, eb, off, scale)
                            _scatter_dense(pt[r], pb, indices, ea, eb, off, one)
                        elif not finite:                    # this phase owns the keys of the range
                            for e in range(ea, eb):
                                j = indices[e] - g * m
                                axpy(dq[bh, i], dsb[e] * scale, kb[j])
                                axpy(dk[bh, j], dsb[e] * scale, qb[i])
                                axpy(dv[bh, j], pb[e], dob[i])
                    _zero(dph)
                    for u in range(hv_ptr[t], hv_ptr[t + 1]):
                        e, h, i = hv_e[u], hv_h[u], i0 + hv_r[u]
                        ph[bh, h, i] = pb[e]                # dk, dv: heavy_bwd
                        dsh[bh, h, i] = dsb[e] * scale
                        if heavy_g:
                            dph[hv_r[u], h] = dsb[e] * scale
                        elif not finite:
                            axpy(dq[bh, i], dsb[e] * scale, kb[indices[e] - g * m])
                    gq = np.empty((nr, d), dtype=q.dtype)                               # (T, D)
                    if dense_g:
                        gk = np.empty((nrng, d), dtype=q.dtype)                         # (R, D)
                        gv = np.empty((nrng, vb.shape[1]), dtype=q.dtype)               # (R, Dv)
                        np.dot(dpt, kb[jl:jl + nrng], gq)
                        add_rows(dq[bh, i0:i0 + nr], gq)
                        np.dot(dpt.T, qt, gk)
                        add_rows(dk[bh, jl:jl + nrng], gk)
                        np.dot(pt.T, dot_, gv)
                        add_rows(dv[bh, jl:jl + nrng], gv)
                    if heavy_g:
                        np.dot(dph, kh, gq)
                        add_rows(dq[bh, i0:i0 + nr], gq)

    return _tiles_bwd_tasks


_TILES_BWD_TASKS = {f: _tiles_bwd_kernel(f) for f in (False, True)}   # finite -> kernel


def tiles_bwd(dq, dk, dv, ds, ph, dsh, dout, p, q, k, v, indptr, indices, row_ea, row_eb,
              tile_start, tile_jlo, tile_jhi, phase_ptr, phase_tiles, heavy_ptr, heavy_cols,
              hv_ptr, hv_e, hv_r, hv_h, groups, scale, per_item, finite):
    """Backward on every tile: the dense and heavy dp (the scattered dp are in ds already,
    from :func:`scattered_dot`), ds of every entry, the dense and heavy parts of dq, the
    dense entries' dk, dv; the heavy entries' p and ds·scale go to ph, dsh.

    dq (BH, N, D), dk (BH, M, D), dv (BH, M, Dv) zero-filled on entry; ds (BH/G, nnz);
    ph, dsh (BH, Gc_max, N) zero-filled; dout (BH, N, Dv); phase f = the tiles
    phase_tiles[phase_ptr[f]:phase_ptr[f + 1]].  Two schedules, same result bits: phase by
    phase, parallel over (batch item, tile of the phase); or (``per_item``, when the batch
    items alone keep the threads busy) parallel over batch items, each visiting its tiles in
    the same phase-major order — no barrier between phases.  Either way each key row
    receives the tiles' contributions in phase order.  ``finite``: q, k and dout are known
    to be finite (no tile is checked; with False a tile with a non-finite factor computes
    the gradients of its entries entry by entry).
    """
    bo_n = p.shape[0]
    rounds = [(0, 0, bo_n * groups)] if per_item else [    # (a, ntp, tasks) per round
        (int(phase_ptr[f]), int(phase_ptr[f + 1] - phase_ptr[f]),
         bo_n * int(phase_ptr[f + 1] - phase_ptr[f])) for f in range(phase_ptr.shape[0] - 1)]
    for a, ntp, ntask in rounds:            # per_item: one round; else one per phase
        run_tasks(_TILES_BWD_TASKS[bool(finite)], ntask, a, ntp, dq, dk, dv, ds, ph, dsh, dout,
                  p, q, k, v, indptr, indices, row_ea, row_eb, tile_start, tile_jlo, tile_jhi,
                  phase_tiles, heavy_ptr, heavy_cols, hv_ptr, hv_e, hv_r, hv_h, groups, scale,
                  per_item)


def _heavy_kernel(finite):
    """The task kernel with ``finite`` a compile-time constant: True when the caller has
    checked that q, k, v (and dout) are finite, so that the entry-by-entry fallbacks for
    non-finite factors are not compiled (they would never run); False checks every tile."""

    @serial
    def _heavy_tasks(lo, hi, dk, dv, ph, dsh, q, dout, p, ds, heavy_ptr, heavy_cols, tile_start,
                     hv_ptr, hv_e, hv_r, hv_h, groups, scale):
        """Batch items lo … hi − 1 of :func:`heavy_bwd`."""
        for bh in range(lo, hi):
            n = q.shape[1]
            m = dk.shape[1]
            g = bh % groups
            bo = bh // groups
            h0 = heavy_ptr[g]
            nh = heavy_ptr[g + 1] - h0
            if nh == 0:
                continue
            if finite or (_finite(q[bh]) and _finite(dout[bh])):
                gk = np.empty((nh, q.shape[2]), dtype=q.dtype)                      # (Gc, D)
                gv = np.empty((nh, dout.shape[2]), dtype=q.dtype)                   # (Gc, Dv)
                np.dot(dsh[bh, :nh], q[bh], gk)
                np.dot(ph[bh, :nh], dout[bh], gv)
                for h in range(nh):
                    j = heavy_cols[h0 + h] - g * m
                    add_rows(dk[bh, j:j + 1], gk[h:h + 1])
                    add_rows(dv[bh, j:j + 1], gv[h:h + 1])
                continue
            if finite:
                continue
            for t in range(tile_start.shape[0] - 1):       # the group's heavy entries in CSR
                if tile_start[t] // n != g:                  # order: each key's rows ascending
                    continue
                for u in range(hv_ptr[t], hv_ptr[t + 1]):
                    e = hv_e[u]
                    i = tile_start[t] - g * n + hv_r[u]
                    j = heavy_cols[h0 + hv_h[u]] - g * m
                    axpy(dk[bh, j], ds[bo, e] * scale, q[bh, i])
                    axpy(dv[bh, j], p[bo, e], dout[bh, i])

    return _heavy_tasks


_HEAVY_TASKS = {f: _heavy_kernel(f) for f in (False, True)}   # finite -> kernel


def heavy_bwd(dk, dv, ph, dsh, q, dout, p, ds, heavy_ptr, heavy_cols, tile_start, hv_ptr, hv_e,
              hv_r, hv_h, groups, scale, finite):
    """dk_j += Σ (ds_e·scale) q_i, dv_j += Σ p_e dout_i over the heavy entries of each heavy
    key j: two products per batch item (ph, dsh from :func:`tiles_bwd`), or, if q or dout
    of the batch item is not finite, entry by entry over the tiles' heavy entries (the plan
    arrays of :func:`tiles_fwd`; each key's rows ascending).  ``finite``: q and dout are
    known to be finite (nothing is checked)."""
    run_tasks(_HEAVY_TASKS[bool(finite)], q.shape[0], dk, dv, ph, dsh, q, dout, p, ds,
              heavy_ptr, heavy_cols, tile_start, hv_ptr, hv_e, hv_r, hv_h, groups, scale)


@serial
def _rel_bias_tasks(lo, hi, drel, ds, indptr, indices, groups, n, m):
    """Batch items lo … hi − 1 of :func:`rel_bias_bwd_csr`."""
    for bh in range(lo, hi):
        g = bh % groups
        bo = bh // groups
        for i in range(n):
            row = g * n + i
            for e in range(indptr[row], indptr[row + 1]):
                drel[bh, i - (indices[e] - g * m) + m - 1] += ds[bo, e]


def rel_bias_bwd_csr(drel, ds, indptr, indices, groups, n, m):
    """drel[bh, i − j + M − 1] += ds_e, one batch item per task, entries in CSR order.

    drel (BH, N + M − 1) zero-filled on entry.
    """
    run_tasks(_rel_bias_tasks, drel.shape[0], drel, ds, indptr, indices, groups, n, m)
