"""Dense O(N²) definitions written as plainly as possible.  Used only by the tests.

These loops are deliberately naive (one query row at a time, Python-level softmax) so that
they can be checked by eye against the formulas in the module docstrings.
"""

from __future__ import annotations

import math

import numpy as np


def attention_rows(q, k, v, allowed=None, bias=None, scale=None):
    """softmax over the allowed keys of each row, one row at a time; empty rows give 0."""
    *batch, n, d = q.shape
    m, dv = v.shape[-2:]
    scale = 1 / math.sqrt(d) if scale is None else scale
    allowed = np.ones((n, m), bool) if allowed is None else allowed
    allowed = np.broadcast_to(allowed, (*batch, n, m))
    bias = np.zeros((n, m), q.dtype) if bias is None else bias
    bias = np.broadcast_to(bias, (*batch, n, m))
    out = np.zeros((*batch, n, dv), dtype=q.dtype)
    for b in np.ndindex(*batch):
        for i in range(n):
            js = [j for j in range(m) if allowed[b][i, j]]
            if not js:
                continue
            s = [float(q[b][i] @ k[b][j]) * scale + float(bias[b][i, j]) for j in js]
            c = max(s)
            w = [math.exp(x - c) for x in s]
            z = sum(w)
            out[b][i] = sum(wj / z * v[b][j] for wj, j in zip(w, js))
    return out
