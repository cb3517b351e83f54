"""A small module system with hand-written backward passes: the layer base class and the
position-wise layers of a Transformer.

The layer contract
------------------
A layer keeps its *parameters and their gradients*, never activations::

    y, ctx = layer.forward(x)          # ctx: a frozen dataclass with what the backward needs
    dx     = layer.backward(dy, ctx)   # accumulates (+=) into layer.grads[name]

* ``layer.params[name]`` and ``layer.grads[name]`` are arrays of the same shape and dtype;
  an optimizer updates ``params`` in place and :meth:`Layer.zero_grad` zeroes ``grads`` in
  place, so references held by an optimizer stay valid.
* Because gradients accumulate, a layer object used L times before one backward pass (ALBERT
  cross-layer sharing) receives the sum of its L gradients by construction: L forward calls
  give L separate contexts.
* ``layer.buffers[name]``: non-trainable state that belongs in a checkpoint (Performer
  features, LSH rotations drawn at initialisation).
* Sub-layers are found by attribute: any attribute holding a :class:`Layer`, or a list of
  them, is a child.  :meth:`Layer.named_parameters` walks the tree in attribute order and
  lists every *distinct* layer once, under the first name it is reached by, so a shared layer
  is counted once in :meth:`Layer.num_parameters` and saved once in a checkpoint.
* ``layer.training`` (set by :meth:`Layer.train` / :meth:`Layer.eval` on the whole tree)
  switches dropout off in evaluation.
* :meth:`Layer.vjp` (forward and backward in one call, no context kept by the caller) is what
  reversible blocks use to recompute; :class:`FeedForward` overrides it to work chunk by chunk.

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

# --------------------------------------------------------------------------------------------
# The base class
# --------------------------------------------------------------------------------------------


class Layer:
    """Base class: parameters, gradients, buffers, children, train/eval, zero_grad."""

    def __init__(self):
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.buffers: dict[str, np.ndarray] = {}
        self.training = True

    def add_param(self, name: str, value: np.ndarray) -> np.ndarray:
        self.params[name] = value
        self.grads[name] = np.zeros_like(value)
        return value

    # --- the tree -------------------------------------------------------------------------
    def children(self) -> dict[str, Layer]:
        """Direct sub-layers by attribute name (list elements as ``name.i``)."""
        found = {}
        for name, value in vars(self).items():
            if isinstance(value, Layer):
                found[name] = value
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, Layer):
                        found[f"{name}.{i}"] = item
        return found

    def named_layers(self, prefix: str = "", _seen: set | None = None):
        """Yield ``(qualified name, layer)`` for every distinct layer of the tree, pre-order."""
        seen = set() if _seen is None else _seen
        if id(self) in seen:
            return
        seen.add(id(self))
        yield prefix, self
        for name, child in self.children().items():
            yield from child.named_layers(f"{prefix}.{name}" if prefix else name, seen)

    def named_parameters(self) -> dict[str, np.ndarray]:
        """``{"blocks.0.attn.fn.q_proj.W": array, ...}``; a shared layer appears once."""
        return {_join(p, k): v for p, layer in self.named_layers() for k, v in layer.params.items()}

    def named_grads(self) -> dict[str, np.ndarray]:
        """Gradients under the same names as :meth:`named_parameters`."""
        return {_join(p, k): v for p, layer in self.named_layers() for k, v in layer.grads.items()}

    def named_buffers(self) -> dict[str, np.ndarray]:
        return {_join(p, k): v for p, layer in self.named_layers()
                for k, v in layer.buffers.items()}

    def num_parameters(self) -> int:
        """Number of trainable scalars, each shared parameter counted once."""
        return int(sum(v.size for v in self.named_parameters().values()))

    def zero_grad(self) -> None:
        for _, layer in self.named_layers():
            for g in layer.grads.values():
                g.fill(0)

    def train(self, mode: bool = True) -> Layer:
        for _, layer in self.named_layers():
            layer.training = bool(mode)
        return self

    def eval(self) -> Layer:
        return self.train(False)

    # --- computation ----------------------------------------------------------------------
    def forward(self, x, **kwargs):                     # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, dy, ctx):                        # pragma: no cover - abstract
        raise NotImplementedError

    def vjp(self, x, dy, **kwargs):
        """Recompute the forward at ``x`` and backpropagate ``dy``; returns ``(y, dx)``."""
        y, ctx = self.forward(x, **kwargs)
        return y, self.backward(dy, ctx)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _input(x, name: str, dtype, last: int) -> np.ndarray:
    """Validate a layer input: float ndarray of the layer's dtype with last dimension ``last``."""
    _checks.float_array(x, name, min_ndim=1, dtype=dtype)
    if x.shape[-1] != last:
        raise ValueError(f"{name} must have last dimension {last}, got shape {x.shape}")
    return x


def _dy(dy, shape, dtype) -> np.ndarray:
    return _checks.dout(dy, shape, dtype, name="dy")


def _rng(rng) -> np.random.Generator:
    if rng is None:
        return np.random.default_rng(0)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng


