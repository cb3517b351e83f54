"""The kernelized-attention engine shared by ``linear`` and ``performer``.

A variant supplies a feature map (:class:`tinyeff.ops.feature_maps.FeatureMap`) and its
readable reference (``forward_ref``, ``backward_ref``); this module validates the common
options, dispatches between the reference and the Numba paths, and holds the pieces both
references are written with (:func:`features`, :func:`pad_keys`, :func:`sums_ref`,
:func:`sums_backward_ref`, :func:`grad_num_den`, :func:`pad_grads`, ...).  It is the only
caller of the kernels of ``tinyeff/kernels/linear.py``, ``linear_noncausal.py``,
``favor_noncausal.py`` and ``favor_rows.py``.

Features with a log-scale
-------------------------
The feature map returns features in stabilized form, φ(x) = f · exp(ℓ)
(:mod:`tinyeff.ops.feature_maps`; ℓ = 0 for elu and relu, FAVOR+ uses it).  Writing ℓq_i,
ℓk_j for the log-scales and C_i = max over the keys row i sees of ℓk_j (one C for all rows
when non-causal; the running prefix maximum when causal), the engine evaluates

    num_i = Σ_j exp(ℓk_j − C_i) (fq_i·fk_j) v_j,    den_i = Σ_j exp(ℓk_j − C_i) (fq_i·fk_j)
    out_i = num_i / (den_i + eps·exp(−ℓq_i − C_i))      normalize=True
    out_i = num_i · exp(ℓq_i + C_i)                      normalize=False

which equals the unstabilized formula of :mod:`tinyeff.attention.linear` exactly
(num_i = exp(−ℓq_i − C_i) φ(q_i)·Σ φ(k_j)v_jᵀ, and so on): the stabilizers cancel for *any*
values of ℓ and C, hence they are constants in the backward.  Every exponent above is ≤ 0,
so nothing overflows.  With ℓ ≡ 0 this is the plain formula, bit for bit.

Paths
-----
* ``impl="ref"``: the variant's ``forward_ref`` / ``backward_ref`` (whole arrays; causal as
  a Python loop over positions, :func:`sums_ref`).
* ``impl="numba"``, causal, elu or relu: fused kernels — features, prefix-sum scan,
  normalization and the maps' chain rule in one pass each (forward; dq scan; reverse dk/dv
  scan), holding one (F, Dv) state per batch slice and no per-position temporaries.
* ``impl="numba"``, non-causal, elu or relu: fused kernels (tinyeff.kernels.linear_noncausal)
  — the features of a chunk of ``CHUNK_FUSED`` rows are formed in scratch next to the chunk's
  BLAS product, so no feature array and no elementwise pass of NumPy is left: KV, z in one
  pass over the keys, out in one over the queries; dq with dKV, dz in one pass over the
  queries, dk and dv in one over the keys.
* ``impl="numba"``, non-causal, ``favor_softmax`` (Performer's default): the same passes
  (tinyeff.kernels.favor_noncausal), the features x̂ωᵀ, their row maxima and exps formed
  per chunk in scratch; each range of keys keeps its own running maximum C and the ranges
  are combined by rescaling (the online-softmax trick).
* otherwise (causal FAVOR maps, ``favor_relu``) the sequence is processed in chunks of
  ``CHUNK`` positions (``CHUNK_NONCAUSAL`` when not causal).  Causal: the features of a
  chunk's rows and keys are formed on flat (BH·L, D) rows (``favor_softmax`` by the Numba
  kernels of tinyeff.kernels.favor_rows, in tasks of ``FEATURE_ROWS`` rows; the other maps
  by NumPy), then the prefix sums with log-scales run chunkwise (tinyeff.kernels.linear:
  sub-chunks of ``SUBCHUNK`` positions as matrix products, the state carried from one to
  the next and from chunk to chunk).  Non-causal: NumPy matrix products.

The N×F×Dv stack of prefix states is never built: the backward runs the prefix sums again,
forward for dq and in reverse for dk, dv.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import _checks, memory
from ..ctx import Ctx
from ..kernels import blas_single_thread
from ..kernels import favor_noncausal as kernels_favor
from ..kernels import favor_rows as kernels_rows
from ..kernels import linear as kernels
from ..kernels import linear_noncausal as kernels_nc
from ..ops.feature_maps import FeatureMap

__all__ = ["IMPLS", "MASK_MODES", "CHUNK", "CHUNK_NONCAUSAL", "LinearCtx", "attend",
           "attend_backward", "features", "key_features", "pad_keys", "sums_ref",
           "sums_backward_ref", "grad_num_den", "chain_q", "chain_k", "pad_grads"]

IMPLS = ("auto", "ref", "numba")
MASK_MODES = ("exact", "values_only")
CHUNK = 1024          # positions per chunk of the "numba" path (bounds the feature memory)
CHUNK_NONCAUSAL = 512  # non-causal chunks: smaller, so m-wide Performer features stay in cache
SUBCHUNK = 32         # positions per sub-chunk of the causal kernels' matrix products
FEATURE_ROWS = 256    # rows per task of the causal path's FAVOR+ feature kernels


def _chunk(causal: bool) -> int:
    return CHUNK if causal else min(CHUNK, CHUNK_NONCAUSAL)


@dataclasses.dataclass(frozen=True)
class LinearCtx(Ctx):
    q: np.ndarray                 # (..., N, D)
    k: np.ndarray                 # (..., M, D)
    v: np.ndarray                 # (..., M, Dv)
    fmap: FeatureMap              # the feature map and its parameters (features recomputed)
    key_padding_mask: np.ndarray | None  # (..., M) True = real key, broadcast to the batch
    mask_mode: str
    causal: bool
    normalize: bool
    eps: float
    out: np.ndarray               # (..., N, Dv) the returned output (a reference)
    denom: np.ndarray             # (..., N) out = num / denom; +inf for an empty row
    key_scale: np.ndarray         # (..., N) C_i; −inf when row i sees no key
    kv: np.ndarray | None         # (..., F, Dv) non-causal Σ_j exp(ℓk_j − C) fk_j v_jᵀ
    z: np.ndarray | None          # (..., F) non-causal Σ_j exp(ℓk_j − C) fk_j
    impl: str


def attend(q, k, v, fmap: FeatureMap, *, forward_ref, causal, key_padding_mask, mask_mode,
           normalize, eps, impl):
    """Kernelized attention with feature map ``fmap``.  Returns ``(out, LinearCtx)``.

    ``forward_ref(q, k, v, fmap, causal, mask, mask_mode)`` is the calling variant's
    reference, run for impl="ref"; it returns (num, den, ℓq, C, kv, z) (module docstring).
    """
    batch, n, m, d, dv, dtype = _checks.qkv(q, k, v)
    causal = _checks.flag(causal, "causal")
    normalize = _checks.flag(normalize, "normalize")
    eps = _checks.positive_float(eps, "eps", allow_zero=True)
    mask = _checks.key_padding_mask(key_padding_mask, batch, m)
    mask_mode = _checks.choice(mask_mode, "mask_mode", MASK_MODES)
    impl = _checks.choice(impl, "impl", IMPLS)
    if mask is not None:
        mask = np.broadcast_to(mask, (*batch, m))                  # (..., M) read-only view
    impl = "numba" if impl == "auto" else impl
    if impl == "numba" and fmap.kind in _FUSED:
        fused = _forward_fused if causal else _forward_fused_noncausal
        out, denom, key_scale, kv, z = fused(q, k, v, fmap, mask, mask_mode, normalize, eps)
    elif impl == "numba" and not causal and _favor_fused(fmap):
        out, denom, key_scale, kv, z = _forward_favor(q, k, v, fmap, mask, mask_mode,
                                                      normalize, eps)
    elif impl == "ref":
        num, den, lq, key_scale, kv, z = forward_ref(q, k, v, fmap, causal, mask, mask_mode)
        out, denom = _finish(num, den, lq, key_scale, normalize, eps)
    else:
        out, denom, key_scale, kv, z = _forward_chunked(q, k, v, fmap, causal, mask,
                                                        mask_mode, normalize, eps,
                                                        _chunk(causal))
    ctx = LinearCtx(q=q, k=k, v=v, fmap=fmap, key_padding_mask=mask, mask_mode=mask_mode,
                    causal=causal, normalize=normalize, eps=eps, out=out, denom=denom,
                    key_scale=key_scale, kv=kv, z=z, impl=impl)
    return out, ctx


def attend_backward(dout, ctx: LinearCtx, impl: str | None = None, *, backward_ref) -> dict:
    """Gradients of :func:`attend`; ``impl`` defaults to the forward's.  ``backward_ref(dout,
    ctx)`` is the calling variant's reference, run for impl="ref"."""
    dout = _checks.dout(dout, ctx.out.shape, ctx.out.dtype)
    impl = ctx.impl if impl is None else _checks.choice(impl, "impl", IMPLS)
    if impl == "ref":
        return backward_ref(dout, ctx)
    if ctx.fmap.kind in _FUSED:
        return (_backward_fused if ctx.causal else _backward_fused_noncausal)(dout, ctx)
    if not ctx.causal and _favor_fused(ctx.fmap):
        return _backward_favor(dout, ctx)
    return _backward_chunked(dout, ctx, _chunk(ctx.causal))


