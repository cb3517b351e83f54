"""The layer base class of ``tinyeff.nn``: parameters, gradients, buffers, children.

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
  reversible blocks use to recompute; :class:`~tinyeff.nn.layers.FeedForward` overrides it
  to work chunk by chunk.
"""

from __future__ import annotations

import numpy as np


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
