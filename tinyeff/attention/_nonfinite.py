"""Exact propagation of NaN/inf values: a non-finite v_j reaches exactly the rows that see j.

Every variant computes its output as a weighted sum Σ_j P_ij v_j over the keys row i sees,
and evaluates it with matrix products over tiles or whole rows in which the keys row i does
*not* see carry a weight of exactly 0.  IEEE arithmetic gives 0 · NaN = NaN and 0 · inf =
NaN, so a single non-finite v_j would reach rows that do not depend on it at all.  The
contract (docs/robustness.md) is sharper: a non-finite v_j makes out[i, c] NaN exactly when
row i sees key j and v_j[c] is not finite.  This module implements that rule once, around a
variant's forward:

1. a cheap test: ``Σ v`` is finite ⇒ every entry is finite (NaN and inf survive a sum; an
   overflowing sum only sends us to the exact test) — the fast path costs one pass over v;
2. the forward runs on v with its non-finite entries replaced by 0 (the context, hence the
   backward, sees those zeros: the gradients are those at the cleaned values);
3. the *same* forward runs once more on the indicator ``bad = ~isfinite(v)`` (as 0/1) with
   every logit set to 0 (q = 0, k cleaned, biases reduced to their −inf entries): the
   weights are then uniform over exactly the keys each row sees — no weight underflows —
   so ``hit[i, c] > 0`` iff row i sees some j with a non-finite v_j[c];
4. ``out[hit > 0] = NaN``.

Step 3 reuses the variant's own masking logic (causal, windows, global tokens, blocks, CSR
patterns, buckets, padding), so "the rows that see j" is by construction the variant's own
definition.  Biases: an entry of −inf removes a key structurally and is kept; every finite
bias is a weight, not a mask, and becomes 0.  Variants with shared QK (LSH) replay the
buckets of step 2 so that hashing, which depends on q, is not redone on zeros.
"""

from __future__ import annotations

import functools

import numpy as np

BIASES = ("bias", "rel_bias")


def all_finite(x) -> bool:
    """True if every entry of the floating array ``x`` is finite (one summation pass)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.sum(x)):
            return True
    return bool(np.isfinite(x).all())


def _structural(bias):
    """A bias reduced to its structure: −inf where it removes a key, 0 elsewhere."""
    if not isinstance(bias, np.ndarray) or bias.dtype.kind != "f":
        return bias
    return np.where(bias == -np.inf, bias, 0).astype(bias.dtype)   # same shape and dtype


def nan_rows_of_v(forward=None, *, replay=(), prepare=None):
    """Decorate ``forward(q, k, v, **options)`` with the rule of the module docstring.

    ``replay``: option names whose value in the second pass is taken from the first pass's
    context (e.g. LSH ``buckets``).  ``prepare``: optional ``options -> options`` for the
    second pass, for variants whose zero logits alone do not make every seen key's weight
    positive (Linformer's signed F, Performer's relu kernel at q = 0).
    """
    def decorate(fwd):
        @functools.wraps(fwd)
        def wrapped(q, k=None, v=None, **options):
            if not (isinstance(v, np.ndarray) and v.dtype.kind == "f") or all_finite(v):
                return fwd(q, k, v, **options)
            bad = ~np.isfinite(v)                                  # (..., M, Dv)
            out, ctx = fwd(q, k, np.where(bad, 0, v).astype(v.dtype), **options)
            hit_opts = {key: (_structural(val) if key in BIASES else val)
                        for key, val in options.items()}
            for name in replay:
                hit_opts[name] = getattr(ctx, name)
            if prepare is not None:
                hit_opts = prepare(hit_opts)
            q0 = np.zeros_like(q)                                  # (..., N, D) logits 0
            k0 = None if k is None else np.zeros_like(k)           # (..., M, D)
            hit, _ = fwd(q0, k0 if k is not q else q0, bad.astype(v.dtype), **hit_opts)
            return np.where(hit > 0, np.nan, out).astype(out.dtype), ctx
        return wrapped
    return decorate if forward is None else decorate(forward)
