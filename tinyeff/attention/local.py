"""Segment-local attention with look-back and look-forward buffers.

The positions are cut into segments of ``block`` = k consecutive positions (the last one may
be shorter); σ(p) = ⌊p / k⌋ is the segment of position p.  Query i attends the keys of its
own segment, of the ``look_backward`` = b segments before it and of the ``look_forward`` = f
segments after it:

    A(i)  = { 0 ≤ j < M : σ(i) − b ≤ σ(j) ≤ σ(i) + f }
            ∩ { j ≤ i } if causal,  ∩ { j : key_padding_mask_j }
    s_ij  = q_i·k_j · scale + rel_bias[i − j + M − 1]          (j ∈ A(i))
    out_i = Σ_{j∈A(i)} softmax_j(s_i·) v_j

Segments before the start or after the end of the sequence are *absent*: their keys are not
in A(i) (no padding tokens, no sentinels, no wrap-around), so the first segment simply has
fewer keys.  The result equals ``full`` with the boolean mask [σ(i) − b ≤ σ(j) ≤ σ(i) + f]
(tests/test_local.py checks the forward and every gradient).

Cost: O(⌈N/k⌉ · k · (b + 1 + f)k · D) time, i.e. O(N·(b + 1 + f)·k·D); O(N) saved state (the
log-sum-exp; the backward recomputes the probabilities segment by segment).

Reference: the segment-with-look-around scheme of
lucidrains/local-attention (``window_size`` = k, ``look_backward``, ``look_forward``), whose
out-of-range look-around buckets are masked like tinyeff's absent segments.  Differences and
how to reproduce it: docs/semantics/local.md.

Shapes: q (..., N, D), k (..., M, D), v (..., M, Dv); leading dimensions are batch
dimensions.  N != M is allowed: queries and keys are cut at the same positions
(segment s = positions [s·k, (s + 1)·k) of either sequence).

Options
-------
block : int >= 1, segment length k.
look_backward : int >= 0, default 1.   look_forward : int >= 0, default 0.
causal : bool (top-left, j <= i, like ``full``).
key_padding_mask : bool (..., M), True = real key; one dim per batch dim (size 1 broadcasts).
rel_bias : float (..., N + M − 1), bias_ij = rel_bias[..., i − j + M − 1]; gradient returned.
scale : float, default 1/sqrt(D).
impl : "auto" (Numba for non-empty shapes) | "ref" (dense per-segment blocks with batched
    matrix products: the spec) | "numba" (the band engine of ``tinyeff/attention/_band.py``
    and ``tinyeff/kernels/band.py``, with tiles aligned to the segments).

Edge cases
----------
* A row whose allowed set is empty (all its keys padded) outputs 0 with 0 gradient.
* The row maximum is subtracted before exp (a constant of the backward).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from .. import _checks
from .._random import random_qkv
from ..ctx import Ctx
from ..ops import softmax
from . import _band, _nonfinite
from ._case import Case

NAME = "local"
SUPPORTS_MASK = False
SUPPORTS_CAUSAL = True
SUPPORTS_BIAS = False
SUPPORTS_REL_BIAS = True
KEY_PADDING = "key_padding_mask"
DIFFERENTIABLE = ("q", "k", "v", "rel_bias")
IMPLS = ("auto", "ref", "numba")
TILE_MAX = 128       # longest query tile of the Numba path (a longer segment is split)
TILE_MIN = 64        # shorter segments are grouped into tiles of about this many rows


@dataclasses.dataclass(frozen=True)
class LocalCtx(Ctx):
    q: np.ndarray                        # (..., N, D)
    k: np.ndarray                        # (..., M, D)
    v: np.ndarray                        # (..., M, Dv)
    out: np.ndarray                      # (..., N, Dv)
    lse: np.ndarray                      # (..., N) log-sum-exp over A(i) (−inf: empty row)
    block: int
    look_backward: int
    look_forward: int
    causal: bool
    key_padding_mask: np.ndarray | None  # (..., M) as given
    rel_bias: np.ndarray | None          # (..., N + M − 1) as given
    scale: float
    impl: str


@_nonfinite.nan_rows_of_v
def forward(q, k, v, *, block, look_backward=1, look_forward=0, causal=False,
            key_padding_mask=None, rel_bias=None, scale=None, impl="auto"):
    """Segment-local attention.  Returns ``(out (..., N, Dv), ctx)``; see the module docstring."""
    batch, n, m, d, dv, dtype = _checks.qkv(q, k, v)
    block = _checks.integer(block, "block", minimum=1)
    look_backward = _checks.integer(look_backward, "look_backward", minimum=0)
    look_forward = _checks.integer(look_forward, "look_forward", minimum=0)
    causal = _checks.flag(causal, "causal")
    key_padding_mask = _checks.key_padding_mask(key_padding_mask, batch, m,
                                                name="key_padding_mask")
    rel_bias = _checks.rel_bias(rel_bias, batch, n, m, dtype)
    scale = _checks.scale(scale, d)
    impl = _checks.choice(impl, "impl", IMPLS)
    if impl == "auto":
        impl = "ref" if 0 in (n, m, d, dv) or q.size == 0 else "numba"
    opts = dict(block=block, look_backward=look_backward, look_forward=look_forward,
                causal=causal, key_padding_mask=key_padding_mask, rel_bias=rel_bias,
                scale=scale)
    run = _forward_numba if impl == "numba" else _forward_ref
    if q.size == 0 or v.size == 0:
        # B, N, M or Dv = 0: zeros, every row empty (docs/robustness.md); neither path can
        # take it (the reference indexes key 0, the kernel plan reshapes with -1)
        out = np.zeros(q.shape[:-1] + v.shape[-1:], dtype=dtype)   # (..., N, Dv)
        lse = np.full(q.shape[:-1], -np.inf, dtype=dtype)          # (..., N)
    else:
        out, lse = run(q, k, v, **opts)
    return out, LocalCtx(q=q, k=k, v=v, out=out, lse=lse, impl=impl, **opts)


def backward(dout, ctx: LocalCtx, *, impl=None) -> dict:
    """Gradients ``{"q", "k", "v"}`` (and ``"rel_bias"`` if one was given)."""
    if not isinstance(ctx, LocalCtx):
        raise TypeError(f"ctx must be the LocalCtx returned by local.forward, got "
                        f"{type(ctx).__name__}")
    dout = _checks.dout(dout, ctx.q.shape[:-1] + ctx.v.shape[-1:], ctx.q.dtype)
    impl = ctx.impl if impl is None else _checks.choice(impl, "impl", IMPLS)
    if ctx.q.size == 0 or ctx.v.size == 0:
        # empty problem (B, N, M or Dv = 0): the output is constant, every gradient is 0
        grads = {"q": np.zeros_like(ctx.q), "k": np.zeros_like(ctx.k), "v": np.zeros_like(ctx.v)}
        if ctx.rel_bias is not None:
            grads["rel_bias"] = np.zeros_like(ctx.rel_bias)
        return grads
    if impl == "auto":
        impl = "ref" if ctx.q.size == 0 or ctx.k.size == 0 or dout.size == 0 else "numba"
    if impl == "numba":
        return _backward_numba(dout, ctx)
    return _backward_ref(dout, ctx)


def allowed_mask(n, m, *, block, look_backward=1, look_forward=0, causal=False):
    """The dense (N, M) boolean A (no key padding) — for small N only; tests and docs use it."""
    si = np.arange(n)[:, None] // block                            # (N, 1) query segments
    sj = np.arange(m)[None, :] // block                            # (1, M) key segments
    ok = (sj >= si - look_backward) & (sj <= si + look_forward)    # (N, M)
    if causal:
        ok &= np.arange(m)[None, :] <= np.arange(n)[:, None]
    return ok


# ------------------------------------------------------------------------------------------
# reference implementation (the spec): dense per-segment blocks, batched matrix products

class _Segments:
    """Index bookkeeping: ns query segments; segment s sees the window of W = b + 1 + f key
    segments s − b … s + f, i.e. key positions j = (s − b)·k + c for c in [0, W·k)."""

    def __init__(self, n, m, block, look_backward, look_forward):
        k, b, f = block, look_backward, look_forward
        self.n, self.m, self.k, self.b, self.f = n, m, k, b, f
        self.ns = -(-n // k)                                       # query segments
        self.nw = b + 1 + f                                        # segments per window
        self.mk = min(m, (self.ns + f) * k)                        # keys any query can see
        s = np.arange(self.ns)[:, None, None]
        r = np.arange(k)[None, :, None]
        c = np.arange(self.nw * k)[None, None, :]
        self.i = s * k + r                                         # (ns, k, 1) query position
        self.j = (s - b) * k + c                                   # (ns, 1, W·k) key position
        self.offset = r[0] - c[0] + b * k                          # (k, W·k) i − j

    def queries(self, x):
        """(..., N, C) -> (..., ns, k, C), zero rows past N."""
        pad = np.zeros((*x.shape[:-2], self.ns * self.k, x.shape[-1]), dtype=x.dtype)
        pad[..., :self.n, :] = x
        return pad.reshape(*x.shape[:-2], self.ns, self.k, x.shape[-1])

    def windows(self, x):
        """(..., M, C) -> (..., ns, W·k, C): the keys of each query segment's window."""
        lead = self.b * self.k
        pad = np.zeros((*x.shape[:-2], (self.ns + self.b + self.f) * self.k, x.shape[-1]),
                       dtype=x.dtype)                              # (..., (ns+b+f)·k, C)
        pad[..., lead:lead + self.mk, :] = x[..., :self.mk, :]
        seg = pad.reshape(*x.shape[:-2], self.ns + self.b + self.f, self.k, x.shape[-1])
        return np.concatenate([seg[..., w:w + self.ns, :, :] for w in range(self.nw)],
                              axis=-2)                             # (..., ns, W·k, C)

    def fold(self, dwin):
        """Backward of :meth:`windows`: (..., ns, W·k, C) -> (..., M, C), summing overlaps."""
        k, lead = self.k, self.b * self.k
        lead_shape, c = dwin.shape[:-3], dwin.shape[-1]
        pad = np.zeros((*lead_shape, self.ns + self.b + self.f, k, c), dtype=dwin.dtype)
        for w in range(self.nw):
            # fwd: window[..., s, w·k:(w+1)·k] = segment s + w of the padded keys
            pad[..., w:w + self.ns, :, :] += dwin[..., :, w * k:(w + 1) * k, :]
        pad = pad.reshape(*lead_shape, -1, c)
        out = np.zeros((*lead_shape, self.m, c), dtype=dwin.dtype)  # (..., M, C)
        out[..., :self.mk, :] = pad[..., lead:lead + self.mk, :]
        return out

    def allowed(self, causal, key_ok):
        """(..., ns, k, W·k) boolean A on the blocks."""
        jc = np.clip(self.j, 0, max(self.m - 1, 0))
        ok = (self.i < self.n) & (self.j >= 0) & (self.j < self.m)  # (ns, k, W·k)
        if causal:
            ok = ok & (self.j <= self.i)
        return ok & key_ok[..., jc]                                # (..., ns, k, W·k)


