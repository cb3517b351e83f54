"""Transformer blocks (pre-LN and reversible) with hand-written backward passes.

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

The model built from these blocks is :class:`tinyeff.nn.Transformer` (:mod:`.transformer`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..ctx import Ctx
from .attention import MultiHeadAttention
from .base import Layer
from .layers import Dropout, FeedForward, PreNorm


def dropout_layers(*layers: Layer) -> list[Dropout]:
    """The Dropout layers inside ``layers``, each once."""
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
        return [(d, d.get_state()) for d in dropout_layers(self.attn, self.ffn)]

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
