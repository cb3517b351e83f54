"""Token-level random patterns: ``random`` (r distinct keys per row) and ``bigbird``
(window ∪ global ∪ random, Zaheer et al. 2020).  Every draw comes from an explicit
``numpy.random.Generator``."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ._build import csr, distinct_ranks, integer, ranges, sizes
from .combine import union
from .positional import global_tokens, local

__all__ = ["random", "bigbird"]


def random(n: int, per_row: int, rng: np.random.Generator, m: int | None = None
           ) -> sp.csr_array:
    """Row i holds min(r, M) distinct keys, drawn uniformly without replacement from [0, M).

    ``rng`` is a ``numpy.random.Generator``; the same generator state gives the same
    pattern.
    """
    n, m = sizes(n, m)
    r = min(integer(per_row, "per_row"), m)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if r == m:
        return ranges(np.zeros(n, np.int64), np.full(n, m - 1, np.int64), m)
    cols = distinct_ranks(np.full(n, m, np.int64), r, rng)                 # (N, r)
    indptr = np.arange(n + 1, dtype=np.int64) * r                           # (N + 1,)
    return csr(indptr, cols.reshape(-1), (n, m))


def bigbird(n: int, window: int, n_global: int, n_random: int, rng: np.random.Generator
            ) -> sp.csr_array:
    """BigBird (Zaheer et al. 2020), token level: window ∪ global ∪ random.

        W(i) = {j : |i − j| ≤ w}                        sliding window
        G    = {0, …, g − 1}: rows in G attend every key, every row attends G
        R(i) = r keys drawn uniformly without replacement from [0, n) ∖ (W(i) ∪ G), for i ∉ G
               (all of them if fewer than r remain)

    so a non-global row away from the edges holds exactly 2w + 1 + g + r keys (the window
    and the globals overlap near position 0).  The random keys exclude the window and the
    globals as in HF's block-sparse code; unlike HF this pattern is token-level — pass a
    block layout to :func:`from_block_layout` for HF's block form.  ``rng`` is a
    ``numpy.random.Generator``: the pattern is an explicit input of the attention, so two
    backends fed the same matrix compute the same thing.
    """
    n = integer(n, "n")
    w = integer(window, "window")
    g = min(integer(n_global, "n_global"), n)
    r = integer(n_random, "n_random")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    parts = [local(n, w), global_tokens(n, np.arange(g))]
    i = np.arange(g, n, dtype=np.int64)                                     # (n − g,) rows
    if r and i.size:
        lo = np.maximum(i - w, g)                       # window part outside the globals
        hi = np.minimum(i + w, n - 1)                   # (lo <= hi: row i is inside it)
        avail = n - g - (hi - lo + 1)                                       # (n − g,)
        # rank ρ in [0, avail) -> key: skip the globals [0, g), then the window [lo, hi]
        full_rows = avail <= r
        cols_full = [np.setdiff1d(np.arange(g, n), np.arange(lo[t], hi[t] + 1))
                     for t in np.nonzero(full_rows)[0]]                    # rare, small n
        some = ~full_rows
        rho = distinct_ranks(avail[some], r, rng)                          # (R, r)
        key = rho + g
        key = np.where(key >= lo[some, None], key + (hi - lo + 1)[some, None], key)
        counts = np.where(full_rows, avail, r)                              # (n − g,)
        indptr = np.zeros(n + 1, dtype=np.int64)                            # (n + 1,)
        np.cumsum(counts, out=indptr[g + 1:])                              # rows < g: empty
        indices = np.empty(int(indptr[-1]), dtype=np.int64)                 # (nnz,)
        starts = indptr[g:-1]
        some_starts = starts[some]
        pos = some_starts[:, None] + np.arange(r)                           # (R, r)
        indices[pos.reshape(-1)] = key.reshape(-1)
        for t, cols in zip(np.nonzero(full_rows)[0], cols_full):
            indices[starts[t]:starts[t] + cols.size] = cols
        parts.append(csr(indptr, indices, (n, n)))
    return union(*parts)
