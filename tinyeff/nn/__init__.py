"""``tinyeff.nn``: Transformer layers with hand-written backward passes, and training.

A layer keeps parameters and gradients, never activations::

    y, ctx = layer.forward(x)
    dx = layer.backward(dy, ctx)        # accumulates into layer.grads[name]

* :mod:`.base` — Layer, the base class (the layer contract)
* :mod:`.layers` — Linear, LowRankLinear, Embedding, FactorizedEmbedding, LayerNorm,
  GELU, Dropout, FeedForward, PreNorm
* :mod:`.attention` — MultiHeadAttention over any ``tinyeff.attention.VARIANTS`` entry
* :mod:`.positions` — learned/sinusoidal positions, relative biases (clipped, T5), ALiBi, RoPE
* :mod:`.blocks` — TransformerBlock (pre-LN), ReversibleBlock
* :mod:`.model` — TokenModel: embedding, positions, readout, head and training step shared
  by the two models below
* :mod:`.transformer` — Transformer (causal LM or classifier)
* :mod:`.funnel` — HierarchicalEncoder (Funnel-style: local attention, segment pooling,
  global attention over summaries, up-sampling), HierarchicalTransformer, SegmentPool
* :mod:`.checks` — the argument checks shared by these modules
* :mod:`.losses`, :mod:`.optim`, :mod:`.checkpoint` — cross-entropy, AdamW, clipping,
  warm-up + cosine schedule, .npz checkpoints

See docs/nn.md for the API and a training loop.
"""

from . import checkpoint
from .attention import MultiHeadAttention, VariantParams
from .base import Layer
from .blocks import (
    ReversibleBlock,
    TransformerBlock,
    activation_nbytes,
    attention_branch,
    ffn_branch,
)
from .funnel import HierarchicalEncoder, HierarchicalTransformer, SegmentPool
from .layers import (
    GELU,
    Dropout,
    Embedding,
    FactorizedEmbedding,
    FeedForward,
    LayerNorm,
    Linear,
    LowRankLinear,
    PreNorm,
)
from .losses import cross_entropy, cross_entropy_backward
from .optim import AdamW, clip_grad_norm, warmup_cosine
from .positions import (
    ALiBi,
    LearnedPositions,
    RelativePositionBias,
    RoPE,
    SinusoidalPositions,
    alibi_slopes,
    t5_bucket,
)
from .transformer import Transformer

__all__ = [
    "Layer", "Linear", "LowRankLinear", "Embedding", "FactorizedEmbedding", "LayerNorm",
    "GELU", "Dropout", "FeedForward", "PreNorm", "MultiHeadAttention", "VariantParams",
    "TransformerBlock", "ReversibleBlock", "Transformer", "attention_branch", "ffn_branch",
    "activation_nbytes", "LearnedPositions", "SinusoidalPositions", "RelativePositionBias",
    "ALiBi", "RoPE", "alibi_slopes", "t5_bucket", "cross_entropy", "cross_entropy_backward",
    "AdamW", "clip_grad_norm", "warmup_cosine", "checkpoint", "HierarchicalEncoder",
    "HierarchicalTransformer", "SegmentPool",
]
