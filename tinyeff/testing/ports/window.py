"""Port of ``window`` (docs/semantics/window.md): ``full`` with the Longformer mask

::

    band(i) = {i + t·d : |t| ≤ w, 0 ≤ j < M, j ∉ G}
    A(i)    = every key if i ∈ G, else band(i) ∪ G        (then ∧ causal ∧ key padding)

G is ``global_indices`` (one set) or ``global_mask`` (one set per batch item).  With the
global projections ``q_global``, ``k_global``, ``v_global`` the rows i ∈ G use them
(score q_global_i·k_global_j, value v_global_j) and every other row uses q, k, v.
"""

from __future__ import annotations

import numpy as np

from . import SHARED_BUGS
from ._dense import default_scale
from .full import SOFTMAX_BUGS, allowed_pairs, attend_with_biases

BUGS = {
    **SHARED_BUGS, **SOFTMAX_BUGS,
    "causal_bottom_right": "causal aligned bottom-right (j <= i + M - N) instead of top-left",
    "rel_bias_sign": "rel_bias read at j - i + N - 1 instead of i - j + M - 1",
    "drop_grad_opt": "no gradient for rel_bias (returned as zeros)",
    "window_off_by_one": "band |t| < w instead of |t| <= w",
    "one_sided": "band t = -w ... 0 only (a one-sided window) when not causal",
    "dilation_ignored": "dilation ignored (d = 1)",
    "no_global_rows": "global rows do not see every key (only global columns are added)",
    "global_double": "a global key inside the band is counted twice (band and global parts "
                     "concatenated without removing G from the band)",
}


def window_mask(n, m, options, bug):
    """The window pattern: ``allowed`` (..., N, M) = band ∪ global columns ∪ global rows,
    ``rows`` (..., N, 1) the global rows, and the band entries that are global keys."""
    w, d = options["window"], options.get("dilation", 1)
    if bug == "dilation_ignored":
        d = 1
    lim = min(n, m)
    if options.get("global_mask") is not None:                    # per batch item
        rows = np.asarray(options["global_mask"], dtype=bool)      # (..., N)
    else:
        glob = options.get("global_indices")
        rows = np.zeros(n, dtype=bool)                             # (N,)
        if glob is not None:
            rows[np.asarray(glob, dtype=int).ravel()] = True
    cols = np.zeros(rows.shape[:-1] + (m,), dtype=bool)            # (..., M)
    cols[..., :lim] = rows[..., :lim]
    diff = np.arange(m)[None, :] - np.arange(n)[:, None]           # (N, M): j − i = t·d
    reach = w - 1 if bug == "window_off_by_one" else w
    band = (np.abs(diff) <= reach * d) & (diff % d == 0)           # (N, M)
    if bug == "one_sided" and not options.get("causal", False):
        band &= diff <= 0
    in_band_g = band & cols[..., None, :]                          # (..., N, M)
    allowed = (band & ~cols[..., None, :]) | cols[..., None, :]
    rows = rows[..., :, None]                                      # (..., N, 1)
    if bug != "no_global_rows":
        allowed = allowed | rows
    return allowed, rows, in_band_g


def compute(x, options, dout, bug):
    n, m = x["q"].shape[-2], x["k"].shape[-2]
    scale = default_scale(x["q"], options, bug)
    pattern, rows, in_band_g = window_mask(n, m, options, bug)
    extra = None
    if bug == "global_double":
        extra = np.where(in_band_g & ~rows, np.log(2.0), 0.0)      # weight 2 = + log 2
    if "q_global" not in x:
        allowed = allowed_pairs(x["q"], x["k"], options, bug, pattern)
        return attend_with_biases(x, options, dout, bug, allowed, scale, extra)
    # Longformer's global projections: the global rows attend with q_global, k_global,
    # v_global to every key; every other row with q, k, v (global key columns included).
    # The two row sets are disjoint, so out = out_local + out_global.
    local = {name: x[name] for name in ("q", "k", "v", "rel_bias") if name in x}
    glob = {"q": x["q_global"], "k": x["k_global"], "v": x["v_global"]}
    if "rel_bias" in x:
        glob["rel_bias"] = x["rel_bias"]
    allowed_l = allowed_pairs(x["q"], x["k"], options, bug, pattern & ~rows)
    every_key = np.broadcast_to(rows, rows.shape[:-1] + (m,))     # (..., N, M)
    allowed_g = allowed_pairs(x["q"], x["k"], options, bug, every_key)
    out_l, grads = attend_with_biases(local, options, dout, bug, allowed_l, scale, extra)
    out_g, grads_g = attend_with_biases(glob, options, dout, bug, allowed_g, scale)
    for name in ("q", "k", "v"):
        grads[f"{name}_global"] = grads_g[name]
    if "rel_bias" in grads:
        grads["rel_bias"] = grads["rel_bias"] + grads_g["rel_bias"]
    return out_l + out_g, grads
