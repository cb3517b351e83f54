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
from the kernels of the "plan" section) sorts every entry into one of three kinds:

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
  (:func:`scattered_dot`, :func:`scattered_axpy`, :func:`cols_bwd_scattered`): a task owns a
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

NOTE: ``np.dot`` inside the kernels calls SciPy's OpenBLAS: the callers run them under
``blas_single_thread`` (kernels/_math.py; BLAS threads inside prange threads oversubscribe
the cores).  The exps use the vectorizable ``fast_exp`` (≤ 1 ulp float32, ≤ 2 ulp float64).
NOTE: fastmath stays off (−inf marks padded keys), except in :func:`_dot` and
:func:`_finite`, which opt in to reassociation only (see the SPEEDTIP).  The reference
(NumPy/SciPy) sums in its own order: kernel/reference parity is to rounding, thread-count
identity is exact.
"""

from __future__ import annotations

import numba
import numpy as np

from ._jit import kernel, prange, serial
from ._math import fast_exp

# ---------------------------------------------------------------------- helpers

# SPEEDTIP: a dot product over D is a reduction; with fastmath off LLVM must keep the serial
# order and emits scalar code (measured ≈ 4× slower than the vectorized form on the BigBird
# benchmark).  The kernels that walk entries one by one (the scattered passes) are therefore
# compiled with reassociation and FMA contraction (``_vec_kernel``) — not with no-inf/no-NaN,
# so −inf and NaN keep their meaning.  Their small helpers below are inlined (a call per
# entry cost its overhead plus reference counting of the array views: measured ≈ 20 % of the
# BigBird fwd+bwd), so they take the flags of the kernel they are inlined into.  The
# summation order of a dot is then the one the compiled code fixes (SIMD lanes, then a fixed
# horizontal sum): the same on every call and thread, so results stay bit-identical across
# thread counts.  No prange reduction exists in these kernels (each output has one owner).
_DOT_FLAGS = {"reassoc", "contract"}
_vec_kernel = numba.njit(cache=True, parallel=True, fastmath=_DOT_FLAGS, nogil=True)


@numba.njit(inline="always")
def _dot(x, y):
    """Σ_d x_d y_d (vectorized; order fixed by the compiled code)."""
    acc = x.dtype.type(0)
    for t in range(x.shape[0]):
        acc += x[t] * y[t]
    return acc


@numba.njit(cache=True, parallel=False, fastmath=_DOT_FLAGS, nogil=True)
def _finite(a):
    """True iff every element of the 2-D array a is finite (Σ a·0 is 0, else NaN)."""
    acc = a.dtype.type(0)
    for r in range(a.shape[0]):
        for c in range(a.shape[1]):
            acc += a[r, c] * 0
    return acc == 0


@numba.njit(inline="always")
def _axpy(out, a, x):
    """out += a · x (elementwise; no reduction, so it vectorizes; FMA allowed)."""
    for d in range(out.shape[0]):
        out[d] += a * x[d]


@numba.njit(inline="always")
def _axpy2(out, a, x, b, y):
    """out = (out + a · x) + b · y, two entries per pass over out (half the loads/stores)."""
    for d in range(out.shape[0]):
        o = out[d]
        o += a * x[d]
        o += b * y[d]
        out[d] = o


@numba.njit(inline="always")
def _row_softmax(x):
    """In place: x = softmax(x) over one row's stored entries; returns lse.

    The max propagates NaN (as the reference's np.maximum); a row with no entry or only
    −inf scores gives x = 0 and lse = −inf.
    """
    c = x.dtype.type(-np.inf)
    for u in range(x.shape[0]):
        if x[u] > c or x[u] != x[u]:
            c = x[u]
    if c == -np.inf:
        x[:] = 0
        return c
    for u in range(x.shape[0]):                  # vectorized exp
        x[u] = fast_exp(x[u] - c)
    z = x.dtype.type(0)
    for u in range(x.shape[0]):                  # serial, entry order
        z += x[u]
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
    dst_row[:] = 0
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
def _gather_rows(dst, src, cols, shift):
    """dst[h] = src[cols[h] − shift] (the heavy keys of a group, contiguous)."""
    for h in range(dst.shape[0]):
        dst[h] = src[cols[h] - shift]


# ---------------------------------------------------------------------- plan


@kernel
def longest_runs(run_lo, run_hi, indptr, indices, min_len):
    """[run_lo_i, run_hi_i) = row i's longest run of consecutive keys (the first of that
    length), or [0, 0) if it is shorter than min_len."""
    for i in prange(run_lo.shape[0]):
        e, e1 = indptr[i], indptr[i + 1]
        best_lo, best_len = 0, 0
        while e < e1:
            s = e
            while e + 1 < e1 and indices[e + 1] == indices[e] + 1:
                e += 1
            if e - s + 1 > best_len:
                best_len = e - s + 1
                best_lo = indices[s]
            e += 1
        if best_len >= min_len:
            run_lo[i] = best_lo
            run_hi[i] = best_lo + best_len
        else:
            run_lo[i] = 0
            run_hi[i] = 0


@serial
def plan_tiles(tile_start, tile_jlo, tile_jhi, run_lo, run_hi, n, t_max, max_area, min_eff):
    """Greedy tiling of the (G·N) rows; returns the number of tiles nt.

    A tile grows row by row while it has fewer than t_max rows, stays inside one group
    (n rows), and its range [jlo, jhi) (hull of the rows' runs) satisfies
    Σ run lengths >= min_eff · rows · (jhi − jlo) and rows · (jhi − jlo) <= max_area.
    Fills tile_start[: nt + 1], tile_jlo[: nt], tile_jhi[: nt] (empty range: jlo = jhi).
    """
    rows = run_lo.shape[0]
    nt = 0
    i = 0
    while i < rows:
        start = i
        group_end = (i // n + 1) * n
        jl, jh = run_lo[i], run_hi[i]
        covered = jh - jl
        i += 1
        while i < group_end and i - start < t_max:
            length = run_hi[i] - run_lo[i]
            nl, nh = jl, jh
            if length > 0:
                if jh > jl:
                    nl, nh = min(jl, run_lo[i]), max(jh, run_hi[i])
                else:
                    nl, nh = run_lo[i], run_hi[i]
            area = (i - start + 1) * (nh - nl)
            if area > 0 and (covered + length < min_eff * area or area > max_area):
                break
            jl, jh = nl, nh
            covered += length
            i += 1
        tile_start[nt] = start
        tile_jlo[nt] = jl
        tile_jhi[nt] = jh
        nt += 1
    tile_start[nt] = rows
    return nt


@kernel
def dense_spans(row_ea, row_eb, indptr, indices, tile_start, tile_jlo, tile_jhi):
    """[row_ea_i, row_eb_i) = the entries of row i whose key lies in its tile's range (a
    contiguous span, the indices being sorted); empty (= indptr[i], indptr[i]) if none."""
    for t in prange(tile_start.shape[0] - 1):
        for row in range(tile_start[t], tile_start[t + 1]):
            e0, e1 = indptr[row], indptr[row + 1]
            if tile_jhi[t] <= tile_jlo[t]:
                row_ea[row] = e0
                row_eb[row] = e0
                continue
            cols = indices[e0:e1]
            row_ea[row] = e0 + np.searchsorted(cols, tile_jlo[t])
            row_eb[row] = e0 + np.searchsorted(cols, tile_jhi[t])


@serial
def count_outside(counts, indptr, indices, row_ea, row_eb):
    """counts[j] = entries of key column j outside their row's dense span."""
    for row in range(indptr.shape[0] - 1):
        for e in range(indptr[row], row_ea[row]):
            counts[indices[e]] += 1
        for e in range(row_eb[row], indptr[row + 1]):
            counts[indices[e]] += 1


