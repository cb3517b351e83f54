"""Performer (FAVOR+): softmax attention estimated with positive random features, O(N) time.

Choromanski et al., "Rethinking Attention with Performers", ICLR 2021.  With ω the (m, D)
matrix of random features (rows ω_f) and x̂ = √scale · x,

    φ(x)_f = m^(−1/2) · exp(ω_f·x̂ − ‖x̂‖²/2)           kernel="softmax" (positive features)
    φ(x)_f = relu(ω_f·x̂) + kernel_eps                   kernel="relu" (generalized attention)

and then linear attention with these features (the engine of :mod:`tinyeff.attention.linear`,
:mod:`tinyeff.attention._linear_engine`, same kernels):

    out_i = φ(q_i) Σ_j φ(k_j) v_jᵀ / (φ(q_i)·Σ_j φ(k_j) + eps)       (j ≤ i when causal)

For ω_f ~ N(0, I_D), E[φ(q)·φ(k)] = exp(q·k·scale), so with the default scale = 1/√D the
output estimates ``full`` softmax attention, with an error falling like 1/√m (lower with
block-orthogonal ω).  Cost O(N·m·(D + Dv)); memory O(CHUNK·m) for the features (computed a
chunk of positions at a time and recomputed in the backward, never stored whole).

Shapes: q (..., N, D), k (..., M, D), v (..., M, Dv), features ω (m, D), shared by all batch
dimensions and heads.

Options
-------
features : (m, D) array, the dtype of q (no silent casting: a float64 ω with float32 inputs
    is a TypeError).  Required for kernel="softmax".  Draw it with :func:`draw_random_options`
    (or :func:`tinyeff.ops.feature_maps.orthogonal_features` / ``gaussian_features``) from a
    seeded ``numpy.random.Generator``; the forward is deterministic given it, and another
    backend can be fed the same matrix.  ω gets no gradient.  For kernel="relu",
    ``features=None`` means ω = I_D (google-research's deterministic generalized attention).
kernel : "softmax" (default) | "relu".
scale : float, default 1/√D.  x̂ = √scale · x, so that q̂·k̂ = q·k·scale (performer-pytorch's
    data normalizer D^(−1/4) for both kernels; google-research's generalized attention uses
    no normalization = scale=1.0).
kernel_eps : float ≥ 0, default 1e-3, added to the relu features (unused for softmax).
causal : bool, default False.  Prefix sums through the Numba kernel of the engine; top-left
    alignment for N != M (row i sees keys ≤ i, as ``full``); f(x)[:t] == f(x[:t]) exactly.
key_padding_mask, mask_mode, normalize, impl : as in :mod:`tinyeff.attention.linear`
    (``key_padding_mask`` = key padding (..., M), True = real key; "exact" removes padded
    keys from the numerator and the denominator; "values_only" zeroes their values only,
    like the public Performer code).
eps : float ≥ 0, default 0.  Added to the *un-stabilized* denominator φ(q_i)·Σ_j φ(k_j).

Stabilizer (kernel="softmax"), and why it cancels exactly
----------------------------------------------------------
exp(ω_f·x̂ − ‖x̂‖²/2) overflows for large |x| (and underflows for all f at once), so features
are computed as f = exp(a − c) with a_f = ω_f·x̂ − ‖x̂‖²/2 and c = max_f a_f per row
(:func:`tinyeff.ops.feature_maps.favor_softmax`), φ = f·exp(ℓ), ℓ = c − ½ ln m.  Then:

* query rows: the row's own ℓq_i multiplies num_i and den_i alike — it cancels;
* keys, non-causal: one constant C = max_j ℓk_j per batch slice multiplies every key;
* keys, causal: C_i = max_{j ≤ i} ℓk_j, a *running* maximum: the prefix state is rescaled by
  exp(C_old − C_new) when a key raises it (online softmax), so row i never sees a later key,
  not even through the stabilizer (performer-pytorch issue #82: its key maximum over the
  whole sequence plus an ε inside φ makes causal outputs depend on future tokens).

The result is out_i = num_i / (den_i + eps·exp(−ℓq_i − C_i)) in stabilized quantities, which
equals the un-stabilized formula above *exactly* (the shifts cancel for any value), so it is
the un-stabilized estimator up to rounding; the shifts are constants of the backward.  No ε
is added inside φ.  Inputs of norm 100 give finite results in float32 (every exponent is
≤ 0).  A row whose denominator underflows to exactly 0 (eps = 0 and extreme inputs) outputs
0, like a fully masked row.  Limit: the stabilizers are per row and per key, not per
(query, key) pair, so for extreme inputs (float32, norms ≈ 100, where the estimator itself
is meaningless) a row's denominator can fall into the denormal range; the forward stays
finite but the backward's dout/denominator can overflow to inf/NaN.  Scaling unit inputs
by 10 is fine in both dtypes, and so is norm 100 in float64 (tests/test_performer.py).

Peers
-----
* google-research ``fast_attention`` and performer-pytorch put ε = 1e-4 *inside* the
  stabilized features, m^(−1/2)(exp(a − c) + 1e-4), with c the query row maximum and a key
  maximum over all positions: their output depends on the stabilizer (by ~1e-4 relative at
  unit-scale inputs) and, causally, on future tokens.  tinyeff equals their formula with that
  ε set to 0 (performer-pytorch ``softmax_kernel(..., eps=0)``) and eps=0 here.
* performer-pytorch causal adds 1e-6 per feature to the prefix sums of φ(k)
  (den + 1e-6·Σ_f φ(q)_f) and non-causal nothing; google-research adds 2e-6 where
  |den| ≤ 1e-6.  Neither is stabilizer-independent; eps=0 matches them up to those terms.
* Both zero the *values* of padded keys only: mask_mode="values_only".
* Generalized attention: performer-pytorch = kernel="relu", kernel_eps=1e-3, default scale,
  random ω; google-research/LRA default = kernel="relu", features=None, scale=1.0,
  kernel_eps=1e-3.
* fast-transformers' ``Favor`` uses hyperbolic features [exp(u − ‖x̂‖²/2), exp(−u − ‖x̂‖²/2)]
  with u = ω x̂ (``fast_transformers/feature_maps/fourier_features.py``); feeding
  ω' = [ω; −ω] with kernel="softmax" gives that
  form (with 1/√m' for the m' = 2·rows(ω) features; not checked against their code).
* Redrawing: peers redraw ω on a schedule (every 1000 training calls in performer-pytorch,
  every call in google-research with a data-dependent seed); here ω is an argument, so the
  caller decides.
"""

