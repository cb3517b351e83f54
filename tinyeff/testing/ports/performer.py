"""Port of ``performer`` (docs/semantics/performer.md): FAVOR+ features into the dense form.

::

    x̂ = √scale·x                                         scale = 1/sqrt(D) by default
    softmax kernel: φ(x)_f = m^(−1/2) exp(ω_f·x̂ − ‖x̂‖²/2)  (ω: features, (m, D))
    relu kernel:    φ(x)   = relu(ω x̂) + kernel_eps       (ω = I when features is None)
    then ``linear``'s kernelized form with eps = 0 by default.

The softmax features are stabilized exactly: φ(q_i) = e^{c_i} φ̃(q_i) with c_i the row max
of the exponents, φ(k_j) = e^{C} φ̃(k_j) with C the max over every key of the batch entry;
the constants are pulled out of numerator and denominator, so ``eps`` becomes
eps·e^{−c_i−C} and an unnormalized output is multiplied by e^{c_i+C}.  The function is the
unstabilized one (c, C cancel exactly, so they are constants of the backward).
"""

from __future__ import annotations

import math

import numpy as np

from . import SHARED_BUGS
from ._dense import default_scale, kernelized
from .linear import KERNEL_BUGS

BUGS = {
    **SHARED_BUGS, **KERNEL_BUGS,
    "default_scale": "scale defaults to 1.0 instead of 1/sqrt(D)",
    "favor_no_sq": "FAVOR+ features without the −‖x̂‖²/2 term",
    "eps_inside_phi": "eps added to every (stabilized) feature instead of to the denominator",
    "scale_on_q_only": "scale applied to q only (q̂ = scale·q, k̂ = k) instead of √scale to both",
    "no_m_norm": "features not divided by sqrt(m)",
    "relu_no_kernel_eps": "relu kernel without + kernel_eps",
    "no_stabilizer": "softmax features exp(ω x̂ − ‖x̂‖²/2) without the max shift: overflow "
                     "or underflow to 0 for large inputs",
}


def features(x, omega, kernel, root, options, bug, per_row: bool):
    """φ̃(x) (..., L, m), the log-scale pulled out ((..., L, 1) or (..., 1, 1)), and the VJP
    ``back(dφ̃) -> dx``."""
    xh = x * root                                                  # (..., L, D)
    u = xh @ omega.T                                               # (..., L, m)
    nf = omega.shape[0]
    if kernel == "relu":
        keps = 0.0 if bug == "relu_no_kernel_eps" else options.get("kernel_eps", 1e-3)
        phi = np.maximum(u, 0.0) + keps
        pos = u > 0

        def back(dphi):
            # fwd: φ = relu(ω x̂) + kernel_eps
            return ((dphi * pos) @ omega) * root
        return phi, np.zeros(x.shape[:-2] + (1, 1)), back
    sq = 0.0 if bug == "favor_no_sq" else (xh * xh).sum(axis=-1, keepdims=True) / 2
    norm = 0.0 if bug == "no_m_norm" else 0.5 * math.log(nf)
    lg = u - sq - norm                                             # (..., L, m) log φ
    if per_row:
        c = lg.max(axis=-1, keepdims=True)                         # (..., L, 1)
    else:
        c = lg.max(axis=(-2, -1), keepdims=True) if lg.shape[-2] else np.zeros(
            lg.shape[:-2] + (1, 1))                                # (..., 1, 1)
    if bug == "no_stabilizer":
        c = np.zeros_like(c)
    with np.errstate(over="ignore"):
        phi = np.exp(lg - c)                                       # (..., L, m)

    def back(dphi):
        # fwd: φ̃ = exp(ω x̂ − ‖x̂‖²/2 − log √m − c)   (c a constant)
        dlg = dphi * phi                                           # (..., L, m)
        dxh = dlg @ omega                                          # (..., L, D)
        if bug != "favor_no_sq":
            dxh = dxh - dlg.sum(axis=-1, keepdims=True) * xh
        return dxh * root
    return phi, c, back


def compute(x, options, dout, bug):
    q, k, v = x["q"], x["k"], x["v"]
    d = q.shape[-1]
    scale = default_scale(q, options, bug)
    kernel = options.get("kernel", "softmax")
    omega = options.get("features")
    omega = np.eye(d, dtype=q.dtype) if omega is None else omega
    rq = rk = math.sqrt(scale)
    if bug == "scale_on_q_only":
        rq, rk = scale, 1.0
    fq, cq, back_q = features(q, omega, kernel, rq, options, bug, per_row=True)
    fk, ck, back_k = features(k, omega, kernel, rk, options, bug, per_row=False)
    eps = options.get("eps", 0.0)
    if bug == "eps_inside_phi":
        fq, fk, eps = fq + eps, fk + eps, 0.0
    normalize = options.get("normalize", True)
    logc = cq + ck                                                 # (..., N, 1)
    with np.errstate(over="ignore"):
        # the pulled-out e^{c_i + C}: eps·e^{−c_i−C} in the denominator (0 stays 0), or
        # a factor of the unnormalized output
        eps_row = eps * np.exp(-logc) if eps else 0.0
        out_scale = None if normalize else np.exp(logc)
    out, dfq, dfk, dv = kernelized(
        fq, fk, v, dout, causal=options.get("causal", False),
        key_padding_mask=options.get("key_padding_mask"),
        mask_mode=options.get("mask_mode", "exact"), normalize=normalize, eps=eps_row,
        out_scale=out_scale, bug=bug)
    return out, {"q": back_q(dfq), "k": back_k(dfk), "v": dv}