# --------------------------------------------------------------------------- shared pieces

def _exp_shift(a, c):
    """exp(a − c), with 0 wherever a = −inf (a padded key) even if c = −inf too."""
    with np.errstate(invalid="ignore", over="ignore"):
        return np.where(a == -np.inf, 0, np.exp(a - c))


def features(fmap, x):
    """(f, ℓ) with ℓ as an array (zeros for the maps without log-scale)."""
    f, ell = fmap.forward(x)                                       # (..., L, F), (..., L)
    if ell is None:
        ell = np.zeros(x.shape[:-1], dtype=x.dtype)                # (..., L)
    return f, ell


def key_features(fmap, k, v, mask, mask_mode):
    """Key features with padding applied (:func:`pad_keys`).  Returns (fk, ℓk, v)."""
    fk, lk = features(fmap, k)                                    # (..., M, F), (..., M)
    return pad_keys(fk, lk, v, mask, mask_mode)


def pad_keys(fk, lk, v, mask, mask_mode):
    """"exact" sets ℓk = −inf and fk = 0 on padded keys, "values_only" zeroes their v
    instead.  Returns (fk, ℓk, v)."""
    if mask is not None:
        if mask_mode == "exact":
            lk = np.where(mask, lk, -np.inf)                       # (..., M)
            fk = np.where(mask[..., None], fk, 0)                  # (..., M, F)
        else:
            v = np.where(mask[..., None], v, 0)                    # (..., M, Dv)
    return fk, lk, v


def _finish(num, den, lq, key_scale, normalize, eps):
    """out = num / denom (in place on num); returns (out, denom) — module docstring.
    Entry by entry, so a chunk of rows gives the same bits as the whole."""
    seen = key_scale > -np.inf                                     # (..., N) row sees a key
    with np.errstate(over="ignore"):
        corr = np.exp(np.where(seen, -(lq + key_scale), 0))       # (..., N) exp(−ℓq − C)
    if normalize:
        denom = den + eps * corr if eps > 0 else den               # (..., N)
        empty = ~seen | (denom == 0)
    else:
        denom, empty = corr, ~seen                                 # out = num · exp(ℓq + C)
    denom = np.where(empty, np.inf, denom)                         # (..., N)
    num /= denom[..., None]                                        # (..., N, Dv) now out
    return num, denom


