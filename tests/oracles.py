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


def check_numba_threads(mod, args: dict, options: dict, dout, reference: bool = False):
    """``mod``'s impl="numba" forward+backward gives the same bits with 1 and 2 Numba threads
    (and, with ``reference``, matches impl="ref" to the tolerance table)."""
    from tinyeff.kernels._jit import num_threads
    from tinyeff.testing import assert_close
    results = []
    for threads in (1, 2):
        with num_threads(threads):
            out, ctx = mod.forward(**args, **options, impl="numba")
            results.append((out, mod.backward(dout, ctx)))
    if reference:
        out_r, ctx_r = mod.forward(**args, **options, impl="ref")
        assert_close(results[0][0], out_r)
        assert_close(results[0][1], mod.backward(dout, ctx_r))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    for name in results[0][1]:
        np.testing.assert_array_equal(results[0][1][name], results[1][1][name], err_msg=name)


class NaNEmptyNumPy:
    """NumPy with ``empty``/``empty_like`` filled with NaN (uninitialised memory made loud)."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def empty(*args, **kwargs):
        return np.full_like(np.empty(*args, **kwargs), np.nan)

    @staticmethod
    def empty_like(*args, **kwargs):
        return np.full_like(np.empty_like(*args, **kwargs), np.nan)
