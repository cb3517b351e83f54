"""Kernelized ("linear") attention in O(N) time: φ(Q) (φ(K)ᵀ V), causal and not.

Katharopoulos et al., "Transformers are RNNs: Fast Autoregressive Transformers with Linear
Attention", ICML 2020.  Replacing exp(q·k) by a feature dot product φ(q)·φ(k) lets the sum
over keys be taken once:

    kv    = Σ_j φ(k_j) v_jᵀ                       (..., F, Dv)
    z     = Σ_j φ(k_j)                            (..., F)
    out_i = φ(q_i) kv / (φ(q_i)·z + eps)          (..., N, Dv)          normalize=True
    out_i = φ(q_i) kv                                                     normalize=False

Causal (query i sees keys j ≤ i): the same with prefix sums,

    S_i = Σ_{j≤i} φ(k_j) v_jᵀ,   z_i = Σ_{j≤i} φ(k_j),   out_i = φ(q_i) S_i / (φ(q_i)·z_i + eps).

Cost O(N·F·Dv) time; memory O(N·(F + Dv) + F·Dv) beyond the inputs: the N×F×Dv stack of
prefix states is never built (the backward runs the prefix sums again, forward for dq and
in reverse for dk, dv; see :mod:`tinyeff.attention._linear_engine`).

Shapes: q (..., N, D), k (..., M, D), v (..., M, Dv); F = D features for the maps here
(m for :mod:`tinyeff.attention.performer`, which runs on the same engine).

Options
-------
feature_map : "elu" (default) | "relu".  φ(x) = elu(x) + 1 (Katharopoulos et al.,
    fast-transformers, LRA) or φ(x) = relu(x) + 1 (a non-negative alternative).  elu + 1 is
    the default: it is what the paper and every public implementation use, it is strictly
    positive and its derivative is continuous (relu + 1 has a kink at 0 and maps every
    negative coordinate to the same feature).  φ acts on the raw q and k: there is **no
    ``scale`` option** (the contract's 1/√D does not apply; fast-transformers uses none either).
causal : bool, default False.  Query i sees keys j ≤ i.  For N != M the alignment is
    *top-left*, as in :mod:`tinyeff.attention.full` and PyTorch's ``is_causal``: row i sees
    keys 0 … min(i, M − 1).  Causal outputs do not depend on later tokens:
    f(x)[:t] == f(x[:t]).
key_padding_mask : boolean (..., M), one dimension per batch dimension (size 1
    broadcasts), True = real key (``KEY_PADDING``).  None = every key is real.
mask_mode : "exact" (default) | "values_only".  "exact" removes a padded key from the
    numerator *and* the denominator (φ(k_j) is zeroed, as fast-transformers does), so the
    output does not depend on how much padding there is.  "values_only" zeroes v_j only, as
    the Performer implementations (google-research, performer-pytorch) do: the padded key
    still counts in the denominator φ(q_i)·z.
normalize : bool, default True.  False gives the unnormalized φ(Q)(φ(K)ᵀV) of the design
    document (eps is then unused).
eps : float ≥ 0, default 1e-6.  Added to the scalar denominator: out_i = num_i / (den_i + eps)
    with den_i = φ(q_i)·z_i, in the input dtype, exactly fast-transformers' placement.
impl : "auto" | "ref" | "numba".  "ref" is the readable NumPy path below (whole arrays;
    causal as a Python loop over positions).  "numba" runs fused kernels, which form the
    features next to the products instead of storing them: causal, one scan each for the
    forward, dq and dk/dv with one (F, Dv) state per batch slice; non-causal, one pass over
    the keys and one over the queries each way, the chunks' products in BLAS
    (:mod:`tinyeff.attention._linear_engine`).  "auto" = "numba".

Edge cases
----------
* A query that sees no real key (every key padded, or M = 0) outputs 0 with 0 gradient;
  so does a row whose denominator is exactly 0 (only possible with eps = 0 and features
  underflowing, see Performer).
* NaN in q_i makes row i NaN; NaN in a real k_j or v_j makes every row that sees j NaN.
* N = 0 gives an empty output.

The engine
----------
:mod:`tinyeff.attention._linear_engine` (shared with :mod:`tinyeff.attention.performer`)
runs this formula for features in stabilized form φ(x) = f · exp(ℓ); ℓ = 0 for elu and relu,
so it is the plain formula above, bit for bit.  The reference below reads it top to bottom:
:func:`_forward_ref` builds the features and the sums, :func:`_backward_ref` inverts them.

Peers: fast-transformers' ``LinearAttention``/``CausalLinearAttention`` = feature_map="elu",
eps=1e-6, mask_mode="exact" (its causal path requires N = M).  LRA's linear_transformer is
the same.
"""

from __future__ import annotations

import functools

import numpy as np

from .. import _checks
from .._random import random_qkv
from ..ops.feature_maps import FeatureMap
from . import _linear_engine as engine
from . import _nonfinite
from ._case import Case
from ._linear_engine import LinearCtx

NAME = "linear"
SUPPORTS_MASK = True
SUPPORTS_CAUSAL = True
SUPPORTS_BIAS = False
SUPPORTS_REL_BIAS = False
KEY_PADDING = "key_padding_mask"
DIFFERENTIABLE = ("q", "k", "v")
IMPLS = engine.IMPLS
FEATURE_MAPS = ("elu", "relu")