from __future__ import annotations

import functools

import numpy as np

from .. import _checks
from .._random import random_qkv
from ..ops import feature_maps
from ..ops.feature_maps import FeatureMap
from . import _linear_engine as engine
from . import _nonfinite
from ._case import Case
from ._linear_engine import LinearCtx

NAME = "performer"
SUPPORTS_MASK = True
SUPPORTS_CAUSAL = True
SUPPORTS_BIAS = False
SUPPORTS_REL_BIAS = False
KEY_PADDING = "key_padding_mask"
DIFFERENTIABLE = ("q", "k", "v")
RANDOM_OPTIONS = ("features",)
KERNELS = ("softmax", "relu")
IMPLS = engine.IMPLS
_KIND = {"softmax": "favor_softmax", "relu": "favor_relu"}


@_checks.renamed(mask="key_padding_mask")
@_nonfinite.nan_rows_of_v(prepare=lambda o: {**o, "kernel_eps": 1.0})
def forward(q, k, v, *, features=None, kernel="softmax", scale=None, kernel_eps=1e-3,
            causal=False, key_padding_mask=None, mask_mode="exact", normalize=True, eps=0.0,
            impl="auto"):
    """FAVOR+ attention.  Returns ``(out (..., N, Dv), ctx)``; see the module docstring."""
    batch, n, m, d, dv, dtype = _checks.qkv(q, k, v)
    kernel = _checks.choice(kernel, "kernel", KERNELS)
    scale = _checks.scale(scale, d)
    kernel_eps = _checks.positive_float(kernel_eps, "kernel_eps", allow_zero=True)
    if features is None:
        if kernel == "softmax":
            raise ValueError(
                "performer: features (m, D) is required for kernel='softmax' (random features "
                "are an explicit input): features = performer.draw_random_options("
                "np.random.default_rng(seed), D, dtype)['features']")
        features = np.eye(d, dtype=dtype)                          # (D, D) deterministic
    _checks.float_array(features, "features", dtype=dtype)
    if features.ndim != 2 or features.shape[1] != d or features.shape[0] < 1:
        raise ValueError(f"features must have shape (m, D) with m >= 1 and D = {d} (q "
                         f"{q.shape}), got {features.shape}")
    if not np.all(np.isfinite(features)):
        raise ValueError("features must be finite")
    fmap = FeatureMap(kind=_KIND[kernel], omega=features, scale=scale, kernel_eps=kernel_eps)
    return engine.attend(q, k, v, fmap, forward_ref=_forward_ref, causal=causal,
                         key_padding_mask=key_padding_mask, mask_mode=mask_mode,
                         normalize=normalize, eps=eps, impl=impl)


