"""Position encodings: absolute (learned, sinusoidal), relative biases (clipped, T5 buckets,
ALiBi) and rotary embeddings (RoPE), each with its backward.

Absolute (added to the token embeddings, x (B, N, d))
-----------------------------------------------------
LearnedPositions     y = x + P[:N],  P (max_len, d) ~ N(0, 0.02²)      (BERT, GPT-2)
SinusoidalPositions  y = x + T[:N],  T[p, 2i] = sin(p / 10000^(2i/d)),
                                     T[p, 2i+1] = cos(p / 10000^(2i/d))  (Vaswani et al. 2017)

Relative biases (added to the attention scores through the contract's ``rel_bias``)
-----------------------------------------------------------------------------------
Every variant with ``SUPPORTS_REL_BIAS`` takes ``rel_bias (..., N + M − 1)`` with
bias_ij = rel_bias[..., i − j + M − 1]; so a scheme that depends only on the offset i − j is
an (H, N + M − 1) vector, O(N) memory, never (N, M).  With t = i − j + M − 1 the key-minus-
query offset is  n = j − i = (M − 1) − t.

RelativePositionBias(kind="t5")       bias_h(i, j) = table[h, bucket(j − i)]      (Raffel et al.)
    T5's ``_relative_position_bucket`` (HF ``t5/modeling_t5.py``), 32 buckets, max_distance 128:
      bidirectional: B = num_buckets/2, offset = B·[n > 0], a = |n|;
      causal:        B = num_buckets,   offset = 0,         a = max(−n, 0) (future -> bucket 0);
      e = B/2;  bucket = offset + (a                                          if a < e
                                   min(B − 1, e + ⌊ln(a/e)/ln(max_distance/e)·(B − e)⌋)  else)
    Bidirectional per side: 0..7 exact, 8–11→8, …, 64–90→14, ≥ 91→15 (saturates at 91).
RelativePositionBias(kind="clipped")  bias_h(i, j) = table[h, clip(j − i, −K, K) + K]   (Shaw et al.
    2018's clipping, as one scalar per head instead of Shaw's per-dimension vectors.)
    The table is learnable, one row per head; its gradient is the scatter-add of the
    rel_bias gradient into the buckets used.  T5 shares one table across the layers of a
    stack (the Transformer's ``share_rel_bias`` option, default True).
ALiBi                                 bias_h(i, j) = −m_h · |i − j|   (Press et al. 2022)
    Fixed slopes (``get_slopes``, ofirpress/attention_with_linear_biases): for H a power of
    two m_h = 2^(−8h/H), h = 1..H; otherwise
    with c = 2^⌊log2 H⌋, slopes(c) followed by every other slope of slopes(2c), first H − c.
    For a causal model −m_h·|i − j| = m_h·(j − i) on the allowed entries (j ≤ i), the
    paper's form; fairseq adds m_h·j instead, equal after the softmax.  No parameters.

Where tinyeff differs from T5: the bias is added to the *scaled* scores
(q·k·scale + bias); T5 does not scale its logits, so reproduce T5 with ``scale=1.0``.

Rotary (applied to q and k before the attention variant, RoFormer, Su et al. 2021)
-----------------------------------------------------------------------------------
RoPE   for each pair (x_{2i}, x_{2i+1}) of a head vector at position p, θ_i = base^(−2i/D):
           y_{2i}   = x_{2i} cos(pθ_i) − x_{2i+1} sin(pθ_i)
           y_{2i+1} = x_{2i} sin(pθ_i) + x_{2i+1} cos(pθ_i)
       so q_iᵀk_j depends on i − j only.  Because it acts on q and k themselves it works with
       every variant, including ``linear`` and ``performer`` (where a score bias cannot).
       Backward: rotate by −pθ_i.  Pairs are *interleaved* as in the paper and in
       lucidrains' rotary-embedding-torch; GPT-NeoX/LLaMA pair dimension i with i + D/2
       ("rotate_half"): reproduce that by permuting the head dimensions
       [0, D/2, 1, D/2+1, …] before and after.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import _checks
from ..ctx import Ctx
from . import checks
from .base import Layer

# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def sinusoidal_table(max_len: int, dim: int) -> np.ndarray:
    """(max_len, dim) float64: T[p, 2i] = sin(p/10000^(2i/d)), T[p, 2i+1] = cos(…)."""
    pos = np.arange(max_len, dtype=np.float64)[:, None]            # (P, 1)
    i2 = np.arange(0, dim, 2, dtype=np.float64)                    # (ceil(d/2),)
    ang = pos / 10000.0 ** (i2 / dim)                              # (P, ceil(d/2))
    table = np.zeros((max_len, dim))                               # (P, d)
    table[:, 0::2] = np.sin(ang)
    table[:, 1::2] = np.cos(ang[:, : dim // 2])
    return table


def t5_bucket(relative_position, *, bidirectional: bool = True, num_buckets: int = 32,
              max_distance: int = 128) -> np.ndarray:
    """T5's bucket of the offset n = j − i (memory minus query position); int64, same shape."""
    n = np.asarray(relative_position, dtype=np.int64)
    if bidirectional:
        nb = num_buckets // 2
        offset = np.where(n > 0, nb, 0)                            # keys after the query
        a = np.abs(n)
    else:
        nb = num_buckets
        offset = np.zeros_like(n)
        a = np.maximum(-n, 0)                                      # future keys -> bucket 0
    exact = nb // 2
    safe = np.maximum(a, 1).astype(np.float64)                     # ln(0) never evaluated
    large = exact + np.floor(np.log(safe / exact) / math.log(max_distance / exact)
                             * (nb - exact)).astype(np.int64)
    large = np.minimum(large, nb - 1)
    return offset + np.where(a < exact, a, large)