def _scores(q, k, seg: _Segments, rel_bias, scale):
    qs = seg.queries(q)                                            # (..., ns, k, D)
    kw = seg.windows(k)                                            # (..., ns, W·k, D)
    s = (qs @ kw.swapaxes(-1, -2)) * scale                         # (..., ns, k, W·k)
    if rel_bias is not None:
        s = s + _band.rel_bias_at(rel_bias, q.shape[:-2], seg.m, seg.offset)[..., None, :, :]
    return qs, kw, s


def _forward_ref(q, k, v, *, block, look_backward, look_forward, causal, key_padding_mask,
                 rel_bias, scale):
    n, m = q.shape[-2], k.shape[-2]
    seg = _Segments(n, m, block, look_backward, look_forward)
    ok = seg.allowed(causal, _band.key_ok(key_padding_mask, q.shape[:-2], m))  # (..., ns, k, W·k)
    _, _, s = _scores(q, k, seg, rel_bias, scale)                  # (..., ns, k, W·k)
    p, lse = softmax.forward(s, ok)                                # (..., ns, k, W·k)
    out = p @ seg.windows(v)                                       # (..., ns, k, Dv)
    out = out.reshape(*q.shape[:-2], -1, v.shape[-1])[..., :n, :]  # (..., N, Dv)
    lse = lse.reshape(*q.shape[:-2], -1)[..., :n]                  # (..., N)
    return np.ascontiguousarray(out), np.ascontiguousarray(lse)