def backward(dout, ctx: LinearCtx) -> dict:
    """Gradients ``{"q", "k", "v"}`` (through the feature map; ω gets none)."""
    if not isinstance(ctx, LinearCtx) or ctx.fmap.kind not in _KIND.values():
        raise TypeError(f"ctx must be the LinearCtx returned by performer.forward, got "
                        f"{type(ctx).__name__}")
    return engine.attend_backward(dout, ctx, backward_ref=_backward_ref)


# --------------------------------------------------------------------------- reference path

def _phi(fmap, x):
    """φ(x) = f·exp(ℓ): the stabilized FAVOR+ features of x and their log-scale ℓ."""
    if fmap.kind == "favor_softmax":
        # x̂ = √scale·x ;  a_f = ω_f·x̂ − ‖x̂‖²/2 ;  c = max_f a_f
        # f = exp(a − c) ∈ (0, 1] ;  ℓ = c − ½ ln m     (φ = m^(−1/2) exp(a) = f·exp(ℓ))
        return feature_maps.favor_softmax(x, fmap.omega, fmap.scale)  # (..., L, m), (..., L)
    # f = relu(ω x̂) + kernel_eps ;  ℓ = 0
    f = feature_maps.favor_relu(x, fmap.omega, fmap.scale, fmap.kernel_eps)  # (..., L, m)
    return f, np.zeros(x.shape[:-1], dtype=x.dtype)                # (..., L, m), (..., L)


def _phi_backward(fmap, df, f, x):
    """dx of :func:`_phi` with the shift c held constant (it cancels in out)."""
    if fmap.kind == "favor_softmax":
        # fwd: f = exp(ω x̂ − ‖x̂‖²/2 − c) ;  x̂ = √scale·x
        #   dx = √scale · ((df·f) ω − Σ_f (df·f)_f · x̂)
        return feature_maps.favor_softmax_backward(df, f, x, fmap.omega, fmap.scale)
    # fwd: f = relu(ω x̂) + kernel_eps  →  dx = √scale · (df·[ω x̂ > 0]) ω
    return feature_maps.favor_relu_backward(df, f, x, fmap.omega, fmap.scale, fmap.kernel_eps)


def _forward_ref(q, k, v, fmap, causal, mask, mask_mode):
    """FAVOR+ read top to bottom.  Returns (num, den, ℓq, C, kv, z); ``engine.attend``
    finishes out_i = num_i / (den_i + eps·exp(−ℓq_i − C_i)) (module docstring)."""
    fq, lq = _phi(fmap, q)                                         # (..., N, m), (..., N)
    fk, lk = _phi(fmap, k)                                         # (..., M, m), (..., M)
    # padded keys: "exact" drops φ(k_j) (fk = 0, ℓk = −inf); "values_only" zeroes v_j
    fk, lk, v = engine.pad_keys(fk, lk, v, mask, mask_mode)        # (..., M, m), (..., M)
    # num_i = fq_i · Σ_j exp(ℓk_j − C_i) fk_j v_jᵀ ;  den_i = fq_i · Σ_j exp(ℓk_j − C_i) fk_j
    #   C_i = max_j ℓk_j (non-causal) or max_{j ≤ i} ℓk_j (causal: a running maximum, so
    #   row i never sees a later key); the row's own exp(ℓq_i) cancels in num / den
    num, den, key_scale, kv, z = engine.sums_ref(fq, fk, lk, v, causal)
    return num, den, lq, key_scale, kv, z


def _backward_ref(dout, ctx: LinearCtx) -> dict:
    """Gradients of :func:`_forward_ref` and the division by the denominator."""
    fmap = ctx.fmap
    fq, _ = _phi(fmap, ctx.q)                                      # recomputed, not stored
    fk, lk = _phi(fmap, ctx.k)
    fk, lk, v = engine.pad_keys(fk, lk, ctx.v, ctx.key_padding_mask, ctx.mask_mode)
    # fwd: out = num / denom ;  denom = den + eps·exp(−ℓq − C)    (ℓq, C constants)
    dnum, dden = engine.grad_num_den(dout, ctx.out, ctx.denom, ctx.normalize)
    # fwd: num, den = Σ_j exp(ℓk_j − C_i) (fq_i·fk_j) (v_j, 1)
    dfq, dfk, dv = engine.sums_backward_ref(fq, fk, lk, v, dnum, dden, ctx)
    # fwd: fq = φ(q) ;  fk = φ(k)
    dq = _phi_backward(fmap, dfq, fq, ctx.q)                       # (..., N, D)
    dk = _phi_backward(fmap, dfk, fk, ctx.k)                       # (..., M, D)
    # fwd: fk = where(mask, fk, 0)  or  v = where(mask, v, 0)
    dk, dv = engine.pad_grads(dk, dv, ctx.key_padding_mask, ctx.mask_mode)
    return {"q": dq, "k": dk, "v": dv}


