"""Linformer: softmax attention over k projected keys and values (Wang et al. 2020).

    K̃   = E (m ⊙ K)                                   (..., k, D)    E: (k, M) or (..., k, M)
    Ṽ   = F (m ⊙ V)                                   (..., k, Dv)   F: (k, M) or (..., k, M)
    S   = Q K̃ᵀ · scale                                (..., N, k)
    P   = softmax(S) over the k projected keys        (..., N, k)
    out = P Ṽ                                         (..., N, Dv)

m_j is the key-padding mask (1 = real key, 0 = padding; all ones without a mask), applied
with ``where`` so that a padded key (even a NaN one) contributes exactly nothing to E K and
F V.  Everything after the projections is exact attention over k keys, i.e.
``out == full.forward(q, E @ K, F @ V)`` — a test checks this.

Paper: S. Wang, B. Z. Li, M. Khabsa, H. Fang, H. Ma, "Linformer: Self-Attention with Linear
Complexity", arXiv:2006.04768 (2020).

Shapes: q (..., N, D), k (..., M, D), v (..., M, Dv), E and F (k, M) or (..., k, M) whose
leading dimensions broadcast to the batch dimensions without enlarging them (e.g. (H, k, M)
for (B, H) batches: one projection per head).  k is the Linformer rank.  Cost O(N·k·D +
k·M·D) time and O(N + k·M) memory: the forward saves K̃, Ṽ and the row log-sum-exp, not
P, and the backward recomputes P in row chunks.  Everything runs one batch element at a time
and in blocks of ~2²⁰ entries, so the only large arrays are the output and the gradients
(no (…, N, k), no (…, k, M) from E broadcast over heads, no masked or transposed copy of
k or v); at N = M = 65,536, k = 256, B·H = 4, D = 64 in float32 the work space beyond the
returned arrays is ~30 MiB.

Options
-------
E, F : float arrays of the inputs' dtype; *differentiable* arguments (``backward`` returns
    ``"E"`` and ``"F"``, reduced to their own shapes).  ``E.shape[-1]`` must equal M: a
    different length is an error, never silently sliced (lucidrains and fairseq use
    ``E[:, :M]`` for shorter inputs; pass that explicitly to reproduce them).  E and F must
    have the same rank k >= 1.
key_padding_mask : boolean (..., M), True = real key, leading dimensions broadcastable to the
    batch.  Padded keys are removed exactly from the projections: the output equals the
    output of the same call with those keys deleted from k, v and their columns deleted
    from E and F.  (fairseq's Linformer ignores the padding mask in self-attention, so its
    padded tokens leak into every projected key; LRA and lucidrains take no mask at all.
    To reproduce them pass no mask.)  Note that, unlike in ``full``, a padded key does not
    disappear from the softmax's key set: the k projected keys are always all present.
causal : must be False.  Linformer has no causal form: every projected key mixes all
    positions, so a query would see the future.  ``causal=True`` raises ValueError.
scale : float, default 1/sqrt(D).

Sharing modes (the paper's head-wise, key-value and layer-wise sharing) are shapes and
identities of the arguments: head-wise is one (k, M) E for all heads; key-value sharing
passes the same array as E and F — the gradients are still returned separately under "E"
and "F" (a layer owning one shared parameter adds them); layer-wise sharing is the layer's
business (``tinyeff.nn``).

Edge cases
----------
* Every query sees k >= 1 projected keys, so no row is ever fully masked; if all M keys are
  padded (or M = 0) then K̃ = Ṽ = 0 and the output is exactly 0 with zero gradients.
* N = 0 gives an empty output.
* Numerically stable: each row's maximum is subtracted before the exponential (a constant
  of the backward).

Layers (``tinyeff.nn``) create the projections with :func:`init_layer_params`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import _checks
from ..ctx import Ctx
from ..ops import softmax
from ._case import Case

NAME = "linformer"
SUPPORTS_MASK = False
SUPPORTS_CAUSAL = False
SUPPORTS_BIAS = False
SUPPORTS_REL_BIAS = False
KEY_PADDING = "key_padding_mask"
DIFFERENTIABLE = ("q", "k", "v", "E", "F")
LAYER_PARAMS = ("E", "F")

_CHUNK_ELEMENTS = 1 << 20   # entries of one (rows, k) score block or one (cols, S·C) gather


@dataclasses.dataclass(frozen=True)
class LinformerCtx(Ctx):
    q: np.ndarray                   # (..., N, D)
    k: np.ndarray                   # (..., M, D)
    v: np.ndarray                   # (..., M, Dv)
    E: np.ndarray                   # (k, M) or (..., k, M)
    F: np.ndarray                   # (k, M) or (..., k, M)
    key_padding_mask: np.ndarray | None   # (..., M) as given, or None
    kp: np.ndarray                  # (..., k, D)  K̃ = E (m ⊙ K)
    vp: np.ndarray                  # (..., k, Dv) Ṽ = F (m ⊙ V)
    lse: np.ndarray                 # (..., N) log-sum-exp of each row of S
    scale: float


def init_layer_params(rng: np.random.Generator, m: int, dtype=np.float64, *, k: int,
                      share_kv: bool = False, **_) -> dict:
    """Projections for a layer over sequences of length ``m``: {"E": (k, m), "F": (k, m)}.

    Entries are i.i.d. uniform on [−1/√k, 1/√k] (lucidrains/linformer's ``init_``; the
    paper's JL argument uses N(0, 1/k) — same order of magnitude).  ``share_kv=True``
    returns the *same* array object under "E" and "F" (key-value sharing).
    """
    rng = _checks.generator(rng)                  # an int/None/RandomState: clear TypeError
    k = _checks.integer(k, "k", minimum=1)
    m = _checks.integer(m, "m", minimum=0)
    bound = 1.0 / math.sqrt(k)
    e = rng.uniform(-bound, bound, size=(k, m)).astype(dtype)      # (k, M)
    f = e if share_kv else rng.uniform(-bound, bound, size=(k, m)).astype(dtype)  # (k, M)
    return {"E": e, "F": f}


def _projection(value, name: str, batch: tuple, m: int, dtype) -> np.ndarray:
    """E or F: a float array (k, M) or (..., k, M) with leading dims broadcastable to batch."""
    _checks.float_array(value, name, min_ndim=2, dtype=dtype)
    if value.shape[-1] != m:
        raise ValueError(
            f"{name} has shape {value.shape} but there are M = {m} keys: {name}.shape[-1] must "
            f"equal M (no silent slicing; pass {name}[..., :{m}] explicitly to project a "
            "shorter sequence as lucidrains/fairseq do)")
    if value.shape[-2] < 1:
        raise ValueError(f"{name} must have a rank k >= 1, got shape {value.shape}")
    if not _checks._fits(value.shape[:-2], batch):
        raise ValueError(f"{name} of shape {value.shape}: its leading dimensions "
                         f"{value.shape[:-2]} do not broadcast to the batch dimensions {batch} "
                         "without enlarging them")
    return value


def _row_chunk(kk: int) -> int:
    """Rows per chunk of one batch element: a (rows, k) score block holds ~_CHUNK_ELEMENTS."""
    return max(1, _CHUNK_ELEMENTS // max(1, kk))


def forward(q, k, v, *, E, F, key_padding_mask=None, causal=False, scale=None):
    """Linformer attention.  Returns ``(out (..., N, Dv), ctx)``; see the module docstring."""
    batch, n, m, d, dv, dtype = _checks.qkv(q, k, v)
    if _checks.flag(causal, "causal"):
        raise ValueError("causal=True is not defined for Linformer: each projected key E·K "
                         "mixes all M positions, so every query would see the future "
                         "(lucidrains/linformer#4); use a causal variant instead")
    E = _projection(E, "E", batch, m, dtype)
    F = _projection(F, "F", batch, m, dtype)
    if E.shape[-2] != F.shape[-2]:
        raise ValueError(f"E and F must have the same rank k, got E {E.shape}, F {F.shape}")
    key_padding_mask = _checks.key_padding_mask(key_padding_mask, batch, m,
                                                name="key_padding_mask")
    scale = _checks.scale(scale, d)
    return _forward_ref(q, k, v, E, F, key_padding_mask, scale)


def backward(dout, ctx: LinformerCtx) -> dict:
    """Gradients ``{"q", "k", "v", "E", "F"}`` (E's and F's reduced to their own shapes)."""
    if not isinstance(ctx, LinformerCtx):
        raise TypeError(f"ctx must be the LinformerCtx returned by linformer.forward, got "
                        f"{type(ctx).__name__}")
    dout = _checks.dout(dout, ctx.q.shape[:-1] + ctx.v.shape[-1:], ctx.q.dtype)
    return _backward_ref(dout, ctx)


def _masked(x, keep):
    """m ⊙ x for x (M, C) and keep (M,) or None: padded rows become exactly 0 (even NaN ones)."""
    if keep is None:
        return x
    return np.where(keep[:, None], x, 0)                           # (M, C)


def _per_element(a, batch: tuple):
    """``a`` (…, r, c) as a view broadcast to (*batch, r, c), or None: index it by batch index."""
    if a is None:
        return None
    return np.broadcast_to(a, (*batch, *a.shape[-2:]))             # (..., r, c) view


def _forward_ref(q, k, v, E, F, kpm, scale):
    # Everything is done one batch element (b, h, …) at a time, so that no (…, k, M) copy of E
    # broadcast over the heads and no (…, M, D) masked copy of k or v is ever formed.
    batch, n, m = q.shape[:-2], q.shape[-2], k.shape[-2]
    kk = E.shape[-2]
    Eb, Fb = _per_element(E, batch), _per_element(F, batch)       # (..., k, M) views
    mb = None if kpm is None else np.broadcast_to(kpm, (*batch, m))   # (..., M) view
    kp = np.empty((*batch, kk, k.shape[-1]), dtype=q.dtype)        # (..., k, D)
    vp = np.empty((*batch, kk, v.shape[-1]), dtype=q.dtype)        # (..., k, Dv)
    out = np.empty((*batch, n, v.shape[-1]), dtype=q.dtype)        # (..., N, Dv)
    lse = np.empty((*batch, n), dtype=q.dtype)                     # (..., N)
    step = _row_chunk(kk)
    for i in np.ndindex(*batch):
        keep = None if mb is None else mb[i]                       # (M,)
        np.matmul(Eb[i], _masked(k[i], keep), out=kp[i])           # (k, D)  K̃ = E (m ⊙ K)
        np.matmul(Fb[i], _masked(v[i], keep), out=vp[i])           # (k, Dv) Ṽ = F (m ⊙ V)
        kpt = kp[i].T                                              # (D, k)
        for r0 in range(0, n, step):                               # rows are independent
            rows = slice(r0, min(n, r0 + step))
            s = q[i][rows] @ kpt                                   # (R, k)
            s *= scale                                             # S = Q K̃ᵀ·scale
            p, lse[i][rows] = softmax.forward(s)                   # (R, k)  P = softmax(S)
            np.matmul(p, vp[i], out=out[i][rows])                  # (R, Dv) out = P Ṽ
    ctx = LinformerCtx(q=q, k=k, v=v, E=E, F=F, key_padding_mask=kpm, kp=kp, vp=vp, lse=lse,
                       scale=scale)
    return out, ctx


def _weight_grad(dproj, x, mb, shape: tuple, dtype) -> np.ndarray:
    """dW = Σ over the broadcast batch axes of dproj (m ⊙ x)ᵀ, returned with W's ``shape``.

    dproj (..., k, C), x (..., M, C), mb (..., M) or None -> (k, M) or (..., k, M).  For each
    kept batch index the summed axes (size S) are folded into the contraction: a (k, S·C)
    @ (S·C, cols) product per block of columns, written straight into the result, so
    neither a (batch, k, M) temporary nor a transposed copy of x is ever formed — only a
    (cols, S·C) gather of x, ~_CHUNK_ELEMENTS entries.
    """
    batch, kk, m = dproj.shape[:-2], dproj.shape[-2], x.shape[-2]
    nb = len(batch)
    lead = (1,) * (nb - (len(shape) - 2)) + tuple(shape[:-2])
    kept = [a for a in range(nb) if lead[a] != 1]
    summed = [a for a in range(nb) if lead[a] == 1]
    kept_shape = tuple(batch[a] for a in kept)
    summed_shape = tuple(batch[a] for a in summed)
    dw = np.empty(shape, dtype=dtype)                              # W's shape
    dw_kept = dw.reshape(*kept_shape, kk, m)                       # (kept..., k, M) view
    sc = math.prod(summed_shape) * x.shape[-1]                     # S·C
    cols = max(1, _CHUNK_ELEMENTS // max(1, sc))

    def full_index(ki, si):                                        # batch index from both parts
        idx = [0] * nb
        for a, j in zip(kept, ki):
            idx[a] = j
        for a, j in zip(summed, si):
            idx[a] = j
        return tuple(idx)

    for ki in np.ndindex(*kept_shape):
        parts = [full_index(ki, si) for si in np.ndindex(*summed_shape)]
        a = np.concatenate([dproj[i] for i in parts], axis=1)      # (k, S·C)
        for c0 in range(0, m, cols):
            c = slice(c0, min(m, c0 + cols))
            xs = np.stack([_masked(x[i][c], None if mb is None else mb[i][c])
                           for i in parts], axis=1)                # (cols, S, C)
            np.matmul(a, xs.reshape(xs.shape[0], sc).T, out=dw_kept[ki][:, c])   # (k, cols)
    return dw


def _backward_ref(dout, ctx: LinformerCtx) -> dict:
    q, k, v, kp, vp, lse, scale = ctx.q, ctx.k, ctx.v, ctx.kp, ctx.vp, ctx.lse, ctx.scale
    batch, n, m = q.shape[:-2], q.shape[-2], k.shape[-2]
    kpm = ctx.key_padding_mask
    Eb, Fb = _per_element(ctx.E, batch), _per_element(ctx.F, batch)   # (..., k, M) views
    mb = None if kpm is None else np.broadcast_to(kpm, (*batch, m))   # (..., M) view
    dq = np.empty_like(q)                                          # (..., N, D)
    dk = np.empty_like(k)                                          # (..., M, D)
    dv = np.empty_like(v)                                          # (..., M, Dv)
    dkp = np.zeros(kp.shape, dtype=q.dtype)                        # (..., k, D)
    dvp = np.zeros(vp.shape, dtype=q.dtype)                        # (..., k, Dv)
    step = _row_chunk(kp.shape[-2])
    for i in np.ndindex(*batch):
        kpt = kp[i].T                                              # (D, k)
        for r0 in range(0, n, step):
            rows = slice(r0, min(n, r0 + step))
            qc, dc = q[i][rows], dout[i][rows]                     # (R, D), (R, Dv)
            # recompute P = softmax(S) from the saved log-sum-exp
            p = qc @ kpt                                           # (R, k)
            p *= scale
            p -= lse[i][rows, None]
            np.exp(p, out=p)                                       # P = exp(S − lse)
            # fwd: out = P Ṽ
            dvp[i] += p.T @ dc                                     # (k, Dv)
            dp = dc @ vp[i].T                                      # (R, k)
            # fwd: P = softmax(S)
            ds = softmax.backward(dp, p)                           # (R, k)
            # fwd: S = Q K̃ᵀ · scale
            dqc = dq[i][rows]                                      # (R, D) view
            np.matmul(ds, kp[i], out=dqc)
            dqc *= scale
            dkp[i] += (ds.T @ qc) * scale                          # (k, D)
        # In blocks of keys: one (M, k) @ (k, D) product would make OpenBLAS touch a
        # buffer of ~¾ of E's size (48 MiB at M = 65,536, k = 256) on top of the result.
        for c0 in range(0, m, step):
            c = slice(c0, min(m, c0 + step))
            # fwd: K̃ = E (m ⊙ K)
            np.matmul(Eb[i][:, c].T, dkp[i], out=dk[i][c])         # (C, D)
            # fwd: Ṽ = F (m ⊙ V)
            np.matmul(Fb[i][:, c].T, dvp[i], out=dv[i][c])         # (C, Dv)
        if mb is not None:                                         # padded keys: dk = dv = 0
            dk[i][~mb[i]] = 0
            dv[i][~mb[i]] = 0
    # fwd: K̃ = E (m ⊙ K)
    dE = _weight_grad(dkp, k, mb, ctx.E.shape, q.dtype)            # E's shape
    # fwd: Ṽ = F (m ⊙ V)
    dF = _weight_grad(dvp, v, mb, ctx.F.shape, q.dtype)            # F's shape
    return {"q": dq, "k": dk, "v": dv, "E": dE, "F": dF}


def example_cases(rng: np.random.Generator, dtype=np.float64) -> list[Case]:
    """Small valid calls covering every option (used by the contract tests and golden files)."""
    b, h, n, m, d, dv, kk = 2, 2, 7, 6, 5, 3, 4

    def qkv(n_=n, m_=m):
        return {"q": rng.standard_normal((b, h, n_, d)).astype(dtype),
                "k": rng.standard_normal((b, h, m_, d)).astype(dtype),
                "v": rng.standard_normal((b, h, m_, dv)).astype(dtype)}

    def proj(*shape):
        return (rng.standard_normal(shape) / math.sqrt(shape[-1])).astype(dtype)

    kpad = np.ones((b, 1, m), dtype=bool)
    kpad[1, :, -2:] = False                                        # key padding of batch 1
    return [
        Case("plain", {**qkv(), "E": proj(kk, m), "F": proj(kk, m)}, {}),
        Case("per_head", {**qkv(), "E": proj(h, kk, m), "F": proj(1, kk, m)}, {"scale": 0.6}),
        Case("per_example", {**qkv(5, 9), "E": proj(b, h, kk, 9), "F": proj(kk, 9)}, {}),
        Case("rank_above_m", {**qkv(), "E": proj(m + 2, m), "F": proj(m + 2, m)}, {}),
        Case("kpad", {**qkv(), "E": proj(kk, m), "F": proj(h, kk, m)},
             {"key_padding_mask": kpad}),
    ]
