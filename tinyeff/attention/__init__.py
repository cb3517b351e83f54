"""The attention contract.  Every variant of tinyeff follows it; read this first.

Arrays
------
``q (..., N, D)``, ``k (..., M, D)``, ``v (..., M, Dv)``.  Leading dimensions are batch
dimensions (typically ``(B, H)``, as in PyTorch's ``scaled_dot_product_attention``) and must
be identical for q, k and v (nothing is broadcast).  float32 and float64 are supported; the
three arrays share one dtype and the output has it too (nothing is cast silently).  Inputs
are never modified.

Functions
---------
Each variant is a module ``tinyeff.attention.<name>`` with two pure functions::

    out, ctx = forward(q, k, v, *, <options>)        # out (..., N, Dv)
    grads    = backward(dout, ctx)                   # {"q": dq, "k": dk, "v": dv, ...}

* ``ctx`` is a frozen dataclass (a :class:`tinyeff.ctx.Ctx`) with named fields: what the
  backward needs, plus every non-differentiable choice made in the forward (bucket ids,
  permutations).  It holds references to the inputs, not copies.
* ``backward`` returns a dict with one gradient for every differentiable array argument,
  keyed by that argument's name (``"q"``, ``"k"``, ``"v"``, ``"bias"``, ``"E"`` ...), each
  with that argument's shape and dtype.  ``dout`` must have exactly the output's shape and
  dtype.
* ``scale`` defaults to ``1/sqrt(D)`` everywhere (a variant that deviates says so).
* Options are keyword-only.  Invalid input gives a ``TypeError`` or ``ValueError`` naming
  the argument and the shapes seen (:mod:`tinyeff._checks`).
* Every random choice (Performer features, LSH rotations, random mask entries) is an
  explicit argument, so two backends can be fed the same one.
* A query with no admissible key outputs zeros and gets zero gradient.

Module-level data of every variant
----------------------------------
``NAME``; ``SUPPORTS_MASK``, ``SUPPORTS_CAUSAL``, ``SUPPORTS_BIAS`` (capabilities read by
the layers and the tests instead of special-casing names); ``DIFFERENTIABLE`` (the names a
gradient can be returned for); ``example_cases(rng, dtype) -> list[Case]`` (small valid
calls covering the options, used by the contract tests and the golden-vector writer).

Registry
--------
``VARIANTS`` maps each name to its module; layers, tests, benchmarks and the golden-vector
tool loop over it with no special cases.
"""

from . import full
from ._case import Case

VARIANTS = {m.NAME: m for m in (full,)}

__all__ = ["VARIANTS", "Case", "full"]
