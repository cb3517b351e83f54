"""The Transformer over token ids: a causal LM or a classifier, with hand-written backward.

    x = Embed(tokens) [+ absolute positions]                      (B, N, d)
    x = blocks(x)                                                 (B, N, d)
    h = LN_f(x)
    task "lm":        logits = h W_head + b                        (B, N, V), causal attention
    task "classify":  logits = mean_{real j}(h_j) W_head + b       (B, C), bidirectional

The embedding, positions, head, readout and training step are :class:`.model.TokenModel`'s;
the blocks (pre-LN or reversible) are those of :mod:`.blocks`.

ALBERT cross-layer sharing (``share``, Lan et al. 2020): "attention" shares F = {LN₁, W_q,
W_k, W_v, W_o and biases} across all layers, "ffn" shares G = {LN₂, W₁, b₁, W₂, b₂}, "all"
shares both (ALBERT's released configuration), None shares nothing.  A shared layer is one
object called by every block, so it receives the sum of the L gradients and is counted
once in :meth:`Layer.num_parameters`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import _checks
from ..ctx import Ctx
from . import checks
from .attention import MultiHeadAttention, VariantParams, variant_module
from .blocks import (
    ReversibleBlock,
    TransformerBlock,
    attention_branch,
    dropout_layers,
    ffn_branch,
)
from .model import TokenModel
from .positions import ALiBi, RelativePositionBias, RoPE


@dataclasses.dataclass(frozen=True)
class StackCtx(Ctx):
    blocks: tuple                 # block ctxs (empty when the reversible path recomputes)
    y: tuple                      # reversible: final (y1, y2); else ()
    dropout_states: tuple         # reversible: per block [(Dropout, state)] before its forward
    dropout_end: tuple            # reversible: [(Dropout, state)] after the whole forward
    replays: tuple                # reversible: per block [(attention, REPLAY choices)]
    key_padding: np.ndarray | None


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
    readout = "mean"              # task "classify": the mean over the real tokens

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
        self.dtype = dtype = checks.float_dtype(dtype)
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
        self.build_input(rng, vocab_size, d_model, self.positions, embed_dim=embed_dim)

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
        self.build_output(rng, d_model, vocab_size if self.task == "lm" else self.n_classes)
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

    def body_forward(self, x, key_padding):
        """x (B, N, d) -> blocks(x) (B, N, d); reversible: the mean of the two streams."""
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
            dropout_end = tuple((d, d.get_state()) for d in dropout_layers(*self.blocks))
            x = 0.5 * (pair[0] + pair[1])                          # (B, N, d)
        return x, StackCtx(blocks=tuple(ctxs), y=y, dropout_states=tuple(states),
                           dropout_end=dropout_end, replays=tuple(replays),
                           key_padding=key_padding)

    def body_backward(self, dx, ctx: StackCtx):
        """Backward of :meth:`body_forward` (reversible: by reconstruction unless
        ``recompute`` is False)."""
        if not self.reversible:
            for block, c in zip(reversed(self.blocks), reversed(ctx.blocks)):
                dx = block.backward(dx, c)                         # (B, N, d)
            return dx
        # fwd: x = (y1 + y2) / 2
        dpair = (0.5 * dx, 0.5 * dx)
        if self.recompute:
            pair = ctx.y
            for block, state, replay in zip(reversed(self.blocks),
                                            reversed(ctx.dropout_states),
                                            reversed(ctx.replays)):
                pair, dpair = block.backward_reconstruct(pair, dpair, ctx.key_padding, state,
                                                         replay)
            for layer, state in ctx.dropout_end:
                layer.set_state(state)
        else:
            for block, c in zip(reversed(self.blocks), reversed(ctx.blocks)):
                dpair = block.backward(dpair, c)
        # fwd: (x1, x2) = (x, x)
        return dpair[0] + dpair[1]                                 # (B, N, d)

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