def grad_num_den(dout, out, denom, normalize):
    """dnum, dden from dout, for out = num / denom and denom = den + (constant)."""
    # fwd: out = num / denom
    dnum = dout / denom[..., None]                                 # (..., N, Dv)
    if normalize:
        # fwd: denom = den + eps·exp(−ℓq − C)      (ℓq, C constants)
        dden = -np.sum(dout * out, axis=-1) / denom                # (..., N)
    else:
        dden = np.zeros(denom.shape, dtype=denom.dtype)            # (..., N)
    return dnum, dden


# --------------------------------------------------------------------------- reference sums

def sums_ref(fq, fk, lk, v, causal):
    """num_i = fq_i·Σ_j exp(ℓk_j − C_i) fk_j v_jᵀ and den_i (v_j → 1), j ≤ i when causal.

    Returns (num (..., N, Dv), den (..., N), C (..., N), kv, z); kv, z are None if causal.
    """
    if causal:
        num, den, key_scale = _causal_scan_ref(fq, fk, lk, v)
        return num, den, key_scale, None, None
    big_c = lk.max(axis=-1) if lk.shape[-1] else np.full(lk.shape[:-1], -np.inf, lk.dtype)
    w = _exp_shift(lk, big_c[..., None])                           # (..., M) exp(ℓk − C)
    fkw = fk * w[..., None]                                        # (..., M, F)
    kv = fkw.swapaxes(-1, -2) @ v                                  # (..., F, Dv)
    z = fkw.sum(axis=-2)                                           # (..., F)
    num = fq @ kv                                                  # (..., N, Dv)
    den = fq @ z[..., None]                                        # (..., N, 1)
    key_scale = np.broadcast_to(big_c[..., None], fq.shape[:-1]).copy()  # (..., N)
    return num, den[..., 0], key_scale, kv, z


def _causal_scan_ref(fq, fk, lk, v):
    """The prefix sums, one position at a time (vectorized over the batch dimensions)."""
    *batch, n, nf = fq.shape
    m, dv = v.shape[-2:]
    dtype = fq.dtype
    s = np.zeros((*batch, nf, dv), dtype)                          # (..., F, Dv) S_t
    z = np.zeros((*batch, nf), dtype)                              # (..., F) z_t
    c = np.full(batch, -np.inf, dtype)                             # (...) C_t
    num = np.zeros((*batch, n, dv), dtype)                         # (..., N, Dv)
    den = np.zeros((*batch, n), dtype)                             # (..., N)
    key_scale = np.full((*batch, n), -np.inf, dtype)               # (..., N)
    for t in range(max(n, m)):
        if t < m:                                                  # key t joins
            c_new = np.maximum(c, lk[..., t])                      # (...)
            r = _exp_shift(c, c_new)                               # (...) rescale old state
            s *= r[..., None, None]
            z *= r[..., None]
            c = c_new
            a = _exp_shift(lk[..., t], c)[..., None] * fk[..., t, :]  # (..., F)
            s += a[..., :, None] * v[..., t, None, :]              # S_t = S_{t−1} + φ(k_t) v_tᵀ
            z += a                                                 # z_t = z_{t−1} + φ(k_t)
        if t < n:                                                  # query t reads
            num[..., t, :] = np.einsum("...f,...fe->...e", fq[..., t, :], s)
            den[..., t] = np.einsum("...f,...f->...", fq[..., t, :], z)
            key_scale[..., t] = c
    return num, den, key_scale


def sums_backward_ref(fq, fk, lk, v, dnum, dden, ctx: LinearCtx):
    """dfq, dfk, dv of :func:`sums_ref` (C, kv, z read from ``ctx``)."""
    if ctx.causal:
        dfq, dfk, dv = _causal_backward_ref(fq, fk, lk, v, dnum, dden, ctx.key_scale)
    else:
        big_c = lk.max(axis=-1) if lk.shape[-1] else np.zeros(lk.shape[:-1], lk.dtype)
        w = _exp_shift(lk, big_c[..., None])                       # (..., M)
        # fwd: num = fq @ kv ;  den = fq @ z
        dfq = dnum @ ctx.kv.swapaxes(-1, -2) + dden[..., None] * ctx.z[..., None, :]
        dkv = fq.swapaxes(-1, -2) @ dnum                           # (..., F, Dv)
        dz = (fq.swapaxes(-1, -2) @ dden[..., None])[..., 0]       # (..., F)
        # fwd: kv = (fk·w)ᵀ v ;  z = Σ_j fk_j w_j      (w = exp(ℓk − C) constant)
        dfk = (v @ dkv.swapaxes(-1, -2) + dz[..., None, :]) * w[..., None]  # (..., M, F)
        dv = (fk * w[..., None]) @ dkv                             # (..., M, Dv)
    return dfq, dfk, dv


