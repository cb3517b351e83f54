"""Patterns defined by positions alone: ``causal``, ``local`` (a band), ``dilated``,
``block_diagonal`` and ``global_tokens`` (formulas in :mod:`tinyeff.masks`)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ._build import csr, integer, progressions, ranges, sizes
from .combine import union

__all__ = ["causal", "local", "dilated", "block_diagonal", "global_tokens"]


def causal(n: int, m: int | None = None, offset: int = 0) -> sp.csr_array:
    """S_ij = [j ≤ i + offset], shape (n, m); ``m`` defaults to n.

    offset 0 is the top-left alignment of ``full(causal=True)`` and PyTorch's ``is_causal``;
    offset = m − n is the bottom-right alignment (FlashAttention ≥ 2.1, KV-cache decoding).
    """
    n, m = sizes(n, m)
    offset = integer(offset, "offset", minimum=-(2**62))
    i = np.arange(n, dtype=np.int64)                                        # (N,)
    return ranges(np.zeros(n, np.int64), np.minimum(i + offset, m - 1), m)


def local(n: int, window: int, m: int | None = None, offset: int = 0) -> sp.csr_array:
    """S_ij = [|i + offset − j| ≤ w]: a band of 2w + 1 keys, clipped at the sequence edges."""
    n, m = sizes(n, m)
    w = integer(window, "window")
    offset = integer(offset, "offset", minimum=-(2**62))
    c = np.arange(n, dtype=np.int64) + offset                               # (N,) centres
    return ranges(np.maximum(c - w, 0), np.minimum(c + w, m - 1), m)


def dilated(n: int, window: int, dilation: int, m: int | None = None,
            offset: int = 0) -> sp.csr_array:
    """S_ij = [j = i + offset + t·dilation for some integer t with |t| ≤ w].

    Row i holds up to 2w + 1 keys spaced ``dilation`` apart around i (Longformer's dilated
    window); keys outside [0, M) are dropped.  ``dilation=1`` equals :func:`local`.
    """
    n, m = sizes(n, m)
    w = integer(window, "window")
    d = integer(dilation, "dilation", minimum=1)
    offset = integer(offset, "offset", minimum=-(2**62))
    c = np.arange(n, dtype=np.int64) + offset                               # (N,) centres
    t_lo = np.maximum(-w, -(c // d))                   # smallest t with c + t·d >= 0
    t_hi = np.minimum(w, (m - 1 - c) // d)             # largest t with c + t·d <= M − 1
    return progressions(c + t_lo * d, d, t_hi - t_lo + 1, m)


def block_diagonal(n: int, block: int, m: int | None = None,
                   key_block: int | None = None) -> sp.csr_array:
    """S_ij = [⌊i/b⌋ = ⌊j/b_k⌋]: query block q attends key block q (b_k defaults to b).

    With N != M pass ``key_block`` so both sides have the same number of blocks; blocks that
    run past the end are shorter (a query block with no key block gets an empty row).
    """
    n, m = sizes(n, m)
    b = integer(block, "block", minimum=1)
    bk = b if key_block is None else integer(key_block, "key_block", minimum=1)
    blk = np.arange(n, dtype=np.int64) // b                                 # (N,)
    return ranges(blk * bk, np.minimum(blk * bk + bk - 1, m - 1), m)


def global_tokens(n: int, indices) -> sp.csr_array:
    """S_ij = [i ∈ G or j ∈ G] for the global positions G = ``indices`` (square, n × n).

    The global rows attend every key and every row attends the global keys (Longformer,
    BigBird ITC).  Union it with :func:`local` for Longformer's pattern.
    """
    n = integer(n, "n")
    g = np.unique(np.asarray(indices, dtype=np.int64).reshape(-1))         # (|G|,) sorted
    if g.size and (g[0] < 0 or g[-1] >= n):
        raise ValueError(f"indices must lie in [0, {n}), got [{g[0]}, {g[-1]}]")
    is_g = np.zeros(n, dtype=bool)                                          # (N,)
    is_g[g] = True
    # non-global rows: the columns G;  global rows: every column
    cols = csr(np.arange(n + 1, dtype=np.int64) * g.size, np.tile(g, n), (n, n))
    rows = ranges(np.zeros(n, np.int64), np.where(is_g, n - 1, -1), n)
    return union(cols, rows)
