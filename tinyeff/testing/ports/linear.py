"""Port of ``linear`` (docs/semantics/linear.md): the dense kernelized form.

::

    φ(x) = elu(x) + 1 (default) or relu(x) + 1, on the raw q and k (no scale)
    w_ij = φ(q_i)·φ(k_j) [j ≤ i if causal]
    out_i = Σ_j w_ij v_j / (Σ_j w_ij + eps)          eps = 1e-6; normalize=False: numerator
"""

from __future__ import annotations

import math

import numpy as np

from . import SHARED_BUGS
from ._dense import kernelized

KERNEL_BUGS = {
    "nan_empty_rows": "no guard when the denominator is exactly 0 (eps = 0, no real key): NaN",
    "causal_bottom_right": "causal aligned bottom-right (j <= i + M - N) instead of top-left",
    "causal_exclusive": "causal prefix sums exclusive (j < i) instead of inclusive (j <= i)",
    "values_only_as_exact": "mask_mode='values_only' treated as 'exact' (padded keys also "
                            "leave the denominator)",
}

BUGS = {
    **SHARED_BUGS, **KERNEL_BUGS,
    "eps_inside_phi": "eps added to every feature (φ + eps) instead of to the denominator",
    "feature_map_ignored": "feature_map='relu' ignored (always elu + 1)",
    "scaled_q": "q multiplied by 1/sqrt(D) (linear has no scale)",
    "elu_grad_at_zero": "d(elu + 1)/dx taken as x + 1 instead of exp(x) for x <= 0",
}


def feature_map(x, name, bug):
    """φ(x) (..., L, D) and φ'(x) (elementwise)."""
    if name == "relu" and bug != "feature_map_ignored":
        return np.maximum(x, 0.0) + 1.0, (x > 0).astype(x.dtype)
    e = np.exp(np.minimum(x, 0.0))
    phi = np.where(x > 0, x + 1.0, e)
    dphi = np.where(x > 0, 1.0, x + 1.0 if bug == "elu_grad_at_zero" else e)
    return phi, dphi


def compute(x, options, dout, bug):
    q, k, v = x["q"], x["k"], x["v"]
    c = 1.0 / math.sqrt(q.shape[-1]) if bug == "scaled_q" else 1.0
    fm = options.get("feature_map", "elu")
    fq, dfq_dx = feature_map(q * c, fm, bug)                       # (..., N, D)
    fk, dfk_dx = feature_map(k, fm, bug)                           # (..., M, D)
    eps = options.get("eps", 1e-6)
    if bug == "eps_inside_phi":
        fq, fk, eps = fq + eps, fk + eps, 0.0
    out, dfq, dfk, dv = kernelized(
        fq, fk, v, dout, causal=options.get("causal", False),
        key_padding_mask=options.get("key_padding_mask"),
        mask_mode=options.get("mask_mode", "exact"), normalize=options.get("normalize", True),
        eps=eps, bug=bug)
    # fwd: φq = φ(q), φk = φ(k)
    return out, {"q": dfq * dfq_dx * c, "k": dfk * dfk_dx, "v": dv}