def _backward_ref(dout, ctx: LocalCtx) -> dict:
    q, k, v, scale = ctx.q, ctx.k, ctx.v, ctx.scale
    n, m = q.shape[-2], k.shape[-2]
    batch = q.shape[:-2]
    seg = _Segments(n, m, ctx.block, ctx.look_backward, ctx.look_forward)
    ok = seg.allowed(ctx.causal, _band.key_ok(ctx.key_padding_mask, batch, m))
    qs, kw, s = _scores(q, k, seg, ctx.rel_bias, scale)
    lse = seg.queries(ctx.lse[..., None])[..., 0]                  # (..., ns, k)
    live = ok & (lse[..., None] != -np.inf)                        # (..., ns, k, W·k)
    # recompute fwd: p = softmax(s) = exp(s − lse) on the allowed entries
    p = np.where(live, np.exp(np.where(live, s - lse[..., None], 0)), 0)
    dos = seg.queries(dout)                                        # (..., ns, k, Dv)
    vw = seg.windows(v)                                            # (..., ns, W·k, Dv)
    # fwd: out = p @ v_window
    dvw = p.swapaxes(-1, -2) @ dos                                 # (..., ns, W·k, Dv)
    dp = dos @ vw.swapaxes(-1, -2)                                 # (..., ns, k, W·k)
    # fwd: p = softmax(s)
    ds = softmax.backward(dp, p)                                   # (..., ns, k, W·k)
    # fwd: s = q_seg @ k_windowᵀ · scale (+ rel_bias)
    dq = (ds @ kw) * scale                                         # (..., ns, k, D)
    dkw = (ds.swapaxes(-1, -2) @ qs) * scale                       # (..., ns, W·k, D)
    grads = {"q": np.ascontiguousarray(dq.reshape(*batch, -1, q.shape[-1])[..., :n, :]),
             "k": seg.fold(dkw), "v": seg.fold(dvw)}
    if ctx.rel_bias is not None:
        # fwd: s[s_, r, c] += rel_bias[r − c + b·k + M − 1]  (the same for every segment)
        dblock = ds.sum(axis=-3)                                   # (..., k, W·k)
        drel = np.zeros((*batch, n + m - 1), dtype=q.dtype)        # (..., N + M − 1)
        for c in range(dblock.shape[-1]):
            first = -c + seg.b * seg.k + m - 1                     # index for r = 0
            lo, hi = max(first, 0), min(first + seg.k, n + m - 1)
            if lo < hi:
                drel[..., lo:hi] += dblock[..., lo - first:hi - first, c]
        grads["rel_bias"] = _checks.reduce_to_shape(drel, ctx.rel_bias.shape)
    return grads