def _causal_backward_ref(fq, fk, lk, v, dnum, dden, key_scale):
    *batch, n, nf = fq.shape
    m, dvd = v.shape[-2:]
    dtype = fq.dtype
    dfq = np.zeros(fq.shape, dtype)                                # (..., N, F)
    dfk = np.zeros(fk.shape, dtype)                                # (..., M, F)
    dv = np.zeros(v.shape, dtype)                                  # (..., M, Dv)
    # pass 1, forward scan: dfq_t = S_t dnum_t + dden_t z_t
    #   (fwd: num_t = fq_t S_t ;  den_t = fq_t·z_t)
    s = np.zeros((*batch, nf, dvd), dtype)                         # (..., F, Dv)
    z = np.zeros((*batch, nf), dtype)                              # (..., F)
    c = np.full(batch, -np.inf, dtype)                             # (...)
    for t in range(max(n, m)):
        if t < m:
            c_new = np.maximum(c, lk[..., t])
            r = _exp_shift(c, c_new)
            s *= r[..., None, None]
            z *= r[..., None]
            c = c_new
            a = _exp_shift(lk[..., t], c)[..., None] * fk[..., t, :]
            s += a[..., :, None] * v[..., t, None, :]
            z += a
        if t < n:
            dfq[..., t, :] = (np.einsum("...fe,...e->...f", s, dnum[..., t, :])
                              + dden[..., t, None] * z)
    # pass 2, reverse: U_t = Σ_{i≥t} exp(C_t − C_i) fq_i dnum_iᵀ,  r_t = Σ_{i≥t} … dden_i fq_i
    u = np.zeros((*batch, nf, dvd), dtype)                         # (..., F, Dv)
    r = np.zeros((*batch, nf), dtype)                              # (..., F)
    c_next = np.full(batch, -np.inf, dtype)                        # (...) C of the last row added
    for t in range(max(n, m) - 1, -1, -1):
        if t < n:
            c_t = key_scale[..., t]
            with np.errstate(invalid="ignore"):
                shrink = np.where(c_t < c_next, np.exp(c_t - c_next), 1)  # (...)
            u = u * shrink[..., None, None] + fq[..., t, :, None] * dnum[..., t, None, :]
            r = r * shrink[..., None] + dden[..., t, None] * fq[..., t, :]
            c_next = c_t
            # fwd: S_i += exp(ℓk_t − C_i) fk_t v_tᵀ ; z_i += exp(ℓk_t − C_i) fk_t   (all i ≥ t)
            if t < m:
                w = _exp_shift(lk[..., t], c_t)[..., None]         # (..., 1)
                dfk[..., t, :] = w * (np.einsum("...fe,...e->...f", u, v[..., t, :]) + r)
                dv[..., t, :] = w * np.einsum("...fe,...f->...e", u, fk[..., t, :])
    return dfq, dfk, dv


def chain_q(fmap, dfq, fq, q):
    """dq through the feature map."""
    # fwd: fq = φ(q)
    return fmap.backward(dfq, fq, q)                               # (..., N, D)


def chain_k(fmap, dfk, dv, fk, k, mask, mask_mode):
    """dk through the feature map, and the padding of dk (exact) or dv (values_only)."""
    # fwd: fk = φ(k)
    dk = fmap.backward(dfk, fk, k)                                 # (..., M, D)
    return pad_grads(dk, dv, mask, mask_mode)


def pad_grads(dk, dv, mask, mask_mode):
    """dk (exact) or dv (values_only) set to 0 on padded keys."""
    if mask is not None:
        pad = ~mask[..., None]                                     # (..., M, 1)
        if mask_mode == "exact":
            dk = np.where(pad, 0, dk)                              # fwd: fk = where(mask, fk, 0)
        else:
            dv = np.where(pad, 0, dv)                              # fwd: v = where(mask, v, 0)
    return dk, dv


# --------------------------------------------------------------------------- fused causal path

_FUSED = ("elu", "relu")      # maps without log-scale: one fused kernel per pass (causal)


def _fused_args(q, k, v, mask, mask_mode):
    """(BH, L, X) C-contiguous writeable views/copies and the (BH, M) keep mask."""
    *batch, n, d = q.shape
    m = k.shape[-2]
    bh = math.prod(batch)
    keep = (np.ones((bh, m), dtype=bool) if mask is None                      # (BH, M)
            else np.require(mask, requirements="CW").reshape(bh, m))
    flat = [np.require(x, requirements="CW").reshape(bh, *x.shape[-2:]) for x in (q, k, v)]
    return (*flat, keep, mask_mode == "exact")


def _fused_grad_args(dout, ctx: LinearCtx, nf=None):
    """:func:`_fused_args` of the forward's inputs, then dout, out (BH, N, Dv) and denom
    (BH, N), and with ``nf`` (the feature count) the non-causal kv (BH, F, Dv), z (BH, F)."""
    qf, kf, vf, keep, exact = _fused_args(ctx.q, ctx.k, ctx.v, ctx.key_padding_mask,
                                          ctx.mask_mode)
    bh, n, _ = qf.shape
    dvd = ctx.v.shape[-1]
    dof, outf = (np.require(x, requirements="CW").reshape(bh, n, dvd) for x in (dout, ctx.out))
    den = np.require(ctx.denom, requirements="CW").reshape(bh, n)
    args = (qf, kf, vf, keep, exact, dof, outf, den)
    if nf is None:
        return args
    return args + (np.require(ctx.kv, requirements="CW").reshape(bh, nf, dvd),
                   np.require(ctx.z, requirements="CW").reshape(bh, nf))


def _forward_fused(q, k, v, fmap, mask, mask_mode, normalize, eps):
    """The causal elu/relu path in one kernel (tinyeff.kernels.linear, fused section)."""
    *batch, n, _ = q.shape
    dvd, dtype = v.shape[-1], q.dtype
    qf, kf, vf, keep, exact = _fused_args(q, k, v, mask, mask_mode)
    out = memory.empty((*batch, n, dvd), dtype)                    # (..., N, Dv)
    denom = np.empty((*batch, n), dtype)                           # (..., N)
    key_scale = np.empty((*batch, n), dtype)                       # (..., N) C ∈ {0, −inf}
    bh = qf.shape[0]
    kernels.causal_phi_fwd(out.reshape(bh, n, dvd), denom.reshape(bh, n),
                           key_scale.reshape(bh, n), qf, kf, vf, keep, fmap.kind == "relu",
                           exact, normalize, dtype.type(eps), dtype.type(0))
    return out, denom, key_scale, None, None


