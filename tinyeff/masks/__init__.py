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

The builders live in submodules and are all importable from here: :mod:`.positional`
(causal, local, dilated, block_diagonal, global_tokens), :mod:`.sparse_transformer`
(strided, fixed), :mod:`.randomized` (random, bigbird), :mod:`.blocks` (from_block_layout,
bigbird_blocks), :mod:`.combine` (union, intersect); the shared validation and CSR
construction is :mod:`._build`.
"""

from __future__ import annotations

from .blocks import BigBirdBlocks, bigbird_blocks, from_block_layout
from .combine import intersect, union
from .pattern import Pattern
from .positional import block_diagonal, causal, dilated, global_tokens, local
from .randomized import bigbird, random
from .sparse_transformer import fixed, strided

__all__ = ["Pattern", "causal", "local", "dilated", "global_tokens", "strided", "fixed",
           "block_diagonal", "random", "bigbird", "from_block_layout", "BigBirdBlocks",
           "bigbird_blocks", "union", "intersect"]