@serial
def color_tiles(phase, tile_jlo, tile_jhi, order):
    """First-fit colouring of the tile ranges visited by increasing jlo (``order``): tiles
    of one phase have disjoint ranges.  Empty ranges go to phase 0.  Returns the count."""
    nt = order.shape[0]
    ends = np.empty(max(nt, 1), dtype=np.int64)   # last range end of each phase
    n_ph = 1
    ends[0] = -1
    for u in range(nt):
        t = order[u]
        if tile_jhi[t] <= tile_jlo[t]:
            phase[t] = 0
            continue
        ph = 0
        while ph < n_ph and ends[ph] > tile_jlo[t]:
            ph += 1
        if ph == n_ph:
            n_ph += 1
        ends[ph] = tile_jhi[t]
        phase[t] = ph
    return n_ph


# ---------------------------------------------------------------------- scattered entries


@numba.njit(inline="always")
def _dot2(x1, y1, x2, y2):
    """(x1·y1, x2·y2) in one loop: two independent sums, so the loads of both overlap."""
    a = x1.dtype.type(0)
    b = x1.dtype.type(0)
    for t in range(x1.shape[0]):
        a += x1[t] * y1[t]
        b += x2[t] * y2[t]
    return a, b


@_vec_kernel
def scattered_dot(vals, x, y, r_ptr, r_row, r_col, r_e, groups, n_chunks, n_blocks, scale):
    """vals[bh // G, e] = scale · x[bh, i]·y[bh, j] for every scattered entry e = (i, j).

    Scores (x = q, y = k) and dp (x = dout, y = v, scale 1).  The entries come in *row-side
    blocked order*: bucket (g, row chunk c, key block b) holds r_ptr[u] … r_ptr[u + 1] − 1,
    u = (g·n_chunks + c)·n_blocks + b, sorted by (row, key) inside; r_row, r_col are local
    to the group.  A task owns one (batch item, row chunk) and walks its key blocks in
    order, so each block's rows of y stay in cache while the chunk's rows stream past.
    """
    bo_n = vals.shape[0]
    for task in prange(bo_n * groups * n_chunks):
        bo = task // (groups * n_chunks)
        gc = task - bo * groups * n_chunks                  # g · n_chunks + c
        g = gc // n_chunks
        u, u1 = r_ptr[gc * n_blocks], r_ptr[(gc + 1) * n_blocks]
        bh = bo * groups + g
        xb, yb, vb = x[bh], y[bh], vals[bo]
        while u + 1 < u1:                                   # two entries per pass
            a, b = _dot2(xb[r_row[u]], yb[r_col[u]], xb[r_row[u + 1]], yb[r_col[u + 1]])
            vb[r_e[u]] = a * scale
            vb[r_e[u + 1]] = b * scale
            u += 2
        if u < u1:
            vb[r_e[u]] = _dot(xb[r_row[u]], yb[r_col[u]]) * scale


