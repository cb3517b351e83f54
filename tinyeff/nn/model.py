"""What the token models share: tokens (B, N) -> logits, trained with cross-entropy.

:class:`~tinyeff.nn.Transformer` and :class:`~tinyeff.nn.HierarchicalTransformer` differ
only in the body between the embedding and the head:

    x = Embed(tokens) [+ P[:N]]                  (B, N, d)   learned or sinusoidal positions
    y = body(x, key_padding)                     (B, N, d)   blocks, or an encoder
    z = LN_f(y)                                  (B, N, d)
    per-token tasks ("lm", "token"):  logits = z W + b                      (B, N, C)
    task "classify":                  logits = (Σ_n r_{bn} z_{bn}) W + b    (B, C)
        readout "mean": r_{bn} = real_{bn} / max(Σ_m real_{bm}, 1), the mean over the real
        tokens (every token is real without key padding); readout "first": r_{bn} = [n = 0]

A subclass sets ``vocab_size``, ``max_len``, ``dtype``, ``task``, ``readout`` and ``config``
(its constructor arguments), builds ``embed``/``pos`` with :meth:`TokenModel.build_input`,
its body, then ``norm``/``head`` with :meth:`TokenModel.build_output` (in this order: the
order of the attributes is the order of the parameters), and implements
``body_forward(x, key_padding) -> (y, ctx)`` and ``body_backward(dy, ctx) -> dx``.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from ..ctx import Ctx
from . import checks
from .base import Layer
from .layers import Embedding, FactorizedEmbedding, LayerNorm, Linear
from .losses import cross_entropy, cross_entropy_backward
from .positions import LearnedPositions, SinusoidalPositions


@dataclasses.dataclass(frozen=True)
class TokenModelCtx(Ctx):
    embed: object
    pos: object                   # absolute-position ctx or None
    body: object                  # the subclass's ctx
    norm: object
    readout: np.ndarray | None    # classify: (B, N) readout weights
    head: object


def readout_weights(readout: str, key_padding, b: int, n: int, dtype) -> np.ndarray:
    """r (B, N): "mean" over the real tokens, or "first" (position 0)."""
    if readout == "first":
        weights = np.zeros((b, n), dtype)                          # (B, N)
        weights[:, 0] = 1
        return weights
    weights = (np.ones((b, n), dtype) if key_padding is None
               else key_padding.astype(dtype))                     # (B, N)
    return weights / np.maximum(weights.sum(axis=1, keepdims=True), 1)  # (B, N)


class TokenModel(Layer):
    """A model from tokens (B, N) to logits; see the module docstring."""

    def build_input(self, rng, vocab_size: int, d_model: int, positions: str, *,
                    embed_dim: int | None = None) -> None:
        """``self.embed`` (factorised with ``embed_dim``, ALBERT) and ``self.pos`` ("learned",
        "sinusoidal", or None for any other ``positions``)."""
        if embed_dim is None:
            self.embed = Embedding(vocab_size, d_model, rng=rng, dtype=self.dtype)
        else:
            self.embed = FactorizedEmbedding(vocab_size, embed_dim, d_model, rng=rng,
                                             dtype=self.dtype)
        self.pos = None
        if positions == "learned":
            self.pos = LearnedPositions(self.max_len, d_model, rng=rng, dtype=self.dtype)
        elif positions == "sinusoidal":
            self.pos = SinusoidalPositions(self.max_len, d_model, dtype=self.dtype)

    def build_output(self, rng, d_model: int, n_out: int) -> None:
        """``self.norm`` (LN_f) and ``self.head`` (d -> n_out)."""
        self.norm = LayerNorm(d_model, dtype=self.dtype)
        self.head = Linear(d_model, n_out, rng=rng, dtype=self.dtype)

    def body_forward(self, x, key_padding):                # pragma: no cover - abstract
        raise NotImplementedError

    def body_backward(self, dy, ctx):                      # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, tokens, key_padding=None):
        """tokens (B, N) int, key_padding (B, N) bool (True = real) -> (logits, ctx)."""
        b, n = checks.token_batch(tokens, self.vocab_size, self.max_len)
        checks.token_mask(key_padding, b, n)
        x, ce = self.embed.forward(tokens)                         # (B, N, d)
        cp = None
        if self.pos is not None:
            x, cp = self.pos.forward(x)                            # (B, N, d)
        y, cbody = self.body_forward(x, key_padding)               # (B, N, d)
        z, cn = self.norm.forward(y)                               # (B, N, d)
        weights = None
        if self.task == "classify":
            weights = readout_weights(self.readout, key_padding, b, n, self.dtype)  # (B, N)
            z = np.einsum("bn,bnd->bd", weights, z)                # (B, d)
        logits, chead = self.head.forward(z)                       # (B, N, C) or (B, C)
        return logits, TokenModelCtx(embed=ce, pos=cp, body=cbody, norm=cn, readout=weights,
                                     head=chead)

    def backward(self, dlogits, ctx: TokenModelCtx):
        """Accumulate every parameter's gradient from dlogits; returns None (tokens)."""
        dz = self.head.backward(dlogits, ctx.head)                 # (B, N, d) or (B, d)
        if ctx.readout is not None:
            # fwd: z = Σ_n r[b, n] · z[b, n]
            dz = ctx.readout[:, :, None] * dz[:, None, :]          # (B, N, d)
        dy = self.norm.backward(dz, ctx.norm)                      # (B, N, d)
        dx = self.body_backward(dy, ctx.body)                      # (B, N, d)
        if self.pos is not None:
            dx = self.pos.backward(dx, ctx.pos)                    # (B, N, d)
        self.embed.backward(dx, ctx.embed)
        return None

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

    def config_json(self) -> str:
        """The constructor arguments as JSON (array-valued options cannot be stored)."""
        try:
            return json.dumps(self.config, sort_keys=True)
        except TypeError as e:
            raise TypeError(f"this model's config is not JSON-serialisable ({e}); array "
                            "options cannot be stored in a checkpoint config") from None

    @classmethod
    def from_config(cls, config: dict) -> TokenModel:
        """The model built from :attr:`config` (fresh parameters)."""
        return cls(**config)
