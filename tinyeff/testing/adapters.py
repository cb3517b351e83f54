"""Framework adapters: a PyTorch or JAX attention function as a conformance backend.

Write your port as a framework function ``fn(q, k, v, **options) -> out`` and test it with::

    from tinyeff.testing import check_backend, torch_backend, jax_backend
    report = check_backend("window", torch_backend(my_torch_window))
    report = check_backend("window", jax_backend(my_jax_window))

The adapter turns every golden case into a call of ``fn``:

* ``q``, ``k``, ``v`` positionally, every other differentiable input (``bias``, ``rel_bias``,
  ``E``, ``F``, ...) as a keyword; ``k`` is ``None`` where the variant has no separate keys
  (``lsh``: its gradient comes back under ``"q"``).  They are framework arrays of the golden
  dtype, on CPU (torch: ``device=``), tracked for gradients.
* every option as a keyword: NumPy arrays (masks, random features, rotations) become
  framework arrays (no gradient), a ``scipy.sparse`` pattern a dense boolean array, a list
  of them a list; scalars, strings and None are passed unchanged.  ``convert_options=False``
  passes the options exactly as the harness gives them.
* the output is differentiated with ``dout`` (torch: ``out.backward(dout)``; JAX:
  ``jax.vjp``), and the adapter returns ``(out, grads)`` as NumPy arrays, with a gradient
  for every input (zeros for one ``fn`` does not use, as JAX does).  ``fn`` may return a
  framework tensor or any array-like (``numpy.asarray`` is applied); one that is not a
  torch tensor makes the torch adapter forward-only (gradients reported as not returned).

Neither framework is imported by tinyeff: the adapters import it when a backend is first
called.  For float64 cases the JAX adapter enables ``jax_enable_x64`` (a global JAX setting:
without it JAX silently computes in float32).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

_KEYS = ("q", "k", "v")


def _split(inputs: dict):
    """(q, k, v, the other inputs by name) of a golden case's inputs."""
    rest = {n: a for n, a in inputs.items() if n not in _KEYS}
    return inputs.get("q"), inputs.get("k"), inputs.get("v"), rest


def _convert(value, to_array):
    if sp.issparse(value):
        return to_array(sp.csr_array(value).toarray())
    if isinstance(value, np.ndarray):
        return to_array(value)
    if isinstance(value, (list, tuple)) and any(
            isinstance(x, np.ndarray) or sp.issparse(x) for x in value):
        return type(value)(_convert(x, to_array) for x in value)
    return value


def torch_backend(fn, *, device="cpu", convert_options: bool = True):
    """A conformance backend that runs the PyTorch function ``fn(q, k, v, **options)``.

    Inputs become tensors with ``requires_grad=True`` on ``device``; the VJP is
    ``out.backward(dout)``; gradients of inputs ``fn`` does not use are zeros.
    """
    def backend(variant, inputs, options, dout):
        import torch

        def tensor(a):
            return torch.from_numpy(np.array(a, copy=True)).to(device)

        leaves = {n: tensor(a).requires_grad_(True) for n, a in inputs.items()}
        q, k, v, rest = _split(leaves)
        opts = ({n: _convert(o, tensor) for n, o in options.items()} if convert_options
                else options)
        out = fn(q, k, v, **rest, **opts)
        if not isinstance(out, torch.Tensor):
            return np.asarray(out), None
        out.backward(tensor(dout))
        grads = {n: (np.zeros_like(inputs[n]) if t.grad is None
                     else t.grad.detach().cpu().numpy()) for n, t in leaves.items()}
        return out.detach().cpu().numpy(), grads

    backend.__name__ = f"torch_backend({getattr(fn, '__name__', 'fn')})"
    return backend


def jax_backend(fn, *, convert_options: bool = True):
    """A conformance backend that runs the JAX function ``fn(q, k, v, **options)``.

    The VJP is ``jax.vjp`` of ``fn`` in the differentiable inputs, applied to ``dout``.
    Enables ``jax_enable_x64`` for float64 cases.
    """
    def backend(variant, inputs, options, dout):
        import jax
        import jax.numpy as jnp

        if dout.dtype == np.float64 and not jax.config.jax_enable_x64:
            jax.config.update("jax_enable_x64", True)
        names = list(inputs)
        opts = ({n: _convert(o, jnp.asarray) for n, o in options.items()}
                if convert_options else options)

        def call(*arrays):
            q, k, v, rest = _split(dict(zip(names, arrays)))
            return fn(q, k, v, **rest, **opts)

        out, vjp = jax.vjp(call, *(jnp.asarray(inputs[n]) for n in names))
        grads = vjp(jnp.asarray(dout, dtype=out.dtype))
        return np.asarray(out), {n: np.asarray(g) for n, g in zip(names, grads)}

    backend.__name__ = f"jax_backend({getattr(fn, '__name__', 'fn')})"
    return backend


__all__ = ["torch_backend", "jax_backend"]
