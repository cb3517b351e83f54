"""Port of ``hierarchical`` (docs/semantics/hierarchical.md) in its dense form.

Every level-ℓ token t (ℓ = 0 … L) covers the span [t·2^ℓ, (t+1)·2^ℓ) ∩ [0, N); with
m_j the key padding::

    n_t  = Σ_{j ∈ span} m_j,   k̄_t = Σ m_j k_j / max(n_t, 1),   v̄_t likewise
    P(i) = fine keys of NF_0(i) ∪ level-ℓ spans ⊂ NF_ℓ(i) \\ NF_{ℓ−1}(i)   (ℓ = 1 … L)
    NF_ℓ(i) = [(β − w)·b·2^ℓ, (β + w + 1)·b·2^ℓ) ∩ [0, N),  β = ⌊i / (b·2^ℓ)⌋
    s_it = q_i·k̄_t·scale + log n_t    over t ∈ P(i) with n_t > 0 (causal: span ends ≤ i)
    out_i = softmax(s_i) v̄

L = min{L : b·2^L·(1 + w) ≥ N}, or ``levels`` clipped to it; w = 1 if neighbours else 0.
"""

from __future__ import annotations

import numpy as np

from . import SHARED_BUGS
from ._dense import default_scale, softmax_attention, swap_t
from .full import SOFTMAX_BUGS

BUGS = {
    **SHARED_BUGS, **SOFTMAX_BUGS,
    "no_log_count": "coarse logits without + log n",
    "count_includes_padding": "span means and log n count padded keys as real",
    "neighbours_ignored": "neighbours=False ignored (always the tri-diagonal near field)",
    "causal_fine_only": "causal applied to the fine keys only (future coarse spans kept)",
    "levels_ignored": "levels ignored (always L_full)",
    "short_span_count": "the last, shorter span of a level counted as 2^l keys (its mean and "
                        "log n use the nominal size, not the true count)",
}


def spans_and_members(n, options, bug):
    """``first, last, level (T,)`` of every token and ``member (N, T)``: token t ∈ P(i)."""
    b = options["block"]
    w = 1 if options.get("neighbours", True) or bug == "neighbours_ignored" else 0
    L = 0
    while b * 2**L * (1 + w) < n:
        L += 1
    if options.get("levels") is not None and bug != "levels_ignored":
        L = min(L, options["levels"])
    lvl = np.concatenate([np.full(-(-n // 2**l), l) for l in range(L + 1)])     # (T,)
    t = np.concatenate([np.arange(-(-n // 2**l)) for l in range(L + 1)])
    first = t * 2**lvl
    end = np.minimum(n, (t + 1) * 2**lvl)                          # exclusive
    i = np.arange(n)[:, None]                                      # (N, 1)

    def near(level):
        size = b * 2**level
        beta = i // size
        return np.maximum((beta - w) * size, 0), np.minimum(n, (beta + w + 1) * size)

    lo, hi = near(lvl[None, :])                                    # (N, T)
    member = (lo <= first) & (end <= hi)
    ilo, ihi = near(np.maximum(lvl - 1, 0)[None, :])
    member &= (lvl == 0) | (end <= ilo) | (first >= ihi)
    return first, end - 1, lvl, member


def compute(x, options, dout, bug):
    q, k, v = x["q"], x["k"], x["v"]
    n = q.shape[-2]
    scale = default_scale(q, options, bug)
    first, last, lvl, member = spans_and_members(n, options, bug)
    kpm = options.get("key_padding_mask")
    real = np.ones((1, n)) if kpm is None or bug == "count_includes_padding" else \
        np.asarray(kpm, dtype=np.float64)                          # (..., N)
    pos = np.arange(n)
    inspan = (first[:, None] <= pos[None, :]) & (pos[None, :] <= last[:, None])   # (T, N)
    weight = inspan * real[..., None, :]                           # (..., T, N)
    count = weight.sum(axis=-1)                                    # (..., T): n_t
    if bug == "short_span_count":
        count = np.where(count > 0, np.maximum(count, 2.0**lvl), 0.0)
    weight = (weight / np.maximum(count, 1.0)[..., None]).astype(q.dtype)
    kbar, vbar = weight @ k, weight @ v                            # (..., T, D), (..., T, Dv)
    logn = np.log(np.maximum(count, 1.0))[..., None, :].astype(q.dtype)   # (..., 1, T)
    if bug == "no_log_count":
        logn = np.zeros_like(logn)
    allowed = member & (count[..., None, :] > 0)                   # (..., N, T)
    if bug == "count_includes_padding" and kpm is not None:
        # (the bug keeps the padded fine keys out: only the spans' means include them)
        padded_key = ~np.asarray(kpm, dtype=bool)[..., first]      # (..., T)
        allowed = allowed & ~((lvl == 0) & padded_key)[..., None, :]
    if options.get("causal", False):
        past = last[None, :] <= pos[:, None]                       # (N, T)
        if bug == "causal_fine_only":
            past = past | (lvl > 0)[None, :]
        allowed = allowed & past
    out, dq, dkbar, dvbar, _ = softmax_attention(q, kbar, vbar, dout, scale=scale,
                                                 allowed=allowed, bias=logn, bug=bug)
    # fwd: k̄ = W k,  v̄ = W v
    return out, {"q": dq, "k": swap_t(weight) @ dkbar, "v": swap_t(weight) @ dvbar}
