"""The position-wise layers of a Transformer, with hand-written backward passes (the layer
contract and the base class :class:`~tinyeff.nn.base.Layer` are in :mod:`tinyeff.nn.base`).

Layers here (x (..., d_in), y (..., d_out); leading dimensions are batch and sequence)
-----------------------------------------------------------------------------------------
Linear           y = x W + b                          W (d_in, d_out), b (d_out,)
LowRankLinear    y = (x W1) W2 + b                    W1 (d_in, r), W2 (r, d_out):
                                                      (d_in + d_out)·r parameters
Embedding        y = W[tokens]                        W (V, d); tokens int array (...)
FactorizedEmbedding (ALBERT)  y = (W[tokens]) P + c   W (V, E), P (E, d): V·E + E·d parameters
LayerNorm        y = (x − μ)/√(σ² + eps) · γ + β      over the last axis; eps = 1e-5 (PyTorch)
GELU             y = x Φ(x)                           exact erf form (PyTorch's default GELU)
Dropout          y = x · mask / (1 − p)               mask ~ Bernoulli(1 − p) from the layer's
                                                      seeded Generator; identity in eval mode
FeedForward      y = Dropout(GELU(x W1 + b1) W2 + b2) optionally in chunks of ``chunk`` positions
PreNorm          y = fn(LayerNorm(x))                 the F and G of a pre-LN residual block

Initialisation (seeded through the Generator passed to each constructor): Linear weights
N(0, 1/d_in), low-rank factors N(0, 1/d_in) and N(0, 1/r) (so x W1 W2 has the variance of a
dense layer), biases 0, token embeddings N(0, 1) (PyTorch's ``nn.Embedding``; a small
std such as GPT-2's 0.02 makes LayerNorm of the residual stream badly conditioned in tiny
models), learned positions N(0, 0.02²), LayerNorm γ = 1, β = 0.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import special

from .. import _checks
from ..ctx import Ctx
from . import checks
from .base import Layer

# --------------------------------------------------------------------------------------------
# Linear maps
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LinearCtx(Ctx):
    x: np.ndarray                 # (..., d_in)


class Linear(Layer):
    """y = x W + b.  W (d_in, d_out) ~ N(0, 1/d_in), b (d_out,) = 0."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool = True, rng=None,
                 dtype=np.float64):
        super().__init__()
        rng, self.dtype = checks.generator(rng), checks.float_dtype(dtype)
        self.d_in = _checks.integer(d_in, "d_in", minimum=1)
        self.d_out = _checks.integer(d_out, "d_out", minimum=1)
        self.add_param("W", (rng.standard_normal((d_in, d_out)) / math.sqrt(d_in))
                       .astype(self.dtype))                        # (d_in, d_out)
        if bias:
            self.add_param("b", np.zeros(d_out, self.dtype))       # (d_out,)

    def forward(self, x):
        checks.layer_input(x, "x", self.dtype, self.d_in)
        y = x @ self.params["W"]                                   # (..., d_out)
        if "b" in self.params:
            y = y + self.params["b"]                               # (..., d_out)
        return y, LinearCtx(x=x)

    def backward(self, dy, ctx: LinearCtx):
        x = ctx.x
        checks.grad_output(dy, x.shape[:-1] + (self.d_out,), self.dtype)
        # fwd: y = x @ W + b
        self.grads["W"] += x.reshape(-1, self.d_in).T @ dy.reshape(-1, self.d_out)
        if "b" in self.params:
            self.grads["b"] += dy.reshape(-1, self.d_out).sum(axis=0)
        return dy @ self.params["W"].T                             # (..., d_in)


@dataclasses.dataclass(frozen=True)
class LowRankCtx(Ctx):
    x: np.ndarray                 # (..., d_in)
    h: np.ndarray                 # (..., r) = x W1


