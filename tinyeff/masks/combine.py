"""``union`` and ``intersect`` of patterns: a linear merge of the sorted rows of canonical
CSR patterns (O(nnz), parallel over rows, kernels of ``tinyeff/kernels/csr.py``)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..kernels.csr import merge_count_csr, merge_fill_csr
from .pattern import Pattern

__all__ = ["union", "intersect"]


def _patterns(masks, what):
    if not masks:
        raise ValueError(f"{what} needs at least one mask")
    pats = [Pattern.from_scipy(x, name=f"{what} argument {t}") for t, x in enumerate(masks)]
    shapes = {p.shape for p in pats}
    if len(shapes) != 1:
        raise ValueError(f"{what}: all masks must have one shape, got {sorted(shapes)}")
    return pats


def _merge(pats, intersect: bool) -> sp.csr_array:
    a = pats[0]
    for b in pats[1:]:
        n = a.shape[0]
        counts = np.empty(n, dtype=np.int64)                                # (N,)
        merge_count_csr(counts, a.indptr, a.indices, b.indptr, b.indices, intersect)
        indptr = np.zeros(n + 1, dtype=np.int64)                            # (N + 1,)
        np.cumsum(counts, out=indptr[1:])
        indices = np.empty(int(indptr[-1]), dtype=np.int64)                 # (nnz,)
        merge_fill_csr(indices, indptr, a.indptr, a.indices, b.indptr, b.indices, intersect)
        a = Pattern(indptr, indices, a.shape)
    return a.to_scipy(copy=len(pats) == 1)


def union(*masks) -> sp.csr_array:
    """S = S¹ ∨ S² ∨ … (entries stored in any argument); arguments of one shape.

    A linear merge of the sorted rows (O(nnz), parallel over rows).
    """
    return _merge(_patterns(masks, "union"), intersect=False)


def intersect(*masks) -> sp.csr_array:
    """S = S¹ ∧ S² ∧ … (entries stored in every argument); arguments of one shape."""
    return _merge(_patterns(masks, "intersect"), intersect=True)
