"""Port of ``lsh`` (docs/semantics/lsh.md) as ONE softmax over the union of the rounds.

Hashing, sorting and chunking only decide *which* pairs meet; they are not differentiable.
With N_ij = how often key j occurs in the chunk windows of query i over all rounds (a window
is the query's chunk and the chunk before it, cyclically over the concatenated rounds), the
log-sum-exp combination of the rounds is one softmax over the multiset union::

    k̂_j  = qk_j / √(‖qk_j‖² + D·1e-6)
    s_ij = scale·qk_i·k̂_j + log N_ij       (log 1 = 0 with dedup: N_ij -> [N_ij > 0])
    s_ii = −1e5 + log N_ii                 (the self logit is replaced, a constant)
    A(i) = {j : N_ij > 0} ∧ (j ≤ i if causal) ∧ key padding
    out  = softmax_A(s) v                  (self-only in every round: v_i; empty: 0)

scale defaults to 1.0.  Buckets: h_r(x) = argmax([x R_r; −x R_r]) (first maximum), padded
positions -> bucket nb, stable sort by bucket within each round.
"""

from __future__ import annotations

import math

import numpy as np

from . import SHARED_BUGS
from ._dense import default_scale, softmax_attention
from .full import SOFTMAX_BUGS

SELF_LOGIT = -1e5
KEY_EPS = 1e-6

BUGS = {
    **SHARED_BUGS, **SOFTMAX_BUGS,
    "default_scale": "scale defaults to 1/sqrt(D) instead of 1.0",
    "self_mask_missing": "the self logit is the plain score instead of −1e5",
    "self_excluded": "the self entry is masked out (−inf) instead of −1e5: self-only rows "
                     "give 0 instead of v_i",
    "rounds_mean": "rounds combined by the mean of their outputs instead of by log-sum-exp",
    "dedup_ignored": "dedup=True ignored (duplicates counted)",
    "no_key_norm": "keys not normalized (k̂ = qk)",
    "hash_no_negative": "bucket = argmax(x R) instead of argmax([x R; −x R])",
    "not_cyclic": "the first chunk does not look back at the last chunk",
}


def bucket_ids(qk, options, bug):
    """(..., r, N) bucket of every position in every round (padded -> nb)."""
    n = qk.shape[-2]
    if options.get("buckets") is not None:
        buckets = np.asarray(options["buckets"]).copy()
        nb = options.get("n_buckets") or 2 * np.asarray(options["rotations"]).shape[2]
    else:
        rot = np.asarray(options["rotations"], dtype=np.float64)  # (D, r, nb/2)
        nb = 2 * rot.shape[2]
        proj = np.einsum("...nd,drh->...rnh", qk.astype(np.float64), rot)   # (..., r, N, nb/2)
        both = proj if bug == "hash_no_negative" else np.concatenate([proj, -proj], axis=-1)
        buckets = np.argmax(both, axis=-1)                         # first maximum
    kpm = options.get("key_padding_mask")
    if kpm is not None:
        real = np.asarray(kpm, dtype=bool)[..., None, :]           # (..., 1, N)
        buckets = np.where(real, buckets, nb)
    return np.broadcast_to(buckets, qk.shape[:-2] + buckets.shape[-2:]), n


def round_counts(buckets, n, c, bug):
    """(..., r, N, N): how often key j is in the window of query i's chunk in round ρ."""
    r = buckets.shape[-2]
    perm = np.argsort(buckets, axis=-1, kind="stable")             # (..., r, N) stable sort
    slots = perm.reshape(perm.shape[:-2] + (r * n,))               # position at each slot
    t_count = r * n // c
    t = np.arange(t_count)
    prev = (t - 1) % t_count
    qslot = (t[:, None] * c + np.arange(c)[None, :])               # (T, c)
    kslot = np.concatenate([prev[:, None] * c + np.arange(c), qslot], axis=1)   # (T, 2c)
    if bug == "not_cyclic":
        kslot[0, :c] = -1                                          # chunk 0: no look-back
    rnd = (t * c) // n                                             # round of chunk t
    counts = np.zeros(buckets.shape[:-2] + (r * n * n,))
    for idx in np.ndindex(*buckets.shape[:-2]):
        pos = slots[idx]                                           # (r·N,)
        qi = np.broadcast_to(pos[qslot][:, :, None], (t_count, c, 2 * c))
        kj = np.where(kslot >= 0, pos[kslot], -1)[:, None, :]
        kj = np.broadcast_to(kj, (t_count, c, 2 * c))
        ro = np.broadcast_to(rnd[:, None, None], (t_count, c, 2 * c))
        keep = kj >= 0
        flat = (ro * n * n + qi * n + kj)[keep]
        counts[idx] = np.bincount(flat, minlength=r * n * n)
    return counts.reshape(buckets.shape[:-2] + (r, n, n))


def compute(x, options, dout, bug):
    qk, v = x["q"], x["v"]
    n, d = qk.shape[-2:]
    scale = default_scale(qk, options, bug, contract=1.0, wrong=1.0 / math.sqrt(d))
    buckets, n = bucket_ids(qk, options, bug)
    per_round = round_counts(buckets, n, options["chunk_len"], bug)   # (..., r, N, N)
    if options.get("dedup", False) and bug != "dedup_ignored":
        per_round = per_round / np.maximum(per_round.sum(axis=-3, keepdims=True), 1.0)
    # fwd: k̂ = qk / √(‖qk‖² + D·ε)
    if bug == "no_key_norm":
        rn = np.ones(qk.shape[:-1] + (1,))
    else:
        rn = np.sqrt((qk * qk).sum(axis=-1, keepdims=True) + d * KEY_EPS)   # (..., N, 1)
    khat = qk / rn                                                 # (..., N, D)
    base = np.ones((n, n), dtype=bool)
    if options.get("causal", False):
        base &= np.tri(n, n, dtype=bool)
    kpm = options.get("key_padding_mask")
    if kpm is not None:
        base = base & np.asarray(kpm, dtype=bool)[..., None, :]
    eye = np.eye(n, dtype=bool)
    fixed = None
    if bug == "self_excluded":
        base = base & ~eye
    elif bug != "self_mask_missing":
        fixed = eye

    def attend(counts):
        allowed = base & (counts > 0)
        with np.errstate(divide="ignore"):
            logn = np.log(np.where(counts > 0, counts, 1.0))       # (..., N, N)
        fx = None if fixed is None else (fixed, SELF_LOGIT + logn)
        return softmax_attention(qk, khat, v, dout, scale=scale, allowed=allowed, bias=logn,
                                 fixed=fx, bug=bug)

    if bug == "rounds_mean":
        r = per_round.shape[-3]
        parts = [attend(per_round[..., rho, :, :]) for rho in range(r)]
        out, dq, dk, dv = (sum(p[i] for p in parts) / r for i in range(4))
    else:
        out, dq, dk, dv, _ = attend(per_round.sum(axis=-3))
    # fwd: k̂ = qk / rn
    dqk_k = dk / rn - qk * (dk * qk).sum(axis=-1, keepdims=True) / rn**3
    if bug == "no_key_norm":
        dqk_k = dk
    return out, {"q": dq + dqk_k, "v": dv}

