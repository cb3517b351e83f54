"""The conformance suite: the golden cases built to catch the mistakes real ports make.

Each variant's ``example_cases`` are small (N, M ≤ 13, D ≤ 5, batch (2, 2)) and drive the
contract tests.  The cases here are what a kernel port needs on top of them, for every
variant (SEMANTICS.md §3 lists them with the edge case each one pins):

* ``long_*`` — batch (1, 2), N and M between 256 and 300 and not multiples of 64 or of the
  variant's block, window or chunk (a port that is right only on its first tile of 64 or
  128 rows fails), D = 32 (64 for ``full``), Dv = 16 ≠ D, default ``scale``;
* ``heads_*`` — batch (2, 3) (B ≠ H: a batch/head mix-up changes shapes, which a (2, 2)
  batch hides), N ≠ M wherever the variant defines it, and rows with no admissible key;
* ``large_*_3d`` — 3-D inputs (B, N, D), and every admissible logit of many rows above 750
  (exp overflows in float64 above 709.78), so a port that skips the softmax
  max-subtraction overflows; ``lsh`` gets ‖qk‖ ≈ 1000 at its default scale 1; for
  ``linear`` and ``performer`` the inputs (and FAVOR+'s feature exponents) are that large
  instead.  These cases exist in float64 only: a float32 logit of 750 carries an absolute
  rounding error of ~1e-4, which moves the probabilities by more than float32's tolerance;
* a few small cases for the edge cases a page pins that the others do not reach
  (M = 0, N = 0, window 0, one segment, an odd block, ...).

The logits are made large without making the softmax ill-conditioned: every key gets
k[..., 0] = 1 and every query q[..., 0] = t_i / scale with t_i drawn in [T, T + 50), so each
row's logits are t_i plus the O(1) scores of the other coordinates (a per-row shift, which
softmax ignores), with T = 800; entries are multiples of 1/8 so that the logits are exact
in float64 whatever the summation order.

Shapes in the comments: B batch, H heads, N queries, M keys, D and Dv feature sizes.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from .. import masks
from ..attention import lsh as _lsh
from ..attention import performer as _performer
from ..attention._case import Case

#: logits (or inputs) of the large-value cases exceed this (exp overflows above 709.78)
LARGE = 800.0

#: long cases: batch (1, 2), N = LONG_N·size, M = LONG_M·size (lsh/hierarchical: M = N)
LONG_N, LONG_M = 267, 293


def _normal(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def _qkv(rng, batch, n, m, d, dv, dtype) -> dict[str, np.ndarray]:
    """Standard-normal q (*batch, n, d), k (*batch, m, d), v (*batch, m, dv)."""
    batch = tuple(batch)
    return {"q": _normal(rng, (*batch, n, d), dtype), "k": _normal(rng, (*batch, m, d), dtype),
            "v": _normal(rng, (*batch, m, dv), dtype)}


def _large_logits(rng, args: dict, scale: float, dtype) -> dict:
    """k[..., 0] = 1 and q[..., 0] = t_i / scale, t_i in [T, T + 50): every logit of row i
    is t_i + O(1) (see the module docstring).  Every entry of q and k is a multiple of 1/8
    and ``scale`` a power of 2, so where a logit is q·k·scale (full, sparse, window, local)
    it is exact in float64 in any summation order: the rounding of a logit of 800 (~1e-13)
    would otherwise reach dk[..., 0] (a sum of ds_ij·t_i) amplified by t, beyond float64's
    tolerance for some draws."""
    if math.frexp(scale)[0] != 0.5:
        raise ValueError(f"scale must be a power of 2 here, got {scale}")
    q = np.round(np.clip(args["q"].astype(np.float64), -4, 4) * 8) / 8
    k = np.round(np.clip(args["k"].astype(np.float64), -4, 4) * 8) / 8
    k[..., 0] = 1                                                  # (..., M)
    t = LARGE + np.round(50 * rng.random(q.shape[:-1]) * 8) / 8    # (..., N), multiples of 1/8
    q[..., 0] = t / scale
    return {**args, "q": q.astype(dtype), "k": k.astype(dtype)}


def _kpad(batch, m, padded) -> np.ndarray:
    """key_padding_mask with q.ndim − 1 dims: (B, 1, M) for (B, H) batches, (B, M) for 3-D;
    ``padded``: {batch item: index or slice of padded keys}."""
    shape = (batch[0], 1, m) if len(batch) == 2 else (batch[0], m)
    kpm = np.ones(shape, dtype=bool)
    for b, where in padded.items():
        kpm[b, ..., where] = False
    return kpm


def _rel_bias(rng, lead, n, m, dtype) -> np.ndarray:
    return _normal(rng, (*lead, n + m - 1), dtype)


def _size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be an integer >= 1, got {size!r}")
    return int(size)


# ----------------------------------------------------------------------------------------
# One function per variant: cases(rng, dtype, size) -> list[Case]
# ----------------------------------------------------------------------------------------

def full_cases(rng, dtype=np.float64, size=1) -> list[Case]:
    s = _size(size)
    n, m = LONG_N * s, LONG_M * s
    long = {**_qkv(rng, (1, 2), n, m, 64, 16, dtype),
            "rel_bias": _rel_bias(rng, (2,), n, m, dtype)}
    nh, mh = 131, 100
    heads = _qkv(rng, (2, 3), nh, mh, 16, 8, dtype)
    bias = _normal(rng, (3, nh, mh), dtype)                        # (H, N, M)
    bias[rng.random(bias.shape) < 0.1] = -np.inf                   # −inf entries are masks
    bias[:, 7] = -np.inf                                           # row 7: all −inf
    pairs = rng.random((nh, mh)) < 0.7
    pairs[[0, 65, 130]] = False                                    # rows with no allowed key
    nl, ml = 150, 141
    large = _qkv(rng, (2,), nl, ml, 16, 8, dtype)
    large = _large_logits(rng, large, 1 / 4, dtype)
    return [
        Case("long_causal_rel_bias", long,
             {"causal": True, "key_padding_mask": _kpad((1, 2), m, {0: slice(m - 9, m)})}),
        Case("heads_mask_bias", {**heads, "bias": bias},
             {"mask": pairs, "key_padding_mask": _kpad((2, 3), mh, {1: slice(0, 50)})}),
        Case("large_logits_3d", large,
             {"key_padding_mask": _kpad((2,), ml, {1: slice(None)})}),
        Case("no_keys", _qkv(rng, (2, 3), 5, 0, 4, 3, dtype), {}),
        Case("no_queries", _qkv(rng, (2, 3), 0, 6, 4, 3, dtype), {"causal": True}),
    ]


def sparse_cases(rng, dtype=np.float64, size=1) -> list[Case]:
    s = _size(size)
    n, m = LONG_N * s, LONG_M * s
    long_mask = masks.union(masks.local(n, 5, m=m), masks.random(n, 3, rng, m=m))
    long = {**_qkv(rng, (1, 2), n, m, 32, 16, dtype),
            "rel_bias": _rel_bias(rng, (2,), n, m, dtype)}
    nh, mh = 131, 117
    per_head = []
    for h in range(3):
        dense = (masks.local(nh, 2 + 3 * h, m=mh).toarray()
                 | (rng.random((nh, mh)) < 0.05))
        dense[rng.choice(nh, 4, replace=False)] = False            # empty rows
        per_head.append(sp.csr_array(dense))
    nl, ml = 150, 141
    pattern = rng.random((nl, ml)) < 0.3
    pattern[[3, 77]] = False
    large = _large_logits(rng, _qkv(rng, (2,), nl, ml, 16, 8, dtype), 1 / 4, dtype)
    return [
        Case("long_local_random_rel_bias", long,
             {"mask": long_mask, "key_padding_mask": _kpad((1, 2), m, {0: slice(m - 9, m)})}),
        Case("heads_per_head_causal", _qkv(rng, (2, 3), nh, mh, 16, 8, dtype),
             {"mask": per_head, "causal": True,
              "key_padding_mask": _kpad((2, 3), mh, {1: slice(0, 20)})}),
        Case("large_logits_3d", large, {"mask": sp.csr_array(pattern)}),
        Case("no_entries", _qkv(rng, (2, 3), 6, 5, 4, 3, dtype),
             {"mask": sp.csr_array((6, 5), dtype=bool)}),
        Case("no_keys", _qkv(rng, (2, 3), 4, 0, 4, 3, dtype),
             {"mask": sp.csr_array((4, 0), dtype=bool)}),
        Case("no_queries", _qkv(rng, (2, 3), 0, 5, 4, 3, dtype),
             {"mask": sp.csr_array((0, 5), dtype=bool)}),
    ]


def window_cases(rng, dtype=np.float64, size=1) -> list[Case]:
    s = _size(size)
    n, m = LONG_N * s, LONG_M * s
    long = {**_qkv(rng, (1, 2), n, m, 32, 16, dtype),
            "rel_bias": _rel_bias(rng, (2,), n, m, dtype)}
    nh, mh = 131, 100
    nl = 150
    large = _large_logits(rng, _qkv(rng, (2,), nl, nl, 16, 8, dtype), 1 / 4, dtype)
    return [
        Case("long_dilated_global_rel_bias", long,
             {"window": 5, "dilation": 2, "global_indices": [200, 0, 70],
              "key_padding_mask": _kpad((1, 2), m, {0: slice(m - 7, m)})}),
        Case("heads_causal_global", _qkv(rng, (2, 3), nh, mh, 16, 8, dtype),
             {"window": 7, "causal": True, "global_indices": [3],
              "key_padding_mask": _kpad((2, 3), mh, {1: [0, 1, 2, 50, 51]})}),
        Case("large_logits_3d", large,
             {"window": 9, "key_padding_mask": _kpad((2,), nl, {0: slice(40, 101)})}),
        Case("window_zero", _qkv(rng, (2, 3), 9, 9, 4, 3, dtype),
             {"window": 0, "global_indices": [2]}),
        Case("window_covers_all", _qkv(rng, (2, 3), 9, 12, 4, 3, dtype), {"window": 15}),
    ]


def local_cases(rng, dtype=np.float64, size=1) -> list[Case]:
    s = _size(size)
    n, m = LONG_N * s, LONG_M * s
    long = {**_qkv(rng, (1, 2), n, m, 32, 16, dtype),
            "rel_bias": _rel_bias(rng, (2,), n, m, dtype)}
    nh, mh = 131, 100                                              # N > M: segments past M
    nl = 150
    large = _large_logits(rng, _qkv(rng, (2,), nl, nl, 16, 8, dtype), 1 / 4, dtype)
    return [
        Case("long_lookaround_rel_bias", long,
             {"block": 24, "look_backward": 1, "look_forward": 1,
              "key_padding_mask": _kpad((1, 2), m, {0: slice(m - 9, m)})}),
        Case("heads_causal_tall", _qkv(rng, (2, 3), nh, mh, 16, 8, dtype),
             {"block": 16, "look_backward": 2, "causal": True,
              "key_padding_mask": _kpad((2, 3), mh, {1: slice(0, 40)})}),
        Case("large_logits_3d", large,
             {"block": 20, "key_padding_mask": _kpad((2,), nl, {1: slice(60, 100)})}),
        Case("block_diagonal", _qkv(rng, (2, 3), 13, 11, 4, 3, dtype),
             {"block": 4, "look_backward": 0, "look_forward": 0}),
        Case("one_segment", _qkv(rng, (2, 3), 9, 12, 4, 3, dtype), {"block": 16}),
    ]


def _linear_large(rng, batch, n, m, d, dv, dtype) -> dict:
    """q, k standard normal × T/2.5 (entries beyond ±T); v standard normal."""
    args = _qkv(rng, batch, n, m, d, dv, dtype)
    mult = LARGE / 2.5
    return {"q": (args["q"] * mult).astype(dtype), "k": (args["k"] * mult).astype(dtype),
            "v": args["v"]}


def _with_zeros(rng, args: dict, frac=0.1) -> dict:
    """Exact zeros in some entries of q and k (the kinks of relu+1 and elu+1)."""
    out = dict(args)
    for name in ("q", "k"):
        x = args[name].copy()
        x[rng.random(x.shape) < frac] = 0
        out[name] = x
    return out


def linear_cases(rng, dtype=np.float64, size=1) -> list[Case]:
    s = _size(size)
    n, m = LONG_N * s, LONG_M * s
    nh, mh = 131, 100
    nl, ml = 150, 141
    return [
        Case("long_causal", _with_zeros(rng, _qkv(rng, (1, 2), n, m, 32, 16, dtype)),
             {"causal": True, "key_padding_mask": _kpad((1, 2), m, {0: slice(m - 9, m)})}),
        Case("heads_relu_values_only", _with_zeros(rng, _qkv(rng, (2, 3), nh, mh, 16, 8, dtype)),
             {"feature_map": "relu", "mask_mode": "values_only",
              "key_padding_mask": _kpad((2, 3), mh, {1: slice(None)})}),
        Case("heads_causal_padded_prefix", _qkv(rng, (2, 3), nh, mh, 16, 8, dtype),
             {"causal": True, "key_padding_mask": _kpad((2, 3), mh, {0: slice(0, 30)})}),
        Case("large_inputs_3d", _linear_large(rng, (2,), nl, ml, 16, 8, dtype),
             {"key_padding_mask": _kpad((2,), ml, {1: slice(None)})}),
        Case("no_keys_eps0", _qkv(rng, (2, 3), 5, 0, 4, 3, dtype), {"eps": 0.0}),
        Case("no_queries", _qkv(rng, (2, 3), 0, 6, 4, 3, dtype), {"causal": True}),
    ]


def performer_cases(rng, dtype=np.float64, size=1) -> list[Case]:
    s = _size(size)
    n, m = LONG_N * s, LONG_M * s
    nh, mh = 131, 100
    nl, ml = 150, 141

    def omega(d, m_, orthogonal=True):
        return _performer.draw_random_options(rng, d, dtype, m=m_,
                                              orthogonal=orthogonal)["features"]

    heads = _qkv(rng, (2, 3), nh, mh, 16, 8, dtype)
    heads["q"][:, :, ::10] = 0                                     # ω·x̂ = 0: relu's kink
    large = _qkv(rng, (2,), nl, ml, 32, 8, dtype)
    # FAVOR+ exponents ω·x̂ − ‖x̂‖²/2 below −750 in many rows (x̂ = x/D^¼)
    large = {"q": (large["q"] * 20).astype(dtype), "k": (large["k"] * 20).astype(dtype),
             "v": large["v"]}
    return [
        Case("long_causal", _qkv(rng, (1, 2), n, m, 32, 16, dtype),
             {"features": omega(32, 64), "causal": True,
              "key_padding_mask": _kpad((1, 2), m, {0: slice(m - 9, m)})}),
        Case("heads_relu_values_only", heads,
             {"features": omega(16, 24), "kernel": "relu", "mask_mode": "values_only",
              "key_padding_mask": _kpad((2, 3), mh, {1: slice(None)})}),
        Case("heads_causal_padded_prefix", _qkv(rng, (2, 3), nh, mh, 16, 8, dtype),
             {"features": omega(16, 24, orthogonal=False), "causal": True,
              "key_padding_mask": _kpad((2, 3), mh, {0: slice(0, 30)})}),
        Case("large_inputs_3d", large,
             {"features": omega(32, 32), "key_padding_mask": _kpad((2,), ml, {1: slice(None)})}),
        Case("no_keys", _qkv(rng, (2, 3), 5, 0, 4, 3, dtype), {"features": omega(4, 6)}),
    ]


def linformer_cases(rng, dtype=np.float64, size=1) -> list[Case]:
    s = _size(size)
    n, m = LONG_N * s, LONG_M * s
    nh, mh = 131, 100
    nl, ml = 150, 141

    def proj(*shape):
        return (rng.standard_normal(shape) / math.sqrt(shape[-1])).astype(dtype)

    e_large = proj(20, ml)
    e_large = e_large - e_large.mean(-1, keepdims=True) + 1 / ml   # rows sum to 1: (E K)[:, 0] = 1
    large = _large_logits(rng, _qkv(rng, (2,), nl, ml, 16, 8, dtype), 1 / 4, dtype)
    shared = proj(24, mh)
    return [
        Case("long_per_head", {**_qkv(rng, (1, 2), n, m, 32, 16, dtype),
                               "E": proj(2, 40, m), "F": proj(40, m)},
             {"key_padding_mask": _kpad((1, 2), m, {0: slice(m - 9, m)})}),
        Case("heads_shared_kv", {**_qkv(rng, (2, 3), nh, mh, 16, 8, dtype),
                                 "E": shared, "F": shared.copy()},
             {"key_padding_mask": _kpad((2, 3), mh, {1: slice(None)})}),
        Case("large_logits_3d", {**large, "E": e_large.astype(dtype), "F": proj(20, ml)}, {}),
        Case("no_keys", {**_qkv(rng, (2, 3), 5, 0, 4, 3, dtype), "E": proj(3, 0),
                         "F": proj(3, 0)}, {}),
        Case("no_queries", {**_qkv(rng, (2, 3), 0, 6, 4, 3, dtype), "E": proj(3, 6),
                            "F": proj(3, 6)}, {}),
    ]


def _lsh_inputs(rng, batch, n, d, dv, n_hashes, n_buckets, dtype, margin=1e-3):
    """qk, v and rotations; rows of qk whose best two hash projections are closer than
    ``margin``·‖qk_i‖ are re-drawn, so a port that rounds the projections differently
    (another summation order) still finds the same buckets."""
    rot = _lsh.draw_random_options(rng, d, dtype, n_hashes=n_hashes,
                                   n_buckets=n_buckets)["rotations"]       # (D, r, nb/2)
    qk = _normal(rng, (*batch, n, d), dtype)
    for _ in range(200):
        proj = np.einsum("...nd,drh->...nrh", qk.astype(np.float64),
                         rot.astype(np.float64))                   # (..., N, r, nb/2)
        both = np.sort(np.concatenate([proj, -proj], axis=-1), axis=-1)
        gap = (both[..., -1] - both[..., -2]).min(-1)              # (..., N)
        bad = gap < margin * np.linalg.norm(qk.astype(np.float64), axis=-1)
        if not bad.any():
            break
        qk[bad] = _normal(rng, (int(bad.sum()), d), dtype)
    return qk, _normal(rng, (*batch, n, dv), dtype), rot


def lsh_cases(rng, dtype=np.float64, size=1) -> list[Case]:
    s = _size(size)
    n = 264 * s                                                    # 33·s chunks of 8
    q, v, rot = _lsh_inputs(rng, (1, 2), n, 32, 16, 2, 8, dtype)
    nh = 132
    qh, vh, roth = _lsh_inputs(rng, (2, 3), nh, 16, 8, 3, 6, dtype)
    qh[0, 1, 17] = 0                                               # a zero row: tie -> bucket 0
    nl = 144
    ql, vl, rotl = _lsh_inputs(rng, (2,), nl, 16, 8, 2, 4, dtype)
    # logits scale·qk_i·k̂_j with unit k̂: make ‖qk_i‖ ≈ 1000 at the default scale 1 (a large
    # `scale` instead would amplify the rounding of the one-hot rows' ~0 gradients of qk)
    norm = np.linalg.norm(ql.astype(np.float64), axis=-1)         # (B, N)
    ql = (ql * (1.25 * LARGE / np.median(norm))).astype(dtype)
    return [
        Case("long_two_rounds", {"q": q, "v": v},
             {"rotations": rot, "chunk_len": 8,
              "key_padding_mask": _kpad((1, 2), n, {0: slice(n - 9, n)})}),
        Case("heads_causal_dedup", {"q": qh, "v": vh},
             {"rotations": roth, "chunk_len": 12, "causal": True, "dedup": True,
              "key_padding_mask": _kpad((2, 3), nh, {1: slice(0, 3)})}),
        Case("large_logits_3d", {"q": ql, "v": vl},
             {"rotations": rotl, "chunk_len": 16,
              "key_padding_mask": _kpad((2,), nl, {1: slice(None)})}),
        Case("no_queries", {"q": _normal(rng, (2, 3, 0, 4), dtype),
                            "v": _normal(rng, (2, 3, 0, 3), dtype)},
             {"rotations": _normal(rng, (4, 1, 2), dtype), "chunk_len": 4}),
    ]


def hierarchical_cases(rng, dtype=np.float64, size=1) -> list[Case]:
    s = _size(size)
    n = LONG_N * s
    nh = 131
    kpad = _kpad((2, 3), nh, {0: slice(0, 10), 1: slice(16, 48)})
    nl = 150
    large = _large_logits(rng, _qkv(rng, (2,), nl, nl, 16, 8, dtype), 1 / 4, dtype)
    return [
        Case("long_all_levels", _qkv(rng, (1, 2), n, n, 32, 16, dtype),
             {"block": 16, "key_padding_mask": _kpad((1, 2), n, {0: slice(n - 9, n)})}),
        Case("heads_causal_no_neighbours", _qkv(rng, (2, 3), nh, nh, 16, 8, dtype),
             {"block": 8, "causal": True, "neighbours": False, "key_padding_mask": kpad}),
        Case("large_logits_3d", large, {"block": 10, "levels": 2}),
        Case("odd_block_no_levels", _qkv(rng, (2, 3), 23, 23, 4, 3, dtype),
             {"block": 5, "levels": 0}),
        Case("block_covers_all", _qkv(rng, (2, 3), 9, 9, 4, 3, dtype), {"block": 12}),
        Case("no_queries", _qkv(rng, (2, 3), 0, 0, 4, 3, dtype), {"block": 4}),
    ]


#: variant name -> its conformance cases(rng, dtype, size)
SUITES = {"full": full_cases, "sparse": sparse_cases, "window": window_cases,
          "local": local_cases, "linear": linear_cases, "performer": performer_cases,
          "linformer": linformer_cases, "lsh": lsh_cases, "hierarchical": hierarchical_cases}


def suite_cases(variant: str, rng: np.random.Generator, dtype=np.float64,
                size: int = 1) -> list[Case]:
    """The conformance cases of ``variant`` (empty for a variant without a suite).

    In float32 the ``large_*`` cases are left out (module docstring); the other cases draw
    the same numbers from ``rng`` in either dtype, so float32 inputs are the float64 ones
    rounded.
    """
    fn = SUITES.get(variant)
    if fn is None:
        return []
    cases = fn(rng, np.dtype(dtype), _size(size))
    if np.dtype(dtype) != np.float64:
        cases = [c for c in cases if not c.name.startswith("large_")]
    return cases
