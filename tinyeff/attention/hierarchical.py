"""Hierarchical attention: exact near a query, averaged far from it (H-Transformer-1D style).

Every query sees the whole sequence (with ``levels=None``) through one H-matrix partition of
its row: fine keys in its own block (and the neighbouring blocks), coarse keys — means over
2^ℓ consecutive keys — further away, coarser the further.  All keys a query sees, fine and
coarse, share one softmax:

    k̄_t^ℓ = mean of the real keys k_j,   j ∈ span(ℓ, t) = [t·2^ℓ, (t+1)·2^ℓ) ∩ [0, N)
    v̄_t^ℓ = mean of the real values v_j over the same span;   n_t^ℓ = number of real keys in it
    s_i,(ℓ,t) = q_i · k̄_t^ℓ · scale + log n_t^ℓ          (level 0: the fine keys, log 1 = 0)
    out_i = Σ_(ℓ,t)∈P(i) softmax_(ℓ,t)(s_i) · v̄_t^ℓ

The log n term makes a span of n identical keys weigh exactly as its n members would in
full attention: n·exp(q·k·scale) = exp(q·k·scale + log n).  Hence, with keys and values
constant within every span, ``hierarchical`` equals ``full`` exactly (a test checks this).

The partition P(i)
------------------
b = ``block``; w = 1 with ``neighbours=True`` (default), else 0; L = number of coarse levels.
At level ℓ the sequence is cut into level-ℓ blocks of b·2^ℓ positions (block index
β_ℓ(i) = ⌊i / (b·2^ℓ)⌋) and each level-ℓ block is represented by b keys of span 2^ℓ.  The
*near field* of query i at level ℓ is

    NF_ℓ(i) = the positions of the level-ℓ blocks β_ℓ(i) − w, …, β_ℓ(i) + w.

NF_0(i) ⊂ NF_1(i) ⊂ … ⊂ NF_L(i), and P(i) is

    level 0:      every fine key j ∈ NF_0(i)                         ((2w+1)·b keys)
    level ℓ ≥ 1:  every level-ℓ span inside NF_ℓ(i) \\ NF_ℓ₋₁(i)      ((2w+1)·b/2 keys)

a partition of NF_L(i) into disjoint spans (each NF_ℓ₋₁ boundary is a multiple of b·2^ℓ⁻¹,
hence of 2^ℓ when b is even, so no span is cut).  Equivalently: at level ℓ ≥ 1 cut the
sequence into segments of g = b·2^ℓ⁻¹ positions (the level-(ℓ−1) blocks), each holding
b/2 coarse keys; the queries of segment G see the segments G + Δ,

    Δ ∈ {−2w, …, −w−1} ∪ {w+1, …, 2w+1}      if G is even
    Δ ∈ {−2w−1, …, −w−1} ∪ {w+1, …, 2w}      if G is odd

(w = 0: the sibling segment, a binary-tree/HODLR partition; w = 1: the paper's
tri-diagonal hierarchy).  Reaching the whole sequence, NF_L(i) = [0, N), takes
L_full = min{L ≥ 0 : b·2^L·(1 + w) ≥ N} levels (:func:`full_levels`).

Receptive field: out_i depends on k_j and v_j exactly for the real keys j with
|⌊j/(b·2^L)⌋ − ⌊i/(b·2^L)⌋| ≤ w (and j ≤ i when causal): all real keys when L = L_full.

Cost: each query sees (2w+1)·b·(1 + L/2) keys, so O(N·b·log(N/b)·D) time with
L = L_full; memory O(N·(D + Dv)) for the coarse keys plus row chunks of scores (the forward
saves the row log-sum-exp; the backward recomputes the scores level by level).

Paper: Z. Zhu, R. Soricut, "H-Transformer-1D: Fast One-Dimensional Hierarchical Attention
for Sequences", ACL 2021.

Shapes: q (..., N, D), k (..., N, D), v (..., N, Dv) — queries and keys are the same
positions, so M must equal N.  L = levels.

Options
-------
block : int >= 1, the fine block size b (required).  Must be even when a coarse level is
    used (L >= 1), so that level-1 spans never straddle a block boundary.  ``block >= N``
    gives one block holding everything: exactly ``full``.
levels : int >= 0 or None (default): the number L of coarse levels; None means L_full
    (reach the whole sequence).  Larger values add nothing (they are clipped to L_full);
    smaller ones shrink the receptive field to NF_L(i).  ``levels=0`` is block-local
    attention over the own (and neighbouring) blocks.
neighbours : bool, default True: the fine level also holds the blocks β_0(i) ± 1, and
    every level uses the tri-diagonal near field.  False: own block only (binary tree).
causal : bool, default False: query i sees keys j <= i only.  No span of P(i) ever contains
    i (i lies in NF_0(i), which is fine), so a span is wholly past or wholly future and
    the causal mask keeps whole spans: the spans straddling the query are exactly those
    that the partition has already refined into finer ones.
key_padding_mask : boolean (..., N), True = real key, one dimension per batch dimension
    (size 1 broadcasts).  Padded keys are removed exactly: span means and counts n_t run
    over the real keys only; a span with no real key is dropped (n = 0, logit −inf).  So
    padded keys get zero gradient and, with keys constant within every span, the result
    equals ``full`` with the same padding.
scale : float, default 1/sqrt(D).

Any N is allowed: the last block and the last span of every level may be shorter (their
counts n are the true lengths).  Span sums are formed pairwise up the tree (Σ over 2^ℓ
keys = Σ over its two halves), then divided by n; ports wanting bit-level agreement should
sum in that order.

Edge cases
----------
* A query all of whose visible keys are padded outputs 0 with zero gradient.
* N = 0 gives an empty output.
* Numerically stable: the row maximum over fine and coarse logits is subtracted before the
  exponential (a constant of the backward).

Differences from public peers
-----------------------------
* The paper and lucidrains/h-transformer-1d also coarsen the *queries* (a block of queries
  attends as its mean, then results are interpolated back); here every query is exact and
  only keys and values are coarsened.  lucidrains normalizes each level with its own
  row maximum and counts a coarse key once in the softmax denominator while summing (not
  averaging) its values; tinyeff uses one softmax with the log n multiplicity, the paper's
  intended normalization.  lucidrains' number of levels, log2(N/b) − 2, leaves half the
  sequence unseen; tinyeff's default reaches everything.
* lucidrains with block size N_r corresponds to ``block=2·N_r, neighbours=False`` (its
  level 0 is the own block plus the sibling block, fine; its level ℓ the sibling block of
  b coarse keys of span 2^ℓ), up to the query coarsening and normalization above.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from .. import _checks
from .._random import random_qkv
from ..ctx import Ctx
from ..ops import softmax
from . import _nonfinite
from ._case import Case

NAME = "hierarchical"
SUPPORTS_MASK = False
SUPPORTS_CAUSAL = True
SUPPORTS_BIAS = False
SUPPORTS_REL_BIAS = False
KEY_PADDING = "key_padding_mask"
DIFFERENTIABLE = ("q", "k", "v")

_CHUNK_ELEMENTS = 1 << 21      # rows per chunk: a (..., rows, keys) score block holds ~2M entries


@dataclasses.dataclass(frozen=True)
class HierarchicalCtx(Ctx):
    q: np.ndarray                   # (..., N, D)
    k: np.ndarray                   # (..., N, D)
    v: np.ndarray                   # (..., N, Dv)
    out: np.ndarray                 # (..., N, Dv) the output (for δ_i = dout_i · out_i)
    lse: np.ndarray                 # (..., N) log-sum-exp over all fine and coarse logits
    key_padding_mask: np.ndarray | None   # (..., N) as given, or None
    block: int
    levels: int                     # L actually used (<= full_levels)
    neighbours: bool
    causal: bool
    scale: float


def full_levels(n: int, block: int, neighbours: bool = True) -> int:
    """L_full = min{L >= 0 : block·2^L·(1 + w) >= n}: the levels reaching the whole sequence."""
    reach = block * (2 if neighbours else 1)
    return max(0, math.ceil(math.log2(n / reach))) if n > reach else 0


def receptive_field(n: int, *, block: int, levels=None, neighbours: bool = True,
                    causal: bool = False) -> np.ndarray:
    """(N, N) boolean: [i, j] True iff out_i depends on key j (before key padding)."""
    L = full_levels(n, block, neighbours) if levels is None else levels
    w = int(neighbours)
    top = np.arange(n) // (block << L)                             # (N,) level-L block index
    rf = np.abs(top[:, None] - top[None, :]) <= w                  # (N, N)
    return rf & np.tri(n, dtype=bool) if causal else rf


def segment_offsets(level: int, parity: int, neighbours: bool) -> np.ndarray:
    """The offsets Δ of the segments seen at ``level`` by a segment of the given parity."""
    w = int(neighbours)
    if level == 0:
        return np.arange(-w, w + 1)                                # (2w+1,) the fine near field
    if parity == 0:
        return np.r_[-2 * w:-w, w + 1:2 * w + 2]                   # (2w+1,)
    return np.r_[-2 * w - 1:-w, w + 1:2 * w + 1]                   # (2w+1,)


@_nonfinite.nan_rows_of_v
def forward(q, k, v, *, block, levels=None, neighbours=True, causal=False,
            key_padding_mask=None, scale=None):
    """Hierarchical attention.  Returns ``(out (..., N, Dv), ctx)``; see the module docstring."""
    batch, n, m, d, dv, dtype = _checks.qkv(q, k, v)
    if m != n:
        raise ValueError(f"hierarchical attention needs as many keys as queries (they are the "
                         f"same positions), got q {q.shape}, k {k.shape}")
    block = _checks.integer(block, "block", minimum=1)
    neighbours = _checks.flag(neighbours, "neighbours")
    causal = _checks.flag(causal, "causal")
    L = full_levels(n, block, neighbours)
    if levels is not None:
        L = min(L, _checks.integer(levels, "levels", minimum=0))
    if L >= 1 and block % 2:
        raise ValueError(f"block must be even when coarse levels are used (a level-1 span of "
                         f"2 keys would straddle a block boundary), got block={block} with "
                         f"{L} level(s) for N={n}; use an even block, levels=0, or block >= N")
    key_padding_mask = _checks.key_padding_mask(key_padding_mask, batch, n,
                                                name="key_padding_mask")
    scale = _checks.scale(scale, d)
    if q.size == 0 or v.size == 0:
        # B, N or Dv = 0: nothing to compute (the chunked path's reshapes cannot infer a
        # length from an empty array); zeros, every row empty (docs/robustness.md)
        out = np.zeros((*batch, n, dv), dtype=dtype)               # (..., N, Dv)
        lse = np.full((*batch, n), -np.inf, dtype=dtype)           # (..., N)
        return out, HierarchicalCtx(q=q, k=k, v=v, out=out, lse=lse,
                                    key_padding_mask=key_padding_mask, block=block, levels=L,
                                    neighbours=neighbours, causal=causal, scale=scale)
    return _forward_ref(q, k, v, key_padding_mask, block, L, neighbours, causal, scale)


def backward(dout, ctx: HierarchicalCtx) -> dict:
    """Gradients ``{"q", "k", "v"}``."""
    if not isinstance(ctx, HierarchicalCtx):
        raise TypeError(f"ctx must be the HierarchicalCtx returned by hierarchical.forward, "
                        f"got {type(ctx).__name__}")
    dout = _checks.dout(dout, ctx.out.shape, ctx.q.dtype)
    if dout.size == 0:                 # B, N or Dv = 0: the output is empty, so is every path
        return {"q": np.zeros_like(ctx.q), "k": np.zeros_like(ctx.k), "v": np.zeros_like(ctx.v)}
    return _backward_ref(dout, ctx)


# ----------------------------------------------------------------------------------------
# The key pyramid: span sums, counts, means
# ----------------------------------------------------------------------------------------

def _pair_sum(x: np.ndarray) -> np.ndarray:
    """(..., n, C) -> (..., ⌈n/2⌉, C): row t is x[2t] + x[2t+1] (x[2t] alone at an odd end)."""
    out = x[..., 0::2, :].copy()                                   # (..., ⌈n/2⌉, C)
    odd = x[..., 1::2, :]                                          # (..., ⌊n/2⌋, C)
    out[..., :odd.shape[-2], :] += odd
    return out


def _pyramid(k, v, kpm, levels):
    """Yield, for ℓ = 0 … levels, the span sums and counts (Σ m k, Σ m v, n) of level ℓ.

    Shapes (..., n_ℓ, D), (..., n_ℓ, Dv), (.., n_ℓ, 1).  Sums go pairwise up the tree; the
    means k̄ = Σ m k / max(n, 1) are formed only for the keys a chunk gathers (so a level
    costs one array of sums, not sums and means).
    """
    if kpm is None:
        sk, sv = k, v                                              # level 0: the keys themselves
        cnt = np.ones((k.shape[-2], 1), dtype=k.dtype)             # (N, 1) real keys per span
    else:
        sk = np.where(kpm[..., None], k, 0)                        # (..., N, D) Σ over a 1-span
        sv = np.where(kpm[..., None], v, 0)                        # (..., N, Dv)
        cnt = kpm[..., None].astype(k.dtype)                       # (.., N, 1)
    for ell in range(levels + 1):
        if ell:
            sk, sv, cnt = _pair_sum(sk), _pair_sum(sv), _pair_sum(cnt)  # (..., n_ℓ, ·)
        yield sk, sv, cnt


# ----------------------------------------------------------------------------------------
# One level seen by one chunk of query rows
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Tile:
    """The keys of one level seen by one chunk of rows, split into ns row groups ("subs")."""
    s: np.ndarray        # (..., ns, rows, C) masked scores (−inf where not in P(i))
    kg: np.ndarray       # (..., ns, C, D) gathered means k̄
    vg: np.ndarray       # (..., ns, C, Dv) gathered means v̄
    inv: np.ndarray      # (.., ns, C, 1) 1 / max(n, 1) of the gathered spans
    groups: np.ndarray   # (ns,) segment index G of each sub
    segs: np.ndarray     # (ns, 2w+1) segments G + Δ seen by each sub, relative to ``lo``
    lo: int              # first segment of the gathered slab
    nseg: int            # segments in the slab


def _slab(x: np.ndarray, lo: int, hi: int, fill) -> np.ndarray:
    """x[..., lo:hi, :] along the token axis, padded with ``fill`` outside [0, len)."""
    n = x.shape[-2]
    if lo >= 0 and hi <= n:
        return x[..., lo:hi, :]                                    # a view
    out = np.full((*x.shape[:-2], hi - lo, x.shape[-1]), fill, dtype=x.dtype)  # (..., hi−lo, C)
    a, b = max(lo, 0), min(hi, n)
    if a < b:
        out[..., a - lo:b - lo, :] = x[..., a:b, :]
    return out


def _gather(x: np.ndarray, lo: int, hi: int, e: int, local: np.ndarray) -> np.ndarray:
    """Segments lo + local of x (tokens grouped e per segment) -> (..., ns, (2w+1)·e, C)."""
    xs = _slab(x, lo * e, hi * e, 0)                               # (..., nH·e, C)
    xs = xs.reshape(*xs.shape[:-2], hi - lo, e, xs.shape[-1])      # (..., nH, e, C)
    # SPEEDTIP: fancy indexing may return a non C-ordered array, which matmul then runs
    # without BLAS (measured 10-100x slower): make the gathered keys contiguous.
    g = np.ascontiguousarray(xs[..., local, :, :])                 # (..., ns, 2w+1, e, C)
    return g.reshape(*g.shape[:-4], local.shape[0], local.shape[1] * e, g.shape[-1])


def _tile(qc, r0, ell, sk, sv, cnt, block, neighbours, causal, scale) -> _Tile:
    """Scores of rows [r0, r0 + R) against the level-ℓ keys of their partition P(i)."""
    *batch, rows_total, d = qc.shape
    n_ell = sk.shape[-2]
    group = block if ell == 0 else block << (ell - 1)              # rows per segment
    e = block if ell == 0 else block // 2                          # keys per segment
    rows = min(rows_total, group)
    ns = rows_total // rows
    groups = r0 // group + np.arange(ns)                           # (ns,)
    offsets = np.stack([segment_offsets(ell, 0, neighbours),
                        segment_offsets(ell, 1, neighbours)])      # (2, 2w+1)
    segs = groups[:, None] + offsets[groups % 2]                   # (ns, 2w+1)
    lo, hi = int(segs.min()), int(segs.max()) + 1
    local = segs - lo                                              # (ns, 2w+1)
    c = local.shape[1] * e
    n = _gather(cnt, lo, hi, e, local)                             # (.., ns, C, 1) real keys
    inv = 1 / np.maximum(n, 1)                                     # (.., ns, C, 1)
    kg = _gather(sk, lo, hi, e, local)                             # (..., ns, C, D) Σ m k
    vg = _gather(sv, lo, hi, e, local)                             # (..., ns, C, Dv) Σ m v
    if ell:                                                        # level 0: n ∈ {0, 1}
        kg *= inv                                                  # k̄ = Σ m k / max(n, 1)
        vg *= inv                                                  # v̄ = Σ m v / max(n, 1)
    with np.errstate(divide="ignore"):
        logn = np.log(n).swapaxes(-1, -2)                          # (.., ns, 1, C) −inf: empty
    tok = (segs[:, :, None] * e + np.arange(e)).reshape(ns, c)     # (ns, C) token index
    allowed = ((tok >= 0) & (tok < n_ell))[:, None, :]             # (ns, 1, C)
    if causal:
        i = (r0 + np.arange(rows_total)).reshape(ns, rows)         # (ns, rows) query position
        allowed = allowed & ((tok << ell)[:, None, :] <= i[:, :, None])  # (ns, rows, C)
    qs = qc.reshape(*batch, ns, rows, d)                           # (..., ns, rows, D)
    s = qs @ kg.swapaxes(-1, -2)                                   # (..., ns, rows, C)
    s *= scale
    s += logn                                                      # S = Q K̄ᵀ·scale + log n
    s[..., ~np.broadcast_to(allowed, s.shape[-3:])] = -np.inf      # outside P(i)
    return _Tile(s=s, kg=kg, vg=vg, inv=inv, groups=groups, segs=local, lo=lo, nseg=hi - lo)


def _scatter(dst: np.ndarray, tile: _Tile, dg: np.ndarray, e: int) -> None:
    """Backward of :func:`_gather`: dst[..., tokens, :] += dg, duplicates summed.

    dg (..., ns, C, X).  Two subs of the same parity see different segments in a given slot,
    so each (parity, slot) class is scattered with one duplicate-free fancy ``+=``.
    """
    *batch, ns, c, x = dg.shape
    nslot = tile.segs.shape[1]
    dg = dg.reshape(*batch, ns, nslot, e, x)                       # (..., ns, 2w+1, e, X)
    dslab = np.zeros((*batch, tile.nseg, e, x), dtype=dg.dtype)    # (..., nH, e, X)
    for parity in (0, 1):
        sub = np.flatnonzero(tile.groups % 2 == parity)            # (ns_r,)
        for slot in range(nslot):
            dslab[..., tile.segs[sub, slot], :, :] += dg[..., sub, slot, :, :]
    lo, hi = tile.lo * e, (tile.lo + tile.nseg) * e
    a, b = max(lo, 0), min(hi, dst.shape[-2])
    if a < b:
        dst[..., a:b, :] += dslab.reshape(*batch, -1, x)[..., a - lo:b - lo, :]


def _chunk_rows(batch, block, n, width) -> int:
    """Rows per chunk R = block·2^j, as large as the score budget allows (at least a block)."""
    rows = block
    cap = block << max(0, math.ceil(math.log2(max(1, -(-n // block)))))
    while 2 * rows <= cap and math.prod(batch) * 2 * rows * width <= _CHUNK_ELEMENTS:
        rows *= 2
    return rows


def _rows(x: np.ndarray, r0: int, rows: int, fill=0) -> np.ndarray:
    """x[..., r0:r0 + rows, :], padded with ``fill`` past the end."""
    return _slab(x, r0, r0 + rows, fill)


# ----------------------------------------------------------------------------------------
# Forward and backward
# ----------------------------------------------------------------------------------------

def _forward_ref(q, k, v, kpm, block, L, neighbours, causal, scale):
    *batch, n, d = q.shape
    dv = v.shape[-1]
    out = np.zeros((*batch, n, dv), dtype=q.dtype)                 # (..., N, Dv)
    lse = np.full((*batch, n), -np.inf, dtype=q.dtype)             # (..., N)
    ctx_args = dict(q=q, k=k, v=v, out=out, lse=lse, key_padding_mask=kpm, block=block,
                    levels=L, neighbours=neighbours, causal=causal, scale=scale)
    if n == 0:
        return out, HierarchicalCtx(**ctx_args)
    pyramid = list(_pyramid(k, v, kpm, L))                         # L + 1 levels of span sums
    w = int(neighbours)
    width = (2 * w + 1) * block * (2 + L) // 2                     # keys seen per query
    R = _chunk_rows(batch, block, n, width)
    for r0 in range(0, n, R):
        qc = _rows(q, r0, R)                                       # (..., R, D)
        tiles = [_tile(qc, r0, ell, sk, sv, cnt, block, neighbours, causal, scale)
                 for ell, (sk, sv, cnt) in enumerate(pyramid)]
        # one softmax over the fine and coarse keys of every level
        s = np.concatenate([t.s.reshape(*batch, R, -1) for t in tiles], axis=-1)  # (..., R, C)
        for t in tiles:
            t.s = t.s.shape                                        # free the per-level copies
        p, lse_c = softmax.forward(s)                              # (..., R, C), (..., R)
        del s
        oc = np.zeros((*batch, R, dv), dtype=q.dtype)              # (..., R, Dv)
        c0 = 0
        for t in tiles:
            ns, rows, c = t.s[-3:]
            pt = p[..., c0:c0 + c].reshape(*batch, ns, rows, c)    # (..., ns, rows, C_ℓ)
            oc += (pt @ t.vg).reshape(*batch, R, dv)               # out = Σ_ℓ P_ℓ V̄_ℓ
            c0 += c
        stop = min(n, r0 + R)
        out[..., r0:stop, :] = oc[..., :stop - r0, :]
        lse[..., r0:stop] = lse_c[..., :stop - r0]
    return out, HierarchicalCtx(**ctx_args)


def _backward_ref(dout, ctx: HierarchicalCtx) -> dict:
    q, scale, block = ctx.q, ctx.scale, ctx.block
    *batch, n, d = q.shape
    dv = ctx.v.shape[-1]
    dq = np.zeros_like(q)                                          # (..., N, D)
    dk = np.zeros(ctx.k.shape, dtype=q.dtype)                      # (..., N, D)
    dvv = np.zeros(ctx.v.shape, dtype=q.dtype)                     # (..., N, Dv)
    if n == 0:
        return {"q": dq, "k": dk, "v": dvv}
    # fwd: P = softmax(S)  ->  dS = P ⊙ (dP − δ),  δ_i = Σ_t P_it dP_it = dout_i · out_i
    delta = np.einsum("...d,...d->...", dout, ctx.out)             # (..., N)
    # rows with no visible key (lse = −inf) get P = 0: use lse = +inf there
    lse = np.where(np.isfinite(ctx.lse), ctx.lse, np.inf)          # (..., N)
    w = int(ctx.neighbours)
    pyramid = _pyramid(ctx.k, ctx.v, ctx.key_padding_mask, ctx.levels)  # built level by level
    for ell, (sk, sv, cnt) in enumerate(pyramid):
        e = block if ell == 0 else block // 2
        # gradients of the span sums Σ m k, Σ m v of this level (level 0: of m ⊙ k, m ⊙ v)
        dsk = dk if ell == 0 else np.zeros(sk.shape, q.dtype)     # (..., n_ℓ, D)
        dsv = dvv if ell == 0 else np.zeros(sv.shape, q.dtype)    # (..., n_ℓ, Dv)
        R = _chunk_rows(batch, block, n, 2 * (2 * w + 1) * e)
        for r0 in range(0, n, R):
            qc = _rows(q, r0, R)                                   # (..., R, D)
            t = _tile(qc, r0, ell, sk, sv, cnt, block, ctx.neighbours, ctx.causal, scale)
            ns, rows = t.s.shape[-3:-1]
            qs = qc.reshape(*batch, ns, rows, d)                   # (..., ns, rows, D)
            dc = _rows(dout, r0, R).reshape(*batch, ns, rows, dv)  # (..., ns, rows, Dv)
            lse_r = _rows(lse[..., None], r0, R, np.inf)           # (..., R, 1)
            delta_r = _rows(delta[..., None], r0, R)               # (..., R, 1)
            # recompute P_ℓ from the saved log-sum-exp
            p = t.s                                                # (..., ns, rows, C)
            p -= lse_r.reshape(*batch, ns, rows, 1)
            np.exp(p, out=p)
            # fwd: out += P_ℓ V̄_ℓ ;  V̄ = Σ m v / max(n, 1)
            _scatter(dsv, t, (p.swapaxes(-1, -2) @ dc) * t.inv, e)  # (..., ns, C, Dv)
            dp = dc @ t.vg.swapaxes(-1, -2)                        # (..., ns, rows, C)
            # fwd: P = softmax(S)
            dp -= delta_r.reshape(*batch, ns, rows, 1)
            dp *= p                                                # dS (..., ns, rows, C)
            # fwd: S_ℓ = Q K̄_ℓᵀ · scale + log n ;  K̄ = Σ m k / max(n, 1)
            dqc = (dp @ t.kg).reshape(*batch, R, d)                # (..., R, D)
            stop = min(n, r0 + R)
            dq[..., r0:stop, :] += dqc[..., :stop - r0, :] * scale
            _scatter(dsk, t, (dp.swapaxes(-1, -2) @ qs) * (t.inv * scale), e)  # (..., ns, C, D)
            del t, p, dp
        if ell:
            # fwd: Σ_ℓ[t] = Σ_{j ∈ span(ℓ, t)} m_j k_j  ->  dk_j += dΣ_ℓ[j >> ℓ]  (m applied below)
            _push_down(dk, dsk, ell)
            _push_down(dvv, dsv, ell)
        del dsk, dsv
    kpm = ctx.key_padding_mask
    if kpm is not None:
        # fwd: sums run over the real keys only (m_j = 0 for padding)
        dk *= kpm[..., None]
        dvv *= kpm[..., None]
    return {"q": dq, "k": dk, "v": dvv}


def _push_down(dx: np.ndarray, dspan: np.ndarray, ell: int) -> None:
    """dx[..., j, :] += dspan[..., j >> ℓ, :] for every position j (in place, no repeat)."""
    n, span = dx.shape[-2], 1 << ell
    full = n // span
    view = dx[..., :full * span, :].reshape(*dx.shape[:-2], full, span, dx.shape[-1])
    view += dspan[..., :full, None, :]                             # (..., full, 2^ℓ, C)
    if full * span < n:
        dx[..., full * span:, :] += dspan[..., full:full + 1, :]


def example_cases(rng: np.random.Generator, dtype=np.float64) -> list[Case]:
    """Small valid calls covering every option (used by the contract tests and golden files)."""
    b, h, d, dv = 2, 2, 3, 2

    qkv = functools.partial(random_qkv, rng, (b, h), d=d, dv=dv, dtype=dtype)  # qkv(N)

    kpad = np.ones((b, 1, 13), dtype=bool)
    kpad[1, :, [2, 3, 9]] = False                                  # key padding of batch 1
    return [
        Case("plain", qkv(13), {"block": 2}),
        Case("causal", qkv(13), {"block": 2, "causal": True}),
        Case("no_neighbours", qkv(12), {"block": 2, "neighbours": False, "scale": 0.8}),
        Case("kpad_causal", qkv(13), {"block": 4, "causal": True, "key_padding_mask": kpad}),
        Case("one_level", qkv(11), {"block": 2, "levels": 1, "neighbours": False}),
    ]


# ----------------------------------------------------------------------------- benchmark data
def bench_options(n: int) -> dict:
    """Options ``python -m tinyeff bench`` runs at length n (``--opt`` overrides them)."""
    return {"block": 64}


def extra_bytes(n: int, d: int, itemsize: int, options: dict, causal: bool) -> int:
    """Generous bound on the saved context and temporaries per batch·head: sixteen
    (N, block) arrays."""
    return 16 * n * int(options.get("block", 64)) * itemsize


def demo_options(n: int, causal: bool) -> dict:
    """Options ``python -m tinyeff demo`` trains with at length n (``--opt`` overrides them)."""
    from ._demo import span
    return {"block": span(n, 16)}
