"""Port of ``full`` (SEMANTICS.md §6): one dense softmax over the allowed pairs.

::

    s    = (q kᵀ)·scale + bias + R          R_ij = rel_bias[..., i − j + M − 1]
    A    = mask ∧ key_padding_mask ∧ (j ≤ i if causal) ∧ (s ≠ −∞)
    out  = softmax_A(s) v                   (a row with empty A: 0)
"""

from __future__ import annotations

import numpy as np

from . import SHARED_BUGS
from ._dense import (
    causal_mask,
    default_scale,
    dense_mask,
    key_mask,
    reduce_to,
    rel_bias_dense,
    rel_bias_grad,
    softmax_attention,
)

SOFTMAX_BUGS = {
    "nan_empty_rows": "plain softmax: a row with no admissible key gives 0/0 = NaN, not 0",
    "no_max_sub": "exp(s) without subtracting the row max: overflows for logits above ~709",
    "default_scale": "scale defaults to 1.0 instead of 1/sqrt(D)",
}

BUGS = {
    **SHARED_BUGS, **SOFTMAX_BUGS,
    "causal_bottom_right": "causal aligned bottom-right (j <= i + M - N) instead of top-left",
    "rel_bias_sign": "rel_bias read at j - i + N - 1 instead of i - j + M - 1",
    "drop_grad_opt": "no gradient for bias / rel_bias (returned as zeros)",
    "bias_grad_head0": "bias gradient taken from the first batch index instead of summed",
}


def allowed_pairs(q, k, options, bug, pattern=None):
    """(..., N, M) boolean A before the −∞ test: pattern ∧ mask ∧ key padding ∧ causal."""
    n, m = q.shape[-2], k.shape[-2]
    allowed = np.ones((n, m), dtype=bool) if pattern is None else pattern
    if options.get("mask") is not None:
        allowed = allowed & dense_mask(options["mask"])
    kpm = key_mask(options)
    if kpm is not None:
        allowed = allowed & kpm
    if options.get("causal", False):
        allowed = allowed & causal_mask(n, m, bug)
    return allowed


def attend_with_biases(x, options, dout, bug, allowed, scale, extra_bias=None):
    """Softmax attention of q, k, v with ``bias`` / ``rel_bias`` from ``x``; grads of all."""
    q, k, v = x["q"], x["k"], x["v"]
    n, m = q.shape[-2], k.shape[-2]
    total = extra_bias
    if x.get("bias") is not None:
        total = x["bias"] if total is None else total + x["bias"]
    if x.get("rel_bias") is not None:
        r = rel_bias_dense(x["rel_bias"], n, m, bug)               # (..., N, M)
        total = r if total is None else total + r
    out, dq, dk, dv, ds = softmax_attention(q, k, v, dout, scale=scale, allowed=allowed,
                                            bias=total, bug=bug)
    grads = {"q": dq, "k": dk, "v": dv}
    # fwd: s += bias (broadcast)
    if "bias" in x:
        grads["bias"] = (ds[(0,) * (ds.ndim - x["bias"].ndim)] if bug == "bias_grad_head0"
                         and ds.ndim > x["bias"].ndim else reduce_to(ds, x["bias"].shape))
    # fwd: s += R
    if "rel_bias" in x:
        grads["rel_bias"] = rel_bias_grad(ds, x["rel_bias"].shape, n, m, bug)
    if bug == "drop_grad_opt":
        for name in ("bias", "rel_bias"):
            if name in grads:
                grads[name] = np.zeros_like(grads[name])
    return out, grads


def compute(x, options, dout, bug):
    scale = default_scale(x["q"], options, bug)
    allowed = allowed_pairs(x["q"], x["k"], options, bug)
    return attend_with_biases(x, options, dout, bug, allowed, scale)
