"""Sliding-window attention with dilation and global tokens (Longformer, Beltagy et al. 2020).

Query i attends the keys of its *allowed set* A(i); with one-sided window w, dilation d and the
set G of global positions (``global_indices``, or per batch item ``global_mask``):

    band(i) = { j = i + t·d : t ∈ {−w, …, w}, 0 ≤ j < M, j ∉ G }
    A(i)    = all keys 0 ≤ j < M                         if i ∈ G   (global query rows)
            = band(i) ∪ G                                otherwise  (global key columns)
    then    A(i) ∩= { j ≤ i }  if causal,   A(i) ∩= { j : key_padding_mask_j }

    s_ij  = q_i·k_j · scale + rel_bias[i − j + M − 1]                  (j ∈ A(i))
    p_ij  = exp(s_ij − lse_i),   lse_i = log Σ_{j∈A(i)} exp(s_ij)
    out_i = Σ_{j∈A(i)} p_ij v_j

With global projections (Longformer §3.1 "Linear Projections for Global Attention"; HF's
``query_global`` / ``key_global`` / ``value_global``) the rows i ∈ G use them instead:

    s_ij  = q_global_i·k_global_j · scale + rel_bias[i − j + M − 1]      (i ∈ G, j ∈ A(i))
    out_i = Σ_{j∈A(i)} p_ij v_global_j

while every other row, global key columns included, keeps q, k, v.

Every allowed pair is counted once: global keys are removed from the band and re-added as
explicit columns (allenai/longformer and HF do the same, to avoid double counting), so the
result equals ``full`` with the boolean mask band ∪ global columns ∪ global rows — that
equality is the definition, and tests/test_window.py checks it in the forward and every
gradient.  Cost O(N·(w + G)·D + G·M·D) time, G the largest global count of a batch item;
O(N) saved state (the log-sum-exp; the backward recomputes the band probabilities); O(N·w)
transient memory in the reference.

Paper: Beltagy, Peters, Cohan, "Longformer: The Long-Document Transformer", 2020, §3.1
(sliding window, dilated sliding window, global attention).

Shapes: q (..., N, D), k (..., M, D), v (..., M, Dv); w one-sided window; leading dimensions
are batch dimensions (typically (B, H)).

Options
-------
window : int >= 0, one-sided w: 2w + 1 band slots per query (w = 0: only j = i).
dilation : int >= 1, default 1.  Keys i ± t·d.  (allenai's ``tvm`` mode; HF has none.)
global_indices : None or 1-D integer array of distinct positions g with 0 <= g < min(N, M),
    any order, the same for the whole batch.  Row g attends every key; every row attends
    key g.
global_mask : None or bool (..., N), exactly q.ndim − 1 dimensions lined up with the batch
    dimensions, size-1 dimensions broadcast (``(B, 1, N)`` or ``(B, H, N)``); True = global
    token, only at positions < min(N, M).  Batch item b behaves exactly as a call with
    ``global_indices = nonzero(global_mask[b])``.  Not together with ``global_indices``.
    Held as per-item position lists padded to G, the largest count in the batch.
causal : bool.  Keeps j <= i (top-left alignment, like ``full``): band slots t ∈ [−w, 0],
    global rows see keys j <= g, and global key g is seen only by rows i >= g.
key_padding_mask : bool (..., M), True = real key; one dim per batch dim (size 1 broadcasts).
rel_bias : float (..., N + M − 1): bias_ij = rel_bias[..., i − j + M − 1] added to s_ij, on
    the band and on the global rows/columns alike; gradient returned reduced to its shape.
    On the band only 2w + 1 of its entries are read (the offsets ±t·d), so the work stays
    O(N·w).
q_global, k_global, v_global : None, or all three, shaped and typed like q, k, v: the
    queries, keys and values of the global rows (see the formula); each gets a gradient.
    The global rows read v_global, so a non-finite v_j reaches only non-global rows; a
    non-finite v_global is plain IEEE arithmetic (it may reach every global row).
scale : float, default 1/sqrt(D).
impl : "auto" (the Numba kernel, or the reference for empty shapes) | "ref" | "numba".

N != M is allowed: the band is j = i + t·d clipped to [0, M), exactly the band of the
(N, M) score matrix, with top-left alignment (no shift by M − N).

Edge cases
----------
* Sequence edges: band slots outside [0, M) are absent (no padding tokens, no −10000
  sentinels), so any N works; nothing requires N to be a multiple of the window.
* A row with no allowed key (all its keys padded; or causal row 0 with its key padded)
  outputs 0 with 0 gradient, like ``full``.
* The row maximum is subtracted before exp (a constant of the backward).
* Global rows attend with q, k, v unless ``q_global``, ``k_global``, ``v_global`` are given;
  the q of a global row and the q_global of a non-global row then get zero gradient.

Numba path (``tinyeff/attention/_window_numba.py``): the band engine shared with ``local``
(``tinyeff/attention/_band.py``, kernels in ``tinyeff/kernels/band.py``: tiles of 48
queries against their contiguous key range, ``np.dot`` on contiguous slices, an explicit
band mask per tile); dilation d is handled by regrouping positions into the d residue
classes i mod d, where the dilated band becomes a plain band.  The global rows and columns
(``tinyeff/attention/_window_globals.py``) are dense NumPy products in both paths.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from .. import _checks
from .._random import random_qkv
from ..ctx import Ctx
from ..ops import softmax
from . import _band, _nonfinite, _window_numba
from ._case import Case
from ._window_globals import (
    PROJECTIONS,
    Globals,
    check_indices,
    check_mask,
    check_projections,
    entries_at,
    exp_minus,
    gcol_scores,
    global_grads,
    global_qkv,
    grow_scores,
    make_globals,
    put,
    rel_bias_grad_gparts,
    rows_at,
)

NAME = "window"
SUPPORTS_MASK = False
SUPPORTS_CAUSAL = True
SUPPORTS_BIAS = False
SUPPORTS_REL_BIAS = True
KEY_PADDING = "key_padding_mask"
GLOBAL_MASK = "global_mask"          # the per-sample global-token option (nn passes it)
SUPPORTS_GLOBAL_PROJECTIONS = True   # q_global, k_global, v_global (nn can create them)
GLOBAL_PROJECTIONS = PROJECTIONS
DIFFERENTIABLE = ("q", "k", "v", "rel_bias", *GLOBAL_PROJECTIONS)
IMPLS = ("auto", "ref", "numba")


@dataclasses.dataclass(frozen=True)
class WindowCtx(Ctx):
    q: np.ndarray                        # (..., N, D)
    k: np.ndarray                        # (..., M, D)
    v: np.ndarray                        # (..., M, Dv)
    out: np.ndarray                      # (..., N, Dv) the output (δ_i = dout_i·out_i)
    lse: np.ndarray                      # (..., N) log-sum-exp over A(i) (−inf: empty row)
    window: int
    dilation: int
    global_indices: np.ndarray           # (G,) int64, sorted (empty with global_mask)
    global_mask: np.ndarray | None       # (..., N) as given, or None
    glob: Globals                        # the global tokens as both paths use them
    causal: bool
    key_padding_mask: np.ndarray | None  # (..., M) as given
    rel_bias: np.ndarray | None          # (..., N + M − 1) as given
    q_global: np.ndarray | None          # (..., N, D) as given, or None (global rows use q)
    k_global: np.ndarray | None          # (..., M, D)
    v_global: np.ndarray | None          # (..., M, Dv)
    scale: float
    impl: str


# ------------------------------------------------------------------------------------------
# public API

def _hit_pass_options(options: dict) -> dict:
    """Options of the NaN-propagation pass (``_nonfinite``): the global rows of a call with
    global projections read v_global, not v, so zero projections keep them out of the pass."""
    hit = dict(options)
    for name in PROJECTIONS:
        if isinstance(hit.get(name), np.ndarray):
            hit[name] = np.zeros_like(hit[name])
    return hit


@_nonfinite.nan_rows_of_v(prepare=_hit_pass_options)
def forward(q, k, v, *, window, dilation=1, global_indices=None, global_mask=None,
            causal=False, key_padding_mask=None, rel_bias=None, q_global=None, k_global=None,
            v_global=None, scale=None, impl="auto"):
    """Sliding-window attention.  Returns ``(out (..., N, Dv), ctx)``; see the module docstring."""
    batch, n, m, d, dv, dtype = _checks.qkv(q, k, v)
    window = _checks.integer(window, "window", minimum=0)
    dilation = _checks.integer(dilation, "dilation", minimum=1)
    if global_indices is not None and global_mask is not None:
        raise ValueError("give global_indices (one set of global positions for the whole "
                         "batch) or global_mask (one per batch item), not both")
    gidx = check_indices(global_indices, n, m)
    global_mask = check_mask(global_mask, batch, n, m)
    causal = _checks.flag(causal, "causal")
    key_padding_mask = _checks.key_padding_mask(key_padding_mask, batch, m,
                                                name="key_padding_mask")
    rel_bias = _checks.rel_bias(rel_bias, batch, n, m, dtype)
    q_global, k_global, v_global = check_projections(q_global, k_global, v_global, q, k, v)
    scale = _checks.scale(scale, d)
    impl = _checks.choice(impl, "impl", IMPLS)
    if impl == "auto":
        impl = "ref" if 0 in (n, m, d, dv) or q.size == 0 else "numba"
    opts = dict(window=window, dilation=dilation,
                glob=make_globals(gidx, global_mask, batch, n, m),
                causal=causal, key_padding_mask=key_padding_mask, rel_bias=rel_bias,
                q_global=q_global, k_global=k_global, v_global=v_global, scale=scale)
    if q.size == 0 or v.size == 0:
        # B, N, M or Dv = 0: zeros, every row empty (docs/robustness.md); neither path can
        # take it (the reference indexes key 0, the kernel plan reshapes with -1)
        out = np.zeros(q.shape[:-1] + v.shape[-1:], dtype=dtype)   # (..., N, Dv)
        lse = np.full(q.shape[:-1], -np.inf, dtype=dtype)          # (..., N)
    elif impl == "numba":
        out, lse = _window_numba.forward(q, k, v, **opts)
    else:
        out, lse = _forward_ref(q, k, v, **opts)
    ctx = WindowCtx(q=q, k=k, v=v, out=out, lse=lse, impl=impl, global_indices=gidx,
                    global_mask=global_mask, **opts)
    return out, ctx


def backward(dout, ctx: WindowCtx, *, impl=None) -> dict:
    """Gradients ``{"q", "k", "v"}``, plus ``"rel_bias"`` and ``"q_global"``, ``"k_global"``,
    ``"v_global"`` when those were given."""
    if not isinstance(ctx, WindowCtx):
        raise TypeError(f"ctx must be the WindowCtx returned by window.forward, got "
                        f"{type(ctx).__name__}")
    dout = _checks.dout(dout, ctx.q.shape[:-1] + ctx.v.shape[-1:], ctx.q.dtype)
    impl = ctx.impl if impl is None else _checks.choice(impl, "impl", IMPLS)
    if ctx.q.size == 0 or ctx.v.size == 0:
        # empty problem (B, N, M or Dv = 0): the output is constant, every gradient is 0
        grads = {"q": np.zeros_like(ctx.q), "k": np.zeros_like(ctx.k), "v": np.zeros_like(ctx.v)}
        if ctx.rel_bias is not None:
            grads["rel_bias"] = np.zeros_like(ctx.rel_bias)
        if ctx.q_global is not None:
            grads.update({name: np.zeros_like(getattr(ctx, name)) for name in PROJECTIONS})
        return grads
    if impl == "auto":
        impl = "ref" if ctx.q.size == 0 or ctx.k.size == 0 or dout.size == 0 else "numba"
    if impl == "numba":
        return _window_numba.backward(dout, ctx)
    return _backward_ref(dout, ctx)


def allowed_mask(n, m, *, window, dilation=1, global_indices=None, causal=False):
    """The dense (N, M) boolean A (no key padding) — for small N only; tests and docs use it."""
    i = np.arange(n)[:, None]
    j = np.arange(m)[None, :]
    off = j - i                                                    # (N, M)
    band = (np.abs(off) <= window * dilation) & (off % dilation == 0)
    g = check_indices(global_indices, n, m)
    band[:, g] = True                                              # global key columns
    band[g, :] = True                                              # global query rows
    if causal:
        band &= j <= i
    return band


# ------------------------------------------------------------------------------------------
# reference implementation (the spec)

def _band_slots(n, m, window, dilation):
    """Band slot t = 0 … 2w: key j = i + (t − w)·d.  Returns offsets (S,) and, per slot, the
    query range [i_lo, i_hi) for which that key exists."""
    offsets = (np.arange(2 * window + 1) - window) * dilation      # (S,) j − i
    ranges = [(max(0, -o), min(n, m - o)) for o in offsets]
    return offsets, ranges


def _band_allowed(n, m, window, dilation, gl, causal, key_ok):
    offsets, _ = _band_slots(n, m, window, dilation)
    i = np.arange(n)[:, None]                                      # (N, 1)
    j = i + offsets[None, :]                                       # (N, S)
    inside = (j >= 0) & (j < m)
    jc = np.clip(j, 0, max(m - 1, 0))
    ok = inside & ~gl.cols[..., jc] & ~gl.rows[..., :, None]       # (N, S) or (..., N, S)
    if causal:
        ok &= j <= i
    return ok & key_ok[..., jc]                                    # (..., N, S)


def _band_scores(q, k, window, dilation, rel_bias, scale):
    """s[..., i, t] = q_i·k_{i+off_t}·scale + rel_bias[−off_t + M − 1] (0 where j is outside)."""
    n, m = q.shape[-2], k.shape[-2]
    offsets, ranges = _band_slots(n, m, window, dilation)
    s = np.zeros(q.shape[:-1] + offsets.shape, dtype=q.dtype)      # (..., N, S)
    for t, (o, (lo, hi)) in enumerate(zip(offsets, ranges)):
        if lo < hi:                                                # one diagonal of q kᵀ
            s[..., lo:hi, t] = np.sum(q[..., lo:hi, :] * k[..., lo + o:hi + o, :], axis=-1)
    s *= scale
    if rel_bias is not None:
        s += _band.rel_bias_at(rel_bias, q.shape[:-2], m, -offsets)[..., None, :]  # (..., 1, S)
    return s


def _forward_ref(q, k, v, *, window, dilation, glob, causal, key_padding_mask, rel_bias,
                 q_global, k_global, v_global, scale):
    n, m = q.shape[-2], k.shape[-2]
    batch, gl = q.shape[:-2], glob
    key_ok = _band.key_ok(key_padding_mask, batch, m)              # (..., M)
    offsets, ranges = _band_slots(n, m, window, dilation)
    # rows i ∉ G: one softmax over [global columns, band without global keys]
    k_g, v_g = rows_at(k, gl), rows_at(v, gl)                      # (..., G, D), (..., G, Dv)
    s_g, ok_g = gcol_scores(q, k_g, gl, causal, key_ok, rel_bias, scale)   # (..., N, G)
    s_b = _band_scores(q, k, window, dilation, rel_bias, scale)    # (..., N, S)
    ok_b = _band_allowed(n, m, window, dilation, gl, causal, key_ok)        # (..., N, S)
    p, lse = softmax.forward(np.concatenate([s_g, s_b], axis=-1),
                             np.concatenate([ok_g, ok_b], axis=-1))  # (..., N, G + S)
    p_g, p_b = p[..., :gl.size], p[..., gl.size:]
    out = p_g @ v_g                                                # (..., N, Dv)
    for t, (o, (lo, hi)) in enumerate(zip(offsets, ranges)):
        if lo < hi:
            out[..., lo:hi, :] += p_b[..., lo:hi, t, None] * v[..., lo + o:hi + o, :]
    # rows i ∈ G: a full softmax over every key (their band/column entries above are empty),
    # with the global projections when given
    q_r, k_r, v_r = global_qkv(q, k, v, q_global, k_global, v_global)
    s_r, ok_r = grow_scores(rows_at(q_r, gl), k_r, gl, causal, key_ok, rel_bias, scale)
    p_r, lse_r = softmax.forward(s_r, ok_r)                        # (..., G, M), (..., G)
    put(out, gl, p_r @ v_r)                                        # out[G] (..., G, Dv)
    put(lse, gl, lse_r, rows=False)                                # lse[G]
    return out, lse


def _backward_ref(dout, ctx: WindowCtx) -> dict:
    q, k, v, lse, scale = ctx.q, ctx.k, ctx.v, ctx.lse, ctx.scale
    n, m = q.shape[-2], k.shape[-2]
    batch, gl, w, dil = q.shape[:-2], ctx.glob, ctx.window, ctx.dilation
    key_ok = _band.key_ok(ctx.key_padding_mask, batch, m)
    offsets, ranges = _band_slots(n, m, w, dil)
    q_r, k_r, v_r = global_qkv(q, k, v, ctx.q_global, ctx.k_global, ctx.v_global)
    # recompute the probabilities from the saved log-sum-exp: p = exp(s − lse)
    k_g, v_g = rows_at(k, gl), rows_at(v, gl)                      # (..., G, D), (..., G, Dv)
    s_g, ok_g = gcol_scores(q, k_g, gl, ctx.causal, key_ok, ctx.rel_bias, scale)
    s_b = _band_scores(q, k, w, dil, ctx.rel_bias, scale)
    ok_b = _band_allowed(n, m, w, dil, gl, ctx.causal, key_ok)
    p_g = exp_minus(s_g, lse, ok_g)                                # (..., N, G)
    p_b = exp_minus(s_b, lse, ok_b)                                # (..., N, S)
    q_rg = rows_at(q_r, gl)                                        # (..., G, D)
    s_r, ok_r = grow_scores(q_rg, k_r, gl, ctx.causal, key_ok, ctx.rel_bias, scale)
    p_r = exp_minus(s_r, entries_at(lse, gl), ok_r)                      # (..., G, M)

    # fwd: out = p_g @ v[G] + Σ_t p_b[:, t] v[i + off_t]
    dv = np.zeros_like(v)                                          # (..., M, Dv)
    put(dv, gl, p_g.swapaxes(-1, -2) @ dout, add=True)             # dv[G]
    dp_g = dout @ v_g.swapaxes(-1, -2)                             # (..., N, G)
    dp_b = np.zeros_like(p_b)                                      # (..., N, S)
    for t, (o, (lo, hi)) in enumerate(zip(offsets, ranges)):
        if lo < hi:
            dv[..., lo + o:hi + o, :] += p_b[..., lo:hi, t, None] * dout[..., lo:hi, :]
            dp_b[..., lo:hi, t] = np.sum(dout[..., lo:hi, :] * v[..., lo + o:hi + o, :], -1)
    # fwd: p = softmax([s_g, s_b]) over the allowed entries
    ds = softmax.backward(np.concatenate([dp_g, dp_b], -1),
                          np.concatenate([p_g, p_b], -1))          # (..., N, G + S)
    ds_g, ds_b = ds[..., :gl.size], ds[..., gl.size:]
    # fwd: s_g = q @ k[G]ᵀ · scale (+ rel_bias)
    dq = (ds_g @ k_g) * scale                                      # (..., N, D)
    dk = np.zeros_like(k)                                          # (..., M, D)
    put(dk, gl, (ds_g.swapaxes(-1, -2) @ q) * scale, add=True)     # dk[G]
    # fwd: s_b[:, t] = Σ_d q_i k_{i+off_t} · scale (+ rel_bias)
    for t, (o, (lo, hi)) in enumerate(zip(offsets, ranges)):
        if lo < hi:
            dq[..., lo:hi, :] += ds_b[..., lo:hi, t, None] * k[..., lo + o:hi + o, :] * scale
            dk[..., lo + o:hi + o, :] += ds_b[..., lo:hi, t, None] * q[..., lo:hi, :] * scale
    # global rows — fwd: out[G] = p_r @ v_r,  p_r = softmax(q_r[G] @ k_rᵀ · scale (+ rel_bias)),
    # (q_r, k_r, v_r) = (q, k, v), or the global projections
    grads = {"q": dq, "k": dk, "v": dv}
    dq_r, dk_r, dv_r = global_grads(grads, ctx)
    dout_g = rows_at(dout, gl)                                     # (..., G, Dv)
    dv_r += p_r.swapaxes(-1, -2) @ dout_g
    ds_r = softmax.backward(dout_g @ v_r.swapaxes(-1, -2), p_r)    # (..., G, M)
    put(dq_r, gl, (ds_r @ k_r) * scale, add=True)                  # dq_r[G]
    dk_r += (ds_r.swapaxes(-1, -2) @ q_rg) * scale
    if ctx.rel_bias is not None:
        drel = np.zeros((*batch, n + m - 1), dtype=q.dtype)        # (..., N + M − 1)
        # fwd: s_b[:, t] += rel_bias[−off_t + M − 1]  (the same entry for every row i)
        dslot = ds_b.sum(axis=-2)                                  # (..., S)
        for t, o in enumerate(offsets):
            if -(m - 1) <= -o <= n - 1:
                drel[..., -o + m - 1] += dslot[..., t]
        rel_bias_grad_gparts(drel, ds_g, ds_r, gl, n, m)
        grads["rel_bias"] = _checks.reduce_to_shape(drel, ctx.rel_bias.shape)
    return grads


# ------------------------------------------------------------------------------------------

def example_cases(rng: np.random.Generator, dtype=np.float64) -> list[Case]:
    """Small valid calls covering every option (used by the contract tests and golden files)."""
    b, h, n, d, dv = 2, 2, 11, 5, 3

    qkv = functools.partial(random_qkv, rng, (b, h), d=d, dv=dv, dtype=dtype)  # qkv(N, M)

    kpad = np.ones((b, 1, n), dtype=bool)
    kpad[1, :, -3:] = False                                        # key padding of batch 1
    gmask = np.zeros((b, 1, n), dtype=bool)                        # per-sample global tokens
    gmask[0, :, [0, 5]] = True
    gmask[1, :, 7] = True
    gmask_h = np.zeros((b, h, n), dtype=bool)                      # per batch item and head
    gmask_h[0, 0, 2] = True
    gmask_h[1, :, [1, 9]] = True

    def proj(x):
        return {name: rng.standard_normal(x[name[0]].shape).astype(dtype)
                for name in PROJECTIONS}
    return [
        Case("plain", qkv(n), {"window": 2}),
        Case("causal", qkv(n), {"window": 3, "causal": True}),
        Case("dilated_global", qkv(n), {"window": 2, "dilation": 2, "global_indices": [0, 6]}),
        Case("global_causal_kpad", qkv(n), {"window": 1, "global_indices": [4],
                                           "causal": True, "key_padding_mask": kpad}),
        Case("rel_bias_global", {**qkv(n), "rel_bias": rng.standard_normal(
            (h, 2 * n - 1)).astype(dtype)}, {"window": 2, "global_indices": [3, 9],
                                             "dilation": 3}),
        Case("rect_rel_bias", {**qkv(8, 13), "rel_bias": rng.standard_normal(
            (b, h, 8 + 13 - 1)).astype(dtype)}, {"window": 3, "causal": True, "scale": 0.6}),
        Case("global_mask_kpad", qkv(n), {"window": 2, "global_mask": gmask,
                                         "key_padding_mask": kpad}),
        Case("global_mask_heads_causal", qkv(n), {"window": 1, "dilation": 2,
                                                 "global_mask": gmask_h, "causal": True}),
        Case("global_projections", {**(x := qkv(n)), **proj(x)},
             {"window": 2, "global_indices": [0, 6], "key_padding_mask": kpad}),
        Case("global_projections_mask_rel_bias",
             {**(x := qkv(n)), **proj(x), "rel_bias": rng.standard_normal(
                 (h, 2 * n - 1)).astype(dtype)}, {"window": 1, "global_mask": gmask}),
    ]


# ----------------------------------------------------------------------------- benchmark data
def bench_options(n: int) -> dict:
    """Options ``python -m tinyeff bench`` runs at length n (``--opt`` overrides them)."""
    return {"window": 128}


def scored_pairs(n: int, options: dict, causal: bool) -> int:
    """(query, key) pairs scored per batch·head at N = M = n (global tokens not counted)."""
    i = np.arange(n)                                              # (N,)
    w = int(options.get("window", 0))
    hi = i if causal else np.minimum(i + w, n - 1)                # (N,) last key
    return int(np.sum(hi - np.maximum(i - w, 0) + 1))


useful_flops, extra_bytes = _band.cost_model(scored_pairs)


def demo_options(n: int, causal: bool) -> dict:
    """Options ``python -m tinyeff demo`` trains with at length n (``--opt`` overrides them)."""
    from ._demo import span
    return {"window": span(n)}