class LowRankLinear(Layer):
    """y = (x W1) W2 + b with W1 (d_in, r), W2 (r, d_out): the projection-compression option.

    (d_in + d_out)·r (+ d_out) parameters and flops per position instead of d_in·d_out.
    """

    def __init__(self, d_in: int, d_out: int, rank: int, *, bias: bool = True, rng=None,
                 dtype=np.float64):
        super().__init__()
        rng, self.dtype = checks.generator(rng), checks.float_dtype(dtype)
        self.d_in = _checks.integer(d_in, "d_in", minimum=1)
        self.d_out = _checks.integer(d_out, "d_out", minimum=1)
        self.rank = _checks.integer(rank, "rank", minimum=1)
        self.add_param("W1", (rng.standard_normal((d_in, rank)) / math.sqrt(d_in))
                       .astype(self.dtype))                        # (d_in, r)
        self.add_param("W2", (rng.standard_normal((rank, d_out)) / math.sqrt(rank))
                       .astype(self.dtype))                        # (r, d_out)
        if bias:
            self.add_param("b", np.zeros(d_out, self.dtype))       # (d_out,)

    def forward(self, x):
        checks.layer_input(x, "x", self.dtype, self.d_in)
        h = x @ self.params["W1"]                                  # (..., r)
        y = h @ self.params["W2"]                                  # (..., d_out)
        if "b" in self.params:
            y = y + self.params["b"]                               # (..., d_out)
        return y, LowRankCtx(x=x, h=h)

    def backward(self, dy, ctx: LowRankCtx):
        x, h = ctx.x, ctx.h
        checks.grad_output(dy, x.shape[:-1] + (self.d_out,), self.dtype)
        dy2 = dy.reshape(-1, self.d_out)                           # (P, d_out)
        # fwd: y = h @ W2 + b
        self.grads["W2"] += h.reshape(-1, self.rank).T @ dy2
        if "b" in self.params:
            self.grads["b"] += dy2.sum(axis=0)
        dh = dy @ self.params["W2"].T                              # (..., r)
        # fwd: h = x @ W1
        self.grads["W1"] += x.reshape(-1, self.d_in).T @ dh.reshape(-1, self.rank)
        return dh @ self.params["W1"].T                            # (..., d_in)


