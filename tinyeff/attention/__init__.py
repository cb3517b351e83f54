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
Capabilities are data, read by the layers and the tests instead of special-casing names:

* ``NAME``; ``DIFFERENTIABLE``: the names a gradient can be returned for.
* ``SUPPORTS_CAUSAL``, ``SUPPORTS_MASK`` (the variant's own ``mask`` option, whatever its
  form), ``SUPPORTS_BIAS`` (a dense additive ``bias``).
* ``KEY_PADDING``: the name of the option that takes a per-key boolean array (..., M)
  (True = real token, leading dimensions broadcastable to the batch), or ``None``.
* ``SUPPORTS_REL_BIAS``: the variant accepts ``rel_bias`` (..., N + M − 1), a bias that
  depends only on the offset, bias_ij = rel_bias[..., i − j + M − 1], and returns its
  gradient.  Relative-position tables, T5 buckets and ALiBi reach every such variant in
  O(N) memory through it.
* ``SHARED_QK`` (optional, default False): keys are the queries (Reformer); ``forward`` is
  called with k equal to q.
* ``LAYER_PARAMS`` (optional, default ()): names of extra differentiable arrays a layer
  must own and pass as keyword arguments (Linformer's ``E``, ``F``), created by
  ``init_layer_params(rng, m, dtype, **options) -> dict``.
* ``RANDOM_OPTIONS`` (optional, default ()): names of random, non-differentiable options
  (Performer ``features``, LSH ``rotations``), drawn by
  ``draw_random_options(rng, d, dtype, **options) -> dict`` from a seeded Generator.
* ``REPLAY`` (optional, default {}): ``{option name: ctx field}`` for non-differentiable
  choices a forward makes (LSH ``buckets``) that a recomputation must reuse: passing
  ``option=getattr(ctx, field)`` to a later forward on the same inputs skips the choice.
  Reversible blocks replay them when they recompute a forward in the backward.
* ``example_cases(rng, dtype) -> list[Case]``: small valid calls covering the options,
  used by the contract tests and the golden-vector writer.
* ``gradcheck_invariant(ctx)`` (optional): the non-differentiable choices of a forward
  (bucket ids) that a finite-difference check must not see change.

What the benchmark (``python -m tinyeff bench``) knows about a variant, all per batch·head
at N = M = n, so that no tool special-cases a name:

* ``bench_options(n) -> dict``: the options the benchmark runs at length n.
* ``scored_pairs(n, options, causal) -> int | None`` (optional): the (query, key) pairs
  the variant scores, where that is well defined.
* ``useful_flops(n, d, options, causal) -> int | None`` (optional): the forward's
  multiply-add flops of the matrix products (the backward counts twice that;
  recomputation, hashing, feature nonlinearities and normalizers are not counted).
* ``extra_bytes(n, d, itemsize, options, causal) -> int``: a generous bound on the saved
  context and temporaries of one forward+backward beyond the inputs, output and gradients
  (the benchmark skips cases that cannot fit).

What the training demo (``python -m tinyeff demo``) knows about a variant:

* ``demo_options(n, causal) -> dict``: the options it trains with at sequence length n
  (the keys ``--opt VARIANT.KEY=VALUE`` overrides).
* ``demo_build(n, options) -> (attention options, model options)`` (optional): turns
  ``demo_options`` plus the overrides into the options the layer gets and those the model
  gets (``pad_to_multiple``); without it the options go to the layer unchanged.

Option routing
--------------
``tinyeff.attention._options.split_options(mod, options, reserved=())`` splits one flat
dict of options between ``forward``, ``draw_random_options`` and ``init_layer_params`` by
their signatures (an option none of them takes, or one the caller ``reserved`` for itself,
is a TypeError); ``accepted_options(mod, reserved)`` is the set of valid names.

Registry
--------
``VARIANTS`` maps each name to its module; layers, tests, benchmarks and the golden-vector
tool loop over it with no special cases.
"""

from . import full, hierarchical, linear, linformer, local, lsh, performer, sparse, window
from ._case import Case

VARIANTS = {m.NAME: m for m in (full, hierarchical, linear, linformer, local, lsh, performer,
                                 sparse, window)}

__all__ = ["VARIANTS", "Case", "full", "linear", "lsh", "performer"]
