"""Port of ``local`` (docs/semantics/local.md): ``full`` with the segment mask

::

    σ(p) = ⌊p / block⌋;   A(i) = {j : σ(i) − b ≤ σ(j) ≤ σ(i) + f}   (then ∧ causal ∧ padding)
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
    "look_swapped": "look_backward and look_forward swapped",
    "look_forward_one": "look_forward defaults to 1 (lucidrains' non-causal default), not 0",
    "segment_off_by_one": "one look-back segment too few (σ(j) > σ(i) − b)",
}


def segment_mask(n, m, options, bug):
    blk = options["block"]
    back = options.get("look_backward", 1)
    fwd = options.get("look_forward", 1 if bug == "look_forward_one" else 0)
    if bug == "look_swapped":
        back, fwd = fwd, back
    seg_q, seg_k = np.arange(n)[:, None] // blk, np.arange(m)[None, :] // blk
    low = seg_k > seg_q - back if bug == "segment_off_by_one" else seg_k >= seg_q - back
    return low & (seg_k <= seg_q + fwd)                            # (N, M)


def compute(x, options, dout, bug):
    n, m = x["q"].shape[-2], x["k"].shape[-2]
    scale = default_scale(x["q"], options, bug)
    allowed = allowed_pairs(x["q"], x["k"], options, bug, segment_mask(n, m, options, bug))
    return attend_with_biases(x, options, dout, bug, allowed, scale)
