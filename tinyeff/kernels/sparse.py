"""Numba kernels of sparse (CSR-pattern) attention and of the pattern algebra.

Attention on a pattern with nnz stored entries, batch items bh = 0 … BH − 1 and G pattern
groups (G = 1: one pattern shared by every batch item; G = H: per-head patterns, stacked
block-diagonally so that group g owns rows g·N … g·N + N − 1 and columns g·M … g·M + M − 1
of one (G·N, G·M) pattern, and batch item bh uses group g = bh mod G).  Per-entry arrays
(scores, probabilities, their gradients) are (BH / G, nnz): entry e of batch item bh lives
at [bh // G, e].

    sddmm_csr      s_e   = scale · q_i·k_j + rel[i − j + M − 1]   (−inf where key j is padding)
    softmax_csr    p_e   = exp(s_e − c_i) / Σ_{e' ∈ row i} exp(s_e' − c_i),  c_i = max s_e'
    spmm_csr       out_i = Σ_{e ∈ row i} p_e v_j
    rows_bwd_csr   dp_e = dout_i·v_j;  ds_e = p_e (dp_e − Σ_row p dp);  dq_i = scale Σ_row ds_e k_j
    cols_bwd_csr   dv_j = Σ_{e ∈ col j} p_e dout_i;  dk_j = scale Σ_{e ∈ col j} ds_e q_i
    rel_bias_bwd_csr   drel[i − j + M − 1] += ds_e   (serial per batch item)

Parallel over (batch item, row) — or (batch item, column) for dk/dv, which walk the
transposed pattern (t_indptr, t_indices, t_perm) so every thread owns its output rows: no
atomics, and every sum runs in a fixed order, so the bits do not depend on the thread count.

NOTE: fastmath stays off (−inf marks padded keys), except in :func:`_dot`, which opts in to
reassociation only (see its SPEEDTIP).  The reference (NumPy/SciPy) sums in its own order:
kernel/reference parity is to rounding, thread-count identity is exact.
"""

from __future__ import annotations

import numba
import numpy as np

from ._jit import kernel, prange, serial

# ---------------------------------------------------------------------- helpers


# SPEEDTIP: a dot product over D is a reduction; with fastmath off LLVM must keep the serial
# order and emits scalar code (measured ≈ 4× slower than this vectorized form on the BigBird
# benchmark).  This helper alone opts in to reassociation (and FMA contraction) — not to
# no-inf/no-NaN, so −inf and NaN keep their meaning.  The summation order is then the one
# the compiled code fixes (SIMD lanes, then a fixed horizontal sum): identical on every call
# and thread, so results stay bit-identical across thread counts.
_DOT_FLAGS = {"reassoc", "contract"}


@numba.njit(cache=True, parallel=False, fastmath=_DOT_FLAGS, nogil=True)
def _dot(x, y):
    """Σ_d x_d y_d (vectorized; order fixed by the compiled code)."""
    acc = x.dtype.type(0)
    for t in range(x.shape[0]):
        acc += x[t] * y[t]
    return acc


@numba.njit(cache=True, parallel=False, fastmath={"contract"}, nogil=True)
def _axpy(out, a, x):
    """out += a · x (elementwise; no reduction, so it vectorizes; FMA allowed)."""
    for d in range(out.shape[0]):
        out[d] += a * x[d]


@numba.njit(cache=True, parallel=False, fastmath={"contract"}, nogil=True)
def _axpy2(out, a, x, b, y):
    """out = (out + a · x) + b · y, two entries per pass over out (half the loads/stores)."""
    for d in range(out.shape[0]):
        o = out[d]
        o += a * x[d]
        o += b * y[d]
        out[d] = o


# ---------------------------------------------------------------------- forward


