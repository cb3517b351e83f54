"""``Pattern``: the one bridge between a SciPy sparse mask and the Numba kernels.

A sparse attention pattern S ∈ {0,1}^{N×M} (S_ij = 1: query i may attend key j) is held in
canonical CSR form:

    indptr  (N + 1,) int64     row i's entries are e = indptr[i] … indptr[i+1] − 1
    indices (nnz,)   int64     column j of entry e, strictly increasing within each row

and, computed once on first use and then cached, the *transpose plan* (the same entries in
column-major order, i.e. the CSC form), which lets a backward pass gather instead of scatter:

    t_indptr  (M + 1,) int64   column j's entries are t = t_indptr[j] … t_indptr[j+1] − 1
    t_indices (nnz,)   int64   row i of transposed entry t, strictly increasing within a column
    t_perm    (nnz,)   int64   CSR position of transposed entry t:  indices[t_perm[t]] == j

Canonicalization (:meth:`Pattern.from_scipy`) happens exactly once per Pattern: indices
are sorted, duplicates merged, both index arrays cast to int64 together, and the *structure*
is the pattern — the stored values are not read, except that explicitly stored ``False``
entries are rejected rather than guessed about (call ``eliminate_zeros()`` first).  Every
SciPy sparse format is accepted (csr/csc/coo/bsr/dok/lil, ``*_array`` or ``*_matrix``), but
the dtype must be bool, like ``full``'s ``mask``.

The arrays of a Pattern are read-only, so one Pattern can be shared by many forward passes
(and their saved contexts) safely; pass a Pattern instead of a SciPy matrix to skip the
canonicalization on every call.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..kernels.csr import transpose_csr


def _frozen(a: np.ndarray) -> np.ndarray:
    """A read-only view (the caller's array itself keeps its flags)."""
    a = a.view()
    a.flags.writeable = False
    return a


class Pattern:
    """Canonical CSR structure of an (N, M) boolean pattern, with a cached transpose plan.

    Build one with :meth:`from_scipy` (or :meth:`from_csr` for arrays you trust less); the
    constructor itself expects canonical int64 arrays and only checks them cheaply.
    """

    __slots__ = ("indptr", "indices", "shape", "_t", "_rows")

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, shape: tuple[int, int]):
        self.indptr = _frozen(np.ascontiguousarray(indptr, dtype=np.int64))    # (N + 1,)
        self.indices = _frozen(np.ascontiguousarray(indices, dtype=np.int64))  # (nnz,)
        self.shape = (int(shape[0]), int(shape[1]))
        self._t = None
        self._rows = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_scipy(cls, mask, name: str = "mask") -> Pattern:
        """Canonicalize any boolean ``scipy.sparse`` matrix/array (see the module docstring).

        A Pattern is returned unchanged.  Raises ``TypeError`` for a non-sparse or non-bool
        argument and ``ValueError`` for explicitly stored ``False`` entries.
        """
        if isinstance(mask, Pattern):
            return mask
        if not sp.issparse(mask):
            raise TypeError(f"{name} must be a scipy.sparse matrix/array or a Pattern, got "
                            f"{type(mask).__name__}")
        if mask.dtype != np.bool_:
            raise TypeError(f"{name}: a sparse mask must have dtype bool, got {mask.dtype}")
        if mask.ndim != 2:
            raise ValueError(f"{name}: a sparse mask must be 2-D (N, M), got shape {mask.shape}")
        if mask.format == "csr":
            csr = mask
        else:
            # explicit False entries must be seen *before* a conversion merges duplicates
            coo = mask if mask.format == "coo" else sp.coo_array(mask)
            _reject_false(coo.data, name)
            csr = sp.csr_array(coo)
        _reject_false(csr.data, name)
        if not csr.has_canonical_format:
            csr = sp.csr_array(csr, copy=True)
            csr.sum_duplicates()                                   # sorts and merges
        return cls(csr.indptr, csr.indices, csr.shape)

    @classmethod
    def from_csr(cls, indptr, indices, shape, name: str = "mask") -> Pattern:
        """Build from raw CSR arrays, sorting and deduplicating them (O(nnz log nnz))."""
        n, m = (int(s) for s in shape)
        indptr = np.asarray(indptr)
        indices = np.asarray(indices)
        if indptr.shape != (n + 1,) or indptr[0] != 0 or np.any(np.diff(indptr) < 0) \
                or indptr[-1] != indices.shape[0]:
            raise ValueError(f"{name}: indptr of shape {indptr.shape} is not a valid CSR row "
                             f"pointer for shape {(n, m)} and {indices.shape[0]} indices")
        if indices.size and (indices.min() < 0 or indices.max() >= m):
            raise ValueError(f"{name}: column indices must lie in [0, {m}), got "
                             f"[{indices.min()}, {indices.max()}]")
        csr = sp.csr_array((np.ones(indices.shape[0], bool), indices, indptr), shape=(n, m))
        csr.sum_duplicates()
        return cls(csr.indptr, csr.indices, (n, m))

    # ------------------------------------------------------------------ properties

    @property
    def nnz(self) -> int:
        return int(self.indices.shape[0])

    @property
    def row_ids(self) -> np.ndarray:
        """(nnz,) int64: the row i of every entry (cached)."""
        if self._rows is None:
            counts = np.diff(self.indptr)                                   # (N,)
            self._rows = _frozen(np.repeat(np.arange(self.shape[0], dtype=np.int64),
                                           counts))                         # (nnz,)
        return self._rows

    def _transpose(self):
        if self._t is None:
            n, m = self.shape
            counts = np.bincount(self.indices, minlength=m)                 # (M,)
            t_indptr = np.zeros(m + 1, dtype=np.int64)                      # (M + 1,)
            np.cumsum(counts, out=t_indptr[1:])
            t_indices = np.empty(self.nnz, dtype=np.int64)                  # (nnz,)
            t_perm = np.empty(self.nnz, dtype=np.int64)                     # (nnz,)
            # a stable O(nnz + N + M) counting sort by column
            transpose_csr(t_indices, t_perm, t_indptr[:-1].copy(), self.indptr, self.indices)
            self._t = (_frozen(t_indptr), _frozen(t_indices), _frozen(t_perm))
        return self._t

    @property
    def t_indptr(self) -> np.ndarray:
        """(M + 1,) column pointer of the transposed (CSC) order."""
        return self._transpose()[0]

    @property
    def t_indices(self) -> np.ndarray:
        """(nnz,) row of each entry in column-major order."""
        return self._transpose()[1]

    @property
    def t_perm(self) -> np.ndarray:
        """(nnz,) CSR position of each entry in column-major order."""
        return self._transpose()[2]

    # ------------------------------------------------------------------ conversions

    def to_scipy(self, copy: bool = True) -> sp.csr_array:
        """A boolean ``csr_array`` with this structure (``copy=False`` shares the read-only
        index arrays: use the result for reading only)."""
        indices, indptr = (self.indices.copy(), self.indptr.copy()) if copy else \
            (self.indices, self.indptr)
        out = sp.csr_array((np.ones(self.nnz, bool), indices, indptr), shape=self.shape,
                           copy=False)
        out.has_canonical_format = True
        return out

    def to_dense(self) -> np.ndarray:
        """(N, M) boolean array.  O(N·M) memory: for tests and small examples only."""
        dense = np.zeros(self.shape, dtype=bool)                            # (N, M)
        dense[self.row_ids, self.indices] = True
        return dense

    def intersect_causal(self, offset: int = 0) -> Pattern:
        """The entries with j <= i + offset (offset 0: top-left alignment, as ``full``)."""
        keep = self.indices <= self.row_ids + offset                        # (nnz,)
        if keep.all():
            return self
        counts = np.bincount(self.row_ids[keep], minlength=self.shape[0])   # (N,)
        new_ptr = np.zeros(self.shape[0] + 1, dtype=np.int64)               # (N + 1,)
        np.cumsum(counts, out=new_ptr[1:])
        return Pattern(new_ptr, self.indices[keep], self.shape)

    @staticmethod
    def block_diag(patterns) -> Pattern:
        """G patterns of one shape (N, M) stacked as the (G·N, G·M) block-diagonal pattern.

        Block g holds pattern g: rows g·N + i, columns g·M + j.  This is how per-head
        patterns reach the kernels.
        """
        patterns = list(patterns)
        n, m = patterns[0].shape
        ptrs, idx, offset = [np.zeros(1, np.int64)], [], 0
        for g, pat in enumerate(patterns):
            ptrs.append(pat.indptr[1:] + offset)                            # (N,)
            idx.append(pat.indices + g * m)                                 # (nnz_g,)
            offset += pat.nnz
        return Pattern(np.concatenate(ptrs), np.concatenate(idx),
                       (len(patterns) * n, len(patterns) * m))

    def __repr__(self) -> str:
        return f"Pattern(shape={self.shape}, nnz={self.nnz})"


def _reject_false(data: np.ndarray, name: str) -> None:
    if data.size and not np.all(data):
        raise ValueError(f"{name}: the sparse mask stores explicit False entries; "
                         "call eliminate_zeros() first")
