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

NOTE: fastmath stays off (−inf marks padded keys).  A dot product over D therefore cannot
be reassociated by the compiler; :func:`_dot` fixes its own order instead — eight
interleaved partial sums (d ≡ 0 … 7 mod 8) combined as ((a0+a1)+(a2+a3))+((a4+a5)+(a6+a7))
— which the compiler maps onto SIMD lanes.  The order is part of the kernel, identical on
every call and thread.  The reference (NumPy) sums in its own order: parity is to rounding.
"""

from __future__ import annotations

import numpy as np

from ._jit import kernel, prange, serial

# ---------------------------------------------------------------------- helpers


@serial
def _dot(x, y):
    """Σ_d x_d y_d, eight interleaved partial sums in a fixed combination order."""
    d = x.shape[0]
    zero = x.dtype.type(0)
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = zero
    t = 0
    while t + 8 <= d:
        a0 += x[t] * y[t]
        a1 += x[t + 1] * y[t + 1]
        a2 += x[t + 2] * y[t + 2]
        a3 += x[t + 3] * y[t + 3]
        a4 += x[t + 4] * y[t + 4]
        a5 += x[t + 5] * y[t + 5]
        a6 += x[t + 6] * y[t + 6]
        a7 += x[t + 7] * y[t + 7]
        t += 8
    acc = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
    while t < d:
        acc += x[t] * y[t]
        t += 1
    return acc


@serial
def _axpy(out, a, x):
    """out += a · x (elementwise over the last axis; no reduction, so it vectorizes)."""
    for d in range(out.shape[0]):
        out[d] += a * x[d]


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
        for e in range(indptr[row], indptr[row + 1]):
            j = indices[e] - g * m
            x = _dot(q[bh, i], k[bh, j]) * scale
            if has_rel:
                x += rel[bh, i - j + m - 1]
            if has_kpad and not kpad[bh, j]:
                x = neg_inf
            s[bo, e] = x


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
        for e in range(indptr[row], indptr[row + 1]):
            _axpy(out[bh, i], p[bo, e], v[bh, indices[e] - g * m])


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
        delta = dq.dtype.type(0)
        for e in range(e0, e1):
            dp = _dot(dout[bh, i], v[bh, indices[e] - g * m])
            ds[bo, e] = dp
            delta += p[bo, e] * dp
        # fwd: p_e = exp(s_e − c_i) / z_i   -> ds_e = p_e (dp_e − Σ_row p dp)
        # fwd: s_e = scale · q_i·k_j + …    -> dq_i = scale Σ_e ds_e k_j
        for e in range(e0, e1):
            x = p[bo, e] * (ds[bo, e] - delta)
            ds[bo, e] = x
            _axpy(dq[bh, i], x, k[bh, indices[e] - g * m])
        for d in range(dq.shape[2]):
            dq[bh, i, d] *= scale


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
        for t in range(t_indptr[col], t_indptr[col + 1]):
            i = t_indices[t] - g * n
            e = t_perm[t]
            # fwd: out_i = Σ_e p_e v_j      -> dv_j = Σ_e p_e dout_i
            _axpy(dv[bh, j], p[bo, e], dout[bh, i])
            # fwd: s_e = scale · q_i·k_j    -> dk_j = scale Σ_e ds_e q_i
            _axpy(dk[bh, j], ds[bo, e], q[bh, i])
        for d in range(dk.shape[2]):
            dk[bh, j, d] *= scale


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