@_vec_kernel
def scattered_axpy(acc, vals, y, pc, dsc, p, r_ptr, r_row, r_col, r_e, r_pos, groups,
                   n_chunks, n_blocks, scale, save):
    """acc[bh, i] += (scale · vals[bh // G, e]) y[bh, j] over the scattered entries, each
    row's in key order (row-side blocked order, see :func:`scattered_dot`).

    out (vals = p, y = v, scale 1) and dq (vals = ds, y = k); with ``save`` also
    pc[bh // G, t] = p_e and dsc[bh // G, t] = scale · ds_e at the entry's position t in
    the column-side order (r_pos; for :func:`cols_bwd_scattered`).
    """
    bo_n = vals.shape[0]
    for task in prange(bo_n * groups * n_chunks):
        bo = task // (groups * n_chunks)
        gc = task - bo * groups * n_chunks
        g = gc // n_chunks
        u, u1 = r_ptr[gc * n_blocks], r_ptr[(gc + 1) * n_blocks]
        bh = bo * groups + g
        yb, vb, ab = y[bh], vals[bo], acc[bh]
        while u < u1:
            i = r_row[u]
            w = vb[r_e[u]] * scale
            if save:
                pc[bo, r_pos[u]] = p[bo, r_e[u]]
                dsc[bo, r_pos[u]] = w
            if u + 1 < u1 and r_row[u + 1] == i:            # two entries of row i
                w2 = vb[r_e[u + 1]] * scale
                if save:
                    pc[bo, r_pos[u + 1]] = p[bo, r_e[u + 1]]
                    dsc[bo, r_pos[u + 1]] = w2
                _axpy2(ab[i], w, yb[r_col[u]], w2, yb[r_col[u + 1]])
                u += 2
            else:
                _axpy(ab[i], w, yb[r_col[u]])
                u += 1


