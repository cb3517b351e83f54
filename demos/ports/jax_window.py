"""A JAX port of tinyeff's ``window`` attention, written from docs/semantics/window.md alone,
and how to test it against the golden suite.  Copy it and replace the function with your own.

Run from the repository root (or anywhere with tinyeff installed)::

    python demos/ports/jax_window.py            # the default window suite, float64 and float32
    python -m tinyeff golden --out golden/ --variants window
    python -m tinyeff check golden/ --against demos/ports/jax_window.py:backend

The port is ``window_attention(q, k, v, **options)`` on JAX arrays;
``tinyeff.testing.jax_backend`` turns it into a conformance backend (``jax.vjp`` with the
golden ``dout``; it enables ``jax_enable_x64`` for the float64 cases).  Dense: O(N·M) memory.
"""

from __future__ import annotations

import math
import sys

import jax.numpy as jnp
import numpy as np

from tinyeff.testing import check_backend, jax_backend


def window_mask(n, m, window, dilation=1, global_indices=None, global_mask=None):
    """The allowed pairs (..., N, M) and the global rows (..., N, 1) (window.md, Formula):
    band(i) = {i + t·d : |t| ≤ w, 0 ≤ j < M, j ∉ G}; A(i) = every key if i ∈ G, else
    band(i) ∪ G.  G: ``global_indices`` for the batch, or ``global_mask`` (..., N) per item."""
    diff = jnp.arange(m)[None, :] - jnp.arange(n)[:, None]         # (N, M): j − i
    band = (jnp.abs(diff) <= window * dilation) & (diff % dilation == 0)
    if global_mask is None:
        rows = np.zeros(n, dtype=bool)
        if global_indices is not None:
            rows[np.asarray(global_indices, dtype=int).reshape(-1)] = True
        rows = jnp.asarray(rows)
    else:
        rows = jnp.asarray(global_mask, dtype=bool)                # (..., N)
    lim = min(n, m)
    cols = jnp.zeros(rows.shape[:-1] + (m,), dtype=bool).at[..., :lim].set(rows[..., :lim])
    allowed = (band & ~cols[..., None, :]) | cols[..., None, :] | rows[..., :, None]
    return allowed, rows[..., :, None]


def masked_softmax(s, allowed):
    """Row softmax over the allowed entries; a row with none gives 0 (not NaN)."""
    c = jnp.max(jnp.where(allowed, s, -jnp.inf), axis=-1, keepdims=True)
    c = jnp.where(jnp.isfinite(c), c, 0.0)                         # the row max, a constant
    e = jnp.where(allowed, jnp.exp(jnp.where(allowed, s - c, 0.0)), 0.0)
    z = e.sum(axis=-1, keepdims=True)
    return e / jnp.where(z > 0, z, 1.0)


def window_attention(q, k, v, *, window, dilation=1, global_indices=None, global_mask=None,
                     causal=False, key_padding_mask=None, rel_bias=None, scale=None,
                     q_global=None, k_global=None, v_global=None):
    """``window`` attention: q (..., N, D), k (..., M, D), v (..., M, Dv) -> (..., N, Dv)."""
    n, m = q.shape[-2], k.shape[-2]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    allowed, rows = window_mask(n, m, window, dilation, global_indices, global_mask)
    keep = jnp.ones((n, m), dtype=bool)
    if causal:
        keep = jnp.tril(keep)                                      # top-left: j ≤ i
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[..., None, :]
    bias = 0.0
    if rel_bias is not None:
        offset = jnp.arange(n)[:, None] - jnp.arange(m)[None, :] + m - 1
        bias = rel_bias[..., offset]                               # R_ij = rel_bias[i − j + M − 1]

    def attend(q, k, v, allowed):
        s = q @ jnp.swapaxes(k, -1, -2) * scale + bias
        return masked_softmax(s, allowed & keep) @ v

    if q_global is None:
        return attend(q, k, v, allowed)
    # global projections: the global rows attend to every key with q/k/v_global
    return attend(q, k, v, allowed & ~rows) + attend(q_global, k_global, v_global, rows)


backend = jax_backend(window_attention)


def main() -> int:
    ok = True
    for dtype in ("float64", "float32"):
        report = check_backend("window", backend, dtype=dtype)
        print(report.table(failures_only=not report.ok) if not report.ok else report.summary())
        ok &= report.ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