@kernel
def sddmm_csr(s, q, k, rel, kpad, indptr, indices, groups, scale):
    """s[bh // G, e] = scale · q[bh, i]·k[bh, j] (+ rel[bh, i − j + M − 1]); −inf if padded.

    s (BH/G, nnz); q (BH, N, D); k (BH, M, D); rel (BH, N + M − 1) or (0, 0);
    kpad (BH, M) bool (True = real key) or (0, 0).
    """
    bh_n, n, _ = q.shape
    m = k.shape[1]
    has_rel = rel.shape[0] > 0
    has_kpad = kpad.shape[0] > 0
    neg_inf = -np.inf
    for r in prange(bh_n * n):
        bh = r // n
        i = r - bh * n
        g = bh % groups
        bo = bh // groups
        row = g * n + i
        qi, kb, sb = q[bh, i], k[bh], s[bo]
        for e in range(indptr[row], indptr[row + 1]):
            j = indices[e] - g * m
            x = _dot(qi, kb[j]) * scale
            if has_rel:
                x += rel[bh, i - j + m - 1]
            if has_kpad and not kpad[bh, j]:
                x = neg_inf
            sb[e] = x


@kernel
def softmax_csr(p, lse, s, indptr, groups):
    """Row softmax over the stored entries; a row with no finite score gives p = 0, lse = −inf.

    p, s (BH/G, nnz) (p may be s); lse (BH, N).
    """
    bh_n, n = lse.shape
    for r in prange(bh_n * n):
        bh = r // n
        i = r - bh * n
        g = bh % groups
        bo = bh // groups
        row = g * n + i
        e0, e1 = indptr[row], indptr[row + 1]
        c = s.dtype.type(-np.inf)
        for e in range(e0, e1):
            if s[bo, e] > c:
                c = s[bo, e]
        if c == -np.inf:                      # empty (or fully padded) row
            for e in range(e0, e1):
                p[bo, e] = 0.0
            lse[bh, i] = -np.inf
            continue
        z = s.dtype.type(0)
        for e in range(e0, e1):
            x = np.exp(s[bo, e] - c)
            p[bo, e] = x
            z += x
        for e in range(e0, e1):
            p[bo, e] = p[bo, e] / z
        lse[bh, i] = c + np.log(z)


@kernel
def spmm_csr(out, p, v, indptr, indices, groups):
    """out[bh, i] = Σ_e p[bh // G, e] v[bh, j_e].   out (BH, N, Dv) zero-filled on entry."""
    bh_n, n, _ = out.shape
    m = v.shape[1]
    for r in prange(bh_n * n):
        bh = r // n
        i = r - bh * n
        g = bh % groups
        bo = bh // groups
        row = g * n + i
        oi, pb, vb = out[bh, i], p[bo], v[bh]
        e, e1 = indptr[row], indptr[row + 1]
        while e + 1 < e1:
            _axpy2(oi, pb[e], vb[indices[e] - g * m], pb[e + 1], vb[indices[e + 1] - g * m])
            e += 2
        if e < e1:
            _axpy(oi, pb[e], vb[indices[e] - g * m])


# ---------------------------------------------------------------------- backward


@kernel
def rows_bwd_csr(dq, ds, dout, p, k, v, indptr, indices, groups, scale):
    """Per query row: dp_e = dout_i·v_j, ds_e = p_e (dp_e − Σ_row p dp), dq_i = scale Σ ds_e k_j.

    dq (BH, N, D) zero-filled on entry; ds (BH/G, nnz) written; dout (BH, N, Dv).
    """
    bh_n, n, _ = dq.shape
    m = k.shape[1]
    for r in prange(bh_n * n):
        bh = r // n
        i = r - bh * n
        g = bh % groups
        bo = bh // groups
        row = g * n + i
        e0, e1 = indptr[row], indptr[row + 1]
        # fwd: out_i = Σ_e p_e v_j          -> dp_e = dout_i · v_j
        doi, vb, kb, pb, dsb, dqi = dout[bh, i], v[bh], k[bh], p[bo], ds[bo], dq[bh, i]
        delta = dq.dtype.type(0)
        for e in range(e0, e1):
            dp = _dot(doi, vb[indices[e] - g * m])
            dsb[e] = dp
            delta += pb[e] * dp
        # fwd: p_e = exp(s_e − c_i) / z_i   -> ds_e = p_e (dp_e − Σ_row p dp)
        # fwd: s_e = scale · q_i·k_j + …    -> dq_i = scale Σ_e ds_e k_j
        for e in range(e0, e1):
            dsb[e] = pb[e] * (dsb[e] - delta)
        e = e0
        while e + 1 < e1:
            _axpy2(dqi, dsb[e], kb[indices[e] - g * m], dsb[e + 1], kb[indices[e + 1] - g * m])
            e += 2
        if e < e1:
            _axpy(dqi, dsb[e], kb[indices[e] - g * m])
        for d in range(dqi.shape[0]):
            dqi[d] *= scale