def _backward_fused(dout, ctx: LinearCtx) -> dict:
    """dq by a forward scan, dk and dv by a reverse scan (one fused kernel)."""
    q, k, v = ctx.q, ctx.k, ctx.v
    qf, kf, vf, keep, exact, dof, outf, den = _fused_grad_args(dout, ctx)
    dtype, relu, zero = q.dtype, ctx.fmap.kind == "relu", q.dtype.type(0)
    dq = memory.empty(q.shape, dtype)                              # (..., N, D)
    dk = memory.empty(k.shape, dtype)                              # (..., M, D)
    dv = memory.empty(v.shape, dtype)                              # (..., M, Dv)
    kernels.causal_phi_bwd(dq.reshape(qf.shape), dk.reshape(kf.shape), dv.reshape(vf.shape),
                           qf, kf, vf, keep, dof, outf, den, relu, exact, ctx.normalize, zero)
    return {"q": dq, "k": dk, "v": dv}


# --------------------------------------------------------------------------- fused non-causal path

CHUNK_FUSED = 128     # rows per task of the fused non-causal kernels (features in L2)


def _forward_fused_noncausal(q, k, v, fmap, mask, mask_mode, normalize, eps):
    """The non-causal elu/relu path: KV and z in one pass over the keys, out in one pass
    over the rows (tinyeff.kernels.linear_noncausal)."""
    *batch, n, d = q.shape
    m, dvd = v.shape[-2:]
    dtype = q.dtype
    qf, kf, vf, keep, exact = _fused_args(q, k, v, mask, mask_mode)
    bh = qf.shape[0]
    parts = kernels_nc.n_parts(m, CHUNK_FUSED)
    seen = keep.any(axis=1) if exact else np.full(bh, m > 0)      # (BH,) rows see a key
    out = memory.empty((*batch, n, dvd), dtype)                    # (..., N, Dv)
    denom = np.empty((*batch, n), dtype)                           # (..., N)
    kv = np.empty((*batch, d, dvd), dtype)                         # (..., F, Dv)
    z = np.empty((*batch, d), dtype)                               # (..., F)
    with blas_single_thread():
        kernels_nc.noncausal_fwd(out.reshape(bh, n, dvd), denom.reshape(bh, n),
                                 kv.reshape(bh, d, dvd), z.reshape(bh, d),
                                 np.empty((bh * parts, d, dvd), dtype),
                                 np.empty((bh * parts, d), dtype), qf, kf, vf, keep, seen,
                                 fmap.kind == "relu", exact, normalize, dtype.type(eps),
                                 CHUNK_FUSED, parts, dtype.type(0))
    key_scale = np.empty((*batch, n), dtype)                       # (..., N) C ∈ {0, −inf}
    key_scale.reshape(bh, n)[...] = np.where(seen, 0, -np.inf)[:, None]
    return out, denom, key_scale, kv, z


def _backward_fused_noncausal(dout, ctx: LinearCtx) -> dict:
    """dq with dKV, dz in one pass over the rows, dk and dv in one pass over the keys."""
    q, k, v = ctx.q, ctx.k, ctx.v
    qf, kf, vf, keep, exact, dof, outf, den, kv, z = _fused_grad_args(dout, ctx, q.shape[-1])
    bh, n, d = qf.shape
    dvd, dtype = v.shape[-1], q.dtype
    parts = kernels_nc.n_parts(n, CHUNK_FUSED)
    dq = memory.empty(q.shape, dtype)                              # (..., N, D)
    dk = memory.empty(k.shape, dtype)                              # (..., M, D)
    dv = memory.empty(v.shape, dtype)                              # (..., M, Dv)
    with blas_single_thread():
        kernels_nc.noncausal_bwd(dq.reshape(qf.shape), dk.reshape(kf.shape),
                                 dv.reshape(vf.shape), np.empty((bh, d, dvd), dtype),
                                 np.empty((bh, d), dtype),
                                 np.empty((bh * parts, d, dvd), dtype),
                                 np.empty((bh * parts, d), dtype), qf, kf, vf, keep, dof,
                                 outf, den, kv, z, ctx.fmap.kind == "relu", exact,
                                 ctx.normalize, CHUNK_FUSED, parts, dtype.type(0))
    return {"q": dq, "k": dk, "v": dv}


# --------------------------------------------------------------------------- fused FAVOR+ path

CHUNK_FAVOR = 512     # rows per task of the fused FAVOR+ kernels (BENCHMARKS.md)


def _favor_fused(fmap) -> bool:
    """Non-causal positive softmax features (at least one): tinyeff.kernels.favor_noncausal."""
    return fmap.kind == "favor_softmax" and fmap.n_features > 0


def _favor_args(fmap, dtype):
    """(ω (m, D), ωᵀ (D, m), √scale, ½ ln m): the feature map's constants for the kernels."""
    omega = np.require(fmap.omega, requirements="CW")              # (m, D)
    return (omega, np.ascontiguousarray(omega.T), dtype.type(math.sqrt(fmap.scale)),
            dtype.type(0.5 * math.log(omega.shape[0])))


def _forward_favor(q, k, v, fmap, mask, mask_mode, normalize, eps):
    """The non-causal FAVOR+ path: KV, z and C in one pass over the keys (each range at its
    running maximum), out in one pass over the rows."""
    *batch, n, _ = q.shape
    m, dvd = v.shape[-2:]
    dtype, nf = q.dtype, fmap.n_features
    qf, kf, vf, keep, exact = _fused_args(q, k, v, mask, mask_mode)
    bh = qf.shape[0]
    parts = kernels_nc.n_parts(m, CHUNK_FAVOR)
    _, omega_t, root, half_log_m = _favor_args(fmap, dtype)
    out = memory.empty((*batch, n, dvd), dtype)                    # (..., N, Dv)
    denom = np.empty((*batch, n), dtype)                           # (..., N)
    kv = np.empty((*batch, nf, dvd), dtype)                        # (..., m, Dv)
    z = np.empty((*batch, nf), dtype)                              # (..., m)
    big_c = np.empty(bh, dtype)                                    # (BH,) C
    with blas_single_thread():
        kernels_favor.favor_fwd(out.reshape(bh, n, dvd), denom.reshape(bh, n),
                                kv.reshape(bh, nf, dvd), z.reshape(bh, nf), big_c,
                                np.empty((bh * parts, nf, dvd), dtype),
                                np.empty((bh * parts, nf), dtype), np.empty(bh * parts, dtype),
                                qf, kf, vf, keep, omega_t, root, half_log_m, exact, normalize,
                                dtype.type(eps), CHUNK_FAVOR, parts, dtype.type(0))
    key_scale = np.empty((*batch, n), dtype)                       # (..., N) C
    key_scale.reshape(bh, n)[...] = big_c[:, None]
    return out, denom, key_scale, kv, z