def clipped_bucket(relative_position, max_offset: int) -> np.ndarray:
    """clip(j − i, −K, K) + K (Shaw et al.'s clipping), int64 in [0, 2K]."""
    n = np.asarray(relative_position, dtype=np.int64)
    return np.clip(n, -max_offset, max_offset) + max_offset


def alibi_slopes(n_heads: int) -> np.ndarray:
    """ALiBi slopes (float64, (H,)): the official recursive power-of-two rule."""
    def power_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (h + 1) for h in range(n)]

    if n_heads & (n_heads - 1) == 0:
        return np.array(power_of_two(n_heads))
    c = 2 ** int(math.floor(math.log2(n_heads)))
    return np.array(power_of_two(c) + power_of_two(2 * c)[0::2][: n_heads - c])


def offsets(n: int, m: int) -> np.ndarray:
    """j − i for each rel_bias slot t = i − j + M − 1, t = 0 … N + M − 2: (N + M − 1,)."""
    return (m - 1) - np.arange(n + m - 1)


# --------------------------------------------------------------------------------------------
# Absolute positions
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AbsoluteCtx(Ctx):
    n: int                        # sequence length N of the forward


def _seq_len(x, max_len: int) -> int:
    if x.ndim < 2:
        raise ValueError(f"x must be (..., N, d), got shape {x.shape}")
    n = x.shape[-2]
    if n > max_len:
        raise ValueError(f"sequence length {n} exceeds max_len {max_len} of the position "
                         "encoding")
    return n


class LearnedPositions(Layer):
    """y = x + P[:N] with a learned P (max_len, d)."""

    def __init__(self, max_len: int, dim: int, *, rng=None, dtype=np.float64):
        super().__init__()
        rng, self.dtype = checks.generator(rng), checks.float_dtype(dtype)
        self.max_len = _checks.integer(max_len, "max_len", minimum=1)
        self.dim = dim
        self.add_param("P", (0.02 * rng.standard_normal((max_len, dim)))
                       .astype(self.dtype))                        # (max_len, d)

    def forward(self, x):
        checks.layer_input(x, "x", self.dtype, self.dim)
        n = _seq_len(x, self.max_len)
        return x + self.params["P"][:n], AbsoluteCtx(n=n)          # (..., N, d)

    def backward(self, dy, ctx: AbsoluteCtx):
        # fwd: y = x + P[:N]
        self.grads["P"][: ctx.n] += dy.reshape(-1, ctx.n, self.dim).sum(axis=0)
        return dy


class SinusoidalPositions(Layer):
    """y = x + T[:N] with the fixed sinusoidal table (no parameters)."""

    def __init__(self, max_len: int, dim: int, *, dtype=np.float64):
        super().__init__()
        self.dtype = checks.float_dtype(dtype)
        self.max_len = _checks.integer(max_len, "max_len", minimum=1)
        self.dim = dim
        self.table = sinusoidal_table(max_len, dim).astype(self.dtype)  # (max_len, d)

    def forward(self, x):
        checks.layer_input(x, "x", self.dtype, self.dim)
        n = _seq_len(x, self.max_len)
        return x + self.table[:n], AbsoluteCtx(n=n)                # (..., N, d)

    def backward(self, dy, ctx: AbsoluteCtx):
        return dy                                                  # fwd: y = x + T (constant)


# --------------------------------------------------------------------------------------------
# Relative biases: forward(n, m) -> (rel_bias (H, N + M − 1), ctx)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RelBiasCtx(Ctx):
    buckets: np.ndarray           # (N + M − 1,) int64 table column of each offset slot


