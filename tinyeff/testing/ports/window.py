"""Port of ``window`` (docs/semantics/window.md): ``full`` with the Longformer mask

::

    band(i) = {i + t·d : |t| ≤ w, 0 ≤ j < M, j ∉ G}
    A(i)    = every key if i ∈ G, else band(i) ∪ G        (then ∧ causal ∧ key padding)
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
    """(N, M) boolean band ∪ global columns ∪ global rows."""
    w, d = options["window"], options.get("dilation", 1)
    if bug == "dilation_ignored":
        d = 1
    glob = options.get("global_indices")
    glob = np.zeros(0, dtype=int) if glob is None else np.asarray(glob, dtype=int).ravel()
    is_g = np.zeros(m, dtype=bool)
    is_g[glob] = True
    diff = np.arange(m)[None, :] - np.arange(n)[:, None]           # (N, M): j − i = t·d
    reach = w - 1 if bug == "window_off_by_one" else w
    band = (np.abs(diff) <= reach * d) & (diff % d == 0)
    if bug == "one_sided" and not options.get("causal", False):
        band &= diff <= 0
    in_band_g = band & is_g[None, :]
    band &= ~is_g[None, :]
    allowed = band | is_g[None, :]
    if bug != "no_global_rows":
        allowed[glob[glob < n], :] = True
    return allowed, in_band_g


def compute(x, options, dout, bug):
    n, m = x["q"].shape[-2], x["k"].shape[-2]
    scale = default_scale(x["q"], options, bug)
    pattern, in_band_g = window_mask(n, m, options, bug)
    allowed = allowed_pairs(x["q"], x["k"], options, bug, pattern)
    extra = None
    if bug == "global_double":
        glob_rows = np.zeros((n, 1), dtype=bool)
        g = options.get("global_indices")
        if g is not None:
            g = np.asarray(g, dtype=int).ravel()
            glob_rows[g[g < n]] = True
        extra = np.where(in_band_g & ~glob_rows, np.log(2.0), 0.0)   # weight 2 = + log 2
    return attend_with_biases(x, options, dout, bug, allowed, scale, extra)
