"""AdamW, gradient clipping by global norm, and the warm-up + cosine learning-rate schedule.

AdamW (Loshchilov & Hutter 2019; PyTorch ``torch.optim.AdamW`` with amsgrad=False), step t
(lr, eps, weight decay λ finite and >= 0, β₁, β₂ in [0, 1); anything else is a ValueError
or TypeError at construction):

    θ ← θ − lr·λ·θ                         decoupled weight decay (only where ``decay``)
    m ← β₁ m + (1 − β₁) g,   v ← β₂ v + (1 − β₂) g²
    θ ← θ − lr · (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + eps)

By default weight decay applies to parameters with two or more dimensions (matrices and
embedding tables), not to biases, LayerNorm gains or 1-D tables (nanoGPT's rule).
Parameters are updated in place, so the model sees the new values immediately.

clip_grad_norm:  n = √(Σ‖g‖²);  if n > max_norm every g is scaled by max_norm / (n + 1e-6)
(PyTorch's ``clip_grad_norm_``); returns n (before clipping).

warmup_cosine(step):  lr = base·(step + 1)/warmup for step < warmup, then
min_lr + ½(base − min_lr)(1 + cos(π·s)) with s = (step − warmup)/(total − warmup) clipped to 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .. import _checks
from .base import Layer


def _betas(betas) -> tuple[float, float]:
    """(β₁, β₂), each a real number in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    out = []
    for i, b in enumerate(betas):
        name = f"betas[{i}]"
        b = _checks.positive_float(b, name, allow_zero=True)
        if b >= 1:
            raise ValueError(f"{name} must be in [0, 1), got {b}")
        out.append(b)
    return out[0], out[1]


def default_decay(name: str, param: np.ndarray) -> bool:
    return param.ndim >= 2


class AdamW:
    """AdamW over a model's parameters (``model.named_parameters()`` / ``named_grads()``)."""

    def __init__(self, model: Layer, *, lr: float = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01,
                 decay: Callable[[str, np.ndarray], bool] = default_decay):
        self.lr = _checks.positive_float(lr, "lr", allow_zero=True)
        self.betas = _betas(betas)
        self.eps = _checks.positive_float(eps, "eps", allow_zero=True)
        self.weight_decay = _checks.positive_float(weight_decay, "weight_decay",
                                                   allow_zero=True)
        if not callable(decay):
            raise TypeError(f"decay must be a callable (name, param) -> bool, got "
                            f"{type(decay).__name__}")
        self.params = model.named_parameters()
        self.grads = model.named_grads()
        self.decay = {name: bool(decay(name, p)) for name, p in self.params.items()}
        self.m = {name: np.zeros_like(p) for name, p in self.params.items()}
        self.v = {name: np.zeros_like(p) for name, p in self.params.items()}
        self.t = 0

    def step(self, lr: float | None = None) -> None:
        """One update with the learning rate ``lr`` (default ``self.lr``; finite, >= 0)."""
        lr = self.lr if lr is None else _checks.positive_float(lr, "lr", allow_zero=True)
        b1, b2 = self.betas
        self.t += 1
        c1, c2 = 1.0 - b1 ** self.t, 1.0 - b2 ** self.t
        for name, p in self.params.items():
            g, m, v = self.grads[name], self.m[name], self.v[name]
            if self.decay[name] and self.weight_decay:
                p *= p.dtype.type(1.0 - lr * self.weight_decay)
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * (g * g)
            p -= (lr * (m / c1) / (np.sqrt(v / c2) + self.eps)).astype(p.dtype, copy=False)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Optimizer state for a checkpoint: ``m/<name>``, ``v/<name>``, ``t``."""
        out = {f"m/{k}": a for k, a in self.m.items()}
        out.update({f"v/{k}": a for k, a in self.v.items()})
        out["t"] = np.array(self.t, dtype=np.int64)
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        for kind, store in (("m", self.m), ("v", self.v)):
            for name, a in store.items():
                key = f"{kind}/{name}"
                if key not in arrays:
                    raise ValueError(f"optimizer state lacks {key!r}")
                if arrays[key].shape != a.shape:
                    raise ValueError(f"optimizer state {key!r} has shape {arrays[key].shape}, "
                                     f"expected {a.shape}")
                a[...] = arrays[key]
        self.t = int(arrays["t"])


def clip_grad_norm(grads, max_norm: float) -> float:
    """Scale the gradients (dict or list of arrays, in place) to global norm <= max_norm."""
    arrays = list(grads.values()) if isinstance(grads, dict) else list(grads)
    total = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in arrays))
    if total > max_norm:
        coef = max_norm / (total + 1e-6)
        for g in arrays:
            g *= g.dtype.type(coef)
    return total


def warmup_cosine(step: int, *, base_lr: float, warmup_steps: int, total_steps: int,
                  min_lr: float = 0.0) -> float:
    """Linear warm-up to ``base_lr`` over ``warmup_steps``, then cosine decay to ``min_lr``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    s = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * s))