def _backward_favor(dout, ctx: LinearCtx) -> dict:
    """dq with dKV, dz in one pass over the rows, dk and dv in one pass over the keys."""
    q, k, v = ctx.q, ctx.k, ctx.v
    dtype, nf = q.dtype, ctx.fmap.n_features
    dq = memory.empty(q.shape, dtype)                              # (..., N, D)
    dk = memory.empty(k.shape, dtype)                              # (..., M, D)
    dv = memory.empty(v.shape, dtype)                              # (..., M, Dv)
    if q.shape[-2] == 0:                                           # no row: no gradient
        dk[...] = 0
        dv[...] = 0
        return {"q": dq, "k": dk, "v": dv}
    qf, kf, vf, keep, exact, dof, outf, den, kv, z = _fused_grad_args(dout, ctx, nf)
    bh, n, _ = qf.shape
    dvd = v.shape[-1]
    parts = kernels_nc.n_parts(n, CHUNK_FAVOR)
    omega, omega_t, root, half_log_m = _favor_args(ctx.fmap, dtype)
    big_c = np.ascontiguousarray(ctx.key_scale.reshape(bh, n)[:, 0])  # (BH,) C
    with blas_single_thread():
        kernels_favor.favor_bwd(dq.reshape(qf.shape), dk.reshape(kf.shape), dv.reshape(vf.shape),
                                np.empty((bh, nf, dvd), dtype), np.empty((bh, nf), dtype),
                                np.empty((bh * parts, nf, dvd), dtype),
                                np.empty((bh * parts, nf), dtype), qf, kf, vf, keep, dof, outf,
                                den, kv, z, big_c, omega, omega_t, root, half_log_m, exact,
                                ctx.normalize, CHUNK_FAVOR, parts, dtype.type(0))
    return {"q": dq, "k": dk, "v": dv}


# --------------------------------------------------------------------------- chunked path

def _chunk_slices(n, m, chunk):
    """Aligned chunks of positions: (rows slice, keys slice) per chunk of max(N, M)."""
    t_end = max(n, m)
    return [(slice(t0, min(t0 + chunk, n)) if t0 < n else slice(n, n),
             slice(t0, min(t0 + chunk, m)) if t0 < m else slice(m, m))
            for t0 in range(0, t_end, chunk)]


def _n_features(fmap, d):
    return d if fmap.n_features is None else fmap.n_features


def _forward_chunked(q, k, v, fmap, causal, mask, mask_mode, normalize, eps, chunk):
    """(out, denom, key_scale, kv, z); each chunk of rows is finished (out = num / denom)
    while it is in cache, instead of one more pass over the whole output."""
    *batch, n, d = q.shape
    m, dvd = v.shape[-2:]
    dtype, nf = q.dtype, _n_features(fmap, d)
    out = memory.empty((*batch, n, dvd), dtype)                    # (..., N, Dv)
    denom = np.empty((*batch, n), dtype)                           # (..., N)
    key_scale = np.empty((*batch, n), dtype)                       # (..., N)
    chunks = _chunk_slices(n, m, chunk)

    def finish(qs, num_c, den_c, lq_c, c_c):
        out[..., qs, :], denom[..., qs] = _finish(num_c, den_c, lq_c, c_c, normalize, eps)

    def keys(ks):
        return key_features(fmap, k[..., ks, :], v[..., ks, :],
                             None if mask is None else mask[..., ks], mask_mode)

    if causal:
        return _forward_causal(q, k, v, fmap, mask, mask_mode, chunks, out, denom, key_scale,
                               finish)
    # non-causal: kv and z summed over key chunks at the running maximum C of ℓk (rescaled
    # when it grows: the online-softmax trick), then read by every query chunk.
    big_c = np.full(batch, -np.inf, dtype)                         # (...)
    kv = np.zeros((*batch, nf, dvd), dtype)                        # (..., F, Dv)
    z = np.zeros((*batch, nf), dtype)                              # (..., F)
    for _, ks in chunks:
        if ks.stop > ks.start:
            fk, lk, vc = keys(ks)                                  # (..., nk, F)
            c_new = np.maximum(big_c, lk.max(axis=-1))             # (...)
            r = _exp_shift(big_c, c_new)                           # (...)
            kv *= r[..., None, None]
            z *= r[..., None]
            big_c = c_new
            fkw = fk * _exp_shift(lk, big_c[..., None])[..., None]  # (..., nk, F)
            kv += fkw.swapaxes(-1, -2) @ vc
            z += fkw.sum(axis=-2)
    key_scale[...] = big_c[..., None]
    for qs, _ in chunks:
        fq, lq = features(fmap, q[..., qs, :])                    # (..., nq, F), (..., nq)
        finish(qs, fq @ kv, (fq @ z[..., None])[..., 0], lq, key_scale[..., qs])
    return out, denom, key_scale, kv, z


