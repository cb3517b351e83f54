"""Attention restricted to a sparse pattern S, computed on the stored entries only.

    A     = S ∧ causal ∧ key_padding                      which keys query i may see
    s_ij  = q_i·k_j · scale + rel_bias[i − j + M − 1]     only for (i, j) stored in S   (SDDMM)
    p_ij  = exp(s_ij − c_i) / Σ_{j' ∈ A(i)} exp(s_ij' − c_i),   c_i = max_{j ∈ A(i)} s_ij
    out_i = Σ_{j ∈ A(i)} p_ij v_j                                                      (SpMM)

This is ``full`` with the dense boolean mask S: softmax(QKᵀ·scale ⊙ S) V with the entries
outside S excluded (not set to zero before the softmax) — and the tests check exactly that,
forward and every gradient.  With nnz stored entries the cost is O(nnz·(D + Dv)) time and
O(nnz) memory per batch item (the saved probabilities), never O(N·M).  Child et al. 2019
(Sparse Transformer), Zaheer et al. 2020 (BigBird) and Beltagy et al. 2020 (Longformer)
are instances: build their patterns with :mod:`tinyeff.masks`.

Shapes: q (..., N, D), k (..., M, D), v (..., M, Dv); leading dimensions are batch
dimensions (typically (B, H)); nnz = stored entries of S.

Options
-------
mask : the pattern S (N, M), required.  Any boolean ``scipy.sparse`` matrix or array (its
    *structure* is the pattern; explicitly stored False entries are rejected) or a
    :class:`tinyeff.masks.Pattern` (canonicalized already: pass one to skip the O(nnz)
    canonicalization and the kernels' planning on every call).  One pattern is shared by all batch
    dimensions.  A list/tuple of H patterns gives per-head patterns: pattern h is used for
    batch index [..., h], i.e. the last batch dimension must have length H.
causal : bool, default False.  Keep only j <= i (top-left alignment, like ``full``):
    S is intersected with the causal pattern before anything else.
key_padding_mask : boolean array (..., M), one dimension per batch dimension (size 1
    broadcasts, e.g. (B, 1, M)); True = real key.  Padded keys get the score −inf (excluded).
rel_bias : float array (..., N + M − 1), leading dimensions broadcastable to the batch:
    bias_ij = rel_bias[..., i − j + M − 1] is added to the scaled score of each stored
    entry (relative positions, T5 buckets, ALiBi).  Its gradient sums ∂s over the stored
    entries of each offset and is reduced to rel_bias's own shape.
scale : float, default 1/sqrt(D).
impl : "auto" | "ref" | "numba".  "ref" is the NumPy/SciPy path below (per batch item,
    gathers on the nnz entries); "numba" the kernels of :mod:`tinyeff.kernels.sparse`
    (BLAS products on tiles of consecutive rows for runs of consecutive keys and for
    heavily shared keys, cache-blocked entry-by-entry passes for the rest; the schedule is
    planned once per Pattern and cached); "auto" picks "numba".

Edge cases
----------
* A row with no stored entry, or whose entries are all padded keys, outputs 0 and passes
  back 0 gradient (lse = −inf), as ``full``.
* The max shift c_i is a constant of the backward (it cancels in p).
* NaN in q_i makes row i NaN; NaN in k_j or v_j reaches exactly the rows that store j.
* N = 0, M = 0 and nnz = 0 are legal.

Backward (dk, dv by the transposed pattern; see ``_backward_ref``)::

    dv_j = Σ_{i: (i,j) ∈ S} p_ij dout_i          dp_ij = dout_i·v_j
    ds_ij = p_ij (dp_ij − Σ_j' p_ij' dp_ij')     dq_i = scale Σ_j ds_ij k_j
    dk_j = scale Σ_i ds_ij q_i                   drel[i − j + M − 1] += ds_ij

Differences from public peers: HF BigBird is block-sparse with additive −10000 padding and
multiplies padded query rows by 0 (tinyeff attends from them); its layout, per head, is
``masks.bigbird_blocks`` — in eval mode HF repeats block 0 as every random block, which a
set pattern cannot express (``full`` with a log-count bias can; docs/semantics/sparse.md).
openai/sparse_attention masks with −1e9 (a fully masked row becomes uniform, not 0).
Other block layouts: ``masks.from_block_layout``; tinyeff excludes masked entries exactly.
The Numba kernels are in ``tinyeff/kernels/sparse.py`` (tiles), ``sparse_scattered.py``
(scattered entries) and ``sparse_plan.py`` (the schedule).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numba
import numpy as np
import scipy.sparse as sp

from .. import _checks, memory
from .._random import random_qkv
from ..ctx import Ctx
from ..kernels import blas_single_thread, sparse_plan
from ..kernels import sparse as kern
from ..masks import Pattern
from ..masks import bigbird as _bigbird
from ..masks import local as _local
from ..masks import random as _random
from ._case import Case

NAME = "sparse"
SUPPORTS_MASK = True
SUPPORTS_CAUSAL = True
SUPPORTS_BIAS = False
SUPPORTS_REL_BIAS = True
KEY_PADDING = "key_padding_mask"
DIFFERENTIABLE = ("q", "k", "v", "rel_bias")
IMPLS = ("auto", "ref", "numba")


@dataclasses.dataclass(frozen=True)
class SparseCtx(Ctx):
    q: np.ndarray                 # (..., N, D)
    k: np.ndarray                 # (..., M, D)
    v: np.ndarray                 # (..., M, Dv)
    pattern: Pattern              # effective pattern (mask ∧ causal); G groups stacked
    groups: int                   # G: 1 (shared pattern) or H (per-head patterns)
    p: np.ndarray                 # (BH / G, nnz) probabilities on the stored entries
    lse: np.ndarray               # (..., N) log-sum-exp of each row (−inf: empty row)
    kpad: np.ndarray | None       # (BH, M) bool, True = real key
    rel_bias: np.ndarray | None   # (BH, N + M − 1) the offset bias, broadcast
    rel_bias_shape: tuple | None  # shape of the rel_bias argument
    scale: float
    impl: str


def _patterns(mask, batch, n, m):
    """-> (Pattern of shape (G·N, G·M), G).  G = 1 for one shared pattern."""
    if isinstance(mask, (list, tuple)):
        if not batch or len(mask) != batch[-1] or len(mask) == 0:
            raise ValueError(f"mask: a sequence of per-head patterns must have one pattern "
                             f"per index of the last batch dimension, got {len(mask)} "
                             f"patterns for batch dimensions {batch}")
        pats = [Pattern.from_scipy(x, name=f"mask[{h}]") for h, x in enumerate(mask)]
    elif isinstance(mask, Pattern) or sp.issparse(mask):
        pats = [Pattern.from_scipy(mask)]
    else:
        raise TypeError(f"mask must be a boolean scipy.sparse matrix, a tinyeff.masks.Pattern "
                        f"or a list of them (one per head), got {type(mask).__name__}; "
                        "for a dense boolean array use scipy.sparse.csr_array(mask)")
    for h, pat in enumerate(pats):
        if pat.shape != (n, m):
            where = "mask" if len(pats) == 1 else f"mask[{h}]"
            raise ValueError(f"{where} must have shape (N, M) = {(n, m)}, got {pat.shape}")
    return pats


def forward(q, k, v, *, mask, causal=False, key_padding_mask=None, rel_bias=None,
            scale=None, impl="auto"):
    """Attention on the stored entries of ``mask``.  Returns ``(out (..., N, Dv), ctx)``."""
    batch, n, m, d, dv, dtype = _checks.qkv(q, k, v)
    pats = _patterns(mask, batch, n, m)
    causal = _checks.flag(causal, "causal")
    key_padding_mask = _checks.key_padding_mask(key_padding_mask, batch, m,
                                                name="key_padding_mask")
    rel_bias = _checks.rel_bias(rel_bias, batch, n, m, dtype)
    scale = _checks.scale(scale, d)
    impl = _checks.choice(impl, "impl", IMPLS)
    if causal:
        pats = [p.intersect_causal() for p in pats]
    groups = len(pats)
    pattern = pats[0] if groups == 1 else Pattern.block_diag(pats)
    bf = math.prod(batch)
    kpad = rel = None
    if key_padding_mask is not None:
        kpad = np.require(np.broadcast_to(key_padding_mask, (*batch, m)),
                          requirements="CW").reshape(bf, m)                   # (BH, M)
    if rel_bias is not None:
        rel = np.require(np.broadcast_to(rel_bias, (*batch, n + m - 1)),
                         requirements="CW").reshape(bf, -1)                   # (BH, N+M−1)
    q3, k3, v3 = _flat(q, k, v)
    run = _forward_ref if impl == "ref" else _forward_numba
    out, p, lse = run(q3, k3, v3, pattern, groups, kpad, rel, scale)
    ctx = SparseCtx(q=q, k=k, v=v, pattern=pattern, groups=groups, p=p,
                    lse=lse.reshape(*batch, n), kpad=kpad, rel_bias=rel,
                    rel_bias_shape=None if rel_bias is None else rel_bias.shape,
                    scale=scale, impl="ref" if impl == "ref" else "numba")
    return out.reshape(*batch, n, dv), ctx


def backward(dout, ctx: SparseCtx, *, impl=None) -> dict:
    """Gradients ``{"q", "k", "v"}`` (and ``"rel_bias"`` if one was given)."""
    if not isinstance(ctx, SparseCtx):
        raise TypeError(f"ctx must be the SparseCtx returned by sparse.forward, got "
                        f"{type(ctx).__name__}")
    dout = _checks.dout(dout, ctx.q.shape[:-1] + ctx.v.shape[-1:], ctx.q.dtype)
    impl = ctx.impl if impl is None else _checks.choice(impl, "impl", IMPLS)
    q3, k3, v3, dout3 = _flat(ctx.q, ctx.k, ctx.v, dout)
    run = _backward_ref if impl == "ref" else _backward_numba
    dq, dk, dv, drel = run(dout3, q3, k3, v3, ctx)
    grads = {"q": dq.reshape(ctx.q.shape), "k": dk.reshape(ctx.k.shape),
             "v": dv.reshape(ctx.v.shape)}
    if ctx.rel_bias_shape is not None:
        batch = ctx.q.shape[:-2]
        drel = drel.reshape(*batch, drel.shape[-1])                         # (..., N+M−1)
        grads["rel_bias"] = _checks.reduce_to_shape(drel, ctx.rel_bias_shape)
    return grads


def _flat(*arrays):
    """(..., X, Y) -> C-contiguous writeable (BH, X, Y) (a copy only if not contiguous or
    read-only: read-only inputs then reuse the kernels compiled for writeable ones)."""
    bf = math.prod(arrays[0].shape[:-2])
    return tuple(np.require(a, requirements="CW").reshape(bf, *a.shape[-2:]) for a in arrays)


# ---------------------------------------------------------------------- reference

def _group(pat: Pattern, g: int, n: int, m: int):
    """Rows, columns, row pointer and entry slice of group g of a stacked pattern."""
    e0, e1 = int(pat.indptr[g * n]), int(pat.indptr[g * n + n])
    indptr = pat.indptr[g * n:g * n + n + 1] - e0                           # (N + 1,)
    rows = pat.row_ids[e0:e1] - g * n                                       # (nnz_g,)
    cols = pat.indices[e0:e1] - g * m                                       # (nnz_g,)
    return rows, cols, indptr, slice(e0, e1)


def _segment_sum(x, indptr):
    """(nnz,) -> (N,) sums of each row's entries (0 for an empty row)."""
    counts = np.diff(indptr)
    out = np.zeros(counts.shape[0], dtype=x.dtype)                          # (N,)
    if x.size:
        out[counts > 0] = np.add.reduceat(x, indptr[:-1][counts > 0])
    return out