def make_linear(d_in: int, d_out: int, rank: int | None, *, rng, dtype, bias: bool = True):
    """A :class:`Linear`, or a :class:`LowRankLinear` when ``rank`` is given."""
    if rank is None:
        return Linear(d_in, d_out, bias=bias, rng=rng, dtype=dtype)
    return LowRankLinear(d_in, d_out, rank, bias=bias, rng=rng, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EmbeddingCtx(Ctx):
    tokens: np.ndarray            # (...) int


class Embedding(Layer):
    """y = W[tokens], W (V, d) ~ N(0, std²), std = 1 (PyTorch's default).  Backward scatters
    dy into the rows used."""

    def __init__(self, vocab_size: int, dim: int, *, rng=None, dtype=np.float64,
                 std: float = 1.0):
        super().__init__()
        rng, self.dtype = checks.generator(rng), checks.float_dtype(dtype)
        self.vocab_size = _checks.integer(vocab_size, "vocab_size", minimum=1)
        self.dim = _checks.integer(dim, "dim", minimum=1)
        self.add_param("W", (std * rng.standard_normal((vocab_size, dim)))
                       .astype(self.dtype))                        # (V, d)

    def forward(self, tokens):
        checks.token_ids(tokens, self.vocab_size)
        return self.params["W"][tokens], EmbeddingCtx(tokens=tokens)  # (..., d)

    def backward(self, dy, ctx: EmbeddingCtx):
        checks.grad_output(dy, ctx.tokens.shape + (self.dim,), self.dtype)
        # fwd: y = W[tokens]  (a token used twice receives both gradients)
        np.add.at(self.grads["W"], ctx.tokens.reshape(-1), dy.reshape(-1, self.dim))
        return None                                                # tokens are not differentiable


@dataclasses.dataclass(frozen=True)
class FactorizedEmbeddingCtx(Ctx):
    emb: EmbeddingCtx
    proj: LinearCtx


class FactorizedEmbedding(Layer):
    """ALBERT's factorised embedding: tokens -> V×E table -> dense E×d (with bias).

    V·E + E·d + d parameters instead of V·d.
    """

    def __init__(self, vocab_size: int, embed_dim: int, dim: int, *, rng=None,
                 dtype=np.float64):
        super().__init__()
        rng = checks.generator(rng)
        self.dtype = checks.float_dtype(dtype)
        self.vocab_size, self.dim = vocab_size, dim
        self.emb = Embedding(vocab_size, embed_dim, rng=rng, dtype=dtype)
        self.proj = Linear(embed_dim, dim, rng=rng, dtype=dtype)

    def forward(self, tokens):
        e, c1 = self.emb.forward(tokens)                           # (..., E)
        y, c2 = self.proj.forward(e)                               # (..., d)
        return y, FactorizedEmbeddingCtx(emb=c1, proj=c2)

    def backward(self, dy, ctx: FactorizedEmbeddingCtx):
        # fwd: y = proj(e) ; e = emb(tokens)
        de = self.proj.backward(dy, ctx.proj)                      # (..., E)
        return self.emb.backward(de, ctx.emb)


# --------------------------------------------------------------------------------------------
# Normalisation and non-linearities
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerNormCtx(Ctx):
    xhat: np.ndarray              # (..., d) normalised input
    rstd: np.ndarray              # (..., 1) 1/√(σ² + eps)


class LayerNorm(Layer):
    """y = (x − μ) / √(σ² + eps) · γ + β over the last axis (biased variance, as PyTorch)."""

    def __init__(self, dim: int, *, eps: float = 1e-5, dtype=np.float64):
        super().__init__()
        self.dtype = checks.float_dtype(dtype)
        self.dim = _checks.integer(dim, "dim", minimum=1)
        self.eps = _checks.positive_float(eps, "eps")
        self.add_param("gamma", np.ones(dim, self.dtype))          # (d,)
        self.add_param("beta", np.zeros(dim, self.dtype))          # (d,)

    def forward(self, x):
        checks.layer_input(x, "x", self.dtype, self.dim)
        mu = x.mean(axis=-1, keepdims=True)                        # (..., 1)
        xc = x - mu                                                # (..., d)
        var = (xc * xc).mean(axis=-1, keepdims=True)               # (..., 1)
        rstd = 1.0 / np.sqrt(var + self.eps)                       # (..., 1)
        xhat = xc * rstd                                           # (..., d)
        y = xhat * self.params["gamma"] + self.params["beta"]      # (..., d)
        return y, LayerNormCtx(xhat=xhat, rstd=rstd)

    def backward(self, dy, ctx: LayerNormCtx):
        xhat, rstd = ctx.xhat, ctx.rstd
        checks.grad_output(dy, xhat.shape, self.dtype)
        # fwd: y = xhat * gamma + beta
        self.grads["gamma"] += (dy * xhat).reshape(-1, self.dim).sum(axis=0)
        self.grads["beta"] += dy.reshape(-1, self.dim).sum(axis=0)
        dxhat = dy * self.params["gamma"]                          # (..., d)
        # fwd: xhat = (x − mean(x)) * rstd,  rstd = (mean((x − mean x)²) + eps)^(−1/2)
        #  -> dx = rstd · (dxhat − mean(dxhat) − xhat · mean(dxhat · xhat))
        return rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                       - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))  # (..., d)


@dataclasses.dataclass(frozen=True)
class GELUCtx(Ctx):
    x: np.ndarray                 # (..., d)