def _backward_chunked(dout, ctx: LinearCtx, chunk) -> dict:
    q, k, v, fmap, mask = ctx.q, ctx.k, ctx.v, ctx.fmap, ctx.key_padding_mask
    *batch, n, d = q.shape
    m, dvd = v.shape[-2:]
    dtype = q.dtype
    dq = memory.empty(q.shape, dtype)                              # (..., N, D)
    dk = memory.empty(k.shape, dtype)                              # (..., M, D)
    dv = memory.empty(v.shape, dtype)                              # (..., M, Dv)
    chunks = _chunk_slices(n, m, chunk)
    if ctx.causal:
        return _backward_causal(dout, ctx, chunks, dq, dk, dv)

    def keys(ks):
        return key_features(fmap, k[..., ks, :], v[..., ks, :],
                             None if mask is None else mask[..., ks], ctx.mask_mode)

    def rows(qs):
        return grad_num_den(dout[..., qs, :], ctx.out[..., qs, :], ctx.denom[..., qs],
                             ctx.normalize)

    def set_keys(ks, dfk, fk, dv_c):
        dk[..., ks, :], dv[..., ks, :] = chain_k(fmap, dfk, dv_c, fk, k[..., ks, :],
                                                  None if mask is None else mask[..., ks],
                                                  ctx.mask_mode)

    # non-causal: dkv, dz summed over query chunks, then read by every key chunk
    kv, z = ctx.kv, ctx.z
    dkv = np.zeros(kv.shape, dtype)                                # (..., F, Dv)
    dz = np.zeros(z.shape, dtype)                                  # (..., F)
    for qs, _ in chunks:
        if qs.stop > qs.start:
            fq, _ = features(fmap, q[..., qs, :])                 # (..., nq, F)
            dnum, dden = rows(qs)
            # fwd: num = fq @ kv ;  den = fq @ z
            dfq = dnum @ kv.swapaxes(-1, -2) + dden[..., None] * z[..., None, :]
            dq[..., qs, :] = chain_q(fmap, dfq, fq, q[..., qs, :])
            dkv += fq.swapaxes(-1, -2) @ dnum
            dz += (fq.swapaxes(-1, -2) @ dden[..., None])[..., 0]
    big_c = ctx.key_scale[..., 0] if n else np.zeros(batch, dtype)  # (...) C
    for _, ks in chunks:
        if ks.stop > ks.start:
            fk, lk, vc = keys(ks)                                  # (..., nk, F)
            w = _exp_shift(lk, big_c[..., None])[..., None]        # (..., nk, 1)
            # fwd: kv = (fk·w)ᵀ v ;  z = Σ_j fk_j w_j      (w = exp(ℓk − C) constant)
            dfk = (vc @ dkv.swapaxes(-1, -2) + dz[..., None, :]) * w  # (..., nk, F)
            set_keys(ks, dfk, fk, (fk * w) @ dkv)
    return {"q": dq, "k": dk, "v": dv}


# --------------------------------------------------------------------------- causal chunked path

def _flat(x, per_row=False):
    """(BH·L, X) C-contiguous writeable rows of a (..., L, X) chunk, or (BH·L) of a (..., L)
    one (``per_row``): the feature maps' products then run as one matrix product per chunk,
    and the kernels take (BH, L, X) views of them (a read-only chunk is copied, so
    read-only inputs reuse the same kernels)."""
    x = np.require(x, requirements="CW")
    return x.reshape(-1) if per_row else x.reshape(-1, x.shape[-1])


def _row_favor_args(fmap, dtype):
    """(ω' = [ω | 1] (m, D + 1), ωᵀ (D, m), √scale, ½ ln m) for tinyeff.kernels.favor_rows."""
    omega, omega_t, root, half_log_m = _favor_args(fmap, dtype)
    omega1 = np.ones((omega.shape[0], omega.shape[1] + 1), dtype)  # (m, D + 1)
    omega1[:, :-1] = omega
    return omega1, omega_t, root, half_log_m


def _row_features(fmap, x):
    """:func:`features` of flat rows x (R, D); FAVOR+ softmax features by the Numba kernels
    of tinyeff.kernels.favor_rows."""
    if not _favor_fused(fmap):
        return features(fmap, x)
    f = np.empty((x.shape[0], fmap.n_features), x.dtype)           # (R, m)
    ell = np.empty(x.shape[0], x.dtype)                            # (R)
    with blas_single_thread():
        kernels_rows.favor_features(f, ell, x, *_row_favor_args(fmap, x.dtype), FEATURE_ROWS)
    return f, ell


def _row_chain(fmap, df, f, x):
    """dx of flat rows x (R, D) through the feature map (:func:`chain_q`); f: the features of
    x, or None (formed here: the FAVOR+ kernel forms them task by task next to their dx); df,
    a temporary of the caller, may be overwritten."""
    if not _favor_fused(fmap):
        if f is None:
            f, _ = features(fmap, x)                               # (R, F)
        return chain_q(fmap, df, f, x)
    if f is None:
        f = np.empty((0, fmap.n_features), x.dtype)               # (0, m): formed per task
    dx = np.empty(x.shape, x.dtype)                                # (R, D)
    with blas_single_thread():
        kernels_rows.favor_dx(dx, df, f, x, *_row_favor_args(fmap, x.dtype), FEATURE_ROWS)
    return dx


def _causal_keys(fmap, k, v, mask, mask_mode, ks):
    """Flat key features of chunk ``ks`` with padding applied: (fk (BH·nk, F), ℓk (BH·nk),
    v (BH·nk, Dv), k (BH·nk, D), mask (BH·nk) or None)."""
    kc = _flat(k[..., ks, :])                                      # (BH·nk, D)
    mc = None if mask is None else np.ascontiguousarray(mask[..., ks]).reshape(-1)
    fk, lk = _row_features(fmap, kc)                               # (BH·nk, F), (BH·nk)
    fk, lk, vc = pad_keys(fk, lk, _flat(v[..., ks, :]), mc, mask_mode)
    return _flat(fk), _flat(lk, True), _flat(vc), kc, mc