# ------------------------------------------------------------------------------------------
# Numba implementation: every row attends one contiguous key range, so the shared band engine
# (attention/_band.py) applies with tiles aligned to the segments.

def _band_plan(q, k, *, block, look_backward, look_forward, causal, key_padding_mask,
               rel_bias):
    """The band for ``_band``: row i sees keys [(σ(i) − b)·k, (σ(i) + f + 1)·k) ∩ [0, M)
    (j ≤ i if causal); tiles are whole segments, split when longer than TILE_MAX, grouped
    when shorter than TILE_MIN."""
    n, m = q.shape[-2], k.shape[-2]
    kk, b, f = block, look_backward, look_forward
    i = np.arange(n)
    sg = i // kk                                                   # (N,) segment of row i
    hi = np.clip((sg + f + 1) * kk, 0, m)                          # (N,)
    if causal:
        hi = np.minimum(hi, i + 1)
    group = max(1, TILE_MIN // kk)                                 # segments per tile
    starts = []
    for s0 in range(0, n, kk * group):
        s1 = min(n, s0 + kk * group)
        pieces = -(-(s1 - s0) // TILE_MAX)
        starts.extend(s0 + (s1 - s0) * p // pieces for p in range(pieces))
    # bias slots: the offsets i − j of a segment window, −((f + 1)·k − 1) … (b + 1)·k − 1
    return _band.make_plan(q, k, groups=1, lo=np.clip((sg - b) * kk, 0, m), hi=hi,
                           tile_start=starts + [n], row_ok=None,
                           key_ok=_band.key_ok(key_padding_mask, q.shape[:-2], m),
                           rel_bias=rel_bias, off_min=-((f + 1) * kk - 1),
                           n_off=(b + f + 2) * kk - 1)


def _forward_numba(q, k, v, *, block, look_backward, look_forward, causal, key_padding_mask,
                   rel_bias, scale):
    plan = _band_plan(q, k, block=block, look_backward=look_backward,
                      look_forward=look_forward, causal=causal,
                      key_padding_mask=key_padding_mask, rel_bias=rel_bias)
    return _band.forward(plan, q, k, v, scale)


def _backward_numba(dout, ctx: LocalCtx) -> dict:
    plan = _band_plan(ctx.q, ctx.k, block=ctx.block, look_backward=ctx.look_backward,
                      look_forward=ctx.look_forward, causal=ctx.causal,
                      key_padding_mask=ctx.key_padding_mask, rel_bias=ctx.rel_bias)
    dq, dk, dv, drel = _band.backward(plan, dout, ctx.out, ctx.lse, ctx.q, ctx.k, ctx.v,
                                      ctx.scale)
    grads = {"q": dq, "k": dk, "v": dv}
    if ctx.rel_bias is not None:
        grads["rel_bias"] = _checks.reduce_to_shape(drel, ctx.rel_bias.shape)
    return grads


# ------------------------------------------------------------------------------------------

def example_cases(rng: np.random.Generator, dtype=np.float64) -> list[Case]:
    """Small valid calls covering every option (used by the contract tests and golden files)."""
    b, h, n, d, dv = 2, 2, 11, 5, 3

    qkv = functools.partial(random_qkv, rng, (b, h), d=d, dv=dv, dtype=dtype)  # qkv(N, M)

    kpad = np.ones((b, 1, n), dtype=bool)
    kpad[1, :, -4:] = False                                        # key padding of batch 1
    return [
        Case("plain", qkv(n), {"block": 3}),
        Case("causal_lookaround", qkv(n), {"block": 4, "look_backward": 1, "look_forward": 1,
                                          "causal": True}),
        Case("kpad_forward", qkv(n), {"block": 2, "look_backward": 0, "look_forward": 2,
                                     "key_padding_mask": kpad}),
        Case("rel_bias", {**qkv(n), "rel_bias": rng.standard_normal(
            (h, 2 * n - 1)).astype(dtype)}, {"block": 3, "look_forward": 1}),
        Case("rect_rel_bias_causal", {**qkv(9, 13), "rel_bias": rng.standard_normal(
            (b, h, 9 + 13 - 1)).astype(dtype)}, {"block": 4, "causal": True, "scale": 0.6}),
    ]


# ----------------------------------------------------------------------------- benchmark data
def bench_options(n: int) -> dict:
    """Options ``python -m tinyeff bench`` runs at length n (``--opt`` overrides them)."""
    return {"block": 128, "look_backward": 1, "look_forward": 1}


def scored_pairs(n: int, options: dict, causal: bool) -> int:
    """(query, key) pairs scored per batch·head at N = M = n."""
    i = np.arange(n)                                              # (N,)
    b = int(options.get("block", 1))
    back, fwd = int(options.get("look_backward", 1)), int(options.get("look_forward", 0))
    blk = i // b                                                  # (N,) query block
    lo = np.maximum(blk - back, 0) * b                            # (N,) first key
    hi = np.minimum((blk + fwd + 1) * b, n) - 1                   # (N,) last key
    hi = np.minimum(hi, i) if causal else hi
    return int(np.sum(hi - lo + 1))


useful_flops, extra_bytes = _band.cost_model(scored_pairs)


def demo_options(n: int, causal: bool) -> dict:
    """Options ``python -m tinyeff demo`` trains with at length n (``--opt`` overrides them):
    one block of look-back, and one of look-ahead when bidirectional (symmetric like the
    window)."""
    from ._demo import span
    return {"block": span(n), "look_backward": 1, "look_forward": 0 if causal else 1}