@_vec_kernel
def cols_bwd_scattered(dk, dv, pc, dsc, q, dout, c_ptr, c_row, c_col, groups, n_chunks,
                       n_blocks):
    """dv_j += Σ p_e dout_i, dk_j += Σ (scale·ds_e) q_i over key j's scattered entries, rows
    ascending.  The entries come in *column-side blocked order*: bucket (g, key chunk c, row
    block b) holds c_ptr[u] … c_ptr[u + 1] − 1, u = (g·n_chunks + c)·n_blocks + b, sorted
    by (key, row) inside; pc, dsc are in this order (from :func:`scattered_axpy`).  A task
    owns one (batch item, key chunk) and walks its row blocks in order, so each block's
    rows of q and dout stay in cache while the chunk's keys stream past.
    """
    bh_n = dk.shape[0]
    for task in prange(bh_n * n_chunks):
        bh = task // n_chunks
        c = task - bh * n_chunks
        g = bh % groups
        bo = bh // groups
        gc = g * n_chunks + c
        t, t1 = c_ptr[gc * n_blocks], c_ptr[(gc + 1) * n_blocks]
        pcb, dsb, qb, dob, dkb, dvb = pc[bo], dsc[bo], q[bh], dout[bh], dk[bh], dv[bh]
        while t < t1:
            j = c_col[t]
            i = c_row[t]
            if t + 1 < t1 and c_col[t + 1] == j:            # two entries of key j
                i2 = c_row[t + 1]
                # fwd: out_i = Σ_e p_e v_j      -> dv_j = Σ_e p_e dout_i
                _axpy2(dvb[j], pcb[t], dob[i], pcb[t + 1], dob[i2])
                # fwd: s_e = scale · q_i·k_j    -> dk_j = scale Σ_e ds_e q_i
                _axpy2(dkb[j], dsb[t], qb[i], dsb[t + 1], qb[i2])
                t += 2
            else:
                _axpy(dvb[j], pcb[t], dob[i])
                _axpy(dkb[j], dsb[t], qb[i])
                t += 1


# ---------------------------------------------------------------------- forward


@serial
def _tile_geometry(t, bo, tile_start, tile_jlo, tile_jhi, n, m, groups):
    """Tile t of batch item bo·G + g: rows [r0, r1) of the stacked (G·N) rows, nr = r1 − r0,
    the group g, the batch slice bh, the first row i0 within the slice, the stacked key
    ``off`` of tile column 0, the same key jl within the slice, and the dense span length."""
    r0, r1 = tile_start[t], tile_start[t + 1]
    g = r0 // n
    off = tile_jlo[t]                                      # stacked key of tile column 0
    return (r0, r1, r1 - r0, g, bo * groups + g, r0 - g * n, off, off - g * m,
            max(tile_jhi[t] - off, 0))


@serial
def _heavy_keys(kb, vb, heavy_ptr, heavy_cols, g, m):
    """The heavy keys of group g gathered into contiguous (Gc, D) and (Gc, Dv) blocks."""
    h0, h1 = heavy_ptr[g], heavy_ptr[g + 1]
    kh = np.empty((h1 - h0, kb.shape[1]), dtype=kb.dtype)                   # (Gc, D)
    vh = np.empty((h1 - h0, vb.shape[1]), dtype=vb.dtype)                   # (Gc, Dv)
    _gather_rows(kh, kb, heavy_cols[h0:h1], g * m)
    _gather_rows(vh, vb, heavy_cols[h0:h1], g * m)
    return kh, vh