def _forward_causal(q, k, v, fmap, mask, mask_mode, chunks, out, denom, key_scale, finish):
    """The causal chunked forward: features of a chunk of rows and keys (flat), then the
    chunkwise scan of tinyeff.kernels.linear, state carried from chunk to chunk."""
    *batch, n, d = q.shape
    dvd, dtype, bh = v.shape[-1], q.dtype, math.prod(batch)
    nf = _n_features(fmap, d)
    state = (np.zeros((bh, nf, dvd + 1), dtype),                   # [S | z] (BH, F, Dv + 1)
             np.full(bh, -np.inf, dtype))                          # C (BH,)
    for qs, ks in chunks:
        nq, nk = qs.stop - qs.start, ks.stop - ks.start
        fq, lq = _row_features(fmap, _flat(q[..., qs, :]))         # (BH·nq, F), (BH·nq)
        fk, lk, vc, _, _ = _causal_keys(fmap, k, v, mask, mask_mode, ks)
        num_c = np.empty((bh, nq, dvd), dtype)                     # (BH, nq, Dv)
        den_c = np.empty((bh, nq), dtype)                          # (BH, nq)
        cm_c = np.empty((bh, nq), dtype)                           # (BH, nq)
        with blas_single_thread():
            kernels.causal_fwd(num_c, den_c, cm_c, *state, _flat(fq).reshape(bh, nq, nf),
                               fk.reshape(bh, nk, nf), lk.reshape(bh, nk),
                               vc.reshape(bh, nk, dvd), SUBCHUNK)
        key_scale[..., qs] = cm_c.reshape(*batch, nq)
        finish(qs, num_c.reshape(*batch, nq, dvd), den_c.reshape(*batch, nq),
               lq.reshape(*batch, nq), key_scale[..., qs])
    return out, denom, key_scale, None, None


def _backward_causal(dout, ctx: LinearCtx, chunks, dq, dk, dv) -> dict:
    """dq by the forward scan (pass 1), dk and dv by the reverse scan (pass 2), chunk by
    chunk; the features are recomputed in each pass."""
    q, k, v, fmap, mask = ctx.q, ctx.k, ctx.v, ctx.fmap, ctx.key_padding_mask
    *batch, n, d = q.shape
    dvd, dtype, bh = v.shape[-1], q.dtype, math.prod(batch)
    nf = _n_features(fmap, d)

    def rows(qs):
        dnum, dden = grad_num_den(dout[..., qs, :], ctx.out[..., qs, :], ctx.denom[..., qs],
                                  ctx.normalize)                   # (..., nq, Dv), (..., nq)
        nq = qs.stop - qs.start
        return _flat(dnum).reshape(bh, nq, dvd), _flat(dden, True).reshape(bh, nq)

    state = (np.zeros((bh, nf, dvd + 1), dtype),                   # [S | z] (BH, F, Dv + 1)
             np.full(bh, -np.inf, dtype))                          # C (BH,)
    for qs, ks in chunks:                                          # pass 1: dq, forward scan
        nq, nk = qs.stop - qs.start, ks.stop - ks.start
        fk, lk, vc, _, _ = _causal_keys(fmap, k, v, mask, ctx.mask_mode, ks)
        dnum, dden = rows(qs)
        dfq = np.empty((bh, nq, nf), dtype)                        # (BH, nq, F)
        with blas_single_thread():
            kernels.causal_bwd_q(dfq, *state, fk.reshape(bh, nk, nf), lk.reshape(bh, nk),
                                 vc.reshape(bh, nk, dvd), dnum, dden, SUBCHUNK)
        qc = _flat(q[..., qs, :])                                  # (BH·nq, D)
        # fwd: fq = φ(q)   (fq formed by _row_chain)
        dq[..., qs, :] = _row_chain(fmap, dfq.reshape(-1, nf), None, qc).reshape(*batch, nq, d)
    state = (np.zeros((bh, nf, dvd + 1), dtype),                   # [Ũ | r̃] (BH, F, Dv + 1)
             np.full(bh, -np.inf, dtype))                          # the state's scale
    for qs, ks in reversed(chunks):                                # pass 2: dk, dv, reverse
        nq, nk = qs.stop - qs.start, ks.stop - ks.start
        fq, _ = _row_features(fmap, _flat(q[..., qs, :]))          # (BH·nq, F)
        fk, lk, vc, kc, mc = _causal_keys(fmap, k, v, mask, ctx.mask_mode, ks)
        dnum, dden = rows(qs)
        dfk = np.empty((bh, nk, nf), dtype)                        # (BH, nk, F)
        dv_c = np.empty((bh, nk, dvd), dtype)                      # (BH, nk, Dv)
        with blas_single_thread():
            kernels.causal_bwd_kv(dfk, dv_c, *state, _flat(fq).reshape(bh, nq, nf), dnum,
                                  dden, _flat(ctx.key_scale[..., qs], True).reshape(bh, nq),
                                  fk.reshape(bh, nk, nf), lk.reshape(bh, nk),
                                  vc.reshape(bh, nk, dvd), SUBCHUNK)
        # fwd: fk = φ(k), then the padding (pad_keys)
        dk_c = _row_chain(fmap, dfk.reshape(-1, nf), fk, kc)       # (BH·nk, D)
        dk_c, dv_c = pad_grads(dk_c, dv_c.reshape(-1, dvd), mc, ctx.mask_mode)
        dk[..., ks, :] = dk_c.reshape(*batch, nk, d)
        dv[..., ks, :] = dv_c.reshape(*batch, nk, dvd)
    return {"q": dq, "k": dk, "v": dv}
