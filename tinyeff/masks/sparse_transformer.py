"""The two factorized patterns of Child et al. (2019), "Generating Long Sequences with Sparse
Transformers": ``strided`` and ``fixed`` (both causal), as openai/sparse_attention builds them."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ._build import integer, progressions, ranges
from .combine import union

__all__ = ["strided", "fixed"]


def strided(n: int, stride: int, part: str = "both") -> sp.csr_array:
    """Child et al. (2019) strided pattern, causal, stride l:

        A¹(i) = {j : i − l < j ≤ i}                   (``part="local"``, l keys incl. i)
        A²(i) = {j ≤ i : (i − j) mod l = 0}           (``part="stride"``)

    ``part="both"`` (default) returns A¹ ∪ A², the "merged" use of the two heads.  A¹
    follows openai/sparse_attention's code (l positions); the paper's text writes l + 1.
    """
    n = integer(n, "n")
    l = integer(stride, "stride", minimum=1)
    if part not in ("both", "local", "stride"):
        raise ValueError(f"part must be one of ['both', 'local', 'stride'], got {part!r}")
    i = np.arange(n, dtype=np.int64)                                        # (N,)
    a1 = ranges(np.maximum(i - l + 1, 0), i, n)
    a2 = progressions(i % l, l, i // l + 1, n)
    if part == "local":
        return a1
    if part == "stride":
        return a2
    return union(a1, a2)


def fixed(n: int, block: int, summary: int, part: str = "both") -> sp.csr_array:
    """Child et al. (2019) fixed pattern, causal, block l and c summary positions:

        A¹(i) = {j ≤ i : ⌊j/l⌋ = ⌊i/l⌋}               (``part="local"``)
        A²(i) = {j ≤ i : j mod l ∈ {l − c, …, l − 1}}  (``part="summary"``)

    ``part="both"`` (default) returns A¹ ∪ A².  Requires 1 ≤ c ≤ l.
    """
    n = integer(n, "n")
    l = integer(block, "block", minimum=1)
    c = integer(summary, "summary", minimum=1)
    if c > l:
        raise ValueError(f"summary must be <= block, got summary={c}, block={l}")
    if part not in ("both", "local", "summary"):
        raise ValueError(f"part must be one of ['both', 'local', 'summary'], got {part!r}")
    i = np.arange(n, dtype=np.int64)                                        # (N,)
    a1 = ranges(i // l * l, i, n)
    a2 = [progressions(np.full(n, o, np.int64), l, np.where(i >= o, (i - o) // l + 1, 0), n)
          for o in range(l - c, l)]
    if part == "local":
        return a1
    if part == "summary":
        return union(*a2)
    return union(a1, *a2)