def draw_random_options(rng: np.random.Generator, d: int, dtype=np.float64, *, m=None,
                        orthogonal=True, scaling="chi", **_other_options) -> dict:
    """``{"features": ω (m, D)}`` drawn from ``rng``.

    m defaults to ⌊D ln D⌋ (performer-pytorch; 266 for D = 64).  ``orthogonal=True`` (the
    default, as in the paper and its public code) draws block-orthogonal rows with
    chi-distributed norms (``scaling="chi"``) or norms √D (``scaling="sqrt_d"``); False draws
    i.i.d. Gaussian rows.  Every other keyword (the variant's forward options, which a
    layer may pass along) is ignored.
    """
    d = _checks.integer(d, "d", minimum=1)
    m = feature_maps.default_num_features(d) if m is None else _checks.integer(m, "m",
                                                                                minimum=1)
    orthogonal = _checks.flag(orthogonal, "orthogonal")
    dtype = np.dtype(dtype)
    if dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    if orthogonal:
        omega = feature_maps.orthogonal_features(rng, m, d, dtype, scaling=scaling)
    else:
        omega = feature_maps.gaussian_features(rng, m, d, dtype)
    return {"features": omega}


def example_cases(rng: np.random.Generator, dtype=np.float64) -> list[Case]:
    """Small valid calls covering every option (used by the contract tests and golden files)."""
    b, h, n, d, dv, m = 2, 2, 7, 5, 3, 8

    qkv = functools.partial(random_qkv, rng, (b, h), d=d, dv=dv, dtype=dtype)  # qkv(N, M)

    def omega(orthogonal=True):
        return draw_random_options(rng, d, dtype, m=m, orthogonal=orthogonal)["features"]

    pad = np.ones((b, 1, n), dtype=bool)
    pad[1, :, -3:] = False                                         # batch 1: 3 padded keys
    return [
        Case("plain", qkv(n), {"features": omega()}),
        Case("iid_causal", qkv(n), {"features": omega(False), "causal": True}),
        Case("causal_rect", qkv(5, 9), {"features": omega(), "causal": True}),
        Case("padmask_causal", qkv(n), {"features": omega(), "key_padding_mask": pad,
                                       "causal": True}),
        Case("values_only", qkv(n), {"features": omega(), "key_padding_mask": pad,
                                    "mask_mode": "values_only"}),
        Case("relu", qkv(n), {"features": omega(), "kernel": "relu"}),
        Case("relu_identity_causal", qkv(n), {"kernel": "relu", "scale": 1.0, "causal": True}),
        Case("eps_unnormalized", qkv(n), {"features": omega(), "eps": 1e-3, "scale": 0.3,
                                         "normalize": False}),
        Case("eps_causal_ref", qkv(n), {"features": omega(), "eps": 1e-2, "causal": True,
                                       "impl": "ref"}),
    ]


# ----------------------------------------------------------------------------- benchmark data
def bench_options(n: int) -> dict:
    """Options ``python -m tinyeff bench`` runs at length n (``--opt`` overrides them)."""
    return {"m": 256}


def useful_flops(n: int, d: int, options: dict, causal: bool) -> int:
    """Forward flops of the matrix products per batch·head with m features: the features
    4·N·D·m plus linear attention over them 4·N·m·D; nonlinearities not counted."""
    m = int(options.get("m", d))
    return 4 * n * d * m + 4 * n * m * d


def extra_bytes(n: int, d: int, itemsize: int, options: dict, causal: bool) -> int:
    """Generous bound on the saved context and temporaries per batch·head: eight (N, m)."""
    return 8 * n * int(options.get("m", d)) * itemsize


def demo_options(n: int, causal: bool) -> dict:
    """Options ``python -m tinyeff demo`` trains with at length n (``--opt`` overrides them)."""
    return {"m": 64}
