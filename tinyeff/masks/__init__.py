"""Sparse attention patterns as boolean ``scipy.sparse.csr_array`` matrices.

A pattern S ∈ {0,1}^{N×M} says which keys each query may attend: S_ij = 1 (a stored entry)
means query i may attend key j.  Every builder here returns a boolean ``csr_array`` in
canonical form (sorted, duplicate-free indices, every stored value True) and never forms a
dense N×M array: index arrays are written directly with NumPy, in row chunks, so building
n = 1,000,000 with a window of 128 takes seconds and O(nnz) memory.  The kernels receive
patterns through :class:`tinyeff.masks.pattern.Pattern` (re-exported here).

Builders and their formulas (i: query row in [0, N), j: key column in [0, M)):

=========================================  ====================================================
``causal(n, m=None, offset=0)``            j ≤ i + offset   (offset 0: top-left, as ``full``;
                                           offset M − N: bottom-right, as FlashAttention ≥ 2.1)
``local(n, window, m=None, offset=0)``     |i + offset − j| ≤ w
``dilated(n, window, dilation, m=None,     j = i + offset + t·dilation for an integer t with
offset=0)``                                |t| ≤ w   (dilation 1 is ``local``)
``global_tokens(n, indices)``              i ∈ G or j ∈ G   (G = ``indices``)
``strided(n, stride)``                     Child et al. 2019, "strided":  j ≤ i and
                                           (i − j < l  or  (i − j) mod l = 0)
``fixed(n, block, summary)``               Child et al. 2019, "fixed":  j ≤ i and
                                           (⌊j/l⌋ = ⌊i/l⌋  or  j mod l ≥ l − c)
``block_diagonal(n, block, m=None,         ⌊i/b⌋ = ⌊j/b_k⌋   (b_k = ``key_block``, default b;
key_block=None)``                          the last block may be shorter)
``random(n, per_row, rng, m=None)``        row i holds min(r, M) distinct keys drawn uniformly
                                           without replacement from [0, M)
``bigbird(n, window, n_global, n_random,   local(window) ∪ global_tokens(0 … g − 1) ∪ R, where
rng)``                                     R gives each non-global row r further keys drawn
                                           uniformly from the keys it does not already have
``from_block_layout(layout, block,         S_ij = layout[⌊i/b⌋, ⌊j/b⌋]   (openai blocksparse /
n=None, m=None)``                          DeepSpeed block layouts)
``bigbird_blocks(n, block,                 HF transformers' BigBird ``block_sparse`` layout per
num_random_blocks, *, rand_attn=None,      head: first/last block global, 3-block window, r
rng=None, num_heads=None)``                random blocks per row block (see the function)
``union(*masks)``, ``intersect(*masks)``   S = S¹ ∨ S² ∨ …,  S = S¹ ∧ S² ∧ …
=========================================  ====================================================

Every random builder takes an explicit ``numpy.random.Generator``: the pattern it returns
is an explicit input of the attention, so two backends can be fed exactly the same one
(build it once, pass the same matrix to both).
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from ..kernels.csr import merge_count_csr, merge_fill_csr
from .pattern import Pattern

__all__ = ["Pattern", "causal", "local", "dilated", "global_tokens", "strided", "fixed",
           "block_diagonal", "random", "bigbird", "from_block_layout", "BigBirdBlocks",
           "bigbird_blocks", "union", "intersect"]

_CHUNK = 1 << 22            # entries written per NumPy step (bounds the temporaries)


# ---------------------------------------------------------------------- validation

def _int(value, name, minimum=0):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _sizes(n, m):
    n = _int(n, "n")
    m = n if m is None else _int(m, "m")
    return n, m


# ---------------------------------------------------------------------- construction

def _csr(indptr, indices, shape) -> sp.csr_array:
    """Wrap canonical arrays (sorted, unique per row) in a boolean csr_array."""
    out = sp.csr_array((np.ones(indices.shape[0], dtype=bool), indices, indptr), shape=shape,
                       copy=False)
    out.has_canonical_format = True
    return out


def _progressions(first, step, count, m) -> sp.csr_array:
    """Row i holds the keys first_i + step·t, t = 0 … count_i − 1 (step > 0, all in [0, M))."""
    n = first.shape[0]
    count = np.maximum(count, 0).astype(np.int64)                           # (N,)
    indptr = np.zeros(n + 1, dtype=np.int64)                                # (N + 1,)
    np.cumsum(count, out=indptr[1:])
    nnz = int(indptr[-1])
    indices = np.empty(nnz, dtype=np.int64)                                       # (nnz,)
    ramp = np.arange(min(nnz, _CHUNK), dtype=np.int64)                           # (chunk,)
    r0 = 0
    while r0 < n:                  # rows in chunks of about _CHUNK entries
        r1 = int(np.searchsorted(indptr, indptr[r0] + _CHUNK, side="right")) - 1
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
    return _csr(indptr, indices, (n, m))


def _ranges(lo, hi, m) -> sp.csr_array:
    """Row i holds the keys lo_i … hi_i (inclusive; empty when hi_i < lo_i)."""
    return _progressions(lo, 1, hi - lo + 1, m)


# ---------------------------------------------------------------------- builders

def causal(n: int, m: int | None = None, offset: int = 0) -> sp.csr_array:
    """S_ij = [j ≤ i + offset], shape (n, m); ``m`` defaults to n.

    offset 0 is the top-left alignment of ``full(causal=True)`` and PyTorch's ``is_causal``;
    offset = m − n is the bottom-right alignment (FlashAttention ≥ 2.1, KV-cache decoding).
    """
    n, m = _sizes(n, m)
    offset = _int(offset, "offset", minimum=-(2**62))
    i = np.arange(n, dtype=np.int64)                                        # (N,)
    return _ranges(np.zeros(n, np.int64), np.minimum(i + offset, m - 1), m)


def local(n: int, window: int, m: int | None = None, offset: int = 0) -> sp.csr_array:
    """S_ij = [|i + offset − j| ≤ w]: a band of 2w + 1 keys, clipped at the sequence edges."""
    n, m = _sizes(n, m)
    w = _int(window, "window")
    offset = _int(offset, "offset", minimum=-(2**62))
    c = np.arange(n, dtype=np.int64) + offset                               # (N,) centres
    return _ranges(np.maximum(c - w, 0), np.minimum(c + w, m - 1), m)


def dilated(n: int, window: int, dilation: int, m: int | None = None,
            offset: int = 0) -> sp.csr_array:
    """S_ij = [j = i + offset + t·dilation for some integer t with |t| ≤ w].

    Row i holds up to 2w + 1 keys spaced ``dilation`` apart around i (Longformer's dilated
    window); keys outside [0, M) are dropped.  ``dilation=1`` equals :func:`local`.
    """
    n, m = _sizes(n, m)
    w = _int(window, "window")
    d = _int(dilation, "dilation", minimum=1)
    offset = _int(offset, "offset", minimum=-(2**62))
    c = np.arange(n, dtype=np.int64) + offset                               # (N,) centres
    t_lo = np.maximum(-w, -(c // d))                   # smallest t with c + t·d >= 0
    t_hi = np.minimum(w, (m - 1 - c) // d)             # largest t with c + t·d <= M − 1
    return _progressions(c + t_lo * d, d, t_hi - t_lo + 1, m)


def global_tokens(n: int, indices) -> sp.csr_array:
    """S_ij = [i ∈ G or j ∈ G] for the global positions G = ``indices`` (square, n × n).

    The global rows attend every key and every row attends the global keys (Longformer,
    BigBird ITC).  Union it with :func:`local` for Longformer's pattern.
    """
    n = _int(n, "n")
    g = np.unique(np.asarray(indices, dtype=np.int64).reshape(-1))         # (|G|,) sorted
    if g.size and (g[0] < 0 or g[-1] >= n):
        raise ValueError(f"indices must lie in [0, {n}), got [{g[0]}, {g[-1]}]")
    is_g = np.zeros(n, dtype=bool)                                          # (N,)
    is_g[g] = True
    # non-global rows: the columns G;  global rows: every column
    cols = _csr(np.arange(n + 1, dtype=np.int64) * g.size, np.tile(g, n), (n, n))
    rows = _ranges(np.zeros(n, np.int64), np.where(is_g, n - 1, -1), n)
    return union(cols, rows)


def strided(n: int, stride: int, part: str = "both") -> sp.csr_array:
    """Child et al. (2019) strided pattern, causal, stride l:

        A¹(i) = {j : i − l < j ≤ i}                   (``part="local"``, l keys incl. i)
        A²(i) = {j ≤ i : (i − j) mod l = 0}           (``part="stride"``)

    ``part="both"`` (default) returns A¹ ∪ A², the "merged" use of the two heads.  A¹
    follows openai/sparse_attention's code (l positions); the paper's text writes l + 1.
    """
    n = _int(n, "n")
    l = _int(stride, "stride", minimum=1)
    if part not in ("both", "local", "stride"):
        raise ValueError(f"part must be one of ['both', 'local', 'stride'], got {part!r}")
    i = np.arange(n, dtype=np.int64)                                        # (N,)
    a1 = _ranges(np.maximum(i - l + 1, 0), i, n)
    a2 = _progressions(i % l, l, i // l + 1, n)
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
    n = _int(n, "n")
    l = _int(block, "block", minimum=1)
    c = _int(summary, "summary", minimum=1)
    if c > l:
        raise ValueError(f"summary must be <= block, got summary={c}, block={l}")
    if part not in ("both", "local", "summary"):
        raise ValueError(f"part must be one of ['both', 'local', 'summary'], got {part!r}")
    i = np.arange(n, dtype=np.int64)                                        # (N,)
    a1 = _ranges(i // l * l, i, n)
    a2 = [_progressions(np.full(n, o, np.int64), l, np.where(i >= o, (i - o) // l + 1, 0), n)
          for o in range(l - c, l)]
    if part == "local":
        return a1
    if part == "summary":
        return union(*a2)
    return union(a1, *a2)


def block_diagonal(n: int, block: int, m: int | None = None,
                   key_block: int | None = None) -> sp.csr_array:
    """S_ij = [⌊i/b⌋ = ⌊j/b_k⌋]: query block q attends key block q (b_k defaults to b).

    With N != M pass ``key_block`` so both sides have the same number of blocks; blocks that
    run past the end are shorter (a query block with no key block gets an empty row).
    """
    n, m = _sizes(n, m)
    b = _int(block, "block", minimum=1)
    bk = b if key_block is None else _int(key_block, "key_block", minimum=1)
    blk = np.arange(n, dtype=np.int64) // b                                 # (N,)
    return _ranges(blk * bk, np.minimum(blk * bk + bk - 1, m - 1), m)


def _distinct_ranks(avail: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
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


def random(n: int, per_row: int, rng: np.random.Generator, m: int | None = None
           ) -> sp.csr_array:
    """Row i holds min(r, M) distinct keys, drawn uniformly without replacement from [0, M).

    ``rng`` is a ``numpy.random.Generator``; the same generator state gives the same
    pattern.
    """
    n, m = _sizes(n, m)
    r = min(_int(per_row, "per_row"), m)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if r == m:
        return _ranges(np.zeros(n, np.int64), np.full(n, m - 1, np.int64), m)
    cols = _distinct_ranks(np.full(n, m, np.int64), r, rng)                 # (N, r)
    indptr = np.arange(n + 1, dtype=np.int64) * r                           # (N + 1,)
    return _csr(indptr, cols.reshape(-1), (n, m))


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
    n = _int(n, "n")
    w = _int(window, "window")
    g = min(_int(n_global, "n_global"), n)
    r = _int(n_random, "n_random")
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
        rho = _distinct_ranks(avail[some], r, rng)                          # (R, r)
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
        parts.append(_csr(indptr, indices, (n, n)))
    return union(*parts)


def from_block_layout(layout, block: int, n: int | None = None, m: int | None = None
                      ) -> sp.csr_array:
    """S_ij = layout[⌊i/b⌋, ⌊j/b⌋]: expand an (nb, mb) block layout to a token pattern.

    ``layout`` is a boolean ndarray or scipy.sparse matrix (openai blocksparse / DeepSpeed
    ``layout[h]``); n and m (default nb·b, mb·b) may cut the last block short.
    """
    b = _int(block, "block", minimum=1)
    if sp.issparse(layout):
        lay = Pattern.from_scipy(layout, name="layout")
    elif isinstance(layout, np.ndarray) and layout.dtype == np.bool_ and layout.ndim == 2:
        lay = Pattern.from_scipy(sp.csr_array(layout), name="layout")
    else:
        raise TypeError("layout must be a 2-D boolean ndarray or scipy.sparse matrix, got "
                        f"{type(layout).__name__}")
    nb, mb = lay.shape
    n = nb * b if n is None else _int(n, "n")
    m = mb * b if m is None else _int(m, "m")
    if n > nb * b or m > mb * b:
        raise ValueError(f"n, m = {(n, m)} exceed the layout's {(nb * b, mb * b)} positions")
    # each block row of the layout becomes b identical token rows of key ranges
    qb = np.arange(n, dtype=np.int64) // b                                  # (N,)
    blocks_per_row = np.diff(lay.indptr)[qb]                                # (N,)
    starts = lay.indptr[qb]                                                 # (N,)
    # entries of token row i: for each stored key block kb, keys kb·b … min(kb·b+b, M) − 1
    e_row = np.repeat(np.arange(n, dtype=np.int64), blocks_per_row)          # (N·blocks,)
    e_blk = lay.indices[np.arange(e_row.size) - np.repeat(
        np.cumsum(blocks_per_row) - blocks_per_row, blocks_per_row) + starts[e_row]]
    lo = e_blk * b
    hi = np.minimum(lo + b, m) - 1
    keep = hi >= lo
    seg = _ranges(lo[keep], hi[keep], m)               # one "row" per (token, key block)
    counts = np.bincount(e_row[keep], weights=(hi - lo + 1)[keep], minlength=n)
    indptr = np.zeros(n + 1, dtype=np.int64)                                # (N + 1,)
    np.cumsum(counts.astype(np.int64), out=indptr[1:])
    return _csr(indptr, seg.indices.astype(np.int64), (n, m))


class BigBirdBlocks(NamedTuple):
    """What :func:`bigbird_blocks` returns (H heads, n_b = n / block blocks, r random)."""

    masks: list                 # H boolean csr_array (n, n): the per-head patterns for sparse
    counts: np.ndarray          # (H, n_b, n_b) int64: times key block c is in row block a's list
    rand_attn: np.ndarray       # (H, n_b − 2, r) int64: the random blocks of rows 1 … n_b − 2


def bigbird_blocks(n: int, block: int, num_random_blocks: int, *, rand_attn=None, rng=None,
                   num_heads: int | None = None) -> BigBirdBlocks:
    """BigBird's block-sparse layout exactly as HF transformers computes it, per head.

    HF ``BigBirdBlockSparseAttention.bigbird_block_sparse_attention`` (huggingface/
    transformers, ``src/transformers/models/big_bird/modeling_big_bird.py``) cuts the
    sequence into n_b = n / b blocks and gives query block a (all b of its rows) this list of
    key blocks, with R_a = ``rand_attn[h, a − 1]`` (r blocks):

        a = 0, a = n_b − 1        every block once                        (global rows)
        a = 1                     0, 1, 2, n_b − 1, R_1
        2 ≤ a ≤ n_b − 3           0, a − 1, a, a + 1, R_a, n_b − 1
        a = n_b − 2               0, n_b − 3, n_b − 2, n_b − 1, R_{n_b−2}

    and softmaxes over the concatenated keys of that list, so a key block listed twice (a
    random block that repeats a window or global block, or another random block) counts
    twice.  ``counts[h, a, c]`` is how many times block c is in row block a's list;
    ``masks[h]`` is the token pattern counts[h] > 0 (``from_block_layout``).  When every
    count is 0 or 1, ``sparse.forward(q, k, v, mask=result.masks)`` equals HF's attention
    (q of shape (B, H, n, D)); otherwise use ``full.forward`` with
    ``bias = log(count)`` expanded to tokens (−inf where the count is 0), which reproduces
    the repeated keys exactly (docs/semantics/sparse.md).

    The random blocks are either given or drawn:

    * ``rand_attn``: an integer ndarray (H, n_b − 2, r) with entries in [0, n_b), row t for
      query block t + 1 — HF's own ``rand_attn`` (its list of H arrays, ``np.stack``-ed),
      which is how HF is matched exactly; any values are accepted, repeats included (HF's
      eval mode uses all zeros: block 0 then counts 1 + r times in rows 1 … n_b − 2).
    * ``rng`` (a ``numpy.random.Generator``) and ``num_heads``: the constraint set of HF's
      training-mode draw for lengths that take its general path
      (``_bigbird_block_rand_mask_with_head`` with the plan of ``_get_rand_attn_plan``
      when n_b > 2r + 5; HF's model runs full attention for n_b ≤ 2r + 5, and this is a
      ``ValueError``).  Each head and each row block a ∈ [1, n_b − 2] gets r distinct blocks,
      uniform among the r-subsets of

          C(a) = {1, …, E − 2} ∖ {a − 1, a, a + 1} ∖ ({E − 2} if a = 1) ∖ ({1} if a = E − 2),
          E = 2r + 5,

      i.e. never a window or global block, and only from the first E − 1 blocks (HF draws
      every row's random blocks from the first plan segment [0, E) and also excludes its
      end block E − 1).  HF's stream (``np.random`` seeded per layer) cannot be reproduced;
      pass ``rand_attn`` for that.  For n ∈ {1024, 3072, 4096} HF uses a different, older
      draw (``_bigbird_block_rand_mask``), whose last rows can repeat window or global
      blocks: pass its ``rand_attn`` too.

    Needs n a multiple of b (HF pads the input to one) and n_b ≥ 4.  Memory: O(H·n_b²)
    for ``counts`` plus the patterns.
    """
    n = _int(n, "n")
    b = _int(block, "block", minimum=1)
    r = _int(num_random_blocks, "num_random_blocks")
    if n % b:
        raise ValueError(f"n must be a multiple of block (HF pads to one), got n={n}, "
                         f"block={b}")
    nb = n // b
    if nb < 4:
        raise ValueError(f"bigbird_blocks needs n / block >= 4 blocks, got {nb} "
                         f"(n={n}, block={b})")
    if (rand_attn is None) == (rng is None):
        raise ValueError("pass exactly one of rand_attn (explicit random blocks) and rng")
    if rand_attn is not None:
        if not isinstance(rand_attn, np.ndarray) or rand_attn.dtype.kind not in "iu":
            raise TypeError("rand_attn must be an integer numpy.ndarray (H, n_b - 2, r), got "
                            f"{type(rand_attn).__name__} "
                            f"{getattr(rand_attn, 'dtype', '')}".rstrip())
        if rand_attn.ndim != 3 or rand_attn.shape[1:] != (nb - 2, r) or rand_attn.shape[0] < 1:
            raise ValueError(f"rand_attn must have shape (H, n_b - 2, r) = (H, {nb - 2}, {r}) "
                             f"with H >= 1, got {rand_attn.shape}")
        if num_heads is not None and _int(num_heads, "num_heads") != rand_attn.shape[0]:
            raise ValueError(f"num_heads={num_heads} does not match rand_attn's "
                             f"{rand_attn.shape[0]} heads")
        if rand_attn.size and (rand_attn.min() < 0 or rand_attn.max() >= nb):
            raise ValueError(f"rand_attn entries must lie in [0, n_b) = [0, {nb}), got "
                             f"[{rand_attn.min()}, {rand_attn.max()}]")
        rand = rand_attn.astype(np.int64)                                   # (H, n_b − 2, r)
    else:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        if num_heads is None:
            raise ValueError("num_heads is required with rng")
        h = _int(num_heads, "num_heads", minimum=1)
        if nb <= 2 * r + 5:
            raise ValueError(f"drawing needs n / block > 2r + 5 = {2 * r + 5} blocks (HF runs "
                             f"full attention below), got {nb}; pass rand_attn instead")
        rand = _hf_bigbird_draw(nb, r, h, rng)
    heads = rand.shape[0]
    a = np.arange(1, nb - 1, dtype=np.int64)                                # (n_b − 2,)
    fixed = np.zeros((nb, nb), dtype=np.int64)                              # (n_b, n_b)
    fixed[0, :] = 1
    fixed[nb - 1, :] = 1
    for col in (np.zeros_like(a), a - 1, a, a + 1, np.full_like(a, nb - 1)):
        fixed[a, col] = 1                      # set, not added: row 1 lists block 0 once
    counts = np.repeat(fixed[None], heads, axis=0)                          # (H, n_b, n_b)
    hh, tt, _ = np.indices(rand.shape)                                      # (H, n_b − 2, r)
    np.add.at(counts, (hh.reshape(-1), tt.reshape(-1) + 1, rand.reshape(-1)), 1)
    pats = [from_block_layout(counts[g] > 0, b) for g in range(heads)]
    return BigBirdBlocks(masks=pats, counts=counts, rand_attn=rand)


def _hf_bigbird_draw(nb: int, r: int, heads: int, rng: np.random.Generator) -> np.ndarray:
    """(H, n_b − 2, r) random blocks: row a = t + 1 gets r distinct blocks, uniform among the
    r-subsets of C(a) (see :func:`bigbird_blocks`), in increasing order."""
    e = 2 * r + 5                                       # end of HF's first plan segment
    a = np.arange(1, nb - 1, dtype=np.int64)                                # (n_b − 2,)
    cols = np.arange(e, dtype=np.int64)                                     # (E,)
    legal = (cols >= 1) & (cols <= e - 2) & (np.abs(cols - a[:, None]) > 1)  # (n_b − 2, E)
    legal[a == 1, e - 2] = False
    legal[a == e - 2, 1] = False
    avail = legal.sum(axis=1)                                               # (n_b − 2,)
    cand = np.argsort(~legal, axis=1, kind="stable")   # legal columns first, ascending
    rows = np.tile(np.arange(nb - 2), heads)                                # (H·(n_b − 2),)
    rho = _distinct_ranks(avail[rows], r, rng)                              # (H·(n_b − 2), r)
    return cand[rows[:, None], rho].reshape(heads, nb - 2, r)


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
