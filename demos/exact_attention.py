"""Exact attention forward and hand-written backward, checked against finite differences.

Run:  python demos/exact_attention.py
"""

import numpy as np

from tinyeff.attention import full
from tinyeff.testing import check_vjp

rng = np.random.default_rng(0)
B, H, N, D = 2, 4, 64, 16
q, k, v = (rng.standard_normal((B, H, N, D)) for _ in range(3))

out, ctx = full.forward(q, k, v, causal=True)
print("out", out.shape, "saved probabilities", ctx.p.shape, f"ctx holds {ctx.nbytes()} bytes")

report = check_vjp(full.forward, full.backward, {"q": q, "k": k, "v": v}, {"causal": True},
                   rng=rng)
print(report)