@kernel
def tiles_fwd(out, lse, p, q, k, v, rel, kpad, indptr, indices, row_ea, row_eb, tile_start,
              tile_jlo, tile_jhi, heavy_ptr, heavy_cols, hv_ptr, hv_e, hv_r, hv_h, groups,
              scale):
    """Forward on every tile: dense and heavy scores, the row softmax (the scattered scores
    are in p already, from :func:`scattered_dot`), out = the dense and heavy parts of P v
    (the scattered part is added by :func:`scattered_axpy`).

    out (BH, N, Dv) zero-filled on entry; lse (BH, N); p (BH/G, nnz);
    q (BH, N, D); k (BH, M, D); v (BH, M, Dv) with D, Dv > 0; rel (BH, N + M − 1) or
    (0, 0); kpad (BH, M) bool (True = real key) or (0, 0); the plan arrays: tiles, dense
    spans, heavy keys of group g = heavy_cols[heavy_ptr[g]:heavy_ptr[g + 1]] and tile t's
    heavy entries u ∈ [hv_ptr[t], hv_ptr[t + 1]): CSR entry hv_e[u] of the tile's row
    hv_r[u], key number hv_h[u] of its group's heavy keys.
    """
    bo_n = p.shape[0]
    _, n, d = q.shape
    m = v.shape[1]
    has_rel = rel.shape[0] > 0
    has_kpad = kpad.shape[0] > 0
    one = q.dtype.type(1)
    nt = tile_start.shape[0] - 1
    for task in prange(bo_n * nt):
        bo = task // nt
        t = task - bo * nt
        r0, r1, nr, g, bh, i0, off, jl, nrng = _tile_geometry(t, bo, tile_start, tile_jlo,
                                                               tile_jhi, n, m, groups)
        qb, kb, vb, pb = q[bh], k[bh], v[bh], p[bo]
        qt = qb[i0:i0 + nr]
        # fwd: s_e = scale · q_i·k_j — the range and the heavy keys by products
        if nrng > 0:
            st = np.dot(qt, kb[jl:jl + nrng].T)                             # (T, R)
        else:
            st = np.zeros((nr, 0), dtype=q.dtype)                           # (T, 0)
        kh, vh = _heavy_keys(kb, vb, heavy_ptr, heavy_cols, g, m)           # (Gc, D), (Gc, Dv)
        nh = kh.shape[0]
        if nh > 0:
            sh = np.dot(qt, kh.T)                                           # (T, Gc)
        else:
            sh = np.zeros((nr, 0), dtype=q.dtype)                           # (T, 0)
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
            if _finite(vb[jl:jl + nrng]):
                for r in range(nr):
                    _scatter_dense(st[r], pb, indices, row_ea[r0 + r], row_eb[r0 + r], off,
                                   one)
                out[bh, i0:i0 + nr] = np.dot(st, vb[jl:jl + nrng])          # (T, Dv)
            else:
                for row in range(r0, r1):
                    for e in range(row_ea[row], row_eb[row]):
                        _axpy(out[bh, row - g * n], pb[e], vb[indices[e] - g * m])
        if nh > 0:
            heavy_o = _finite(vh)
            sh[:, :] = 0
            for u in range(hv_ptr[t], hv_ptr[t + 1]):
                e = hv_e[u]
                if heavy_o:
                    sh[hv_r[u], hv_h[u]] = pb[e]
                else:
                    _axpy(out[bh, i0 + hv_r[u]], pb[e], vb[indices[e] - g * m])
            if heavy_o:
                out[bh, i0:i0 + nr] += np.dot(sh, vh)                       # (T, Dv)


# ---------------------------------------------------------------------- backward