class GELU(Layer):
    """y = x Φ(x) = x (1 + erf(x/√2)) / 2 (exact form; PyTorch ``GELU()``, not the tanh one)."""

    def forward(self, x):
        _checks.float_array(x, "x")
        cdf = 0.5 * (1.0 + special.erf(x / math.sqrt(2.0)))       # (..., d)  Φ(x)
        return x * cdf, GELUCtx(x=x)

    def backward(self, dy, ctx: GELUCtx):
        x = ctx.x
        checks.grad_output(dy, x.shape, x.dtype)
        cdf = 0.5 * (1.0 + special.erf(x / math.sqrt(2.0)))       # (..., d)
        pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)      # (..., d)  φ(x)
        # fwd: y = x · Φ(x)  ->  dy/dx = Φ(x) + x φ(x)
        return (dy * (cdf + x * pdf)).astype(x.dtype, copy=False)  # (..., d)


@dataclasses.dataclass(frozen=True)
class DropoutCtx(Ctx):
    keep: np.ndarray | None       # (..., d) boolean mask, None when the layer was an identity


class Dropout(Layer):
    """Inverted dropout: y = x · keep / (1 − p), keep ~ Bernoulli(1 − p), in training only.

    The mask comes from the layer's own ``numpy.random.Generator`` (seeded at construction)
    and is saved in ctx, so the backward uses exactly the forward's mask.  The Generator's
    state can be read and restored (:meth:`get_state` / :meth:`set_state`); reversible blocks
    use this to replay the same masks when they recompute a forward.
    """

    def __init__(self, p: float = 0.0, *, seed: int = 0):
        super().__init__()
        self.p = float(p)
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"dropout p must be in [0, 1), got {p}")
        self.rng = np.random.default_rng(seed)

    def get_state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

    def forward(self, x):
        _checks.float_array(x, "x")
        if not self.training or self.p == 0.0:
            return x, DropoutCtx(keep=None)
        keep = self.rng.random(x.shape) >= self.p                  # (..., d) bool
        return x * keep * x.dtype.type(1.0 / (1.0 - self.p)), DropoutCtx(keep=keep)

    def backward(self, dy, ctx: DropoutCtx):
        if ctx.keep is None:
            return dy
        # fwd: y = x * keep / (1 − p)
        return dy * ctx.keep * dy.dtype.type(1.0 / (1.0 - self.p))  # (..., d)


# --------------------------------------------------------------------------------------------
# Feed-forward and the pre-norm wrapper
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FeedForwardCtx(Ctx):
    fc1: LinearCtx | LowRankCtx
    act: GELUCtx
    fc2: LinearCtx | LowRankCtx
    drop: DropoutCtx


@dataclasses.dataclass(frozen=True)
class ChunkedCtx(Ctx):
    chunks: tuple                 # one FeedForwardCtx per chunk of positions
    bounds: tuple                 # ((start, stop), ...) along the sequence axis


