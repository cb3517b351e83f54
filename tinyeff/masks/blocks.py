"""Block layouts expanded to token patterns: ``from_block_layout`` (openai blocksparse /
DeepSpeed layouts) and ``bigbird_blocks`` (HF transformers' BigBird ``block_sparse`` layout,
per head, with the counts of repeated key blocks)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from ._build import csr, distinct_ranks, integer, ranges
from .pattern import Pattern

__all__ = ["from_block_layout", "BigBirdBlocks", "bigbird_blocks"]


def from_block_layout(layout, block: int, n: int | None = None, m: int | None = None
                      ) -> sp.csr_array:
    """S_ij = layout[⌊i/b⌋, ⌊j/b⌋]: expand an (nb, mb) block layout to a token pattern.

    ``layout`` is a boolean ndarray or scipy.sparse matrix (openai blocksparse / DeepSpeed
    ``layout[h]``); n and m (default nb·b, mb·b) may cut the last block short.
    """
    b = integer(block, "block", minimum=1)
    if sp.issparse(layout):
        lay = Pattern.from_scipy(layout, name="layout")
    elif isinstance(layout, np.ndarray) and layout.dtype == np.bool_ and layout.ndim == 2:
        lay = Pattern.from_scipy(sp.csr_array(layout), name="layout")
    else:
        raise TypeError("layout must be a 2-D boolean ndarray or scipy.sparse matrix, got "
                        f"{type(layout).__name__}")
    nb, mb = lay.shape
    n = nb * b if n is None else integer(n, "n")
    m = mb * b if m is None else integer(m, "m")
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
    seg = ranges(lo[keep], hi[keep], m)               # one "row" per (token, key block)
    counts = np.bincount(e_row[keep], weights=(hi - lo + 1)[keep], minlength=n)
    indptr = np.zeros(n + 1, dtype=np.int64)                                # (N + 1,)
    np.cumsum(counts.astype(np.int64), out=indptr[1:])
    return csr(indptr, seg.indices.astype(np.int64), (n, m))


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
    n = integer(n, "n")
    b = integer(block, "block", minimum=1)
    r = integer(num_random_blocks, "num_random_blocks")
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
        if num_heads is not None and integer(num_heads, "num_heads") != rand_attn.shape[0]:
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
        h = integer(num_heads, "num_heads", minimum=1)
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
    rho = distinct_ranks(avail[rows], r, rng)                              # (H·(n_b − 2), r)
    return cand[rows[:, None], rho].reshape(heads, nb - 2, r)