@serial
def _tile_bwd(t, bo, dq, dk, dv, ds, ph, dsh, dout, p, q, k, v, indptr, indices, row_ea,
              row_eb, tile_start, tile_jlo, tile_jhi, heavy_ptr, heavy_cols, hv_ptr, hv_e, hv_r,
              hv_h, groups, scale):
    """The backward of tile t for batch items bo·G + g (see :func:`tiles_bwd`)."""
    _, n, d = q.shape
    m = v.shape[1]
    one = q.dtype.type(1)
    r0, r1, nr, g, bh, i0, off, jl, nrng = _tile_geometry(t, bo, tile_start, tile_jlo,
                                                           tile_jhi, n, m, groups)
    qb, kb, vb, dob, pb, dsb = q[bh], k[bh], v[bh], dout[bh], p[bo], ds[bo]
    qt, dot_ = qb[i0:i0 + nr], dob[i0:i0 + nr]
    # fwd: out_i = Σ_e p_e v_j   -> dp_e = dout_i · v_j (range and heavy keys: products)
    if nrng > 0:
        dpt = np.dot(dot_, vb[jl:jl + nrng].T)                              # (T, R)
    else:
        dpt = np.zeros((nr, 0), dtype=q.dtype)                              # (T, 0)
    kh, vh = _heavy_keys(kb, vb, heavy_ptr, heavy_cols, g, m)               # (Gc, D), (Gc, Dv)
    nh = kh.shape[0]
    if nh > 0:
        dph = np.dot(dot_, vh.T)                                            # (T, Gc)
    else:
        dph = np.zeros((nr, 0), dtype=q.dtype)                              # (T, 0)
    # accumulating products need finite factors (else 0 · NaN leaks)
    dense_g = (nrng > 0 and _finite(qt) and _finite(dot_)
               and _finite(kb[jl:jl + nrng]))
    heavy_g = nh > 0 and _finite(kh)
    pt = np.zeros((nr if dense_g else 0, nrng), dtype=q.dtype)              # (T, R) P̂
    for u in range(hv_ptr[t], hv_ptr[t + 1]):
        dsb[hv_e[u]] = dph[hv_r[u], hv_h[u]]
    for row in range(r0, r1):
        i = row - g * n
        r = row - r0
        e0, ea, eb, e1 = indptr[row], row_ea[row], row_eb[row], indptr[row + 1]
        _gather_dense(dsb, dpt[r], indices, ea, eb, off, one)
        # fwd: p_e = exp(s_e − c_i) / z_i  -> ds_e = p_e (dp_e − Σ_row p dp)
        delta = q.dtype.type(0)
        for e in range(e0, e1):
            delta += pb[e] * dsb[e]
        for e in range(e0, e1):
            dsb[e] = pb[e] * (dsb[e] - delta)
        # fwd: s_e = scale · q_i·k_j + …  -> dq_i = scale Σ_e ds_e k_j,
        #                                    dk_j = scale Σ_e ds_e q_i
        # fwd: out_i = Σ_e p_e v_j        -> dv_j = Σ_e p_e dout_i
        if dense_g:
            _scatter_dense(dpt[r], dsb, indices, ea, eb, off, scale)
            _scatter_dense(pt[r], pb, indices, ea, eb, off, one)
        else:                               # this phase owns the keys of the range
            for e in range(ea, eb):
                j = indices[e] - g * m
                _axpy(dq[bh, i], dsb[e] * scale, kb[j])
                _axpy(dk[bh, j], dsb[e] * scale, qb[i])
                _axpy(dv[bh, j], pb[e], dob[i])
    dph[:, :] = 0
    for u in range(hv_ptr[t], hv_ptr[t + 1]):
        e, h, i = hv_e[u], hv_h[u], i0 + hv_r[u]
        ph[bh, h, i] = pb[e]                # dk, dv: heavy_bwd
        dsh[bh, h, i] = dsb[e] * scale
        if heavy_g:
            dph[hv_r[u], h] = dsb[e] * scale
        else:
            _axpy(dq[bh, i], dsb[e] * scale, kb[indices[e] - g * m])
    if dense_g:
        dq[bh, i0:i0 + nr] += np.dot(dpt, kb[jl:jl + nrng])                 # (T, D)
        dk[bh, jl:jl + nrng] += np.dot(dpt.T, qt)                           # (R, D)
        dv[bh, jl:jl + nrng] += np.dot(pt.T, dot_)                          # (R, Dv)
    if heavy_g:
        dq[bh, i0:i0 + nr] += np.dot(dph, kh)                               # (T, D)