class FeedForward(Layer):
    """y = Dropout(GELU(x W1 + b1) W2 + b2), x (..., N, d), hidden width d_ff.

    ``rank`` makes both projections :class:`LowRankLinear`.  ``chunk`` (Reformer's chunked
    feed-forward) processes the sequence axis (−2) in slices of ``chunk`` positions; the map
    is position-wise so the result is identical, and :meth:`vjp` (what a reversible block
    calls) then recomputes and backpropagates one chunk at a time, so the (…, N, d_ff) hidden
    activation never exists in full.  ``chunk`` is a chunk *size*, as HF's
    ``chunk_size_feed_forward`` (lucidrains' ``ff_chunks`` is a number of chunks).
    """

    def __init__(self, d_model: int, d_ff: int, *, rank: int | None = None,
                 chunk: int | None = None, dropout: float = 0.0, rng=None, dtype=np.float64):
        super().__init__()
        rng = checks.generator(rng)
        self.dtype = checks.float_dtype(dtype)
        self.d_model = d_model
        self.chunk = None if chunk is None else _checks.integer(chunk, "chunk", minimum=1)
        self.fc1 = make_linear(d_model, d_ff, rank, rng=rng, dtype=dtype)
        self.act = GELU()
        self.fc2 = make_linear(d_ff, d_model, rank, rng=rng, dtype=dtype)
        self.drop = Dropout(dropout, seed=int(rng.integers(2**63)))

    def _bounds(self, n: int):
        step = n if self.chunk is None else self.chunk
        return tuple((s, min(s + step, n)) for s in range(0, max(n, 1), step))

    def _forward_one(self, x):
        h, c1 = self.fc1.forward(x)                                # (..., d_ff)
        a, c2 = self.act.forward(h)                                # (..., d_ff)
        y, c3 = self.fc2.forward(a)                                # (..., d)
        y, c4 = self.drop.forward(y)                               # (..., d)
        return y, FeedForwardCtx(fc1=c1, act=c2, fc2=c3, drop=c4)

    def _backward_one(self, dy, ctx: FeedForwardCtx):
        # fwd: y = drop(fc2(act(fc1(x))))
        da = self.fc2.backward(self.drop.backward(dy, ctx.drop), ctx.fc2)  # (..., d_ff)
        return self.fc1.backward(self.act.backward(da, ctx.act), ctx.fc1)  # (..., d)

    def forward(self, x):
        checks.layer_input(x, "x", self.dtype, self.d_model)
        if self.chunk is None or x.ndim < 2:
            return self._forward_one(x)
        bounds = self._bounds(x.shape[-2])
        outs, ctxs = zip(*(self._forward_one(x[..., s:e, :]) for s, e in bounds))
        return np.concatenate(outs, axis=-2), ChunkedCtx(chunks=ctxs, bounds=bounds)

    def backward(self, dy, ctx):
        if isinstance(ctx, FeedForwardCtx):
            return self._backward_one(dy, ctx)
        # fwd: y = concat(ff(x[chunk]) for chunk)
        return np.concatenate([self._backward_one(dy[..., s:e, :], c)
                               for (s, e), c in zip(ctx.bounds, ctx.chunks)], axis=-2)

    def vjp(self, x, dy, **kwargs):
        """Forward and backward chunk by chunk: peak memory O(chunk · d_ff), not O(N · d_ff)."""
        if self.chunk is None or x.ndim < 2:
            return super().vjp(x, dy)
        ys, dxs = [], []
        for s, e in self._bounds(x.shape[-2]):
            y, c = self._forward_one(x[..., s:e, :])
            ys.append(y)
            dxs.append(self._backward_one(dy[..., s:e, :], c))
        return np.concatenate(ys, axis=-2), np.concatenate(dxs, axis=-2)


@dataclasses.dataclass(frozen=True)
class PreNormCtx(Ctx):
    norm: LayerNormCtx
    fn: object                    # the wrapped layer's ctx


class PreNorm(Layer):
    """y = fn(LayerNorm(x)): the residual branch F (attention) or G (feed-forward) of a
    pre-LN block.  Keyword arguments of ``forward`` (e.g. ``key_padding``) go to ``fn``."""

    def __init__(self, dim: int, fn: Layer, *, dtype=np.float64):
        super().__init__()
        self.norm = LayerNorm(dim, dtype=dtype)
        self.fn = fn

    def forward(self, x, **kwargs):
        h, c1 = self.norm.forward(x)                               # (..., d)
        y, c2 = self.fn.forward(h, **kwargs)                       # (..., d)
        return y, PreNormCtx(norm=c1, fn=c2)

    def backward(self, dy, ctx: PreNormCtx):
        # fwd: y = fn(norm(x))
        return self.norm.backward(self.fn.backward(dy, ctx.fn), ctx.norm)

    def vjp(self, x, dy, **kwargs):
        h, c1 = self.norm.forward(x)                               # (..., d)
        y, dh = self.fn.vjp(h, dy, **kwargs)                       # (..., d), (..., d)
        return y, self.norm.backward(dh, c1)
