"""Transformer blocks (pre-LN and reversible) and the whole model, with hand-written backward.

Pre-LN block (GPT-2 / nanoGPT ordering), F = attention branch, G = feed-forward branch:

    h = x + F(x),   F(x) = MHA(LN₁(x))
    y = h + G(h),   G(h) = FFN(LN₂(h))
    backward:  dh = dy + Gᵀ(dy);   dx = dh + Fᵀ(dh)

Reversible block (Gomez et al. 2017; Reformer, Kitaev et al. 2020):

    y₁ = x₁ + F(x₂),   y₂ = x₂ + G(y₁)
    backward from (y₁, y₂, dy₁, dy₂), storing no activations:
        recompute G(y₁), backprop dy₂:   x₂ = y₂ − G(y₁),   dy₁' = dy₁ + Gᵀ(dy₂)
        recompute F(x₂), backprop dy₁':  x₁ = y₁ − F(x₂),   dx₂ = dy₂ + Fᵀ(dy₁'),  dx₁ = dy₁'
  The stream starts duplicated (x₁ = x₂ = embedding) and the two halves are merged by their
  average (y₁ + y₂)/2 — trax's enc-dec ``Reformer`` and lucidrains' choice; trax's
  ReformerLM and HF concatenate [y₁, y₂] and LayerNorm over 2d instead.  The reconstruction
  is exact up to round-off.  Dropout masks are replayed: the block records the Generator
  state of its dropout layers before the forward and restores it before recomputing
  (HF/lucidrains record RNG states the same way); after the backward every dropout
  Generator is put back where the forward left it, so the next step draws fresh masks.
  The discrete choices of the attention variant are replayed too: after each block's
  forward the model records the variant's ``REPLAY`` choices (LSH ``buckets``, read from
  its ctx) and passes them back as options when it recomputes, so the recomputation does
  not re-hash inputs that were reconstructed only up to round-off.

The model (``Transformer``):

    x = Embed(tokens) [+ absolute positions]                      (B, N, d)
    x = blocks(x)                                                 (B, N, d)
    h = LN_f(x)
    task "lm":        logits = h W_head + b                        (B, N, V), causal attention
    task "classify":  logits = mean_{real j}(h_j) W_head + b       (B, C), bidirectional

ALBERT cross-layer sharing (``share``, Lan et al. 2020): "attention" shares F = {LN₁, W_q,
W_k, W_v, W_o and biases} across all layers, "ffn" shares G = {LN₂, W₁, b₁, W₂, b₂}, "all"
shares both (ALBERT's released configuration), None shares nothing.  A shared layer is one
object called by every block, so it receives the sum of the L gradients and is counted
once in :meth:`Layer.num_parameters`.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from .. import _checks
from ..ctx import Ctx
from .attention import MultiHeadAttention, VariantParams, variant_module
from .layers import (
    Dropout,
    Embedding,
    FactorizedEmbedding,
    FeedForward,
    Layer,
    LayerNorm,
    Linear,
    PreNorm,
    _dtype,
    _key_padding,
    _token_batch,
)
from .losses import cross_entropy, cross_entropy_backward
from .positions import ALiBi, LearnedPositions, RelativePositionBias, RoPE, SinusoidalPositions


def _dropouts(*layers: Layer) -> list[Dropout]:
    found = {}
    for layer in layers:
        for _, sub in layer.named_layers():
            if isinstance(sub, Dropout):
                found[id(sub)] = sub
    return list(found.values())


def _replayable(*layers: Layer) -> list:
    """The attention layers (anything with ``last_replay``) inside ``layers``, each once."""
    found = {}
    for layer in layers:
        for _, sub in layer.named_layers():
            if hasattr(sub, "last_replay"):
                found[id(sub)] = sub
    return list(found.values())


def activation_nbytes(ctx) -> int:
    """Bytes of the arrays a (possibly nested) layer ctx keeps alive, each buffer once."""
    seen: dict[int, int] = {}

    def walk(obj):
        if isinstance(obj, np.ndarray):
            base = obj
            while isinstance(base.base, np.ndarray):
                base = base.base
            seen[id(base)] = base.nbytes
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for f in dataclasses.fields(obj):
                walk(getattr(obj, f.name))

    walk(ctx)
    return sum(seen.values())


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


def attention_branch(d_model: int, n_heads: int, attention: str = "full", *, rng, dtype,
                     **mha_kwargs) -> PreNorm:
    """F(x) = MHA(LN(x)) with the given variant and options."""
    return PreNorm(d_model, MultiHeadAttention(d_model, n_heads, attention, rng=rng,
                                               dtype=dtype, **mha_kwargs), dtype=dtype)


def ffn_branch(d_model: int, d_ff: int, *, rng, dtype, **ff_kwargs) -> PreNorm:
    """G(x) = FFN(LN(x))."""
    return PreNorm(d_model, FeedForward(d_model, d_ff, rng=rng, dtype=dtype, **ff_kwargs),
                   dtype=dtype)


@dataclasses.dataclass(frozen=True)
class BlockCtx(Ctx):
    attn: object                  # PreNorm ctx of F
    ffn: object                   # PreNorm ctx of G


class TransformerBlock(Layer):
    """Pre-LN residual block: h = x + F(x); y = h + G(h).

    ``TransformerBlock(attn, ffn)`` takes the two branches (``PreNorm`` layers, possibly
    shared with other blocks); :func:`attention_branch` and :func:`ffn_branch` build them.
    """

    def __init__(self, attn: Layer, ffn: Layer):
        super().__init__()
        self.attn, self.ffn = attn, ffn

    def forward(self, x, key_padding=None):
        a, ca = self.attn.forward(x, key_padding=key_padding)      # (B, N, d)
        h = x + a                                                  # (B, N, d)
        f, cf = self.ffn.forward(h)                                # (B, N, d)
        return h + f, BlockCtx(attn=ca, ffn=cf)

    def backward(self, dy, ctx: BlockCtx):
        # fwd: y = h + G(h)
        dh = dy + self.ffn.backward(dy, ctx.ffn)                   # (B, N, d)
        # fwd: h = x + F(x)
        return dh + self.attn.backward(dh, ctx.attn)               # (B, N, d)


class ReversibleBlock(Layer):
    """y₁ = x₁ + F(x₂), y₂ = x₂ + G(y₁) on a pair of streams; see the module docstring.

    ``forward((x1, x2))`` returns ``((y1, y2), ctx)`` and :meth:`backward` uses that ctx
    (ordinary backpropagation, used to test the reconstruction);
    :meth:`backward_reconstruct` needs only the outputs.
    """

    def __init__(self, attn: Layer, ffn: Layer):
        super().__init__()
        self.attn, self.ffn = attn, ffn

    def dropout_state(self) -> list:
        return [(d, d.get_state()) for d in _dropouts(self.attn, self.ffn)]

    def replay_state(self) -> list:
        """[(attention layer, its last forward's REPLAY choices)], e.g. LSH buckets."""
        return [(a, a.last_replay) for a in _replayable(self.attn) if a.last_replay]

    def forward(self, x, key_padding=None):
        x1, x2 = x
        f, ca = self.attn.forward(x2, key_padding=key_padding)     # (B, N, d)
        y1 = x1 + f                                                # (B, N, d)
        g, cg = self.ffn.forward(y1)                               # (B, N, d)
        y2 = x2 + g                                                # (B, N, d)
        return (y1, y2), BlockCtx(attn=ca, ffn=cg)

    def backward(self, dy, ctx: BlockCtx):
        dy1, dy2 = dy
        # fwd: y2 = x2 + G(y1)
        dy1 = dy1 + self.ffn.backward(dy2, ctx.ffn)                # (B, N, d)
        # fwd: y1 = x1 + F(x2)
        dx2 = dy2 + self.attn.backward(dy1, ctx.attn)              # (B, N, d)
        return dy1, dx2

    def backward_reconstruct(self, y, dy, key_padding=None, dropout_state=(), replay_state=()):
        """From outputs and their gradients to ``((x1, x2), (dx1, dx2))`` by recomputation.

        ``dropout_state`` and ``replay_state`` (from :meth:`dropout_state` before and
        :meth:`replay_state` after the forward) make the recomputation take the forward's
        dropout masks and discrete attention choices (LSH buckets), not fresh ones.
        """
        (y1, y2), (dy1, dy2) = y, dy
        for layer, state in dropout_state:
            layer.set_state(state)                                 # replay the forward's masks
        for layer, choices in replay_state:
            layer.replay_next = choices                            # replay e.g. LSH buckets
        # fwd: y2 = x2 + G(y1)  ->  recompute G(y1), backprop dy2
        g, dg = self.ffn.vjp(y1, dy2)                              # (B, N, d) each
        x2 = y2 - g                                                # (B, N, d)
        dy1 = dy1 + dg                                             # (B, N, d)
        # fwd: y1 = x1 + F(x2)  ->  recompute F(x2), backprop dy1
        f, df = self.attn.vjp(x2, dy1, key_padding=key_padding)    # (B, N, d) each
        x1 = y1 - f                                                # (B, N, d)
        return (x1, x2), (dy1, dy2 + df)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TransformerCtx(Ctx):
    embed: object
    pos: object                   # absolute-position ctx or None
    blocks: tuple                 # block ctxs (empty when the reversible path recomputes)
    y: tuple                      # reversible: final (y1, y2); else ()
    dropout_states: tuple         # reversible: per block [(Dropout, state)] before its forward
    dropout_end: tuple            # reversible: [(Dropout, state)] after the whole forward
    replays: tuple                # reversible: per block [(attention, REPLAY choices)]
    key_padding: np.ndarray | None
    norm: object
    pool: np.ndarray | None       # classify: (B, N) pooling weights
    head: object


class TokenModel(Layer):
    """A model from tokens (B, N) to logits, trained with cross-entropy: the training step
    shared by :class:`Transformer` and :class:`tinyeff.nn.hierarchical.HierarchicalTransformer`
    (subclasses provide ``forward(tokens, key_padding=) -> (logits, ctx)`` and
    ``backward(dlogits, ctx)``)."""

    def loss_and_grads(self, tokens, targets, *, key_padding=None, ignore_index: int = -100,
                       label_smoothing: float = 0.0, zero_grad: bool = True):
        """One training step's forward and backward.

        tokens (B, N) int; targets (B, N) int for per-token tasks ("lm": the next tokens;
        "token"), with ``ignore_index`` where no loss is wanted, or (B,) int for "classify".
        Zeroes the gradients first (unless ``zero_grad=False``, to accumulate), computes the
        mean cross-entropy and backpropagates.  Returns ``(loss: float, grads: {name:
        array})`` — the grads are the model's own accumulators (the same names as
        :meth:`named_parameters`).
        """
        if zero_grad:
            self.zero_grad()
        logits, ctx = self.forward(tokens, key_padding=key_padding)
        loss, lctx = cross_entropy(logits, targets, ignore_index=ignore_index,
                                   label_smoothing=label_smoothing)
        self.backward(cross_entropy_backward(lctx), ctx)
        return loss, self.named_grads()

    def logits(self, tokens, key_padding=None) -> np.ndarray:
        """Forward only (no ctx kept by the caller)."""
        return self.forward(tokens, key_padding=key_padding)[0]


class Transformer(TokenModel):
    """A Transformer over token ids: a causal LM (task="lm") or a classifier (task="classify").

    Parameters
    ----------
    vocab_size : V.
    d_model, n_heads, n_layers : width d, heads H, depth L.
    d_ff : feed-forward width (default 4·d).
    max_len : longest sequence (learned/sinusoidal tables, Linformer's E/F).
    attention : a name in ``tinyeff.attention.VARIANTS``; ``attention_options`` its options.
    positions : "learned" | "sinusoidal" | "rope" | "t5" | "clipped" | "alibi" | "none";
        ``position_options``: t5 {num_buckets, max_distance}, clipped {max_offset},
        rope {base}.  t5/clipped/alibi need a variant with ``SUPPORTS_REL_BIAS``.
    share : ALBERT cross-layer sharing, None | "attention" | "ffn" | "all".
    share_rel_bias : one relative-bias table for all layers (T5, default) or one per layer.
    share_layer_params : one set of the variant's layer parameters (Linformer E/F) for all
        layers; ``layer_params`` "layer" (shared by the heads) or "head".
    rank : low-rank projections (attention and feed-forward) of this rank, or None.
    shared_kv : one K/V head shared by all query heads.
    embed_dim : ALBERT factorised embedding width E (V×E then E×d), or None.
    reversible : reversible residual blocks (activations recomputed in the backward).
    ff_chunk : feed-forward chunk size along the sequence (Reformer), or None.
    task : "lm" (causal, logits (B, N, V)) or "classify" (bidirectional, logits (B, C)).
    n_classes : C for task="classify".
    dropout : dropout on the attention output and the feed-forward output.
    pad_to_multiple : see :class:`MultiHeadAttention`.
    seed, dtype : initialisation seed (numpy Generator) and float32/float64.
    """

    POSITIONS = ("learned", "sinusoidal", "rope", "t5", "clipped", "alibi", "none")
    REL_POSITIONS = ("t5", "clipped", "alibi")
    SHARE = ("attention", "ffn", "all")
    TASKS = ("lm", "classify")

    def __init__(self, vocab_size: int, d_model: int = 64, n_heads: int = 4, n_layers: int = 2,
                 d_ff: int | None = None, max_len: int = 128, *, attention: str = "full",
                 attention_options: dict | None = None, positions: str = "learned",
                 position_options: dict | None = None, share: str | None = None,
                 share_rel_bias: bool = True, share_layer_params: bool = False,
                 layer_params: str = "layer", rank: int | None = None, shared_kv: bool = False,
                 embed_dim: int | None = None, reversible: bool = False,
                 ff_chunk: int | None = None, task: str = "lm", n_classes: int | None = None,
                 dropout: float = 0.0, pad_to_multiple: int | None = None, seed: int = 0,
                 dtype=np.float32):
        super().__init__()
        self.config = dict(
            vocab_size=vocab_size, d_model=d_model, n_heads=n_heads, n_layers=n_layers,
            d_ff=d_ff, max_len=max_len, attention=attention,
            attention_options=dict(attention_options or {}), positions=positions,
            position_options=dict(position_options or {}), share=share,
            share_rel_bias=share_rel_bias, share_layer_params=share_layer_params,
            layer_params=layer_params, rank=rank, shared_kv=shared_kv, embed_dim=embed_dim,
            reversible=reversible, ff_chunk=ff_chunk, task=task, n_classes=n_classes,
            dropout=dropout, pad_to_multiple=pad_to_multiple, seed=seed,
            dtype=np.dtype(dtype).name)
        self.dtype = dtype = _dtype(dtype)
        self.vocab_size = _checks.integer(vocab_size, "vocab_size", minimum=1)
        self.d_model = _checks.integer(d_model, "d_model", minimum=1)
        self.n_layers = _checks.integer(n_layers, "n_layers", minimum=1)
        self.max_len = _checks.integer(max_len, "max_len", minimum=1)
        self.task = _checks.choice(task, "task", self.TASKS)
        self.positions = _checks.choice(positions, "positions", self.POSITIONS)
        if share is not None:
            _checks.choice(share, "share", self.SHARE)
        self.share = share
        self.reversible = _checks.flag(reversible, "reversible")
        self.recompute = True     # reversible: reconstruct in the backward (False: keep ctxs)
        mod = variant_module(attention)
        causal = self.task == "lm"
        if causal and not mod.SUPPORTS_CAUSAL:
            raise ValueError(f"attention {attention!r} does not support causal attention, so "
                             "it cannot be used for task='lm'; use task='classify'")
        if self.positions in self.REL_POSITIONS and not getattr(mod, "SUPPORTS_REL_BIAS",
                                                                 False):
            raise ValueError(f"positions={positions!r} needs a variant with relative-bias "
                             f"support; attention {attention!r} has SUPPORTS_REL_BIAS = False "
                             "(use 'rope', 'learned' or 'sinusoidal')")
        if self.task == "classify":
            self.n_classes = _checks.integer(n_classes, "n_classes", minimum=2)
        d_ff = 4 * d_model if d_ff is None else d_ff
        rng = np.random.default_rng(seed)
        popts = dict(position_options or {})

        # embeddings and absolute positions
        if embed_dim is None:
            self.embed = Embedding(vocab_size, d_model, rng=rng, dtype=dtype)
        else:
            self.embed = FactorizedEmbedding(vocab_size, embed_dim, d_model, rng=rng,
                                             dtype=dtype)
        self.pos = None
        if self.positions == "learned":
            self.pos = LearnedPositions(max_len, d_model, rng=rng, dtype=dtype)
        elif self.positions == "sinusoidal":
            self.pos = SinusoidalPositions(max_len, d_model, dtype=dtype)

        # attention-level positions (objects shared by the layers unless asked otherwise)
        def make_attn_positions():
            if self.positions == "rope":
                return RoPE(d_model // n_heads, dtype=dtype, **popts)
            if self.positions == "alibi":
                return ALiBi(n_heads, dtype=dtype)
            if self.positions in ("t5", "clipped"):
                return RelativePositionBias(n_heads, kind=self.positions,
                                            bidirectional=not causal, rng=rng, dtype=dtype,
                                            **popts)
            return None

        shared_pos = make_attn_positions()
        shared_vp = None
        if share_layer_params and getattr(mod, "LAYER_PARAMS", ()):
            shared_vp = VariantParams(mod, max_len, n_heads, per_head=layer_params == "head",
                                      rng=rng, dtype=dtype,
                                      options=dict(attention_options or {}))

        def make_attn():
            pos = shared_pos
            if self.positions in ("t5", "clipped") and not share_rel_bias:
                pos = make_attn_positions()
            return attention_branch(d_model, n_heads, attention, rng=rng, dtype=dtype,
                                    causal=causal, rank=rank, shared_kv=shared_kv,
                                    positions=pos, max_len=max_len, layer_params=layer_params,
                                    variant_params=shared_vp, pad_to_multiple=pad_to_multiple,
                                    dropout=dropout, **(attention_options or {}))

        def make_ffn():
            return ffn_branch(d_model, d_ff, rng=rng, dtype=dtype, rank=rank, chunk=ff_chunk,
                              dropout=dropout)

        block_cls = ReversibleBlock if self.reversible else TransformerBlock
        attn0 = make_attn() if share in ("attention", "all") else None
        ffn0 = make_ffn() if share in ("ffn", "all") else None
        self.blocks = [block_cls(attn0 or make_attn(), ffn0 or make_ffn())
                       for _ in range(n_layers)]
        self.norm = LayerNorm(d_model, dtype=dtype)
        n_out = vocab_size if self.task == "lm" else self.n_classes
        self.head = Linear(d_model, n_out, rng=rng, dtype=dtype)
        self.random_rng = rng     # for MultiHeadAttention.redraw via redraw_random_options

    # ------------------------------------------------------------------------------------
    def attention_layers(self) -> list[MultiHeadAttention]:
        """The distinct attention layers, in order."""
        return [layer for _, layer in self.named_layers()
                if isinstance(layer, MultiHeadAttention)]

    def redraw_random_options(self, rng: np.random.Generator | None = None) -> None:
        """Redraw every attention layer's random options (Performer features, LSH rotations)."""
        for layer in self.attention_layers():
            layer.redraw(self.random_rng if rng is None else rng)

    def forward(self, tokens, key_padding=None):
        """tokens (B, N) int, key_padding (B, N) bool (True = real) -> (logits, ctx)."""
        b, n = _token_batch(tokens, self.vocab_size, self.max_len)
        _key_padding(key_padding, b, n)
        x, ce = self.embed.forward(tokens)                         # (B, N, d)
        cp = None
        if self.pos is not None:
            x, cp = self.pos.forward(x)                            # (B, N, d)
        ctxs, states, replays, y = [], [], [], ()
        if not self.reversible:
            for block in self.blocks:
                x, c = block.forward(x, key_padding=key_padding)   # (B, N, d)
                ctxs.append(c)
            dropout_end = ()
        else:
            pair = (x, x)
            for block in self.blocks:
                states.append(block.dropout_state())
                pair, c = block.forward(pair, key_padding=key_padding)
                replays.append(block.replay_state())               # e.g. LSH buckets
                if not self.recompute:
                    ctxs.append(c)                                 # else dropped right here
            y = pair
            dropout_end = tuple((d, d.get_state()) for d in _dropouts(*self.blocks))
            x = 0.5 * (pair[0] + pair[1])                          # (B, N, d)
        h, cn = self.norm.forward(x)                               # (B, N, d)
        pool = None
        if self.task == "classify":
            pool = (np.ones((b, n), self.dtype) if key_padding is None
                    else key_padding.astype(self.dtype))           # (B, N)
            pool = pool / np.maximum(pool.sum(axis=1, keepdims=True), 1)  # (B, N)
            h = np.einsum("bn,bnd->bd", pool, h)                   # (B, d)
        logits, chead = self.head.forward(h)                       # (B, N, V) or (B, C)
        return logits, TransformerCtx(embed=ce, pos=cp, blocks=tuple(ctxs), y=y,
                                      dropout_states=tuple(states), dropout_end=dropout_end,
                                      replays=tuple(replays),
                                      key_padding=key_padding, norm=cn, pool=pool, head=chead)

    def backward(self, dlogits, ctx: TransformerCtx):
        """Accumulate every parameter's gradient from dlogits; returns None (tokens)."""
        dh = self.head.backward(dlogits, ctx.head)                 # (B, N, d) or (B, d)
        if ctx.pool is not None:
            # fwd: h = Σ_n pool[b, n] · h[b, n]
            dh = ctx.pool[:, :, None] * dh[:, None, :]             # (B, N, d)
        dx = self.norm.backward(dh, ctx.norm)                      # (B, N, d)
        kp = ctx.key_padding
        if not self.reversible:
            for block, c in zip(reversed(self.blocks), reversed(ctx.blocks)):
                dx = block.backward(dx, c)                         # (B, N, d)
        else:
            # fwd: x = (y1 + y2) / 2
            dpair = (0.5 * dx, 0.5 * dx)
            if self.recompute:
                pair = ctx.y
                for block, state, replay in zip(reversed(self.blocks),
                                                reversed(ctx.dropout_states),
                                                reversed(ctx.replays)):
                    pair, dpair = block.backward_reconstruct(pair, dpair, kp, state, replay)
                for layer, state in ctx.dropout_end:
                    layer.set_state(state)
            else:
                for block, c in zip(reversed(self.blocks), reversed(ctx.blocks)):
                    dpair = block.backward(dpair, c)
            # fwd: (x1, x2) = (x, x)
            dx = dpair[0] + dpair[1]                               # (B, N, d)
        if self.pos is not None:
            dx = self.pos.backward(dx, ctx.pos)                    # (B, N, d)
        self.embed.backward(dx, ctx.embed)
        return None

    def generate(self, prompt, n_new: int, *, rng: np.random.Generator,
                 temperature: float = 1.0, top_k: int | None = None) -> np.ndarray:
        """Sample ``n_new`` tokens after ``prompt`` (1-D int array) from an "lm" model.

        Each step runs the model on the last ``max_len`` tokens (no KV cache) in eval mode.
        """
        if self.task != "lm":
            raise ValueError("generate needs task='lm'")
        was_training = self.training
        self.eval()
        out = list(np.asarray(prompt, dtype=np.int64))
        try:
            for _ in range(int(n_new)):
                window = np.array(out[-self.max_len:], dtype=np.int64)[None]  # (1, n)
                z = self.logits(window)[0, -1].astype(np.float64) / float(temperature)  # (V,)
                if top_k is not None:
                    cut = np.sort(z)[-int(top_k)]
                    z = np.where(z < cut, -np.inf, z)
                p = np.exp(z - z.max())                            # (V,)
                out.append(int(rng.choice(self.vocab_size, p=p / p.sum())))
        finally:
            self.train(was_training)
        return np.array(out, dtype=np.int64)

    def config_json(self) -> str:
        """The constructor arguments as JSON (array-valued options cannot be stored)."""
        try:
            return json.dumps(self.config, sort_keys=True)
        except TypeError as e:
            raise TypeError(f"this model's config is not JSON-serialisable ({e}); array "
                            "options cannot be stored in a checkpoint config") from None

    @classmethod
    def from_config(cls, config: dict) -> Transformer:
        return cls(**config)
