"""Dense building blocks of the independent ports: one softmax attention, one kernelized form.

Everything here is a plain transcription of SEMANTICS.md §2 and §6 on dense arrays: the
allowed set is a boolean array broadcastable to ``(..., N, T)``, biases are dense, and every
backward is written out by hand under the forward line it inverts (``# fwd: ...``).  Nothing
here calls ``tinyeff.attention`` or ``tinyeff.kernels``.

``bug`` selects one planted porting bug of :mod:`tinyeff.testing.mutation` (``None``: the
correct port).  Only the bugs these helpers know are handled here; the rest live in the
variant ports.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

TILE = 64                       # the query tile of the "tail_rows" bug


def default_scale(q: np.ndarray, options: dict, bug, *, contract: float | None = None,
                  wrong: float = 1.0) -> float:
    """``options["scale"]``, else the variant's default (``contract``: 1/√D unless given).

    bug ``default_scale``: the default is ``wrong`` instead.
    """
    scale = options.get("scale")
    if scale is not None:
        return float(scale)
    if bug == "default_scale":
        return wrong
    return 1.0 / math.sqrt(q.shape[-1]) if contract is None else contract


def dense_mask(mask) -> np.ndarray:
    """A boolean ``mask`` option as a dense array (a ``scipy.sparse`` pattern: its structure)."""
    if sp.issparse(mask):
        return sp.csr_array(mask).toarray().astype(bool)
    return np.asarray(mask, dtype=bool)


def causal_mask(n: int, m: int, bug) -> np.ndarray:
    """(N, M) top-left causal mask: j ≤ i.  bug ``causal_bottom_right``: j ≤ i + M − N."""
    if bug == "causal_bottom_right":
        return np.tri(n, m, k=m - n, dtype=bool)
    return np.tri(n, m, dtype=bool)


def key_mask(options: dict) -> np.ndarray | None:
    """``key_padding_mask (..., M)`` as ``(..., 1, M)``, ready to AND with an (N, M) mask."""
    kpm = options.get("key_padding_mask")
    return None if kpm is None else np.asarray(kpm, dtype=bool)[..., None, :]


def rel_offsets(n: int, m: int, bug) -> np.ndarray:
    """(N, M) index into ``rel_bias``: i − j + M − 1.  bug ``rel_bias_sign``: j − i + N − 1."""
    i, j = np.arange(n)[:, None], np.arange(m)[None, :]
    if bug == "rel_bias_sign":
        return j - i + n - 1
    return i - j + m - 1


def rel_bias_dense(rel_bias: np.ndarray, n: int, m: int, bug) -> np.ndarray:
    """(..., N, M) bias R_ij = rel_bias[..., i − j + M − 1] (leading dims as rel_bias's)."""
    return rel_bias[..., rel_offsets(n, m, bug)]


def rel_bias_grad(ds: np.ndarray, shape: tuple, n: int, m: int, bug) -> np.ndarray:
    """VJP of :func:`rel_bias_dense`: sum ds (..., N, M) along each diagonal, then reduce
    the batch axes rel_bias was broadcast along.  Returns ``shape``."""
    # fwd: R[..., i, j] = rel_bias[..., i − j + M − 1]
    ds = reduce_to(ds, tuple(shape[:-1]) + (n, m))                 # (*lead, N, M)
    idx = rel_offsets(n, m, bug).ravel()                           # (N·M,)
    flat = ds.reshape(-1, n * m)                                   # (prod(lead), N·M)
    out = np.stack([np.bincount(idx, weights=row, minlength=shape[-1]) for row in flat])
    return out.reshape(shape).astype(ds.dtype, copy=False)


def reduce_to(g: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum a gradient over the axes along which an array of ``shape`` was broadcast."""
    shape = tuple(shape)
    extra = g.ndim - len(shape)
    if extra > 0:
        g = g.sum(axis=tuple(range(extra)))
    axes = tuple(a for a, (gs, s) in enumerate(zip(g.shape, shape)) if s == 1 and gs != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


def swap_t(x: np.ndarray) -> np.ndarray:
    return x.swapaxes(-1, -2)


def softmax_attention(q, k, v, dout, *, scale: float, allowed, bias=None, fixed=None,
                      bug=None):
    """``out = softmax_A(q kᵀ·scale + bias) v`` and its VJP with ``dout``.

    q (..., N, D), k (..., T, D), v (..., T, Dv), dout (..., N, Dv); ``allowed`` boolean
    broadcastable to (..., N, T); ``bias`` float broadcastable to it or None (−∞ entries
    leave the allowed set); ``fixed``: ``(where, value)`` — the logits at ``where`` are the
    constant ``value`` (no gradient to q or k).  A row with no allowed entry gives 0 and 0
    gradient (SEMANTICS.md §2).

    Returns ``out, dq, dk, dv, ds``: ds (..., N, T) is the gradient of the logits (the
    biases' gradient, before any reduction).
    """
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        s = (q @ swap_t(k)) * scale                                # (..., N, T)
        if bias is not None:
            s = s + bias
        if fixed is not None:
            s = np.where(fixed[0], fixed[1], s)
        a = np.broadcast_to(allowed, s.shape) & (s > -np.inf)      # (..., N, T)
        nonempty = a.any(axis=-1, keepdims=True)                   # (..., N, 1)
        c = np.max(np.where(a, s, -np.inf), axis=-1, keepdims=True, initial=-np.inf)
        c = np.where(nonempty, c, 0.0)                             # row max: a constant
        if bug == "no_max_sub":
            c = np.zeros_like(c)
        e = np.where(a, np.exp(np.where(a, s - c, 0.0)), 0.0)      # (..., N, T)
        z = e.sum(axis=-1, keepdims=True)                          # (..., N, 1)
        if bug == "nan_empty_rows":
            p = e / z                                              # 0/0 on an empty row
        else:
            p = e / np.where(z > 0, z, 1.0)                        # empty row: p = 0
        out = p @ v                                                # (..., N, Dv)
        # fwd: out = p v
        dv = swap_t(p) @ dout                                      # (..., T, Dv)
        dp = dout @ swap_t(v)                                      # (..., N, T)
        # fwd: p = softmax_A(s)
        ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))       # (..., N, T)
        dsq = ds if fixed is None else np.where(fixed[0], 0.0, ds)
        # fwd: s = q kᵀ·scale
        dq = (dsq @ k) * scale                                     # (..., N, D)
        dk = (swap_t(dsq) @ q) * scale                             # (..., T, D)
    return out, dq, dk, dv, ds


def kernelized(fq, fk, v, dout, *, causal: bool, key_padding_mask, mask_mode: str,
               normalize: bool, eps, out_scale=None, bug=None):
    """The dense form of linear attention and its VJP (docs/semantics/linear.md):

    ``w_ij = φ(q_i)·φ(k_j) [j ≤ i if causal]``, ``out_i = Σ_j w_ij v_j / (Σ_j w_ij + eps)``
    (``normalize=False``: the numerator alone, times ``out_scale``); a padded key loses
    φ(k_j) (``"exact"``) or only v_j (``"values_only"``); a row whose denominator is exactly
    0 gives 0.

    fq (..., N, F), fk (..., M, F), v (..., M, Dv); ``eps`` a float or (..., N, 1).
    Returns ``out, dfq, dfk, dv``.
    """
    n, m = fq.shape[-2], fk.shape[-2]
    km = None
    if key_padding_mask is not None:
        km = np.asarray(key_padding_mask, dtype=bool)[..., None]   # (..., M, 1)
    fk_, v_ = fk, v
    if km is not None:
        if mask_mode == "exact" or bug == "values_only_as_exact":
            fk_ = np.where(km, fk, 0.0)                            # (..., M, F)
        else:
            v_ = np.where(km, v, 0.0)                              # (..., M, Dv)
    tri = None
    if causal:
        tri = causal_mask(n, m, bug)
        if bug == "causal_exclusive":
            tri = np.tri(n, m, k=-1, dtype=bool)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        w = fq @ swap_t(fk_)                                       # (..., N, M)
        if tri is not None:
            w = w * tri
        num = w @ v_                                               # (..., N, Dv)
        if normalize:
            den = w.sum(axis=-1, keepdims=True) + eps              # (..., N, 1)
            zero = den == 0
            if bug == "nan_empty_rows":
                safe, zero = den, np.zeros_like(zero)
            else:
                safe = np.where(zero, 1.0, den)
            out = np.where(zero, 0.0, num / safe)                  # (..., N, Dv)
            # fwd: out = num / den
            dnum = np.where(zero, 0.0, dout / safe)                # (..., N, Dv)
            dden = -(dnum * out).sum(axis=-1, keepdims=True)       # (..., N, 1)
        else:
            osc = 1.0 if out_scale is None else out_scale
            out = num * osc
            dnum = dout * osc
            dden = 0.0
        # fwd: num = w v,  den = rowsum(w) + eps
        dw = dnum @ swap_t(v_) + dden                              # (..., N, M)
        dv_ = swap_t(w) @ dnum                                     # (..., M, Dv)
        if tri is not None:
            dw = dw * tri
        # fwd: w = φq φkᵀ
        dfq = dw @ fk_                                             # (..., N, F)
        dfk_ = swap_t(dw) @ fq                                     # (..., M, F)
    dfk, dv = dfk_, dv_
    if km is not None:
        if mask_mode == "exact" or bug == "values_only_as_exact":
            dfk = np.where(km, dfk_, 0.0)
        else:
            dv = np.where(km, dv_, 0.0)
    return out, dfq, dfk, dv