@kernel
def cols_bwd_csr(dk, dv, ds, p, q, dout, t_indptr, t_indices, t_perm, groups, scale):
    """Per key j, walking column j of the transposed pattern (no scatter, no atomics):
    dv_j = Σ_e p_e dout_i,  dk_j = scale Σ_e ds_e q_i.   dk, dv zero-filled on entry.
    """
    bh_n, m, _ = dk.shape
    n = q.shape[1]
    for c in prange(bh_n * m):
        bh = c // m
        j = c - bh * m
        g = bh % groups
        bo = bh // groups
        col = g * m + j
        dkj, dvj, pb, dsb, qb, dob = dk[bh, j], dv[bh, j], p[bo], ds[bo], q[bh], dout[bh]
        t, t1 = t_indptr[col], t_indptr[col + 1]
        while t + 1 < t1:                     # two entries per pass
            i, i2 = t_indices[t] - g * n, t_indices[t + 1] - g * n
            e, e2 = t_perm[t], t_perm[t + 1]
            # fwd: out_i = Σ_e p_e v_j      -> dv_j = Σ_e p_e dout_i
            _axpy2(dvj, pb[e], dob[i], pb[e2], dob[i2])
            # fwd: s_e = scale · q_i·k_j    -> dk_j = scale Σ_e ds_e q_i
            _axpy2(dkj, dsb[e], qb[i], dsb[e2], qb[i2])
            t += 2
        if t < t1:
            i, e = t_indices[t] - g * n, t_perm[t]
            _axpy(dvj, pb[e], dob[i])
            _axpy(dkj, dsb[e], qb[i])
        for d in range(dkj.shape[0]):
            dkj[d] *= scale


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


# ---------------------------------------------------------------------- pattern algebra


@serial
def transpose_csr(t_indices, t_perm, t_next, indptr, indices):
    """Counting sort of the CSR entries by column (stable: rows ascend within a column).

    t_next (M,) holds t_indptr[:-1] on entry (it is consumed).
    """
    n = indptr.shape[0] - 1
    for i in range(n):
        for e in range(indptr[i], indptr[i + 1]):
            t = t_next[indices[e]]
            t_indices[t] = i
            t_perm[t] = e
            t_next[indices[e]] = t + 1


@kernel
def merge_count_csr(counts, a_ptr, a_idx, b_ptr, b_idx, intersect):
    """counts[i] = |A(i) ∪ B(i)| (or |A(i) ∩ B(i)|) for sorted, duplicate-free rows."""
    for i in prange(counts.shape[0]):
        ea, ea1 = a_ptr[i], a_ptr[i + 1]
        eb, eb1 = b_ptr[i], b_ptr[i + 1]
        c = 0
        while ea < ea1 and eb < eb1:
            x, y = a_idx[ea], b_idx[eb]
            if x == y:
                ea += 1
                eb += 1
                c += 1
            elif x < y:
                ea += 1
                c += 0 if intersect else 1
            else:
                eb += 1
                c += 0 if intersect else 1
        if not intersect:
            c += (ea1 - ea) + (eb1 - eb)
        counts[i] = c


@kernel
def merge_fill_csr(out_idx, out_ptr, a_ptr, a_idx, b_ptr, b_idx, intersect):
    """Write the merged rows counted by :func:`merge_count_csr` (sorted, duplicate-free)."""
    for i in prange(out_ptr.shape[0] - 1):
        ea, ea1 = a_ptr[i], a_ptr[i + 1]
        eb, eb1 = b_ptr[i], b_ptr[i + 1]
        o = out_ptr[i]
        while ea < ea1 and eb < eb1:
            x, y = a_idx[ea], b_idx[eb]
            if x == y:
                out_idx[o] = x
                o += 1
                ea += 1
                eb += 1
            elif x < y:
                if not intersect:
                    out_idx[o] = x
                    o += 1
                ea += 1
            else:
                if not intersect:
                    out_idx[o] = y
                    o += 1
                eb += 1
        if not intersect:
            while ea < ea1:
                out_idx[o] = a_idx[ea]
                o += 1
                ea += 1
            while eb < eb1:
                out_idx[o] = b_idx[eb]
                o += 1
                eb += 1
