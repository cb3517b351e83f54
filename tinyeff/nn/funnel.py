"""A Funnel-style encoder: local attention below, global attention over segment summaries
above, broadcast back to the tokens (a two-level hierarchy built across layers).

(Not the ``hierarchical`` attention variant, ``tinyeff/attention/hierarchical.py``, which
builds a hierarchy inside one attention layer; see "Peers" below.)

Shape letters: B batch, N tokens, d model width, H heads, k segment length,
C = ⌈N / k⌉ segments, σ(i) = ⌊i / k⌋ the segment of token i, S_c = {i : σ(i) = c}.

The encoder (``HierarchicalEncoder``, x (B, N, d) -> y (B, N, d))
--------------------------------------------------------------------
    h   = LowerBlocks(x)              n_lower pre-LN blocks, attention ``lower_attention``
                                       (default ``local`` with block = k: each token sees its
                                       own segment and the neighbouring ones)     (B, N, d)
    s_c = Pool_{i ∈ S_c}(h_i)          one summary per segment                   (B, C, d)
    s   = s + P_seg[:C]                learned (or sinusoidal) segment positions (optional)
    g   = UpperBlocks(s)               n_upper pre-LN blocks, attention ``upper_attention``
                                       (default ``full``): every summary sees every summary
    y_i = h_i + g_{σ(i)}               up-sampling by repetition plus the low-level residual
                                       (Funnel Transformer's decoder input)       (B, N, d)
    y   = RefineBlocks(y)              n_refine more lower-attention blocks (default 0;
                                       Funnel's decoder layers, for token-level outputs)

Pooling (``SegmentPool``), r_i ∈ {0, 1} the key-padding flag of token i (1 = real):

    mean:     s_c = Σ_{i∈S_c} r_i h_i / max(Σ_{i∈S_c} r_i, 1)
              (an exact mean over the real tokens of the segment; the last segment may be
              shorter than k when N is not a multiple of k, and its mean divides by its own
              length)
    learned:  per head η (H heads; the value channels of head η are the slice
              [η·Dh, (η+1)·Dh) of d, Dh = d/H), with a learned query u_η ∈ ℝ^d:
                  ĥ_i      = (h_i − mean(h_i)) / √(var(h_i) + 1e-5)     (no affine)
                  e_{iη}   = ⟨u_η, ĥ_i⟩ / √d
                  α_{iη}   = softmax_{i ∈ S_c, r_i = 1}(e_{·η})
                  s_{c,η}  = Σ_{i∈S_c} α_{iη} h_{i,η}
              u (H, d) starts at 0, so learned pooling starts as exactly the mean pooling.
              A key projection W_k before a single query would collapse into the one vector
              W_k u_η per head, so none is used; the values are the residual stream itself
              (the upper blocks project them).  The normalisation has no γ, β: with a
              single query γ would be redundant with u and β would cancel in the softmax.
    A segment with no real token gets s_c = 0 (and zero gradient) and is a padded key for the
    upper blocks (summary padding: any r_i in S_c); its upper output still reaches its own
    (padded) tokens only.

Segment length and the local block.  With ``lower_attention="local"`` the encoder sets the
variant's ``block`` to k itself, so the attention segments and the pooling segments are the
same cuts of the sequence (a different ``block`` in ``lower_options`` is an error).  The
default look-around is one segment on each side (``look_backward = look_forward = 1``): a
lower layer mixes a token with its segment and the two neighbours, the upper layers mix whole
segments.  With ``lower_attention="window"`` the default one-sided ``window`` is k (a token
sees ±k positions); any other variant takes ``lower_options`` as given.  N need not be a
multiple of k: the last segment is shorter (the ``local`` variant cuts it the same way).

Cost: lower layers O(N·3k·d) with ``local``; pooling and up-sampling O(N·d); upper layers
O(C²·d) = O(N²·d/k²) with ``full``.  The encoder is bidirectional (no causal option): a
summary mixes a segment's future tokens into its past ones.

The model (``HierarchicalTransformer``), tokens (B, N) int:

    x = Embed(tokens) + P[:N]              (learned or sinusoidal token positions)
    y = HierarchicalEncoder(x);  z = LN_f(y)
    task "classify":  logits = readout(z) W + b     (B, n_classes)
        readout "mean" (default): the mean of z over the real tokens — no [CLS] token is
        needed, and every segment's tokens contribute in proportion to their number;
        readout "first": z at position 0 (the first token must then be real).
    task "token":     logits = z W + b              (B, N, n_classes); targets (B, N) with
        ``ignore_index`` at padded positions.

The embedding, positions, readout, head and training API are the
:class:`~tinyeff.nn.Transformer`'s (both are a :class:`~tinyeff.nn.model.TokenModel`):
``loss_and_grads``, ``named_parameters`` / ``named_grads`` (so :class:`~tinyeff.nn.AdamW`,
``clip_grad_norm`` and ``checkpoint.save`` / ``load`` work unchanged), ``config`` /
``from_config``.

Peers: Funnel Transformer (Dai et al. 2020; HF transformers
``src/transformers/models/funnel/modeling_funnel.py``) pools by stride-2 mean pooling with
``pool_q_only`` attention, repeatedly, and separates [CLS]; here one pooling step of stride k
with a plain mean (or a learned-query attention pooling), no [CLS], and local attention below
the pooling.  Funnel's up-sampling (repeat to full length, add the first block's output) is
the one used.  H-Transformer-1D (Zhu & Soricut 2021; lucidrains/h-transformer-1d) builds the
hierarchy inside one attention layer; the ``hierarchical`` attention variant does that, this
encoder builds it across layers.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import _checks
from ..ctx import Ctx
from . import checks
from .attention import variant_module
from .base import Layer
from .blocks import TransformerBlock, attention_branch, ffn_branch
from .model import TokenModel
from .positions import LearnedPositions, SinusoidalPositions

POOLINGS = ("mean", "learned")
NORM_EPS = 1e-5
# the option of a lower variant that the encoder ties to the segment length, and its default
# look-around
SEGMENT_OPTION = {"local": "block", "window": "window"}
DEFAULT_LOWER_OPTIONS = {"local": {"look_backward": 1, "look_forward": 1}}


def n_segments(n: int, segment: int) -> int:
    """C = ⌈N / k⌉."""
    return -(-n // segment)


def segment_padding(key_padding, n: int, segment: int):
    """(B, N) token padding -> (B, C) summary padding (a segment is real if any token is)."""
    if key_padding is None:
        return None
    b = key_padding.shape[0]
    c = n_segments(n, segment)
    kp = np.zeros((b, c * segment), dtype=bool)                    # (B, C·k)
    kp[:, :n] = key_padding
    return kp.reshape(b, c, segment).any(axis=2)                   # (B, C)


def _by_segment(x, segment: int):
    """(B, N, ...) -> (B, C, k, ...), zero rows appended to fill the last segment."""
    b, n = x.shape[:2]
    c = n_segments(n, segment)
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, c * segment - n)
    return np.pad(x, pad).reshape((b, c, segment) + x.shape[2:])   # (B, C, k, ...)


def _from_segments(x, n: int):
    """(B, C, k, ...) -> (B, N, ...): the inverse of :func:`_by_segment` (drops the fill)."""
    b, c, k = x.shape[:3]
    return x.reshape((b, c * k) + x.shape[3:])[:, :n]              # (B, N, ...)


def upsample(g, n: int, segment: int):
    """u_i = g_{σ(i)}: (B, C, d) -> (B, N, d), repetition of each summary over its segment."""
    return np.repeat(g, segment, axis=1)[:, :n]                    # (B, N, d)


def upsample_backward(du, segment: int):
    """dg_c = Σ_{i∈S_c} du_i: (B, N, d) -> (B, C, d)."""
    return _by_segment(du, segment).sum(axis=2)                    # (B, C, d)


# --------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PoolCtx(Ctx):
    n: int                        # N
    xs: np.ndarray                # (B, C, k, H, Dh) input by segment (zero fill)
    w: np.ndarray                 # (B, C, k, H) pooling weights (0 on padding and fill)
    xhat: np.ndarray | None       # (B, C, k, d) normalised input (learned pooling)
    rstd: np.ndarray | None       # (B, C, k, 1) 1/√(var + eps) (learned pooling)


class SegmentPool(Layer):
    """Segment summaries s_c (B, C, d) from token states h (B, N, d): mean or learned pooling.

    ``forward(x, key_padding=None) -> (s, ctx)``; ``backward(ds, ctx) -> dx``.  See the module
    docstring for the formulas; the learned query is ``params["query"]`` (H, d), initially 0.
    """

    def __init__(self, d_model: int, n_heads: int, segment: int, *, pooling: str = "mean",
                 dtype=np.float64):
        super().__init__()
        self.dtype = checks.float_dtype(dtype)
        self.d_model, self.n_heads = checks.heads(d_model, n_heads)
        self.segment = _checks.integer(segment, "segment", minimum=1)
        self.pooling = _checks.choice(pooling, "pooling", POOLINGS)
        if self.pooling == "learned":
            self.add_param("query", np.zeros((n_heads, d_model), self.dtype))  # (H, d)

    def forward(self, x, key_padding=None):
        b, n = checks.sequence_input(x, self.dtype, self.d_model)
        checks.token_mask(key_padding, b, n)
        d, h, k = self.d_model, self.n_heads, self.segment
        real = np.ones((b, n), dtype=bool) if key_padding is None else key_padding  # (B, N)
        real_s = _by_segment(real, k)                              # (B, C, k) bool, fill False
        xs = _by_segment(x, k)                                     # (B, C, k, d)
        c = xs.shape[1]
        xhat = rstd = None
        if self.pooling == "mean":
            count = real_s.sum(axis=2, keepdims=True)              # (B, C, 1)
            w1 = real_s / np.maximum(count, 1)                     # (B, C, k)
            w = np.repeat(w1[..., None], h, axis=3).astype(self.dtype)  # (B, C, k, H)
        else:
            mu = xs.mean(axis=-1, keepdims=True)                   # (B, C, k, 1)
            xc = xs - mu                                           # (B, C, k, d)
            rstd = 1.0 / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + NORM_EPS)  # (B,C,k,1)
            xhat = xc * rstd                                       # (B, C, k, d)
            e = xhat @ self.params["query"].T / math.sqrt(d)       # (B, C, k, H)
            ok = real_s[..., None]                                 # (B, C, k, 1)
            e_max = np.where(ok, e, -np.inf).max(axis=2, keepdims=True)   # (B, C, 1, H)
            e_max = np.where(np.isfinite(e_max), e_max, 0.0)       # empty segment: any constant
            p = np.exp(np.where(ok, e - e_max, -np.inf))           # (B, C, k, H)
            den = p.sum(axis=2, keepdims=True)                     # (B, C, 1, H)
            w = (p / np.where(den > 0, den, 1.0)).astype(self.dtype)  # (B, C, k, H)
        xs = xs.reshape(b, c, k, h, d // h)                        # (B, C, k, H, Dh)
        s = np.einsum("bcjh,bcjhe->bche", w, xs).reshape(b, c, d)  # (B, C, d)
        return s, PoolCtx(n=n, xs=xs, w=w, xhat=xhat, rstd=rstd)

    def backward(self, ds, ctx: PoolCtx):
        xs, w = ctx.xs, ctx.w
        b, c, k, h, dh = xs.shape
        d = h * dh
        checks.grad_output(ds, (b, c, d), self.dtype)
        ds = ds.reshape(b, c, h, dh)                               # (B, C, H, Dh)
        # fwd: s[c, η] = Σ_j w[c, j, η] · x[c, j, η]
        dxs = np.einsum("bcjh,bche->bcjhe", w, ds).reshape(b, c, k, d)  # (B, C, k, d)
        if self.pooling == "learned":
            dw = np.einsum("bcjhe,bche->bcjh", xs, ds)             # (B, C, k, H)
            # fwd: w = softmax_j(e) over the real tokens (w = 0 elsewhere)
            de = w * (dw - (w * dw).sum(axis=2, keepdims=True))    # (B, C, k, H)
            # fwd: e = xhat @ query.T / √d
            u = self.params["query"]
            self.grads["query"] += np.einsum("bcjh,bcjd->hd", de, ctx.xhat) / math.sqrt(d)
            dxhat = de @ u / math.sqrt(d)                          # (B, C, k, d)
            # fwd: xhat = (x − mean(x)) · rstd  (the LayerNorm backward without γ)
            xhat, rstd = ctx.xhat, ctx.rstd
            dxs = dxs + rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                                - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
        return _from_segments(dxs, ctx.n)                          # (B, N, d)


# --------------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EncoderCtx(Ctx):
    n: int                        # N
    lower: tuple                  # block ctxs
    pool: PoolCtx
    seg_pos: object               # segment-position ctx or None
    upper: tuple                  # block ctxs
    refine: tuple                 # block ctxs


def _lower_options(name: str, segment: int, options: dict | None) -> dict:
    opts = dict(DEFAULT_LOWER_OPTIONS.get(name, {}))
    opts.update(options or {})
    tied = SEGMENT_OPTION.get(name)
    if name == "local" and opts.get(tied, segment) != segment:
        raise ValueError(f"lower_options block={opts[tied]} differs from segment={segment}: "
                         "the encoder pools over the local attention's segments, so the "
                         "local block is the segment length (leave block out)")
    if tied is not None:
        opts.setdefault(tied, segment)
    return opts


class HierarchicalEncoder(Layer):
    """Local attention -> segment pooling -> global attention over summaries -> up-sampling.

    Parameters
    ----------
    d_model, n_heads : width d and heads H (d % H == 0; also the heads of learned pooling).
    segment : segment length k (the ``local`` block).
    n_lower, n_upper, n_refine : numbers of lower (local), upper (global, over summaries) and
        refine (local, after up-sampling) pre-LN blocks.
    d_ff : feed-forward width (default 4·d).
    pooling : "mean" or "learned".
    lower_attention, lower_options : the variant of the lower and refine blocks (default
        "local", one segment of look-around on each side) and its options.
    upper_attention, upper_options : the variant over the summaries (default "full").
    max_len : the longest sequence: needed for ``summary_positions`` and for variants with
        layer parameters (Linformer E/F: max_len tokens below, ⌈max_len/k⌉ summaries above).
    summary_positions : "learned", "sinusoidal" or None: positions added to the summaries.
    dropout : dropout of the blocks.  rng, dtype : seeded Generator; float32 or float64.
    """

    def __init__(self, d_model: int, n_heads: int, *, segment: int, n_lower: int = 1,
                 n_upper: int = 1, n_refine: int = 0, d_ff: int | None = None,
                 pooling: str = "mean", lower_attention: str = "local",
                 lower_options: dict | None = None, upper_attention: str = "full",
                 upper_options: dict | None = None, max_len: int | None = None,
                 summary_positions: str | None = None, dropout: float = 0.0, rng=None,
                 dtype=np.float64):
        super().__init__()
        rng, self.dtype = checks.generator(rng), checks.float_dtype(dtype)
        self.d_model = _checks.integer(d_model, "d_model", minimum=1)
        self.segment = _checks.integer(segment, "segment", minimum=1)
        for name, value in (("n_lower", n_lower), ("n_upper", n_upper),
                            ("n_refine", n_refine)):
            _checks.integer(value, name, minimum=0)
        self.max_len = None if max_len is None else _checks.integer(max_len, "max_len",
                                                                    minimum=1)
        max_seg = None if max_len is None else n_segments(max_len, segment)
        variant_module(lower_attention), variant_module(upper_attention)  # known names
        self.lower_attention, self.upper_attention = lower_attention, upper_attention
        self.lower_options = _lower_options(lower_attention, segment, lower_options)
        self.upper_options = dict(upper_options or {})
        d_ff = 4 * d_model if d_ff is None else d_ff

        def block(variant, options, length):
            return TransformerBlock(
                attention_branch(d_model, n_heads, variant, rng=rng, dtype=self.dtype,
                                 max_len=length, dropout=dropout, **options),
                ffn_branch(d_model, d_ff, rng=rng, dtype=self.dtype, dropout=dropout))

        self.lower = [block(lower_attention, self.lower_options, max_len)
                      for _ in range(n_lower)]
        self.pool = SegmentPool(d_model, n_heads, segment, pooling=pooling, dtype=self.dtype)
        if summary_positions not in (None, "learned", "sinusoidal"):
            raise ValueError("summary_positions must be 'learned', 'sinusoidal' or None, got "
                             f"{summary_positions!r}")
        if summary_positions is not None and max_len is None:
            raise ValueError("summary_positions needs max_len (the table has ⌈max_len/segment⌉ "
                             "rows)")
        self.seg_pos = None
        if summary_positions == "learned":
            self.seg_pos = LearnedPositions(max_seg, d_model, rng=rng, dtype=self.dtype)
        elif summary_positions == "sinusoidal":
            self.seg_pos = SinusoidalPositions(max_seg, d_model, dtype=self.dtype)
        self.upper = [block(upper_attention, self.upper_options, max_seg)
                      for _ in range(n_upper)]
        self.refine = [block(lower_attention, self.lower_options, max_len)
                       for _ in range(n_refine)]

    def forward(self, x, key_padding=None):
        """x (B, N, d), key_padding (B, N) bool (True = real) or None -> (y (B, N, d), ctx)."""
        b, n = checks.sequence_input(x, self.dtype, self.d_model)
        checks.token_mask(key_padding, b, n)
        if self.max_len is not None and n > self.max_len:
            raise ValueError(f"sequence length {n} exceeds max_len {self.max_len}")
        seg_kp = segment_padding(key_padding, n, self.segment)     # (B, C) or None
        h, lower = x, []
        for blk in self.lower:
            h, c = blk.forward(h, key_padding=key_padding)         # (B, N, d)
            lower.append(c)
        s, cpool = self.pool.forward(h, key_padding=key_padding)   # (B, C, d)
        cpos = None
        if self.seg_pos is not None:
            s, cpos = self.seg_pos.forward(s)                      # (B, C, d)
        g, upper = s, []
        for blk in self.upper:
            g, c = blk.forward(g, key_padding=seg_kp)              # (B, C, d)
            upper.append(c)
        y = h + upsample(g, n, self.segment)                       # (B, N, d)
        refine = []
        for blk in self.refine:
            y, c = blk.forward(y, key_padding=key_padding)         # (B, N, d)
            refine.append(c)
        return y, EncoderCtx(n=n, lower=tuple(lower), pool=cpool, seg_pos=cpos,
                             upper=tuple(upper), refine=tuple(refine))

    def backward(self, dy, ctx: EncoderCtx):
        checks.grad_output(dy, (ctx.pool.xs.shape[0], ctx.n, self.d_model), self.dtype)
        for blk, c in zip(reversed(self.refine), reversed(ctx.refine)):
            dy = blk.backward(dy, c)                               # (B, N, d)
        # fwd: y = h + upsample(g)
        dh = dy                                                    # (B, N, d)
        dg = upsample_backward(dy, self.segment)                   # (B, C, d)
        for blk, c in zip(reversed(self.upper), reversed(ctx.upper)):
            dg = blk.backward(dg, c)                               # (B, C, d)
        if self.seg_pos is not None:
            # fwd: s = s + P_seg[:C]
            dg = self.seg_pos.backward(dg, ctx.seg_pos)            # (B, C, d)
        # fwd: s = pool(h)
        dh = dh + self.pool.backward(dg, ctx.pool)                 # (B, N, d)
        for blk, c in zip(reversed(self.lower), reversed(ctx.lower)):
            dh = blk.backward(dh, c)                               # (B, N, d)
        return dh


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class HierarchicalTransformer(TokenModel):
    """Token ids -> :class:`HierarchicalEncoder` -> class logits (B, C) or token logits
    (B, N, C).  Same training API as :class:`~tinyeff.nn.Transformer`.

    Parameters
    ----------
    vocab_size : V.   d_model, n_heads : width d, heads H.
    segment, n_lower, n_upper, n_refine, d_ff, pooling, lower_attention, lower_options,
    upper_attention, upper_options, dropout : see :class:`HierarchicalEncoder`.
    max_len : longest sequence (position tables).
    positions : "learned" | "sinusoidal" | "none": token positions, and the same kind of
        positions for the segment summaries (⌈max_len/segment⌉ rows).
    task : "classify" (logits (B, n_classes), targets (B,)) or "token" (logits
        (B, N, n_classes), targets (B, N)).
    readout : "mean" (over the real tokens; default) or "first" (position 0), classify only.
    seed, dtype : initialisation seed; float32 or float64.
    """

    TASKS = ("classify", "token")
    READOUTS = ("mean", "first")
    POSITIONS = ("learned", "sinusoidal", "none")

    def __init__(self, vocab_size: int, d_model: int = 64, n_heads: int = 4, *,
                 segment: int = 16, n_lower: int = 1, n_upper: int = 1, n_refine: int = 0,
                 d_ff: int | None = None, max_len: int = 1024, pooling: str = "mean",
                 lower_attention: str = "local", lower_options: dict | None = None,
                 upper_attention: str = "full", upper_options: dict | None = None,
                 positions: str = "learned", task: str = "classify",
                 n_classes: int | None = None, readout: str = "mean", dropout: float = 0.0,
                 seed: int = 0, dtype=np.float32):
        super().__init__()
        self.config = dict(
            vocab_size=vocab_size, d_model=d_model, n_heads=n_heads, segment=segment,
            n_lower=n_lower, n_upper=n_upper, n_refine=n_refine, d_ff=d_ff, max_len=max_len,
            pooling=pooling, lower_attention=lower_attention,
            lower_options=dict(lower_options or {}), upper_attention=upper_attention,
            upper_options=dict(upper_options or {}), positions=positions, task=task,
            n_classes=n_classes, readout=readout, dropout=dropout, seed=seed,
            dtype=np.dtype(dtype).name)
        self.dtype = dtype = checks.float_dtype(dtype)
        self.vocab_size = _checks.integer(vocab_size, "vocab_size", minimum=1)
        self.max_len = _checks.integer(max_len, "max_len", minimum=1)
        self.task = _checks.choice(task, "task", self.TASKS)
        self.readout = _checks.choice(readout, "readout", self.READOUTS)
        self.positions = _checks.choice(positions, "positions", self.POSITIONS)
        self.n_classes = _checks.integer(n_classes, "n_classes", minimum=2)
        rng = np.random.default_rng(seed)
        self.build_input(rng, vocab_size, d_model, self.positions)
        self.encoder = HierarchicalEncoder(
            d_model, n_heads, segment=segment, n_lower=n_lower, n_upper=n_upper,
            n_refine=n_refine, d_ff=d_ff, pooling=pooling, lower_attention=lower_attention,
            lower_options=lower_options, upper_attention=upper_attention,
            upper_options=upper_options, max_len=max_len,
            summary_positions=None if self.positions == "none" else self.positions,
            dropout=dropout, rng=rng, dtype=dtype)
        self.build_output(rng, d_model, self.n_classes)

    def body_forward(self, x, key_padding):
        """x (B, N, d) -> (HierarchicalEncoder(x) (B, N, d), ctx)."""
        return self.encoder.forward(x, key_padding=key_padding)

    def body_backward(self, dy, ctx: EncoderCtx):
        """dy (B, N, d) -> dx (B, N, d) through the encoder."""
        return self.encoder.backward(dy, ctx)
