"""Numba kernels of sparse attention (:mod:`tinyeff.kernels.sparse`): the *scattered* entries.

The scattered entries of a CSR pattern are those outside every tile's dense key range and
not on a heavy key (:mod:`tinyeff.kernels.sparse_plan`).  They are computed entry by entry,
*blocked*: a task owns a chunk of rows (or keys) and walks the keys (or rows) in blocks, so
that the rows of k and v (or q and dout) it gathers come from cache rather than memory.

* :func:`scattered_dot`       s_e = scale · x_i·y_j          (scores; dp with scale 1)
* :func:`scattered_axpy`      acc_i += scale · vals_e y_j    (out; dq, saving p and ds·scale
                              in the column order)
* :func:`cols_bwd_scattered`  dv_j += Σ p_e dout_i,  dk_j += Σ (scale·ds_e) q_i
"""

from __future__ import annotations

import numba

from ._jit import run_tasks

__all__ = ["DOT_FLAGS", "axpy", "axpy2", "cols_bwd_scattered", "scattered_axpy", "scattered_dot"]

# SPEEDTIP: a dot product over D is a reduction; with fastmath off LLVM must keep the serial
# order and emits scalar code (measured ≈ 4× slower than the vectorized form on the BigBird
# benchmark).  The kernels that walk entries one by one (the scattered passes) are therefore
# compiled with reassociation and FMA contraction (``_vec_kernel``) — not with no-inf/no-NaN,
# so −inf and NaN keep their meaning.  Their small helpers below are inlined (a call per
# entry cost its overhead plus reference counting of the array views: measured ≈ 20 % of the
# BigBird fwd+bwd), so they take the flags of the kernel they are inlined into.  The
# summation order of a dot is then the one the compiled code fixes (SIMD lanes, then a fixed
# horizontal sum): the same on every call and thread, so results stay bit-identical across
# thread counts.  No reduction across tasks exists in these kernels (each output has one
# owner).  The kernels are serial over a range of tasks; ``run_tasks`` (kernels/_jit.py)
# spreads the tasks over the threads (no gufunc to compile).
DOT_FLAGS = {"reassoc", "contract"}
_vec_kernel = numba.njit(cache=True, parallel=False, fastmath=DOT_FLAGS, nogil=True)


@numba.njit(inline="always")
def _dot(x, y):
    """Σ_d x_d y_d (vectorized; order fixed by the compiled code)."""
    acc = x.dtype.type(0)
    for t in range(x.shape[0]):
        acc += x[t] * y[t]
    return acc


@numba.njit(inline="always")
def axpy(out, a, x):
    """out += a · x (elementwise; no reduction, so it vectorizes; FMA allowed)."""
    for d in range(out.shape[0]):
        out[d] += a * x[d]


@numba.njit(inline="always")
def axpy2(out, a, x, b, y):
    """out = (out + a · x) + b · y, two entries per pass over out (half the loads/stores)."""
    for d in range(out.shape[0]):
        o = out[d]
        o += a * x[d]
        o += b * y[d]
        out[d] = o



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
def _scattered_dot_tasks(lo, hi, vals, x, y, r_ptr, r_row, r_col, r_e, groups, n_chunks,
                         n_blocks, scale):
    """Tasks lo … hi − 1 of :func:`scattered_dot`."""
    for task in range(lo, hi):
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


def scattered_dot(vals, x, y, r_ptr, r_row, r_col, r_e, groups, n_chunks, n_blocks, scale):
    """vals[bh // G, e] = scale · x[bh, i]·y[bh, j] for every scattered entry e = (i, j).

    Scores (x = q, y = k) and dp (x = dout, y = v, scale 1).  The entries come in *row-side
    blocked order*: bucket (g, row chunk c, key block b) holds r_ptr[u] … r_ptr[u + 1] − 1,
    u = (g·n_chunks + c)·n_blocks + b, sorted by (row, key) inside; r_row, r_col are local
    to the group.  A task owns one (batch item, row chunk) and walks its key blocks in
    order, so each block's rows of y stay in cache while the chunk's rows stream past.
    """
    run_tasks(_scattered_dot_tasks, vals.shape[0] * groups * n_chunks, vals, x, y, r_ptr,
              r_row, r_col, r_e, groups, n_chunks, n_blocks, scale)


@_vec_kernel
def _scattered_axpy_tasks(lo, hi, acc, vals, y, pc, dsc, p, r_ptr, r_row, r_col, r_e, r_pos,
                          groups, n_chunks, n_blocks, scale, save):
    """Tasks lo … hi − 1 of :func:`scattered_axpy`."""
    for task in range(lo, hi):
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
                axpy2(ab[i], w, yb[r_col[u]], w2, yb[r_col[u + 1]])
                u += 2
            else:
                axpy(ab[i], w, yb[r_col[u]])
                u += 1


def scattered_axpy(acc, vals, y, pc, dsc, p, r_ptr, r_row, r_col, r_e, r_pos, groups, n_chunks,
                   n_blocks, scale, save):
    """acc[bh, i] += (scale · vals[bh // G, e]) y[bh, j] over the scattered entries, each
    row's in key order (row-side blocked order, see :func:`scattered_dot`).

    out (vals = p, y = v, scale 1) and dq (vals = ds, y = k); with ``save`` also
    pc[bh // G, t] = p_e and dsc[bh // G, t] = scale · ds_e at the entry's position t in
    the column-side order (r_pos; for :func:`cols_bwd_scattered`).
    """
    run_tasks(_scattered_axpy_tasks, vals.shape[0] * groups * n_chunks, acc, vals, y, pc, dsc,
              p, r_ptr, r_row, r_col, r_e, r_pos, groups, n_chunks, n_blocks, scale, save)


@_vec_kernel
def _cols_bwd_scattered_tasks(lo, hi, dk, dv, pc, dsc, q, dout, c_ptr, c_row, c_col, groups,
                              n_chunks, n_blocks):
    """Tasks lo … hi − 1 of :func:`cols_bwd_scattered`."""
    for task in range(lo, hi):
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
                axpy2(dvb[j], pcb[t], dob[i], pcb[t + 1], dob[i2])
                # fwd: s_e = scale · q_i·k_j    -> dk_j = scale Σ_e ds_e q_i
                axpy2(dkb[j], dsb[t], qb[i], dsb[t + 1], qb[i2])
                t += 2
            else:
                axpy(dvb[j], pcb[t], dob[i])
                axpy(dkb[j], dsb[t], qb[i])
                t += 1


def cols_bwd_scattered(dk, dv, pc, dsc, q, dout, c_ptr, c_row, c_col, groups, n_chunks,
                       n_blocks):
    """dv_j += Σ p_e dout_i, dk_j += Σ (scale·ds_e) q_i over key j's scattered entries, rows
    ascending.  The entries come in *column-side blocked order*: bucket (g, key chunk c, row
    block b) holds c_ptr[u] … c_ptr[u + 1] − 1, u = (g·n_chunks + c)·n_blocks + b, sorted
    by (key, row) inside; pc, dsc are in this order (from :func:`scattered_axpy`).  A task
    owns one (batch item, key chunk) and walks its row blocks in order, so each block's
    rows of q and dout stay in cache while the chunk's keys stream past.
    """
    run_tasks(_cols_bwd_scattered_tasks, dk.shape[0] * n_chunks, dk, dv, pc, dsc, q, dout,
              c_ptr, c_row, c_col, groups, n_chunks, n_blocks)