class RelativePositionBias(Layer):
    """Learned per-head bias of the (bucketed or clipped) offset; see the module docstring.

    ``kind="t5"``: ``num_buckets`` (default 32), ``max_distance`` (default 128),
    ``bidirectional`` (False for a causal model).  ``kind="clipped"``: ``max_offset`` K
    (default 16), table of 2K + 1 columns.
    """

    KINDS = ("t5", "clipped")

    def __init__(self, n_heads: int, *, kind: str = "t5", bidirectional: bool = True,
                 num_buckets: int = 32, max_distance: int = 128, max_offset: int = 16,
                 rng=None, dtype=np.float64):
        super().__init__()
        rng, self.dtype = checks.generator(rng), checks.float_dtype(dtype)
        self.n_heads = _checks.integer(n_heads, "n_heads", minimum=1)
        self.kind = _checks.choice(kind, "kind", self.KINDS)
        self.bidirectional = _checks.flag(bidirectional, "bidirectional")
        self.num_buckets = _checks.integer(num_buckets, "num_buckets", minimum=4)
        self.max_distance = _checks.integer(max_distance, "max_distance", minimum=2)
        self.max_offset = _checks.integer(max_offset, "max_offset", minimum=0)
        width = self.num_buckets if kind == "t5" else 2 * self.max_offset + 1
        self.add_param("table", (0.02 * rng.standard_normal((n_heads, width)))
                       .astype(self.dtype))                        # (H, n_buckets)

    def bucket(self, relative_position) -> np.ndarray:
        if self.kind == "t5":
            return t5_bucket(relative_position, bidirectional=self.bidirectional,
                             num_buckets=self.num_buckets, max_distance=self.max_distance)
        return clipped_bucket(relative_position, self.max_offset)

    def forward(self, n: int, m: int):
        buckets = self.bucket(offsets(n, m))                       # (N + M − 1,)
        return self.params["table"][:, buckets], RelBiasCtx(buckets=buckets)  # (H, N + M − 1)

    def backward(self, drel, ctx: RelBiasCtx):
        checks.grad_output(drel, (self.n_heads, ctx.buckets.size), self.dtype)
        # fwd: rel = table[:, buckets]   (several offsets share a bucket: scatter-add)
        np.add.at(self.grads["table"], (slice(None), ctx.buckets), drel)
        return None


class ALiBi(Layer):
    """bias_h(i, j) = −m_h·|i − j| with the fixed slopes of :func:`alibi_slopes`."""

    def __init__(self, n_heads: int, *, dtype=np.float64):
        super().__init__()
        self.dtype = checks.float_dtype(dtype)
        self.n_heads = _checks.integer(n_heads, "n_heads", minimum=1)
        self.slopes = alibi_slopes(n_heads)                        # (H,) float64

    def forward(self, n: int, m: int):
        dist = np.abs(offsets(n, m)).astype(np.float64)            # (N + M − 1,) |i − j|
        rel = (-self.slopes[:, None] * dist).astype(self.dtype)    # (H, N + M − 1)
        return rel, RelBiasCtx(buckets=np.zeros(0, np.int64))

    def backward(self, drel, ctx):
        return None                                                # fixed: no parameters


# --------------------------------------------------------------------------------------------
# Rotary embeddings
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RoPECtx(Ctx):
    n: int                        # sequence length N (positions 0 … N − 1)


class RoPE(Layer):
    """Rotary position embedding of x (..., N, D) (D even), interleaved pairs."""

    def __init__(self, head_dim: int, *, base: float = 10000.0, dtype=np.float64):
        super().__init__()
        self.dtype = checks.float_dtype(dtype)
        self.head_dim = _checks.integer(head_dim, "head_dim", minimum=2)
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got head_dim={head_dim}")
        self.base = _checks.positive_float(base, "base")

    def angles(self, n: int):
        """cos and sin of p·θ_i, each (N, D/2), in the layer's dtype (computed in float64)."""
        theta = self.base ** (-np.arange(0, self.head_dim, 2) / self.head_dim)  # (D/2,)
        ang = np.arange(n)[:, None] * theta[None, :]               # (N, D/2)
        return np.cos(ang).astype(self.dtype), np.sin(ang).astype(self.dtype)

    def forward(self, x):
        checks.layer_input(x, "x", self.dtype, self.head_dim)
        n = x.shape[-2]
        cos, sin = self.angles(n)                                  # (N, D/2) each
        x0, x1 = x[..., 0::2], x[..., 1::2]                        # (..., N, D/2) each
        y = np.empty_like(x)                                       # (..., N, D)
        y[..., 0::2] = x0 * cos - x1 * sin
        y[..., 1::2] = x0 * sin + x1 * cos
        return y, RoPECtx(n=n)

    def backward(self, dy, ctx: RoPECtx):
        cos, sin = self.angles(ctx.n)                              # (N, D/2) each
        dy0, dy1 = dy[..., 0::2], dy[..., 1::2]                    # (..., N, D/2) each
        dx = np.empty_like(dy)                                     # (..., N, D)
        # fwd: y0 = x0 cos − x1 sin ;  y1 = x0 sin + x1 cos   (rotation by pθ; its transpose
        #      is the rotation by −pθ)
        dx[..., 0::2] = dy0 * cos + dy1 * sin
        dx[..., 1::2] = -dy0 * sin + dy1 * cos
        return dx
