"""Reformer LSH attention: angular hashing, sort, chunked attention, multi-round combination.

Kitaev, Kaiser & Levskaya, "Reformer: The Efficient Transformer", ICLR 2020; semantics as
the authors' code (google/trax ``LSHSelfAttention``) and the HF port implement them, with
the deviations listed at the end.  Pinned semantics for other backends:
``docs/semantics/lsh.md``.

Shapes: qk (..., N, D) (shared queries and keys), v (..., N, Dv), rotations (D, r, nb/2);
r = n_hashes rounds, nb = n_buckets (even), c = chunk_len, N a multiple of c.  The hashing
(h_r, π_r, their Numba wrappers, the checks of rotations/buckets) is in
:mod:`tinyeff.attention._lsh_hashing`; this module normalizes, attends and combines.

    k̂_j   = qk_j / sqrt(‖qk_j‖² + D·ε),   ε = NORM_EPS = 1e-6
            (= trax/HF's  qk · rsqrt(mean(qk²) + ε) / √D, exactly)
    h_r(x) = argmax([x R_r ; −x R_r])  ∈ [0, nb)         ties -> the first (lowest) index;
            products in float64 whatever the input dtype; padded positions -> bucket nb
    π_r    = stable sort of positions by h_r               (i.e. by (bucket, position))

The sorted rounds are concatenated (slot r·N + s holds position π_r(s)) and cut into
T = r·N/c chunks; chunk t attends to chunk t−1 (cyclically: the first chunk of round r sees
the last chunk of round r−1, round 0 wraps to the last round) and to itself, the window
W(t) = [chunk t−1, chunk t] of 2c keys (a key may occur twice in a window: see rounds).
For query i in chunk t of round r and key j in W(t):

    s_ij = scale · qk_i · k̂_j           if j ≠ i
         = SELF_PENALTY = −1e5           if j = i      (replaces the logit: no gradient)
         − log N_ij                       if dedup (N_ij = occurrences of j in i's windows,
                                                        all rounds counted)
         excluded (−inf)                  if causal and j > i, or key j is padded
    o_i^(r) = Σ_j softmax_j(s_i·) v_j,   z_i^(r) = logsumexp_j s_ij      (−inf: nothing seen)
    out_i   = Σ_r exp(z_i^(r) − Z_i) o_i^(r),   Z_i = logsumexp_r z_i^(r)

Equivalently out_i is ONE softmax over the multiset union of i's windows (every occurrence
of j counts); with ``dedup=True`` each distinct key counts once, i.e. exact attention over
the union of the windows (the paper's "subtract log N_ij").

Cost O(r·N·c·(D + Dv)) time for attention plus O(r·N·D·nb/2) for hashing (quadratic in N
when nb grows with N, as under trax's rule nb = 2N/c; the kernel filters it with float32 BLAS
products, see ``tinyeff/kernels/lsh_hash.py``), O(r·N) memory for the context (nothing of size
N·c is kept).  The reference computes in float64 whatever the input dtype; the kernels
compute in the input dtype (``tinyeff/kernels/lsh.py``).

Options
-------
rotations : (D, r, nb/2) array of q's dtype, e.g. from :func:`draw_random_options`
    (i.i.d. N(0, 1), not orthogonalised, as trax/HF).  Shared by all batch dimensions.
chunk_len : int, c.  N must be a multiple of it (ValueError otherwise; layers pad).
n_buckets : int or None; None = 2·rotations.shape[2].  Given, it must equal that.
causal : bool, default False.  Removes keys at later positions.
key_padding_mask : bool (..., N), one dim per batch dim (size 1 broadcasts), True = real.
    Padded keys are excluded (−inf), padded positions hash to the extra bucket nb (so they
    sort to the end of each round, as trax/HF).  Padded positions remain queries.
dedup : bool, default False (trax and HF omit the correction).
scale : float, default **1.0** (trax/HF: no 1/√D on top of the key normalization;
    pass scale = 1/√D to reproduce lucidrains/reformer-pytorch).
buckets : optional int array (..., r, N), e.g. ``ctx.buckets`` of an earlier call: skips
    hashing (a reversible block's recomputation must reuse the forward's buckets).
    ``rotations`` may then be None, in which case ``n_buckets`` is required.
impl : "auto" (= "numba") | "numba" | "ref".  Kernels: ``tinyeff/kernels/lsh.py``.

``k`` must be None or q itself (or an array equal to q): keys are the queries.  The
gradient of the shared qk comes back under "q" (it sums the query and the key paths).

Edge cases
----------
* A query always sees itself (unless it is padded or the keys are all excluded): if it sees
  nothing else in a round, that round's z is −1e5 and it gets weight exp(−1e5 − Z) ≈ 0
  unless every round is self-only; then out_i = v_i (the paper's "unless no other target"),
  exactly with one round and to about 1e-11 relative with several (the rounds' z ≈ −1e5 go
  through a log-sum-exp, and ulp(1e5) ≈ 1.5e-11).
* A query that sees no admissible key in any round outputs 0 and gets zero gradient.
* x = 0 hashes to bucket 0 (all projections tie at 0).
* N = 0 gives an empty output.

Peers
-----
* trax subtracts 1e5 (self) and 1e9 (causal, pad) from the logits; HF replaces them by
  −1e5 / −1e9.  tinyeff replaces the self logit (HF) and excludes causal/pad exactly; the
  results agree to float precision except for queries with no admissible key at all: HF
  replaces the padded self entry's −1e9 by −1e5, which wins, so HF outputs v_i; tinyeff
  outputs 0.
* Rotations shared over batch and heads (lucidrains' default); for HF's per-head R call
  once per head.  Factorised bucket lists ([b1, b2]) are not supported.
* lucidrains: scale = 1/√D, its ε is 1e-12 on ‖k‖, chunk = bucket size (set chunk_len and
  n_buckets accordingly); its duplicate masking when ``allow_duplicate_attention=False``
  is ``dedup=True`` up to the exact count.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import _checks
from ..ctx import Ctx
from ..ops import permute, softmax
from . import _lsh_hashing as hashing
from . import _nonfinite
from ._case import Case
from ._lsh_hashing import hash_buckets, hash_margin, suggest_n_buckets

NAME = "lsh"
SHARED_QK = True
SUPPORTS_MASK = True
SUPPORTS_CAUSAL = True
SUPPORTS_BIAS = False
SUPPORTS_REL_BIAS = False
KEY_PADDING = "key_padding_mask"
DIFFERENTIABLE = ("q", "v")
RANDOM_OPTIONS = ("rotations",)
REPLAY = {"buckets": "buckets"}   # option -> ctx field: reuse the forward's hashing
IMPLS = ("auto", "ref", "numba")

SELF_PENALTY = -1e5
NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class LSHCtx(Ctx):
    qk: np.ndarray                # (..., N, D) the input (a reference)
    v: np.ndarray                 # (..., N, Dv)
    key_mask: np.ndarray | None   # (..., N) bool, True = real key (broadcast to the batch)
    rn: np.ndarray                # (..., N) 1 / sqrt(‖qk‖² + D·ε), so k̂ = qk·rn
    buckets: np.ndarray           # (..., r, N) int64 bucket ids (nb for padded positions)
    perm: np.ndarray              # (..., r, N) int64 position at each sorted slot
    inv_perm: np.ndarray          # (..., r, N) int64 slot of each position
    z: np.ndarray                 # (..., r, N) float64 per-round log-sum-exp z_i^(r)
    lse: np.ndarray               # (..., N) float64 Z_i = logsumexp_r z_i^(r)
    out: np.ndarray               # (..., N, Dv) the returned output (a reference, as
                                  #   full/window/local/linear: δ_i = ⟨dout_i, out_i⟩)
    scale: float
    chunk_len: int
    n_buckets: int
    causal: bool
    dedup: bool
    impl: str


# ----------------------------------------------------------------------------- public helpers

def draw_random_options(rng: np.random.Generator, d: int, dtype=np.float64, *, n_hashes: int,
                        n_buckets: int, **_ignored) -> dict:
    """``{"rotations": (D, n_hashes, n_buckets // 2)}`` i.i.d. N(0, 1) from ``rng``."""
    rng = _checks.generator(rng)                  # an int/None/RandomState: clear TypeError
    n_hashes = _checks.integer(n_hashes, "n_hashes", minimum=1)
    n_buckets = _checks.integer(n_buckets, "n_buckets", minimum=2)
    if n_buckets % 2:
        raise ValueError(f"n_buckets must be even, got {n_buckets}")
    rot = rng.standard_normal((d, n_hashes, n_buckets // 2)).astype(dtype)  # (D, r, nb/2)
    return {"rotations": rot}


def inverse_norm(qk: np.ndarray) -> np.ndarray:
    """rn = 1 / sqrt(‖qk‖² + D·ε) in qk's dtype, so that k̂ = qk · rn."""
    d = qk.shape[-1]
    sq = np.einsum("...d,...d->...", qk, qk)                       # (..., N) ‖qk‖², no temporary
    return 1.0 / np.sqrt(sq + qk.dtype.type(d * NORM_EPS))         # (..., N)


def gradcheck_invariant(ctx: LSHCtx) -> np.ndarray:
    """The bucket ids: a finite-difference check must not see them change."""
    return ctx.buckets


# ----------------------------------------------------------------------------- forward/backward

@_nonfinite.nan_rows_of_v(replay=("buckets",))
def forward(q, k=None, v=None, *, rotations, chunk_len, n_buckets=None, causal=False,
            key_padding_mask=None, dedup=False, scale=None, buckets=None, impl="auto"):
    """LSH attention of the shared qk = q.  Returns ``(out (..., N, Dv), ctx)``."""
    qk = q
    if v is None:
        raise TypeError("v is required: forward(q, k=None, v=..., ...)")
    _checks.float_array(qk, "q", min_ndim=2)
    if k is not None and k is not qk:
        if not (isinstance(k, np.ndarray) and k.shape == qk.shape and k.dtype == qk.dtype
                and np.array_equal(k, qk)):
            raise ValueError("lsh shares queries and keys: k must be None or equal to q, got "
                             f"q {qk.shape} and k {getattr(k, 'shape', type(k).__name__)} "
                             "with different values")
    batch, n, _, d, dv, dtype = _checks.qkv(qk, qk, v)
    chunk_len = _checks.integer(chunk_len, "chunk_len", minimum=1)
    if n % chunk_len:
        raise ValueError(f"the sequence length N = {n} (q {qk.shape}) must be a multiple of "
                         f"chunk_len = {chunk_len}; pad the sequence")
    causal = _checks.flag(causal, "causal")
    dedup = _checks.flag(dedup, "dedup")
    scale = 1.0 if scale is None else _checks.scale(scale, d)
    impl = _checks.choice(impl, "impl", IMPLS)
    kpm = _checks.key_padding_mask(key_padding_mask, batch, n, name="key_padding_mask")
    n_hashes, n_buckets = hashing.check_hashing(rotations, buckets, n_buckets, batch, n, d, dtype)

    g = math.prod(batch)
    x = qk.reshape(g, n, d)                                        # (G, N, D)
    vv = v.reshape(g, n, dv)                                       # (G, N, Dv)
    kp = None if kpm is None else np.broadcast_to(kpm, (*batch, n)).reshape(g, n)  # (G, N)
    use_numba = impl in ("auto", "numba") and n > 0 and g > 0
    rn = inverse_norm(x)                                           # (G, N)

    if buckets is not None:
        bk = np.array(buckets, dtype=np.int64).reshape(g, n_hashes, n)  # (G, r, N) a copy
    elif use_numba:
        bk = hashing.hash_numba(x, rotations, n_hashes)                   # (G, r, N)
    else:
        bk = hash_buckets(x, rotations)                            # (G, r, N)
    if kp is not None:
        bk = np.where(kp[:, None, :], bk, n_buckets)               # (G, r, N) pads last
    if use_numba:
        perm, inv_perm = hashing.sort_numba(bk, n_buckets + 1)            # (G, r, N) each
        out, z, lse = _forward_numba(x, vv, rn, perm, inv_perm, kp, causal, dedup, scale,
                                     chunk_len)
    else:
        perm = np.argsort(bk, axis=-1, kind="stable")              # (G, r, N)
        inv_perm = permute.inverse(perm)                           # (G, r, N)
        out, z, lse = _forward_ref(x, vv, rn, perm, inv_perm, kp, causal, dedup, scale,
                                   chunk_len)
    def shaped(a, *tail):
        return a.reshape(*batch, *tail)

    out = shaped(out, n, dv)                                       # (..., N, Dv)
    ctx = LSHCtx(qk=qk, v=v, key_mask=None if kp is None else shaped(kp, n),
                 rn=shaped(rn, n), buckets=shaped(bk, n_hashes, n),
                 perm=shaped(perm, n_hashes, n), inv_perm=shaped(inv_perm, n_hashes, n),
                 z=shaped(z, n_hashes, n), lse=shaped(lse, n), out=out, scale=scale,
                 chunk_len=chunk_len, n_buckets=n_buckets, causal=causal, dedup=dedup,
                 impl="numba" if use_numba else "ref")
    return out, ctx


def backward(dout, ctx: LSHCtx, *, impl: str | None = None) -> dict:
    """Gradients ``{"q": dqk, "v": dv}`` (dqk sums the query and the normalized-key paths)."""
    if not isinstance(ctx, LSHCtx):
        raise TypeError(f"ctx must be the LSHCtx returned by lsh.forward, got "
                        f"{type(ctx).__name__}")
    dout = _checks.dout(dout, ctx.qk.shape[:-1] + ctx.v.shape[-1:], ctx.qk.dtype)
    impl = ctx.impl if impl is None else _checks.choice(impl, "impl", IMPLS)
    *batch, n, d = ctx.qk.shape
    dv_ = ctx.v.shape[-1]
    r = ctx.perm.shape[-2]
    g = math.prod(batch)
    flat = dict(
        x=ctx.qk.reshape(g, n, d), v=ctx.v.reshape(g, n, dv_), dout=dout.reshape(g, n, dv_),
        rn=ctx.rn.reshape(g, n), perm=ctx.perm.reshape(g, r, n),
        inv_perm=ctx.inv_perm.reshape(g, r, n), lse=ctx.lse.reshape(g, n),
        out=ctx.out.reshape(g, n, dv_),
        kp=None if ctx.key_mask is None else ctx.key_mask.reshape(g, n))
    if impl in ("auto", "numba") and n > 0 and g > 0:
        dx, dv = _backward_numba(flat, ctx)
    else:
        dx, dv = _backward_ref(flat, ctx)
    return {"q": dx.reshape(ctx.qk.shape), "v": dv.reshape(ctx.v.shape)}


# ----------------------------------------------------------------------------- reference

def _windows(x, v, rn, perm, inv_perm, kp, causal, dedup, scale, c):
    """Sort every round, chunk, and build each chunk's window logits.  (G-flattened arrays.)

    Returns a dict with sq (G, T, c, D) queries, bk (G, T, 2c, D) window keys,
    bv (G, T, 2c, Dv) window values, s (G, T, c, 2c) logits, allowed and is_self masks.
    """
    G, R, N = perm.shape
    D = x.shape[-1]
    T = R * N // c
    khat = x * rn[..., None]                                       # (G, N, D)
    # sort: slot s of round r holds position perm[r, s]; the rounds are concatenated
    sq = permute.forward(x[:, None], perm).reshape(G, T, c, D)     # (G, T, c, D)
    sk = permute.forward(khat[:, None], perm).reshape(G, T, c, D)  # (G, T, c, D)
    sv = permute.forward(v[:, None], perm).reshape(G, T, c, v.shape[-1])  # (G, T, c, Dv)
    spos = perm.reshape(G, T, c)                                   # (G, T, c) positions
    # look one chunk back, cyclically over the concatenated rounds
    bk = np.concatenate([np.roll(sk, 1, axis=1), sk], axis=2)      # (G, T, 2c, D)
    bv = np.concatenate([np.roll(sv, 1, axis=1), sv], axis=2)      # (G, T, 2c, Dv)
    bpos = np.concatenate([np.roll(spos, 1, axis=1), spos], axis=2)  # (G, T, 2c)
    qpos = spos[..., :, None]                                      # (G, T, c, 1)
    kpos = bpos[..., None, :]                                      # (G, T, 1, 2c)
    s = scale * (sq @ bk.swapaxes(-1, -2))                         # (G, T, c, 2c)
    is_self = qpos == kpos                                         # (G, T, c, 2c)
    s = np.where(is_self, s.dtype.type(SELF_PENALTY), s)           # (G, T, c, 2c)
    if dedup:
        s = s - np.log(_dedup_counts(inv_perm, spos, bpos, c)).astype(s.dtype)
    allowed = np.ones(s.shape, dtype=bool)                         # (G, T, c, 2c)
    if causal:
        allowed &= kpos <= qpos
    if kp is not None:
        allowed &= kp[np.arange(G)[:, None, None], bpos][..., None, :]
    return dict(sq=sq, bk=bk, bv=bv, s=s, allowed=allowed, is_self=is_self)


def _dedup_counts(inv_perm, spos, bpos, c):
    """N_ij for every window entry: occurrences of key j in query i's windows, all rounds."""
    G, R, N = inv_perm.shape
    T = R * N // c
    nc = N // c
    gchunk = (np.arange(R)[:, None] * N + inv_perm) // c           # (G, R, N) chunk of i in r
    gi = np.arange(G)[:, None, None, None]
    count = np.zeros(spos.shape + bpos.shape[-1:], dtype=np.int64)  # (G, T, c, 2c)
    for r2 in range(R):
        tq = np.take_along_axis(gchunk[:, r2], spos.reshape(G, R * N), axis=-1)
        tq = tq.reshape(spos.shape)                                # (G, T, c) i's chunk in r2
        for cw in ((tq - 1) % T, tq):                              # i's window in round r2
            hit = gchunk[gi, (cw // nc)[..., None], bpos[..., None, :]] == cw[..., None]
            count += hit                                           # (G, T, c, 2c)
    return count


def _combine_rounds(z):
    """Z = logsumexp_r z (−inf if every round is empty) and w_r = exp(z_r − Z), float64."""
    c = z.max(axis=1, keepdims=True)                               # (G, 1, N)
    c = np.where(c == -np.inf, 0.0, c)                             # constant shift
    with np.errstate(divide="ignore"):
        lse = c[:, 0] + np.log(np.exp(z - c).sum(axis=1))          # (G, N)
    w = np.exp(z - np.where(lse == -np.inf, 0.0, lse)[:, None])    # (G, R, N)
    return lse, w


def _rounds_ref(x, v, rn, perm, inv_perm, kp, causal, dedup, scale, c):
    """Per-round outputs o (G, R, N, Dv) and z (G, R, N) (float64), plus the window parts."""
    G, R, N = perm.shape
    win = _windows(x, v, rn, perm, inv_perm, kp, causal, dedup, scale, c)
    p, zs = softmax.forward(win["s"], win["allowed"])              # (G, T, c, 2c), (G, T, c)
    so = p @ win["bv"]                                             # (G, T, c, Dv)
    # unsort: position i of round r reads slot inv_perm[r, i]
    o = permute.forward(so.reshape(G, R, N, v.shape[-1]), inv_perm)  # (G, R, N, Dv)
    z = permute.forward(zs.reshape(G, R, N, 1), inv_perm)[..., 0]  # (G, R, N)
    return o, z.astype(np.float64), p, win


def _forward_ref(x, v, rn, perm, inv_perm, kp, causal, dedup, scale, c):
    # computed in float64 whatever the input dtype, rounded once at the end:
    # a float32 logit cannot hold SELF_PENALTY − log N_ij to better than ±0.004
    x64, v64, rn64 = (a.astype(np.float64) for a in (x, v, rn))
    o, z, _, _ = _rounds_ref(x64, v64, rn64, perm, inv_perm, kp, causal, dedup, scale, c)
    lse, w = _combine_rounds(z)                                    # (G, N), (G, R, N)
    out = np.sum(w[..., None] * o, axis=1).astype(x.dtype)         # (G, N, Dv)
    return out, z, lse


def _backward_ref(f, ctx: LSHCtx):
    dtype = f["x"].dtype
    x, v, dout, rn = (f[a].astype(np.float64) for a in ("x", "v", "dout", "rn"))  # as forward
    perm, inv_perm = f["perm"], f["inv_perm"]
    G, R, N = perm.shape
    d, dv_ = x.shape[-1], v.shape[-1]
    c = ctx.chunk_len
    T = R * N // c
    # recompute the forward (the context keeps nothing of size N·c)
    o, z, p, win = _rounds_ref(x, v, rn, perm, inv_perm, f["kp"], ctx.causal, ctx.dedup,
                               ctx.scale, c)
    lse, w = _combine_rounds(z)                                    # (G, N), (G, R, N)
    # fwd: out = Σ_r w_r o_r
    dw = np.sum(dout[:, None] * o, axis=-1)                        # (G, R, N)
    do = w[..., None] * dout[:, None]                              # (G, R, N, Dv)
    # fwd: w_r = exp(z_r − Z), Z = logsumexp_r z_r   (a softmax over the rounds)
    dz = w * (dw - np.sum(w * dw, axis=1, keepdims=True))          # (G, R, N)
    # fwd: o = permute.forward(so, inv_perm);  z = permute.forward(zs, inv_perm)
    dso = permute.backward(do, perm).reshape(G, T, c, dv_)         # (G, T, c, Dv)
    dzs = permute.backward(dz[..., None], perm).reshape(G, T, c)   # (G, T, c)
    # fwd: so = p @ bv
    dp = dso @ win["bv"].swapaxes(-1, -2)                          # (G, T, c, 2c)
    dbv = p.swapaxes(-1, -2) @ dso                                 # (G, T, 2c, Dv)
    # fwd: p = softmax(s);  zs = logsumexp(s)  (∂zs/∂s = p)
    ds = softmax.backward(dp, p) + p * dzs[..., None]              # (G, T, c, 2c)
    # fwd: s = where(is_self, SELF_PENALTY, scale * sq @ bkᵀ) − log N_ij   (constants)
    ds = np.where(win["is_self"], 0, ds)                           # (G, T, c, 2c)
    dsq = ctx.scale * (ds @ win["bk"])                             # (G, T, c, D)
    dbk = ctx.scale * (ds.swapaxes(-1, -2) @ win["sq"])            # (G, T, 2c, D)
    # fwd: bk = concat([roll(sk, 1, axis=chunks), sk])   (and bv alike)
    dsk = dbk[:, :, c:] + np.roll(dbk[:, :, :c], -1, axis=1)       # (G, T, c, D)
    dsv = dbv[:, :, c:] + np.roll(dbv[:, :, :c], -1, axis=1)       # (G, T, c, Dv)
    # fwd: sq = permute.forward(x, perm_r) for every round r (x shared by the rounds)
    dx = permute.backward(dsq.reshape(G, R, N, d), inv_perm).sum(axis=1)     # (G, N, D)
    dkhat = permute.backward(dsk.reshape(G, R, N, d), inv_perm).sum(axis=1)  # (G, N, D)
    dv = permute.backward(dsv.reshape(G, R, N, dv_), inv_perm).sum(axis=1)  # (G, N, Dv)
    # fwd: khat = x · rn,  rn = (‖x‖² + D·ε)^(−1/2)
    dx = dx + rn[..., None] * dkhat - (rn**3 * np.sum(x * dkhat, axis=-1))[..., None] * x
    return dx.astype(dtype), dv.astype(dtype)


# ----------------------------------------------------------------------------- Numba wrappers

# Kernel inputs go through np.require(..., "CW"): C-contiguous and writeable (a read-only
# input is copied), so read-only inputs reuse the kernels compiled for writeable ones.

def _kp_args(kp, g, n):
    if kp is None:
        return np.ones((1, 1), dtype=bool), False
    return np.require(kp, requirements="CW"), True


def _forward_numba(x, v, rn, perm, inv_perm, kp, causal, dedup, scale, c):
    from ..kernels import blas_single_thread
    from ..kernels import lsh as K
    g, r, n = perm.shape
    out = np.zeros((g, n, v.shape[-1]), dtype=x.dtype)             # (G, N, Dv)
    lse = np.empty((g, n))                                         # (G, N)
    z = np.empty((g, r, n))                                        # (G, R, N)
    kp_arr, use_kp = _kp_args(kp, g, n)
    x, v, rn = (np.require(a, requirements="CW") for a in (x, v, rn))
    with blas_single_thread():
        K.chunk_attend(out, lse, z, x, v, rn, perm, inv_perm, kp_arr, use_kp, causal, dedup,
                       x.dtype.type(scale), c, SELF_PENALTY)
    return out, z, lse


def _backward_numba(f, ctx: LSHCtx):
    from ..kernels import blas_single_thread
    from ..kernels import lsh as K
    x = np.require(f["x"], requirements="CW")
    v = np.require(f["v"], requirements="CW")
    dout = np.require(f["dout"], requirements="CW")
    rn = np.require(f["rn"], requirements="CW")
    perm = np.require(f["perm"], requirements="CW")
    inv_perm = np.require(f["inv_perm"], requirements="CW")
    lse = np.require(f["lse"], np.float64, "CW")
    g, n, d = x.shape
    dd = np.empty((g, n))                                          # (G, N) ⟨dout_i, out_i⟩
    K.row_dot(dd, dout, np.require(f["out"], requirements="CW"))
    kp_arr, use_kp = _kp_args(f["kp"], g, n)
    dx = np.zeros_like(x)                                          # (G, N, D)
    dv = np.zeros_like(v)                                          # (G, N, Dv)
    with blas_single_thread():
        K.chunk_attend_bwd(dx, dv, dout, dd, lse, x, v, rn, perm, inv_perm, kp_arr, use_kp,
                           ctx.causal, ctx.dedup, x.dtype.type(ctx.scale), ctx.chunk_len,
                           SELF_PENALTY)
    return dx, dv


# ----------------------------------------------------------------------------- example cases

def example_cases(rng: np.random.Generator, dtype=np.float64) -> list[Case]:
    """Small valid calls covering every option; inputs re-drawn until every bucket is
    robust to a ±1e-6 perturbation (relative hash margin ≥ 1e-3)."""
    b, h, d, dv = 2, 2, 5, 3

    def draw(n, n_hashes, n_buckets):
        rot = draw_random_options(rng, d, dtype, n_hashes=n_hashes,
                                  n_buckets=n_buckets)["rotations"]
        for _ in range(100):
            qk = rng.standard_normal((b, h, n, d)).astype(dtype)
            if hash_margin(qk, rot) >= 1e-3:
                break
        v = rng.standard_normal((b, h, n, dv)).astype(dtype)
        return {"q": qk, "v": v}, rot

    kpad = np.ones((b, 1, 12), dtype=bool)
    kpad[1, :, -4:] = False                                        # padding of batch 1
    a1, r1 = draw(8, 1, 4)
    a2, r2 = draw(12, 4, 4)
    a3, r3 = draw(12, 2, 4)
    a4, r4 = draw(12, 4, 6)
    a5, r5 = draw(8, 1, 2)
    return [
        Case("one_round", a1, {"rotations": r1, "chunk_len": 4}),
        Case("four_rounds_causal", a2, {"rotations": r2, "chunk_len": 3, "causal": True}),
        Case("padded_dedup", a3, {"rotations": r3, "chunk_len": 4,
                                  "key_padding_mask": kpad, "dedup": True}),
        Case("dedup_causal_scaled", a4, {"rotations": r4, "chunk_len": 2, "dedup": True,
                                         "causal": True, "scale": 0.5}),
        Case("one_chunk", a5, {"rotations": r5, "chunk_len": 8}),
    ]


# ----------------------------------------------------------------------------- benchmark data
def bench_options(n: int) -> dict:
    """Options ``python -m tinyeff bench`` runs at length n (``--opt`` overrides them)."""
    return {"chunk_len": 64, "n_hashes": 4, "n_buckets": suggest_n_buckets(n, 64)}


def scored_pairs(n: int, options: dict, causal: bool) -> int:
    """(query, key) pairs scored per batch·head at N = n: each chunk of each hash round
    attends to itself and to the previous chunk."""
    c, r = int(options.get("chunk_len", 64)), int(options.get("n_hashes", 1))
    return r * n * 2 * c


def useful_flops(n: int, d: int, options: dict, causal: bool) -> int | None:
    """Forward flops of the matrix products per batch·head: 2·P·D (q kᵀ) + 2·P·D (P v)."""
    pairs = scored_pairs(n, options, causal)
    return None if pairs is None else 4 * pairs * d


def extra_bytes(n: int, d: int, itemsize: int, options: dict, causal: bool) -> int:
    """Generous bound on the saved context and temporaries per batch·head: a few arrays per
    scored pair."""
    return 5 * scored_pairs(n, options, causal) * (itemsize + 8)


def demo_options(n: int, causal: bool) -> dict:
    """Options ``python -m tinyeff demo`` trains with at length n (``--opt`` overrides them;
    :func:`demo_build` completes them)."""
    from ._demo import span
    return {"chunk_len": span(n, 32), "n_hashes": 2}


def demo_build(n: int, options: dict) -> tuple[dict, dict]:
    """(attention options, model options) from :func:`demo_options` and ``--opt``:
    ``n_buckets`` (unless given) by :func:`suggest_n_buckets` at n rounded up to a multiple
    of ``chunk_len``; when n is not such a multiple the model pads inside attention
    (``pad_to_multiple=chunk_len``)."""
    c = int(options["chunk_len"])
    if c < 1:
        raise ValueError(f"chunk_len must be >= 1, got {options['chunk_len']!r}")
    n_pad = -(-n // c) * c
    opts = dict(options)
    opts.setdefault("n_buckets", suggest_n_buckets(n_pad, c))
    return opts, ({"pad_to_multiple": c} if n % c else {})
