"""Port of ``sparse`` (docs/semantics/sparse.md): ``full`` with the CSR pattern as a dense mask.

A list of H patterns is one per head: pattern h serves batch index ``[..., h]`` (the last
batch axis).
"""

from __future__ import annotations

import numpy as np

from . import SHARED_BUGS
from ._dense import default_scale, dense_mask
from .full import SOFTMAX_BUGS, allowed_pairs, attend_with_biases

BUGS = {
    **SHARED_BUGS, **SOFTMAX_BUGS,
    "causal_bottom_right": "causal aligned bottom-right (j <= i + M - N) instead of top-left",
    "rel_bias_sign": "rel_bias read at j - i + N - 1 instead of i - j + M - 1",
    "drop_grad_opt": "no gradient for rel_bias (returned as zeros)",
    "per_head_first_axis": "a list of per-head patterns is applied along the first batch axis",
    "causal_ignored": "causal=True is ignored when a pattern is given",
}


def pattern_of(options, ndim, bug):
    """The allowed pattern: (N, M), or (H, N, M) for a list of per-head patterns."""
    mask = options["mask"]
    if isinstance(mask, (list, tuple)):
        pat = np.stack([dense_mask(p) for p in mask])              # (H, N, M)
        if bug == "per_head_first_axis" and ndim >= 4:
            pat = pat.reshape((pat.shape[0],) + (1,) * (ndim - 3) + pat.shape[1:])
        return pat
    return dense_mask(mask)                                        # (N, M)


def compute(x, options, dout, bug):
    scale = default_scale(x["q"], options, bug)
    opts = {k: v for k, v in options.items() if k != "mask"}
    if bug == "causal_ignored":
        opts.pop("causal", None)
    allowed = allowed_pairs(x["q"], x["k"], opts, bug, pattern_of(options, x["q"].ndim, bug))
    return attend_with_biases(x, options, dout, bug, allowed, scale)
