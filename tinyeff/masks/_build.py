"""Validation and CSR construction shared by the pattern builders of :mod:`tinyeff.masks`.

Index arrays are written directly with NumPy, in row chunks of about :data:`CHUNK` entries,
so no builder ever forms a dense N×M array: :func:`progressions` (row i holds
first_i + step·t, t < count_i) and :func:`ranges` (row i holds lo_i … hi_i) return canonical
boolean ``csr_array`` s (:func:`csr`); :func:`distinct_ranks` draws sorted distinct
integers per row for the random builders.
"""

from __future__ import annotations

import numbers

import numpy as np
import scipy.sparse as sp

__all__ = ["CHUNK", "integer", "sizes", "csr", "progressions", "ranges", "distinct_ranks"]

CHUNK = 1 << 22            # entries written per NumPy step (bounds the temporaries)


# ---------------------------------------------------------------------- validation

def integer(value, name, minimum=0):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def sizes(n, m):
    n = integer(n, "n")
    m = n if m is None else integer(m, "m")
    return n, m


# ---------------------------------------------------------------------- construction

def csr(indptr, indices, shape) -> sp.csr_array:
    """Wrap canonical arrays (sorted, unique per row) in a boolean csr_array."""
    out = sp.csr_array((np.ones(indices.shape[0], dtype=bool), indices, indptr), shape=shape,
                       copy=False)
    out.has_canonical_format = True
    return out


def progressions(first, step, count, m) -> sp.csr_array:
    """Row i holds the keys first_i + step·t, t = 0 … count_i − 1 (step > 0, all in [0, M))."""
    n = first.shape[0]
    count = np.maximum(count, 0).astype(np.int64)                           # (N,)
    indptr = np.zeros(n + 1, dtype=np.int64)                                # (N + 1,)
    np.cumsum(count, out=indptr[1:])
    nnz = int(indptr[-1])
    indices = np.empty(nnz, dtype=np.int64)                                       # (nnz,)
    ramp = np.arange(min(nnz, CHUNK), dtype=np.int64)                           # (chunk,)
    r0 = 0
    while r0 < n:                  # rows in chunks of about CHUNK entries
        r1 = int(np.searchsorted(indptr, indptr[r0] + CHUNK, side="right")) - 1
        r1 = min(max(r1, r0 + 1), n)
        e0, e1 = int(indptr[r0]), int(indptr[r1])
        if e1 - e0 > ramp.shape[0]:                    # one row longer than a chunk
            ramp = np.arange(e1 - e0, dtype=np.int64)
        # entry e of row i (e − indptr_i = t) holds first_i + step·t
        #                                      = (first_i − step·(indptr_i − e0)) + step·(e − e0)
        base = first[r0:r1] - step * (indptr[r0:r1] - e0)                   # (rows,)
        out = indices[e0:e1]
        out[:] = np.repeat(base, count[r0:r1])
        if step == 1:
            out += ramp[:e1 - e0]
        else:
            out += step * ramp[:e1 - e0]
        r0 = r1
    return csr(indptr, indices, (n, m))


def ranges(lo, hi, m) -> sp.csr_array:
    """Row i holds the keys lo_i … hi_i (inclusive; empty when hi_i < lo_i)."""
    return progressions(lo, 1, hi - lo + 1, m)


# ---------------------------------------------------------------------- random draws

def distinct_ranks(avail: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """(R, k) sorted distinct integers, row r uniform among the k-subsets of [0, avail_r).

    Requires avail_r >= k.  Draws with replacement, then redraws the duplicates until none
    remain; the procedure is symmetric in the values, so each k-subset is equally likely.
    """
    r = rng.integers(0, avail[:, None], size=(avail.shape[0], k))           # (R, k)
    r.sort(axis=1)
    while k > 1:
        dup = np.zeros(r.shape, dtype=bool)                                 # (R, k)
        dup[:, 1:] = r[:, 1:] == r[:, :-1]
        if not dup.any():
            break
        rows = np.nonzero(dup)[0]
        r[dup] = rng.integers(0, avail[rows])
        bad = np.unique(rows)
        r[bad] = np.sort(r[bad], axis=1)
    return r
