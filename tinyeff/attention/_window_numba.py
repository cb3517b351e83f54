"""The Numba path of ``window`` (same ``WindowCtx`` as its reference): the band by the band
engine shared with ``local`` (:mod:`tinyeff.attention._band`), the global rows and columns
as dense NumPy products (:mod:`tinyeff.attention._window_globals`), as in the reference.

Dilation d is handled by regrouping positions into the d residue classes i mod d, where the
dilated band j = i + t·d becomes the plain band i' − w ≤ j' ≤ i' + w (:func:`band_plan`).
"""

from __future__ import annotations

import numpy as np

from .. import _checks
from ..kernels import blas_single_thread
from ..ops import softmax
from . import _band
from ._window_globals import (
    entries_at,
    exp_minus,
    gcol_scores,
    global_grads,
    global_qkv,
    grow_scores,
    put,
    rel_bias_grad_gparts,
    rows_at,
)

__all__ = ["TILE", "band_plan", "forward", "backward"]

TILE = 48            # query rows per tile of the Numba kernel


def band_plan(q, k, *, window, dilation, glob, causal, key_padding_mask, rel_bias):
    """The band for ``_band``: positions regrouped into the d residue classes i mod d, where
    the dilated band j = i + t·d becomes the plain band i' − w ≤ j' ≤ i' + w of row i' in its
    class (j' ≤ i' if causal); global rows and key columns are left out of it."""
    n, m, d, w = q.shape[-2], k.shape[-2], dilation, window
    ln, lm = -(-n // d), -(-m // d)                                # rows, keys per class
    i = np.arange(ln)                                              # (Ln,) class coordinates
    hi = np.minimum(i + w + 1, lm)                                 # (Ln,)
    if causal:
        hi = np.minimum(hi, i + 1)
    key_ok = _band.key_ok(key_padding_mask, q.shape[:-2], m) & ~glob.cols   # (..., M)
    return _band.make_plan(q, k, groups=d, lo=np.maximum(i - w, 0), hi=hi,
                           tile_start=np.append(np.arange(0, ln, TILE), ln),
                           row_ok=~glob.rows, key_ok=key_ok, rel_bias=rel_bias,
                           off_min=-w, n_off=2 * w + 1)


def forward(q, k, v, *, window, dilation, glob, causal, key_padding_mask, rel_bias,
            q_global, k_global, v_global, scale):
    """(out (..., N, Dv), lse (..., N)): the band by the band engine, merged with the global
    columns by log-sum-exp weights; the global rows as in the reference.  The global parts'
    NumPy products run on one BLAS thread (``blas_single_thread``): they are thin (G rows
    or columns), and on several threads OpenBLAS leaves a worker spinning on the core the
    next band kernel needs."""
    m, dt = k.shape[-2], q.dtype
    batch, gl = q.shape[:-2], glob
    plan = band_plan(q, k, window=window, dilation=dilation, glob=gl, causal=causal,
                     key_padding_mask=key_padding_mask, rel_bias=rel_bias)
    out_b, lse_b = _band.forward(plan, q, k, v, scale)             # (..., N, Dv), (..., N)
    if gl.size == 0:
        return out_b, lse_b
    with blas_single_thread():
        key_ok = _band.key_ok(key_padding_mask, batch, m)
        # merge the band softmax with the global-column softmax (log-sum-exp weights)
        k_g, v_g = rows_at(k, gl), rows_at(v, gl)                  # (..., G, D), (..., G, Dv)
        s_g, ok_g = gcol_scores(q, k_g, gl, causal, key_ok, rel_bias, scale)
        p_g, lse_g = softmax.forward(s_g, ok_g)                    # (..., N, G), (..., N)
        lse = np.logaddexp(lse_b, lse_g)                           # (..., N)
        live = lse != -np.inf
        with np.errstate(invalid="ignore"):
            w_b = np.where(live, np.exp(np.where(live, lse_b - lse, 0)), 0)[..., None]
            w_g = np.where(live, np.exp(np.where(live, lse_g - lse, 0)), 0)[..., None]
        out = w_b * out_b + w_g * (p_g @ v_g)                      # (..., N, Dv)
        q_r, k_r, v_r = global_qkv(q, k, v, q_global, k_global, v_global)
        s_r, ok_r = grow_scores(rows_at(q_r, gl), k_r, gl, causal, key_ok, rel_bias, scale)
        p_r, lse_r = softmax.forward(s_r, ok_r)                    # (..., G, M)
        put(out, gl, p_r @ v_r)                                    # out[G]
        put(lse, gl, lse_r, rows=False)                            # lse[G]
        return out.astype(dt, copy=False), lse.astype(dt, copy=False)


def backward(dout, ctx) -> dict:
    """Gradients from the ``WindowCtx`` of ``window.forward`` (same keys as the reference)."""
    q, k, v, lse, scale = ctx.q, ctx.k, ctx.v, ctx.lse, ctx.scale
    n, m = q.shape[-2], k.shape[-2]
    batch, gl = q.shape[:-2], ctx.glob
    plan = band_plan(q, k, window=ctx.window, dilation=ctx.dilation, glob=gl,
                     causal=ctx.causal, key_padding_mask=ctx.key_padding_mask,
                     rel_bias=ctx.rel_bias)
    dq, dk, dv, drel = _band.backward(plan, dout, ctx.out, lse, q, k, v, scale)
    key_ok = _band.key_ok(ctx.key_padding_mask, batch, m)
    grads = {"q": dq, "k": dk, "v": dv}
    dq_r, dk_r, dv_r = global_grads(grads, ctx)
    if gl.size:
        with blas_single_thread():                             # (forward's docstring)
            delta = np.sum(dout * ctx.out, axis=-1)                # (..., N) = Σ_j p dp
            # global columns — fwd: s_g = q @ k[G]ᵀ · scale, out += p_g @ v[G]
            k_g, v_g = rows_at(k, gl), rows_at(v, gl)              # (..., G, D), (..., G, Dv)
            s_g, ok_g = gcol_scores(q, k_g, gl, ctx.causal, key_ok, ctx.rel_bias, scale)
            p_g = exp_minus(s_g, lse, ok_g)                        # (..., N, G)
            put(dv, gl, p_g.swapaxes(-1, -2) @ dout, add=True)     # dv[G]
            ds_g = p_g * (dout @ v_g.swapaxes(-1, -2) - delta[..., None])
            dq += (ds_g @ k_g) * scale
            put(dk, gl, (ds_g.swapaxes(-1, -2) @ q) * scale, add=True)   # dk[G]
            # global rows — fwd: out[G] = softmax(q_r[G] @ k_rᵀ · scale) @ v_r,
            # (q_r, k_r, v_r) = (q, k, v), or the global projections
            q_r, k_r, v_r = global_qkv(q, k, v, ctx.q_global, ctx.k_global, ctx.v_global)
            q_rg, dout_g = rows_at(q_r, gl), rows_at(dout, gl)     # (..., G, D), (..., G, Dv)
            s_r, ok_r = grow_scores(q_rg, k_r, gl, ctx.causal, key_ok, ctx.rel_bias, scale)
            p_r = exp_minus(s_r, entries_at(lse, gl), ok_r)        # (..., G, M)
            dv_r += p_r.swapaxes(-1, -2) @ dout_g
            ds_r = softmax.backward(dout_g @ v_r.swapaxes(-1, -2), p_r)  # (..., G, M)
            put(dq_r, gl, (ds_r @ k_r) * scale, add=True)          # dq_r[G]
            dk_r += (ds_r.swapaxes(-1, -2) @ q_rg) * scale
    if ctx.rel_bias is not None:
        if gl.size:
            rel_bias_grad_gparts(drel, ds_g, ds_r, gl, n, m)
        grads["rel_bias"] = _checks.reduce_to_shape(drel, ctx.rel_bias.shape)
    return grads