@kernel
def tiles_bwd(dq, dk, dv, ds, ph, dsh, dout, p, q, k, v, indptr, indices, row_ea, row_eb,
              tile_start, tile_jlo, tile_jhi, phase_ptr, phase_tiles, heavy_ptr, heavy_cols,
              hv_ptr, hv_e, hv_r, hv_h, groups, scale, per_item):
    """Backward on every tile: the dense and heavy dp (the scattered dp are in ds already,
    from :func:`scattered_dot`), ds of every entry, the dense and heavy parts of dq, the
    dense entries' dk, dv; the heavy entries' p and ds·scale go to ph, dsh.

    dq (BH, N, D), dk (BH, M, D), dv (BH, M, Dv) zero-filled on entry; ds (BH/G, nnz);
    ph, dsh (BH, Gc_max, N) zero-filled; dout (BH, N, Dv); phase f = the tiles
    phase_tiles[phase_ptr[f]:phase_ptr[f + 1]].  Two schedules, same result bits: phase by
    phase, parallel over (batch item, tile of the phase); or (``per_item``, when the batch
    items alone keep the threads busy) parallel over batch items, each visiting its tiles in
    the same phase-major order — no barrier between phases.  Either way each key row
    receives the tiles' contributions in phase order.
    """
    bo_n = p.shape[0]
    n = q.shape[1]
    if per_item:
        for task in prange(bo_n * groups):
            bo = task // groups
            g = task - bo * groups
            for u in range(phase_tiles.shape[0]):
                t = phase_tiles[u]
                if tile_start[t] // n == g:
                    _tile_bwd(t, bo, dq, dk, dv, ds, ph, dsh, dout, p, q, k, v, indptr,
                              indices, row_ea, row_eb, tile_start, tile_jlo, tile_jhi,
                              heavy_ptr, heavy_cols, hv_ptr, hv_e, hv_r, hv_h, groups,
                              scale)
        return
    for f in range(phase_ptr.shape[0] - 1):
        a = phase_ptr[f]
        ntp = phase_ptr[f + 1] - a
        for task in prange(bo_n * ntp):
            bo = task // ntp
            t = phase_tiles[a + task - bo * ntp]
            _tile_bwd(t, bo, dq, dk, dv, ds, ph, dsh, dout, p, q, k, v, indptr, indices,
                      row_ea, row_eb, tile_start, tile_jlo, tile_jhi, heavy_ptr, heavy_cols,
                      hv_ptr, hv_e, hv_r, hv_h, groups, scale)


@kernel
def heavy_bwd(dk, dv, ph, dsh, q, dout, p, ds, heavy_ptr, heavy_cols, t_indptr, t_indices,
              t_perm, row_ea, row_eb, groups, scale):
    """dk_j += Σ (ds_e·scale) q_i, dv_j += Σ p_e dout_i over the heavy entries of each heavy
    key j: two products per batch item (ph, dsh from :func:`tiles_bwd`), or, if q or dout
    of the batch item is not finite, entry by entry down the transposed pattern."""
    bh_n, n = q.shape[0], q.shape[1]
    m = dk.shape[1]
    for bh in prange(bh_n):
        g = bh % groups
        bo = bh // groups
        h0 = heavy_ptr[g]
        nh = heavy_ptr[g + 1] - h0
        if nh == 0:
            continue
        if _finite(q[bh]) and _finite(dout[bh]):
            gk = np.dot(dsh[bh, :nh], q[bh])                                # (Gc, D)
            gv = np.dot(ph[bh, :nh], dout[bh])                              # (Gc, Dv)
            for h in range(nh):
                j = heavy_cols[h0 + h] - g * m
                dk[bh, j] += gk[h]
                dv[bh, j] += gv[h]
            continue
        for h in range(nh):
            col = heavy_cols[h0 + h]
            j = col - g * m
            for t in range(t_indptr[col], t_indptr[col + 1]):
                row = t_indices[t]
                e = t_perm[t]
                if row_ea[row] <= e < row_eb[row]:
                    continue
                _axpy(dk[bh, j], ds[bo, e] * scale, q[bh, row - g * n])
                _axpy(dv[bh, j], p[bo, e], dout[bh, row - g * n])


@kernel
def rel_bias_bwd_csr(drel, ds, indptr, indices, groups, n, m):
    """drel[bh, i − j + M − 1] += ds_e, one batch item per thread, entries in CSR order.

    drel (BH, N + M − 1) zero-filled on entry.
    """
    for bh in prange(drel.shape[0]):
        g = bh % groups
        bo = bh // groups
        for i in range(n):
            row = g * n + i
            for e in range(indptr[row], indptr[row + 1]):
                drel[bh, i - (indices[e] - g * m) + m - 1] += ds[bo, e]
