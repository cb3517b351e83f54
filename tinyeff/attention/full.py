"""Exact softmax attention — the reference every efficient variant is measured against.

    S   = q kᵀ · scale + bias                                  (..., N, M)
    A   = mask ∧ causal                                        which keys query i may see
    P   = softmax over the allowed entries of each row of S    (0 outside A)
    out = P v                                                  (..., N, Dv)

Shapes: q (..., N, D), k (..., M, D), v (..., M, Dv); leading dimensions are batch
dimensions (typically (B, H)).  Cost O(N·M·D) time and O(N·M) memory (the saved P).

Options
-------
causal : bool, default False
    Query i sees keys j <= i.  When N != M the alignment is *top-left*: row i of the
    (N, M) score matrix keeps columns 0..i, exactly ``torch.ones(N, M).tril()``, which is
    what PyTorch's ``scaled_dot_product_attention(is_causal=True)`` does.  (FlashAttention
    ≥ 2.1 aligns bottom-right, j <= i + M − N; pass that as an explicit ``mask``.)
mask : boolean array broadcastable to (..., N, M), True = may attend; or a scipy.sparse
    matrix of shape (N, M) whose stored entries are the allowed pairs.
key_padding_mask : boolean array (..., M) with one dimension per batch dimension (size 1
    broadcasts: (B, 1, M) for (B, H) batches; a (B, M) mask is a ValueError); True = real
    key.  Combined with ``mask`` by logical and.
bias : float array broadcastable to (..., N, M), added to the scaled scores.  ``-inf``
    entries act as a mask.  Its gradient is returned reduced to the bias's own shape.
rel_bias : float array (..., N + M − 1) whose leading dimensions broadcast to the batch
    dimensions (e.g. (H, N + M − 1)): a bias that depends only on the offset i − j,
    bias_ij = rel_bias[..., i − j + M − 1].  This O(N) form is how relative-position
    schemes (clipped tables, T5 buckets, ALiBi) reach every variant that supports them
    (``SUPPORTS_REL_BIAS``).  Its gradient sums ∂S along each diagonal.
scale : float, default 1/sqrt(D).
impl : "auto" | "ref" | "blocked".  "ref" is the plain NumPy path below (the spec; it saves
    P, O(N·M) memory).  "blocked" is the FlashAttention algorithm in Numba
    (:mod:`tinyeff.kernels.blocked`): tiles of ``BLOCKED_TILE`` queries and keys (a causal
    diagonal tile in bands of ``BLOCKED_BAND`` keys), an online softmax, and a backward
    that recomputes P from the saved log-sum-exp, so the extra memory is O((N + M)·D) —
    exact attention at N = 65,536, H = 4, D = 64 in well under 1 GiB.  It supports
    ``causal``, ``key_padding_mask`` and ``rel_bias``; a dense ``mask`` or ``bias`` with
    impl="blocked" is a ValueError.  "auto" picks "blocked" when
    N·M >= ``AUTO_BLOCKED_MIN_NM`` and no dense mask or bias is given, else "ref".  The two
    agree to float rounding (``tinyeff.testing.PARITY``).

Edge cases
----------
* A query row with no allowed key (fully masked) outputs zeros and passes back zero
  gradient.  PyTorch's math path gives NaN there (``_safe_softmax`` in recent releases
  gives 0, like tinyeff).
* Numerically stable: the row maximum over the allowed entries is subtracted before the
  exponential (a constant of the backward), so logits of ±1e4 give finite results.
* NaN in q_i makes row i NaN; NaN in k_j or v_j makes every row that may see j NaN.
* N = 0 gives an empty output; M = 0 gives every row fully masked, hence zeros.
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

NAME = "full"
SUPPORTS_MASK = True
SUPPORTS_CAUSAL = True
SUPPORTS_BIAS = True
SUPPORTS_REL_BIAS = True
KEY_PADDING = "key_padding_mask"
DIFFERENTIABLE = ("q", "k", "v", "bias", "rel_bias")
IMPLS = ("auto", "ref", "blocked")
BLOCKED_TILE = 384                 # query and key tile of impl="blocked" (measured: BENCHMARKS.md)
BLOCKED_BAND = 64                  # keys per band of a causal diagonal tile (BENCHMARKS.md)
AUTO_BLOCKED_MIN_NM = 1 << 20      # impl="auto" uses "blocked" from N·M = 1024² on


@dataclasses.dataclass(frozen=True)
class FullCtx(Ctx):
    """One schema for both implementations: inputs and options by reference (no copies),
    the output and lse; ``p`` is the reference path's saved P (the blocked path recomputes
    it tile by tile from lse instead of storing O(N·M))."""

    q: np.ndarray                        # (..., N, D)
    k: np.ndarray                        # (..., M, D)
    v: np.ndarray                        # (..., M, Dv)
    out: np.ndarray                      # (..., N, Dv) the output (δ = rowsum(dout∘out))
    lse: np.ndarray                      # (..., N) log-sum-exp of the allowed scores (−inf: empty)
    p: np.ndarray | None                 # (..., N, M) probabilities, 0 outside the allowed set;
                                         #   None when impl="blocked" (recomputed from lse)
    scale: float
    causal: bool
    key_padding_mask: np.ndarray | None  # (..., M) as passed
    rel_bias: np.ndarray | None          # (..., N + M − 1) as passed
    bias_shape: tuple | None             # shape of bias (its gradient is reduced to it)
    rel_bias_shape: tuple | None         # shape of the rel_bias argument
    dense: bool                          # a dense mask or bias was used ("ref" backward only)
    impl: str                            # "ref" or "blocked": the implementation that made this ctx
    tile: int                            # query/key tile of the blocked forward (0 for "ref")
    band: int                            # keys per band of its causal diagonal tiles (0 for "ref")


def causal_mask(n: int, m: int) -> np.ndarray:
    """(N, M) boolean, True where j <= i (top-left alignment, as PyTorch's ``is_causal``)."""
    return np.tri(n, m, dtype=bool)                                # (N, M)


def rel_bias_matrix(rel_bias: np.ndarray, n: int, m: int) -> np.ndarray:
    """(..., N + M − 1) offset bias -> (..., N, M) with [i, j] = rel_bias[..., i − j + M − 1]."""
    idx = np.arange(n)[:, None] - np.arange(m)[None, :] + (m - 1)  # (N, M) offset index
    return rel_bias[..., idx]                                      # (..., N, M)


def rel_bias_grad(dbias: np.ndarray) -> np.ndarray:
    """Backward of :func:`rel_bias_matrix`: sum (..., N, M) along each diagonal i − j."""
    n, m = dbias.shape[-2:]
    out = np.zeros((*dbias.shape[:-2], n + m - 1), dtype=dbias.dtype)  # (..., N + M − 1)
    for i in range(n):
        # row i holds offsets i − j + M − 1 = i + M − 1 … i for j = 0 … M − 1
        out[..., i:i + m] += dbias[..., i, ::-1]
    return out


@_nonfinite.nan_rows_of_v
def forward(q, k, v, *, causal=False, mask=None, key_padding_mask=None, bias=None,
            rel_bias=None, scale=None, impl="auto"):
    """Exact attention.  Returns ``(out (..., N, Dv), ctx)``; see the module docstring."""
    batch, n, m, d, dv, dtype = _checks.qkv(q, k, v)
    causal = _checks.flag(causal, "causal")
    mask = _checks.attn_mask(mask, batch, n, m)
    key_padding_mask = _checks.key_padding_mask(key_padding_mask, batch, m,
                                                name="key_padding_mask")
    bias = _checks.bias(bias, batch, n, m, dtype)
    rel_bias = _checks.rel_bias(rel_bias, batch, n, m, dtype)
    scale = _checks.scale(scale, d)
    impl = _checks.choice(impl, "impl", IMPLS)
    dense = mask is not None or bias is not None
    if impl == "blocked" and dense:
        raise ValueError("impl='blocked' supports causal, key_padding_mask and rel_bias; a "
                         f"dense mask (shape {None if mask is None else mask.shape}) or bias "
                         f"(shape {None if bias is None else bias.shape}) needs impl='ref'")
    if impl == "auto":
        impl = "blocked" if (not dense and n * m >= AUTO_BLOCKED_MIN_NM) else "ref"
    if impl == "blocked":
        return _forward_blocked(q, k, v, causal, key_padding_mask, rel_bias, scale)
    allowed = mask
    if key_padding_mask is not None:
        kp = key_padding_mask[..., None, :]                        # (..., 1, M)
        allowed = kp if allowed is None else (allowed & kp)
    if causal:
        tri = causal_mask(n, m)                                    # (N, M)
        allowed = tri if allowed is None else (allowed & tri)
    out, p, lse = _forward_ref(q, k, v, allowed, bias, rel_bias, scale)
    ctx = FullCtx(q=q, k=k, v=v, out=out, lse=lse, p=p, scale=scale, causal=causal,
                  key_padding_mask=key_padding_mask, rel_bias=rel_bias,
                  bias_shape=None if bias is None else bias.shape,
                  rel_bias_shape=None if rel_bias is None else rel_bias.shape, dense=dense,
                  impl="ref", tile=0, band=0)
    return out, ctx


def backward(dout, ctx: FullCtx, *, impl=None) -> dict:
    """Gradients ``{"q", "k", "v"}`` (and ``"bias"``/``"rel_bias"`` if given).

    ``impl`` (default: the one that made ``ctx``) may cross the implementations: "ref" on a
    blocked ctx recomputes P from the saved lse; "blocked" on a ref ctx works when the
    forward used no dense mask or bias.
    """
    if not isinstance(ctx, FullCtx):
        raise TypeError(f"ctx must be the FullCtx returned by full.forward, got "
                        f"{type(ctx).__name__}")
    impl = ctx.impl if impl is None else _checks.choice(impl, "impl", ("ref", "blocked"))
    dout = _checks.dout(dout, ctx.q.shape[:-1] + ctx.v.shape[-1:], ctx.q.dtype)
    if impl == "blocked":
        if ctx.dense:
            raise ValueError("backward(impl='blocked') cannot apply the dense mask or bias of "
                             "this forward; use impl='ref'")
        return _backward_blocked(dout, ctx)
    return _backward_ref(dout, ctx)


def _forward_ref(q, k, v, allowed, bias, rel_bias, scale):
    s = (q @ k.swapaxes(-1, -2)) * scale                           # (..., N, M)
    if bias is not None:
        s = s + bias                                               # (..., N, M)
    if rel_bias is not None:
        s = s + rel_bias_matrix(rel_bias, q.shape[-2], k.shape[-2])  # (..., N, M)
    p, lse = softmax.forward(s, allowed)                           # (..., N, M), (..., N)
    out = p @ v                                                    # (..., N, Dv)
    return out, p, lse


def _probs_from_lse(ctx: FullCtx) -> np.ndarray:
    """P = exp(S − lse) on the allowed entries: the P a blocked forward did not save."""
    n, m = ctx.q.shape[-2], ctx.k.shape[-2]
    s = (ctx.q @ ctx.k.swapaxes(-1, -2)) * ctx.scale               # (..., N, M)
    if ctx.rel_bias is not None:
        s = s + rel_bias_matrix(ctx.rel_bias, n, m)                # (..., N, M)
    allowed = np.isfinite(ctx.lse)[..., None] & (s > -np.inf)      # (..., N, M)
    if ctx.key_padding_mask is not None:
        allowed = allowed & ctx.key_padding_mask[..., None, :]     # (..., N, M)
    if ctx.causal:
        allowed = allowed & causal_mask(n, m)                      # (..., N, M)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.where(allowed, np.exp(s - ctx.lse[..., None]), 0)  # (..., N, M)


def _backward_ref(dout, ctx: FullCtx) -> dict:
    q, k, v = ctx.q, ctx.k, ctx.v
    p = ctx.p if ctx.p is not None else _probs_from_lse(ctx)       # (..., N, M)
    # fwd: out = p @ v
    dv = p.swapaxes(-1, -2) @ dout                                 # (..., M, Dv)
    dp = dout @ v.swapaxes(-1, -2)                                 # (..., N, M)
    # fwd: p = softmax(s) over the allowed entries (the max shift is a constant)
    ds = softmax.backward(dp, p)                                   # (..., N, M)
    # fwd: s = (q @ kᵀ) * scale + bias
    dq = (ds @ k) * ctx.scale                                      # (..., N, D)
    dk = (ds.swapaxes(-1, -2) @ q) * ctx.scale                     # (..., M, D)
    grads = {"q": dq, "k": dk, "v": dv}
    if ctx.bias_shape is not None:
        grads["bias"] = _checks.reduce_to_shape(ds, ctx.bias_shape)  # bias's own shape
    if ctx.rel_bias_shape is not None:
        # fwd: s += rel_bias[..., i − j + M − 1]
        drel = rel_bias_grad(ds)                     # (..., N + M − 1)
        grads["rel_bias"] = _checks.reduce_to_shape(drel, ctx.rel_bias_shape)
    return grads


# ----------------------------------------------------------------- impl="blocked" (Numba)

def _heads(x: np.ndarray, bh: int) -> np.ndarray:
    """(..., L, C) -> (BH, L, C) C-contiguous and writeable (a view when x already is; a
    copy of a read-only x, so that read-only inputs reuse the kernels compiled for writeable
    ones instead of compiling a read-only specialization)."""
    return np.require(x.reshape(bh, *x.shape[-2:]), requirements="CW")  # (BH, L, C)


def _per_head(x, batch: tuple, bh: int, length: int, dtype) -> np.ndarray:
    """A per-key or per-offset array broadcast to (BH, length); a (1, 1) dummy if None."""
    if x is None:
        return np.zeros((1, 1), dtype=dtype)                       # unused by the kernel
    full_shape = (*batch, length)
    return np.require(np.broadcast_to(x, full_shape).reshape(bh, length), requirements="CW")


def _forward_blocked(q, k, v, causal, key_padding_mask, rel_bias, scale):
    # imported here so that `import tinyeff` does not compile or load Numba code
    from ..kernels import blas_single_thread, blocked
    batch, n, m, dv = q.shape[:-2], q.shape[-2], k.shape[-2], v.shape[-1]
    bh = math.prod(batch)
    dtype = q.dtype
    tile, band = BLOCKED_TILE, BLOCKED_BAND
    out = np.zeros((bh, n, dv), dtype=dtype)                       # (BH, N, Dv)
    lse = np.full((bh, n), -np.inf, dtype=dtype)                   # (BH, N)
    if bh and n and m:
        kpad = _per_head(key_padding_mask, batch, bh, m, bool)     # (BH, M)
        rel = _per_head(rel_bias, batch, bh, n + m - 1, dtype)     # (BH, N + M − 1)
        with blas_single_thread():
            blocked.flash_fwd(out, lse, _heads(q, bh), _heads(k, bh), _heads(v, bh), kpad, rel,
                              dtype.type(scale), causal, key_padding_mask is not None,
                              rel_bias is not None, tile, band)
    out = out.reshape(*batch, n, dv)                               # (..., N, Dv)
    ctx = FullCtx(q=q, k=k, v=v, out=out, lse=lse.reshape(*batch, n), p=None, scale=scale,
                  causal=causal, key_padding_mask=key_padding_mask, rel_bias=rel_bias,
                  bias_shape=None, rel_bias_shape=None if rel_bias is None else rel_bias.shape,
                  dense=False, impl="blocked", tile=tile, band=band)
    return out, ctx


def _backward_blocked(dout, ctx: FullCtx, schedule: str = "auto") -> dict:
    """schedule: "fused" (one thread per head), "split" (dq pass, then dk/dv pass) or "auto"."""
    import numba

    from ..kernels import blas_single_thread, blocked
    q, k, v = ctx.q, ctx.k, ctx.v
    batch, n, m, d, dv = q.shape[:-2], q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    bh = math.prod(batch)
    dtype = q.dtype
    tile, band = ctx.tile or BLOCKED_TILE, ctx.band or BLOCKED_BAND
    out = ctx.out                                                  # (..., N, Dv)
    dq = np.zeros((bh, n, d), dtype=dtype)                         # (BH, N, D)
    dk = np.zeros((bh, m, d), dtype=dtype)                         # (BH, M, D)
    dvv = np.zeros((bh, m, dv), dtype=dtype)                       # (BH, M, Dv)
    drel = np.zeros((bh, max(n + m - 1, 0)), dtype=dtype)  # (BH, N + M − 1); N = M = 0: (BH, 0)
    if bh and n and m:
        q3, k3, v3, dout3 = _heads(q, bh), _heads(k, bh), _heads(v, bh), _heads(dout, bh)
        # δ_i = Σ_c dout_ic · out_ic  (= Σ_j P_ij dP_ij, the softmax backward's row term)
        delta = np.sum(dout3 * _heads(out, bh), axis=-1)           # (BH, N)
        lse = np.ascontiguousarray(ctx.lse.reshape(bh, n))         # (BH, N)
        kpad = _per_head(ctx.key_padding_mask, batch, bh, m, bool)  # (BH, M)
        rel = _per_head(ctx.rel_bias, batch, bh, n + m - 1, dtype)  # (BH, N + M − 1)
        flags = (dtype.type(ctx.scale), ctx.causal, ctx.key_padding_mask is not None)
        has_rel = ctx.rel_bias is not None
        threads = numba.get_num_threads()
        if schedule == "auto":
            fused = bh >= 4 * threads or (bh >= threads and bh % threads == 0)
        else:
            fused = schedule == "fused"
        with blas_single_thread():
            if fused:
                blocked.flash_bwd_fused(dq, dk, dvv, q3, k3, v3, dout3, lse, delta, kpad, rel,
                                        *flags, has_rel, tile, band)
            else:
                blocked.flash_bwd_dq(dq, q3, k3, v3, dout3, lse, delta, kpad, rel, *flags,
                                     has_rel, tile, band)
                blocked.flash_bwd_dkdv(dk, dvv, q3, k3, v3, dout3, lse, delta, kpad, rel,
                                       *flags, has_rel, tile, band)
            if has_rel:
                ndiag = -(-n // tile) + -(-m // tile) - 1
                parts = np.zeros((bh, ndiag, 2 * tile - 1), dtype=dtype)  # (BH, diagonals, 2T − 1)
                blocked.flash_bwd_rel_parts(parts, q3, k3, v3, dout3, lse, delta, kpad, rel,
                                            *flags, tile)
                blocked.flash_bwd_rel_combine(drel, parts, n, m, tile)
    grads = {"q": dq.reshape(q.shape), "k": dk.reshape(k.shape), "v": dvv.reshape(v.shape)}
    if ctx.rel_bias_shape is not None:
        drel = drel.reshape(*batch, n + m - 1)                     # (..., N + M − 1)
        grads["rel_bias"] = _checks.reduce_to_shape(drel, ctx.rel_bias_shape)
    return grads


def example_cases(rng: np.random.Generator, dtype=np.float64) -> list[Case]:
    """Small valid calls covering every option (used by the contract tests and golden files)."""
    b, h, n, m, d, dv = 2, 2, 7, 7, 5, 3

    qkv = functools.partial(random_qkv, rng, (b, h), d=d, dv=dv, dtype=dtype)  # qkv(N, M)

    pad = np.ones((b, 1, 1, m), dtype=bool)
    pad[1, :, :, -3:] = False                                      # key padding of batch 1
    kpad = np.ones((b, 1, 9), dtype=bool)
    kpad[0, :, 6:] = False                                         # key padding of batch 0
    holes = rng.random((n, m)) < 0.6
    holes[2] = False                                               # one fully masked row
    return [
        Case("plain", qkv(n, m), {}),
        Case("causal", qkv(n, m), {"causal": True}),
        Case("causal_rect", qkv(5, 9), {"causal": True}),
        Case("padmask", qkv(n, m), {"mask": pad}),
        Case("holes_causal", qkv(n, m), {"mask": holes, "causal": True, "scale": 0.7}),
        Case("bias_head", {**qkv(n, m), "bias": rng.standard_normal((h, n, m)).astype(dtype)},
             {"causal": True}),
        Case("bias_full", {**qkv(n, m), "bias": rng.standard_normal((b, h, n, m)).astype(dtype)},
             {"mask": pad}),
        Case("rel_bias_kpad",
             {**qkv(5, 9), "rel_bias": rng.standard_normal((h, 5 + 9 - 1)).astype(dtype)},
             {"key_padding_mask": kpad, "causal": True}),
    ]


# ----------------------------------------------------------------------------- benchmark data
def bench_options(n: int) -> dict:
    """Options ``python -m tinyeff bench`` runs at length n (``--opt`` overrides them)."""
    return {}


def scored_pairs(n: int, options: dict, causal: bool) -> int:
    """(query, key) pairs scored per batch·head at N = M = n."""
    return n * (n + 1) // 2 if causal else n * n


def useful_flops(n: int, d: int, options: dict, causal: bool) -> int | None:
    """Forward flops of the matrix products per batch·head: 2·P·D (q kᵀ) + 2·P·D (P v)."""
    pairs = scored_pairs(n, options, causal)
    return None if pairs is None else 4 * pairs * d


def extra_bytes(n: int, d: int, itemsize: int, options: dict, causal: bool) -> int:
    """Generous bound on the saved context and temporaries per batch·head: a few (N, N)
    score arrays on the reference path, none on the blocked one."""
    impl = options.get("impl", "auto")
    blocked = impl == "blocked" or (impl == "auto" and n * n >= AUTO_BLOCKED_MIN_NM)
    return 0 if blocked else 5 * n * n * itemsize


def demo_options(n: int, causal: bool) -> dict:
    """Options ``python -m tinyeff demo`` trains with at length n (``--opt`` overrides them):
    the blocked kernel (O(N) memory)."""
    return {"impl": "blocked"}
