"""Port of ``linformer`` (docs/semantics/linformer.md)::

    K̃ = E · where(m, K, 0),  Ṽ = F · where(m, V, 0),  out = softmax(Q K̃ᵀ·scale) Ṽ
"""

from __future__ import annotations

import numpy as np

from . import SHARED_BUGS
from ._dense import default_scale, reduce_to, softmax_attention, swap_t
from .full import SOFTMAX_BUGS

# (no "nan_empty_rows": a Linformer row always has k >= 1 projected keys, never an empty row)
BUGS = {
    **SHARED_BUGS, **{k: d for k, d in SOFTMAX_BUGS.items() if k != "nan_empty_rows"},
    "padding_not_removed": "padded keys are not removed from E K and F V",
    "drop_grad_opt": "no gradient for F (returned as zeros)",
    "ef_swapped": "F projects the keys and E the values",
    "per_head_on_batch": "an (H, k, M) projection is broadcast along the first batch axis",
    "padding_keys_only": "padding removed from E K but not from F V",
}


def compute(x, options, dout, bug):
    q, k, v, E, F = x["q"], x["k"], x["v"], x["E"], x["F"]
    scale = default_scale(q, options, bug)
    if bug == "ef_swapped":
        E, F = F, E
    if bug == "per_head_on_batch" and q.ndim >= 4:
        E = E[:, None] if E.ndim == 3 else E
        F = F[:, None] if F.ndim == 3 else F
    kpm = options.get("key_padding_mask")
    m = None if kpm is None or bug == "padding_not_removed" else np.asarray(kpm)[..., None]
    k0 = k if m is None else np.where(m, k, 0.0)                   # (..., M, D)
    v0 = v if m is None or bug == "padding_keys_only" else np.where(m, v, 0.0)
    kt, vt = E @ k0, F @ v0                                        # (..., k, D), (..., k, Dv)
    out, dq, dkt, dvt, _ = softmax_attention(q, kt, vt, dout, scale=scale, allowed=True,
                                             bug=bug)
    # fwd: K̃ = E k0,  Ṽ = F v0
    dE = reduce_to(dkt @ swap_t(k0), E.shape)
    dF = reduce_to(dvt @ swap_t(v0), F.shape)
    dk0 = swap_t(E) @ dkt                                          # (..., M, D)
    dv0 = swap_t(F) @ dvt                                          # (..., M, Dv)
    # fwd: k0 = where(m, k, 0)
    dk = dk0 if m is None else np.where(m, dk0, 0.0)
    dv = dv0 if m is None or bug == "padding_keys_only" else np.where(m, dv0, 0.0)
    if bug == "per_head_on_batch" and q.ndim >= 4:
        dE = reduce_to(dE, x["E"].shape) if dE.shape != x["E"].shape else dE
        dF = reduce_to(dF, x["F"].shape) if dF.shape != x["F"].shape else dF
    if bug == "ef_swapped":
        dE, dF = dF, dE
    if bug == "drop_grad_opt":
        dF = np.zeros_like(dF)
    return out, {"q": dq, "k": dk, "v": dv, "E": dE, "F": dF}