@_checks.renamed(mask="key_padding_mask")
@_nonfinite.nan_rows_of_v
def forward(q, k, v, *, feature_map="elu", causal=False, key_padding_mask=None,
            mask_mode="exact", normalize=True, eps=1e-6, impl="auto"):
    """Linear attention.  Returns ``(out (..., N, Dv), ctx)``; see the module docstring."""
    _checks.qkv(q, k, v)
    feature_map = _checks.choice(feature_map, "feature_map", FEATURE_MAPS)
    fmap = FeatureMap(kind=feature_map, omega=None, scale=1.0, kernel_eps=0.0)
    return engine.attend(q, k, v, fmap, forward_ref=_forward_ref, causal=causal,
                         key_padding_mask=key_padding_mask, mask_mode=mask_mode,
                         normalize=normalize, eps=eps, impl=impl)


def backward(dout, ctx: LinearCtx) -> dict:
    """Gradients ``{"q", "k", "v"}``."""
    if not isinstance(ctx, LinearCtx) or ctx.fmap.kind not in FEATURE_MAPS:
        raise TypeError(f"ctx must be the LinearCtx returned by linear.forward, got "
                        f"{type(ctx).__name__}")
    return engine.attend_backward(dout, ctx, backward_ref=_backward_ref)


# --------------------------------------------------------------------------- reference path

def _forward_ref(q, k, v, fmap, causal, mask, mask_mode):
    """Linear attention read top to bottom.  Returns (num, den, ℓq, C, kv, z); the engine
    finishes out_i = num_i / (den_i + eps·exp(−ℓq_i − C_i)), here ℓ = 0 (module docstring)."""
    fq, lq = engine.features(fmap, q)                              # (..., N, F), (..., N)
    # padded keys: "exact" drops φ(k_j) (fk = 0, ℓk = −inf); "values_only" zeroes v_j
    fk, lk, v = engine.key_features(fmap, k, v, mask, mask_mode)   # (..., M, F), (..., M)
    # num_i = fq_i · Σ_j fk_j v_jᵀ ;  den_i = fq_i · Σ_j fk_j     (j ≤ i when causal)
    num, den, key_scale, kv, z = engine.sums_ref(fq, fk, lk, v, causal)
    return num, den, lq, key_scale, kv, z


def _backward_ref(dout, ctx: LinearCtx) -> dict:
    """Gradients of :func:`_forward_ref` and the division by the denominator."""
    q, k, fmap = ctx.q, ctx.k, ctx.fmap
    fq, lq = engine.features(fmap, q)                              # recomputed, not stored
    fk, lk, v = engine.key_features(fmap, k, ctx.v, ctx.key_padding_mask, ctx.mask_mode)
    # fwd: out = num / denom ;  denom = den + eps      (ℓq = C = 0 here)
    dnum, dden = engine.grad_num_den(dout, ctx.out, ctx.denom, ctx.normalize)
    # fwd: num, den = Σ_j (fq_i·fk_j) (v_j, 1)
    dfq, dfk, dv = engine.sums_backward_ref(fq, fk, lk, v, dnum, dden, ctx)
    # fwd: fk = φ(k), then where(mask, fk, 0) or v = where(mask, v, 0)
    dk, dv = engine.chain_k(fmap, dfk, dv, fk, k, ctx.key_padding_mask, ctx.mask_mode)
    # fwd: fq = φ(q)
    return {"q": engine.chain_q(fmap, dfq, fq, q), "k": dk, "v": dv}


def example_cases(rng: np.random.Generator, dtype=np.float64) -> list[Case]:
    """Small valid calls covering every option (used by the contract tests and golden files)."""
    b, h, n, d, dv = 2, 2, 7, 5, 3

    qkv = functools.partial(random_qkv, rng, (b, h), d=d, dv=dv, dtype=dtype)  # qkv(N, M)

    pad = np.ones((b, 1, n), dtype=bool)
    pad[1, :, -3:] = False                                         # batch 1: 3 padded keys
    pad9 = np.ones((b, 1, 9), dtype=bool)
    pad9[0, :, 4:] = False
    return [
        Case("plain", qkv(n), {}),
        Case("relu", qkv(n), {"feature_map": "relu"}),
        Case("causal", qkv(n), {"causal": True}),
        Case("causal_rect", qkv(5, 9), {"causal": True, "key_padding_mask": pad9}),
        Case("causal_tall", qkv(9, 4), {"causal": True, "feature_map": "relu"}),
        Case("padmask", qkv(n), {"key_padding_mask": pad}),
        Case("values_only_causal", qkv(n), {"key_padding_mask": pad, "mask_mode": "values_only",
                                            "causal": True}),
        Case("unnormalized", qkv(n), {"normalize": False, "causal": True}),
        Case("eps0_ref", qkv(n), {"eps": 0.0, "impl": "ref"}),
    ]


# ----------------------------------------------------------------------------- benchmark data
def bench_options(n: int) -> dict:
    """Options ``python -m tinyeff bench`` runs at length n (``--opt`` overrides them)."""
    return {}


def useful_flops(n: int, d: int, options: dict, causal: bool) -> int:
    """Forward flops of the matrix products per batch·head: 4·N·D² (φ(k)ᵀv and φ(q)(kv));
    feature maps and normalizers not counted."""
    return 4 * n * d * d


def extra_bytes(n: int, d: int, itemsize: int, options: dict, causal: bool) -> int:
    """Generous bound on the saved context and temporaries per batch·head: ten (N, D)."""
    return 10 * n * d * itemsize


def demo_options(n: int, causal: bool) -> dict:
    """Options ``python -m tinyeff demo`` trains with at length n (``--opt`` overrides them)."""
    return {}
