"""Cross-entropy with ignore index and label smoothing, and its backward.

For logits z (..., C) and integer targets y (...), with p = softmax(z) and ε the label
smoothing, each counted position (y ≠ ignore_index) has the target distribution
t = (1 − ε)·onehot(y) + ε/C and the loss

    ℓ = −Σ_c t_c log p_c  = (1 − ε)·(−log p_y) + ε·mean_c(−log p_c)

and the returned loss is the mean of ℓ over the counted positions (PyTorch's
``F.cross_entropy(..., ignore_index=, label_smoothing=, reduction="mean")``).  The gradient
is ∂loss/∂z = (p − t) / n_counted at counted positions and 0 elsewhere.  With no counted
position the loss is 0 and the gradient 0 (PyTorch returns NaN there).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import _checks
from ..ctx import Ctx


@dataclasses.dataclass(frozen=True)
class CrossEntropyCtx(Ctx):
    p: np.ndarray                 # (..., C) softmax probabilities
    targets: np.ndarray           # (...) int
    keep: np.ndarray              # (...) bool, positions counted in the mean
    count: int
    label_smoothing: float


def cross_entropy(logits, targets, *, ignore_index: int = -100, label_smoothing: float = 0.0):
    """Mean cross-entropy.  Returns ``(loss: float, ctx)``."""
    _checks.float_array(logits, "logits", min_ndim=1)
    if not isinstance(targets, np.ndarray) or not np.issubdtype(targets.dtype, np.integer):
        raise TypeError(f"targets must be an integer numpy.ndarray, got "
                        f"{type(targets).__name__} {getattr(targets, 'dtype', '')}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets must have shape logits.shape[:-1] = {logits.shape[:-1]}, "
                         f"got {targets.shape}")
    eps = _checks.positive_float(label_smoothing, "label_smoothing", allow_zero=True)
    if eps > 1:
        raise ValueError(f"label_smoothing must be in [0, 1], got {eps}")
    c = logits.shape[-1]
    keep = targets != ignore_index                                 # (...)
    bad = keep & ((targets < 0) | (targets >= c))
    if bad.any():
        raise ValueError(f"targets must lie in [0, {c}) or equal ignore_index={ignore_index}, "
                         f"got {targets[bad][:5]}")
    z = logits - logits.max(axis=-1, keepdims=True)                # (..., C) shift: constant
    logz = np.log(np.exp(z).sum(axis=-1, keepdims=True))           # (..., 1)
    logp = z - logz                                                # (..., C) log-softmax
    y = np.where(keep, targets, 0)                                 # (...) safe index
    nll = -np.take_along_axis(logp, y[..., None], axis=-1)[..., 0]  # (...)
    smooth = -logp.mean(axis=-1)                                   # (...)
    per = (1.0 - eps) * nll + eps * smooth                         # (...)
    count = int(keep.sum())
    loss = float(per[keep].sum() / count) if count else 0.0
    ctx = CrossEntropyCtx(p=np.exp(logp), targets=y, keep=keep, count=count,
                          label_smoothing=eps)
    return loss, ctx


def cross_entropy_backward(ctx: CrossEntropyCtx, dloss: float = 1.0) -> np.ndarray:
    """∂(dloss · loss)/∂logits, (..., C) in the logits' dtype."""
    p = ctx.p
    if ctx.count == 0:
        return np.zeros_like(p)
    c = p.shape[-1]
    eps = ctx.label_smoothing
    # fwd: loss = mean over kept of −Σ_c t_c log softmax(z)_c  ->  dz = (p − t) / count
    t = np.full_like(p, eps / c)                                   # (..., C)
    np.put_along_axis(t, ctx.targets[..., None], 1.0 - eps + eps / c, axis=-1)
    dz = (p - t) * (ctx.keep[..., None] * (dloss / ctx.count))     # (..., C)
    return dz.astype(p.dtype, copy=False)