def _dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


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
        rng, self.dtype = _rng(rng), _dtype(dtype)
        self.d_in = _checks.integer(d_in, "d_in", minimum=1)
        self.d_out = _checks.integer(d_out, "d_out", minimum=1)
        self.add_param("W", (rng.standard_normal((d_in, d_out)) / math.sqrt(d_in))
                       .astype(self.dtype))                        # (d_in, d_out)
        if bias:
            self.add_param("b", np.zeros(d_out, self.dtype))       # (d_out,)

    def forward(self, x):
        _input(x, "x", self.dtype, self.d_in)
        y = x @ self.params["W"]                                   # (..., d_out)
        if "b" in self.params:
            y = y + self.params["b"]                               # (..., d_out)
        return y, LinearCtx(x=x)

    def backward(self, dy, ctx: LinearCtx):
        x = ctx.x
        _dy(dy, x.shape[:-1] + (self.d_out,), self.dtype)
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
        rng, self.dtype = _rng(rng), _dtype(dtype)
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
        _input(x, "x", self.dtype, self.d_in)
        h = x @ self.params["W1"]                                  # (..., r)
        y = h @ self.params["W2"]                                  # (..., d_out)
        if "b" in self.params:
            y = y + self.params["b"]                               # (..., d_out)
        return y, LowRankCtx(x=x, h=h)

    def backward(self, dy, ctx: LowRankCtx):
        x, h = ctx.x, ctx.h
        _dy(dy, x.shape[:-1] + (self.d_out,), self.dtype)
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


def _tokens(tokens, vocab: int, name: str = "tokens") -> np.ndarray:
    if not isinstance(tokens, np.ndarray) or not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"{name} must be an integer numpy.ndarray, got "
                        f"{type(tokens).__name__} {getattr(tokens, 'dtype', '')}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
        raise ValueError(f"{name} must lie in [0, {vocab}), got values in "
                         f"[{tokens.min()}, {tokens.max()}] (shape {tokens.shape})")
    return tokens


def _token_batch(tokens, vocab: int, max_len: int) -> tuple[int, int]:
    """Check model input tokens (B, N): integer ids in [0, vocab), 1 <= N <= max_len, B >= 1;
    returns (B, N)."""
    _tokens(tokens, vocab)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (B, N), got shape {tokens.shape}")
    b, n = tokens.shape
    if b == 0 or n == 0:
        raise ValueError(f"tokens must hold at least one sequence of at least one token, got "
                         f"shape {tokens.shape}")
    if n > max_len:
        raise ValueError(f"sequence length {n} exceeds max_len {max_len}")
    return b, n


def _key_padding(key_padding, b: int, n: int, name: str = "key_padding",
                 meaning: str = "True = real token") -> None:
    """None, or a bool array (B, N) (True = real token); TypeError for another type or
    dtype (nothing is cast), ValueError for another shape."""
    if key_padding is None:
        return
    if not isinstance(key_padding, np.ndarray):
        raise TypeError(f"{name} must be a bool numpy.ndarray of shape (B, N) = {(b, n)}, got "
                        f"{type(key_padding).__name__}")
    if key_padding.dtype != np.bool_:
        raise TypeError(f"{name} must be a bool array ({meaning}), got dtype "
                        f"{key_padding.dtype} (shape {key_padding.shape}); nothing is cast, "
                        f"pass e.g. {name} != 0")
    if key_padding.shape != (b, n):
        raise ValueError(f"{name} must be a bool array of shape (B, N) = {(b, n)}, got shape "
                         f"{key_padding.shape}")


class Embedding(Layer):
    """y = W[tokens], W (V, d) ~ N(0, std²), std = 1 (PyTorch's default).  Backward scatters
    dy into the rows used."""

    def __init__(self, vocab_size: int, dim: int, *, rng=None, dtype=np.float64,
                 std: float = 1.0):
        super().__init__()
        rng, self.dtype = _rng(rng), _dtype(dtype)
        self.vocab_size = _checks.integer(vocab_size, "vocab_size", minimum=1)
        self.dim = _checks.integer(dim, "dim", minimum=1)
        self.add_param("W", (std * rng.standard_normal((vocab_size, dim)))
                       .astype(self.dtype))                        # (V, d)

    def forward(self, tokens):
        _tokens(tokens, self.vocab_size)
        return self.params["W"][tokens], EmbeddingCtx(tokens=tokens)  # (..., d)

    def backward(self, dy, ctx: EmbeddingCtx):
        _dy(dy, ctx.tokens.shape + (self.dim,), self.dtype)
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
        rng = _rng(rng)
        self.dtype = _dtype(dtype)
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
        self.dtype = _dtype(dtype)
        self.dim = _checks.integer(dim, "dim", minimum=1)
        self.eps = _checks.positive_float(eps, "eps")
        self.add_param("gamma", np.ones(dim, self.dtype))          # (d,)
        self.add_param("beta", np.zeros(dim, self.dtype))          # (d,)

    def forward(self, x):
        _input(x, "x", self.dtype, self.dim)
        mu = x.mean(axis=-1, keepdims=True)                        # (..., 1)
        xc = x - mu                                                # (..., d)
        var = (xc * xc).mean(axis=-1, keepdims=True)               # (..., 1)
        rstd = 1.0 / np.sqrt(var + self.eps)                       # (..., 1)
        xhat = xc * rstd                                           # (..., d)
        y = xhat * self.params["gamma"] + self.params["beta"]      # (..., d)
        return y, LayerNormCtx(xhat=xhat, rstd=rstd)

    def backward(self, dy, ctx: LayerNormCtx):
        xhat, rstd = ctx.xhat, ctx.rstd
        _dy(dy, xhat.shape, self.dtype)
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
        _dy(dy, x.shape, x.dtype)
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
        rng = _rng(rng)
        self.dtype = _dtype(dtype)
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
        _input(x, "x", self.dtype, self.d_model)
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