def _row_softmax(s, indptr, rows):
    """Softmax of the entries of each row; rows with no finite score give p = 0, lse = −inf."""
    counts = np.diff(indptr)
    c = np.full(counts.shape[0], -np.inf, dtype=s.dtype)                    # (N,)
    if s.size:
        c[counts > 0] = np.maximum.reduceat(s, indptr[:-1][counts > 0])
    c = np.where(c == -np.inf, 0, c).astype(s.dtype)     # empty row: any finite shift
    e = np.exp(s - c[rows])                                                 # (nnz,)
    z = _segment_sum(e, indptr)                                             # (N,)
    p = e / np.where(z > 0, z, 1)[rows]                                     # (nnz,)
    with np.errstate(divide="ignore"):
        lse = c + np.log(z)                                                 # (N,)
    return p, lse


def _csr(values, cols, indptr, shape):
    return sp.csr_array((values, cols, indptr), shape=shape)


def _forward_ref(q, k, v, pat, groups, kpad, rel, scale):
    bf, n, _ = q.shape
    m, dv = v.shape[1:]
    p = np.zeros((bf // groups, pat.nnz), dtype=q.dtype)                   # (BH/G, nnz)
    lse = np.empty((bf, n), dtype=q.dtype)                                  # (BH, N)
    out = np.zeros((bf, n, dv), dtype=q.dtype)                              # (BH, N, Dv)
    for b in range(bf):
        rows, cols, indptr, sl = _group(pat, b % groups, n, m)
        # SDDMM: the scores of the stored entries only
        s = np.einsum("ed,ed->e", q[b, rows], k[b, cols]) * scale          # (nnz,)
        if rel is not None:
            s = s + rel[b, rows - cols + m - 1]                             # (nnz,)
        if kpad is not None:
            s = np.where(kpad[b, cols], s, -np.inf).astype(q.dtype)         # (nnz,)
        pb, lse[b] = _row_softmax(s, indptr, rows)                          # (nnz,), (N,)
        p[b // groups, sl] = pb
        # SpMM: out = P v
        out[b] = _csr(pb, cols, indptr, (n, m)) @ v[b]                     # (N, Dv)
    return out, p, lse


def _backward_ref(dout, q, k, v, ctx: SparseCtx):
    bf, n, _ = q.shape
    m = k.shape[1]
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)      # (BH, ·, ·)
    drel = np.zeros((bf, max(n + m - 1, 0)), dtype=q.dtype)  # (BH, N+M−1); N = M = 0: (BH, 0)
    for b in range(bf):
        rows, cols, indptr, sl = _group(ctx.pattern, b % ctx.groups, n, m)
        pb = ctx.p[b // ctx.groups, sl]                                     # (nnz,)
        # fwd: out = P v
        dv[b] = _csr(pb, cols, indptr, (n, m)).T @ dout[b]                 # (M, Dv)
        dp = np.einsum("ed,ed->e", dout[b, rows], v[b, cols])              # (nnz,)
        # fwd: p = softmax of each row's entries (the max shift is a constant)
        ds = pb * (dp - _segment_sum(pb * dp, indptr)[rows])                # (nnz,)
        # fwd: s = (q_i·k_j) * scale + rel_bias[i − j + M − 1]
        dS = _csr(ds, cols, indptr, (n, m))
        dq[b] = (dS @ k[b]) * ctx.scale                                     # (N, D)
        dk[b] = (dS.T @ q[b]) * ctx.scale                                   # (M, D)
        if ctx.rel_bias is not None:
            drel[b] = np.bincount(rows - cols + m - 1, weights=ds, minlength=n + m - 1)
    return dq, dk, dv, drel


# ---------------------------------------------------------------------- numba

_NO_REL = {np.dtype(np.float32): np.zeros((0, 0), np.float32),
           np.dtype(np.float64): np.zeros((0, 0), np.float64)}
_NO_KPAD = np.zeros((0, 0), dtype=bool)

# The kernels' schedule: tinyeff/kernels/sparse_plan.py (KNOBS: its sizes and thresholds).
KNOBS = sparse_plan.Knobs()


_PLANS: dict = {}          # (id(Pattern), G, knobs) -> (Pattern, Plan)
_PLANS_MAX = 8


def _plan(pat: Pattern, groups: int) -> sparse_plan.Plan:
    """The cached plan of a Pattern (the few most recent patterns are kept)."""
    key = (id(pat), groups, KNOBS)
    held = _PLANS.get(key)
    if held is None or held[0] is not pat:
        held = (pat, sparse_plan.Plan(pat.indptr, pat.indices, pat.shape, groups, KNOBS))
        _PLANS.pop(key, None)
        while len(_PLANS) >= _PLANS_MAX:
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[key] = held
    return held[1]


def _all_finite(*arrays) -> bool:
    """True if every element of the arrays is finite, judged by their sums (a NaN or ±inf
    makes the sum NaN or ±inf; a sum that overflows answers False, which is only slower).
    The tile kernels then compile and run without their fallbacks for non-finite factors."""
    return all(bool(np.isfinite(np.sum(a))) for a in arrays)


def _forward_numba(q, k, v, pat, groups, kpad, rel, scale):
    bf, n, d = q.shape
    dv = v.shape[2]
    if d == 0 or dv == 0:                          # nothing for the products to do
        return _forward_ref(q, k, v, pat, groups, kpad, rel, scale)
    scale = q.dtype.type(scale)
    pl = _plan(pat, groups)
    p = memory.empty((bf // groups, pat.nnz), q.dtype)                     # (BH/G, nnz)
    lse = np.empty((bf, n), dtype=q.dtype)                                  # (BH, N)
    out = memory.zeros((bf, n, dv), q.dtype)                                # (BH, N, Dv)
    # fwd: s = scale · q·k: the scattered entries first, then tiles (+ softmax, dense P v)
    kern.scattered_dot(p, q, k, pl.r_ptr, pl.r_row, pl.r_col, pl.r_e, groups, *pl.r_split,
                       scale)
    with blas_single_thread():
        kern.tiles_fwd(out, lse, p, q, k, v, _NO_REL[q.dtype] if rel is None else rel,
                       _NO_KPAD if kpad is None else kpad, pat.indptr, pat.indices,
                       pl.row_ea, pl.row_eb, pl.tile_start, pl.tile_jlo, pl.tile_jhi,
                       pl.heavy_ptr, pl.heavy_cols, pl.hv_ptr, pl.hv_e, pl.hv_r, pl.hv_h,
                       groups, scale, _all_finite(v))
    empty = _NO_REL[q.dtype]
    kern.scattered_axpy(out, p, v, empty, empty, p, pl.r_ptr, pl.r_row, pl.r_col, pl.r_e,
                        pl.r_pos, groups, *pl.r_split, q.dtype.type(1), False)
    return out, p, lse


def _backward_numba(dout, q, k, v, ctx: SparseCtx):
    pat, groups = ctx.pattern, ctx.groups
    bf, n, d = q.shape
    m, dvn = v.shape[1:]
    if d == 0 or dvn == 0:
        return _backward_ref(dout, q, k, v, ctx)
    scale = q.dtype.type(ctx.scale)
    p = np.ascontiguousarray(ctx.p, dtype=q.dtype)
    pl = _plan(pat, groups)
    phase_ptr, phase_tiles = pl.phases()
    dq = memory.zeros(q.shape, q.dtype)                                     # (BH, N, D)
    dk = memory.zeros(k.shape, k.dtype)                                     # (BH, M, D)
    dv = memory.zeros(v.shape, v.dtype)                                     # (BH, M, Dv)
    ds = memory.empty(p.shape, p.dtype)                                     # (BH/G, nnz)
    # fwd: out = P v  -> dp = dout · v on the scattered entries (into ds)
    kern.scattered_dot(ds, dout, v, pl.r_ptr, pl.r_row, pl.r_col, pl.r_e, groups,
                       *pl.r_split, q.dtype.type(1))
    ph = memory.zeros((bf, pl.heavy_max, n), q.dtype)                      # (BH, Gc, N)
    dsh = memory.zeros(ph.shape, q.dtype)                                   # (BH, Gc, N)
    finite = _all_finite(q, k, dout)
    with blas_single_thread():
        kern.tiles_bwd(dq, dk, dv, ds, ph, dsh, dout, p, q, k, v, pat.indptr, pat.indices,
                       pl.row_ea, pl.row_eb, pl.tile_start, pl.tile_jlo, pl.tile_jhi,
                       phase_ptr, phase_tiles, pl.heavy_ptr, pl.heavy_cols, pl.hv_ptr,
                       pl.hv_e, pl.hv_r, pl.hv_h, groups, scale,
                       bf >= 2 * numba.get_num_threads(), finite)
        kern.heavy_bwd(dk, dv, ph, dsh, q, dout, p, ds, pl.heavy_ptr, pl.heavy_cols,
                       pl.tile_start, pl.hv_ptr, pl.hv_e, pl.hv_r, pl.hv_h, groups, scale,
                       finite)
    # fwd: s = scale · q·k  -> dq += scale Σ ds k over the scattered entries; their p and
    # ds·scale are saved in column order for dk, dv
    pc = memory.empty((p.shape[0], pl.n_scattered), q.dtype)               # (BH/G, n_sc)
    dsc = memory.empty(pc.shape, q.dtype)                                   # (BH/G, n_sc)
    kern.scattered_axpy(dq, ds, k, pc, dsc, p, pl.r_ptr, pl.r_row, pl.r_col, pl.r_e,
                        pl.r_pos, groups, *pl.r_split, scale, True)
    kern.cols_bwd_scattered(dk, dv, pc, dsc, q, dout, pl.c_ptr, pl.c_row, pl.c_col, groups,
                            *pl.c_split)
    drel = None
    if ctx.rel_bias is not None:
        drel = np.zeros((bf, n + m - 1), dtype=q.dtype)                     # (BH, N+M−1)
        kern.rel_bias_bwd_csr(drel, ds, pat.indptr, pat.indices, groups, n, m)
    return dq, dk, dv, drel


# ---------------------------------------------------------------------- examples

def example_cases(rng: np.random.Generator, dtype=np.float64) -> list[Case]:
    """Small valid calls covering every option (used by the contract tests and golden files)."""
    b, h, n, d, dv = 2, 2, 7, 5, 3

    qkv = functools.partial(random_qkv, rng, (b, h), d=d, dv=dv, dtype=dtype)  # qkv(N, M)

    dense = rng.random((n, n)) < 0.5
    dense[[2, 5]] = False                                          # two empty rows
    holes = sp.csr_array(dense)
    kpad = np.ones((b, 1, 9), dtype=bool)
    kpad[0, :, 6:] = False                                         # key padding of batch 0
    return [
        Case("local", qkv(n), {"mask": _local(n, 2)}),
        Case("bigbird_causal", qkv(n), {"mask": _bigbird(n, 1, 1, 2, rng), "causal": True}),
        Case("random_rect", qkv(5, 9), {"mask": _random(5, 3, rng, m=9), "scale": 0.7}),
        Case("empty_rows", qkv(n), {"mask": holes}),
        Case("rel_bias_kpad",
             {**qkv(5, 9), "rel_bias": rng.standard_normal((h, 5 + 9 - 1)).astype(dtype)},
             {"mask": _local(5, 3, m=9, offset=2), "key_padding_mask": kpad}),
        Case("per_head", qkv(n), {"mask": [_local(n, 1), _random(n, 3, rng)],
                                 "causal": True}),
    ]


# ----------------------------------------------------------------------------- benchmark data
def bench_options(n: int) -> dict:
    """Options ``python -m tinyeff bench`` runs at length n (``--opt`` overrides them): a
    BigBird pattern with about the nnz of a ±128 window (2·96+1 + 16 global + 48 random),
    as a canonical ``Pattern`` so that the kernels' plan is built once."""
    return {"mask": Pattern.from_scipy(_bigbird(n, 96, 16, 48, np.random.default_rng(0)))}


def scored_pairs(n: int, options: dict, causal: bool) -> int | None:
    """(query, key) pairs scored per batch·head at N = M = n, when ``mask`` is a sparse
    array or a ``Pattern`` (None otherwise)."""
    mask = options.get("mask")
    if not hasattr(mask, "nnz"):
        return None
    if not causal:
        return int(mask.nnz)
    return int(sum(np.count_nonzero(mask.indices[mask.indptr[r]:mask.indptr[r + 1]] <= r)
                   for r in range(n)))


def useful_flops(n: int, d: int, options: dict, causal: bool) -> int | None:
    """Forward flops of the matrix products per batch·head: 2·P·D (q kᵀ) + 2·P·D (P v)."""
    pairs = scored_pairs(n, options, causal)
    return None if pairs is None else 4 * pairs * d


def extra_bytes(n: int, d: int, itemsize: int, options: dict, causal: bool) -> int:
    """Generous bound on the saved context and temporaries per batch·head: a few arrays per
    scored pair (ten (N, D) arrays when the pair count is unknown)."""
    pairs = scored_pairs(n, options, causal)
    return 10 * n * d * itemsize if pairs is None else 5 * pairs * (itemsize + 8)


def demo_options(n: int, causal: bool) -> dict:
    """The BigBird parameters ``python -m tinyeff demo`` trains with at length n (``--opt``
    overrides them; :func:`demo_build` turns them into the pattern)."""
    from ._demo import span
    return {"window": span(n, 24), "n_global": span(n, 32) // 4, "n_random": span(n, 24),
            "seed": 0}


def demo_build(n: int, options: dict) -> tuple[dict, dict]:
    """(attention options, model options) from :func:`demo_options` and ``--opt``: the
    pattern ``tinyeff.masks.bigbird`` at length n, window and global count capped at n."""
    keys = {"window", "n_global", "n_random", "seed"}
    if set(options) != keys:
        raise TypeError(f"the demo's sparse options are {sorted(keys)}, got {sorted(options)}")
    o = options
    mask = _bigbird(n, min(o["window"], n), min(o["n_global"], n), o["n_random"],
                    np.random.default_rng(o["seed"]))                    # (n, n) CSR
    return {"mask": mask}, {}
