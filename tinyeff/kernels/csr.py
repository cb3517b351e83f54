"""Numba kernels of the CSR pattern algebra: transpose, union and intersection.

Patterns are canonical CSR structures (int64 ``indptr`` (N + 1,), ``indices`` (nnz,), rows
sorted and duplicate-free; :class:`tinyeff.masks.pattern.Pattern`).  The union or the
intersection of two patterns is built in two passes, count then fill: row i of the result
is the sorted merge of row i of A and row i of B.  O(nnz) work, run serially (a parallel
kernel costs more to compile than it saves: SPEEDTIP in ``_jit.py``).
"""

from __future__ import annotations

from ._jit import serial


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


@serial
def merge_count_csr(counts, a_ptr, a_idx, b_ptr, b_idx, intersect):
    """counts[i] = |A(i) ∪ B(i)| (or |A(i) ∩ B(i)|) for sorted, duplicate-free rows."""
    for i in range(counts.shape[0]):
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


@serial
def merge_fill_csr(out_idx, out_ptr, a_ptr, a_idx, b_ptr, b_idx, intersect):
    """Write the merged rows counted by :func:`merge_count_csr` (sorted, duplicate-free)."""
    for i in range(out_ptr.shape[0] - 1):
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
