"""Shared numerical building blocks of the Numba kernels.

* :func:`fast_exp` — exp(x) for float32 and float64 as a branch-free polynomial that LLVM
  vectorizes inside loops (``math.exp`` is a scalar libm call: measured 5 ns per float32
  element against 1 ns).  Range reduction exp(x) = 2ⁿ · exp(r), n = round(x / ln 2),
  |r| ≤ ln 2 / 2 with a Cody–Waite split of ln 2; exp(r) by the Cephes polynomials
  (expf.c for float32, each of its steps one fused multiply-add; the (3, 3) Padé form of
  exp.c for float64, plain multiplies and adds).  Accuracy: ≤ 1 ulp in
  float32, ≤ 2 ulp in float64 (tests/test_blocked.py); exp(−∞) = 0, exp(NaN) = NaN,
  overflow gives +∞, and results below 4e-38 (float32) / 1e-307 (float64) flush to 0.
* :func:`colmax` — the NaN-propagating column maximum of a tile (running max of the
  online softmax), two rows per step (blocked, window).
* :func:`rowmax` — the NaN-propagating maximum of a 1-D array, in eight lanes (the row
  maxima of the FAVOR+ features and of the sparse kernels' row softmax).
* :func:`add_rows` — dst += src for two 2-D arrays of one shape, as a loop (the array
  expression ``dst += src`` compiles broadcasting checks whose error messages format
  strings: seconds of compile time per kernel, for the same sums).
* :func:`blas_single_thread` — pins SciPy's OpenBLAS (the BLAS behind ``np.dot`` in Numba)
  to one thread while kernels that call it from their threads run.

Used by ``kernels/blocked.py``, ``kernels/band.py``, ``kernels/sparse.py`` and the
non-causal linear and FAVOR+ kernels.
"""

from __future__ import annotations

import contextlib
import ctypes
import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from ._jit import serial

__all__ = ["add_rows", "blas_single_thread", "colmax", "fast_exp", "nanmax", "rowmax"]

# ----------------------------------------------------------------------------- fast exp


@intrinsic
def _pow2_f64(typingctx, n):
    """2.0**n for an int64 n in [−1022, 1023], by writing the exponent bits."""
    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        bits = builder.shl(builder.add(args[0], ir.Constant(i64, 1023)), ir.Constant(i64, 52))
        return builder.bitcast(bits, ir.DoubleType())
    return types.float64(types.int64), codegen


@intrinsic
def _pow2_f32(typingctx, n):
    """2.0**n for an int32 n in [−126, 127], by writing the exponent bits."""
    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        bits = builder.shl(builder.add(args[0], ir.Constant(i32, 127)), ir.Constant(i32, 23))
        return builder.bitcast(bits, ir.FloatType())
    return types.float32(types.int32), codegen


def fast_exp(x):
    """exp(x); the jitted version (below) vectorizes.  Plain Python falls back to math.exp."""
    return math.exp(x) if x > -math.inf else 0.0


def _exp64(x):
    # exp(x) = 2ⁿ · exp(r), n = round(x / ln 2), |r| ≤ ln2 / 2 (Cody–Waite split of ln 2);
    # exp(r) = 1 + 2 r P(r²) / (Q(r²) − r P(r²))  (Cephes exp.c, a (3, 3) Padé form)
    xc = min(max(x, -707.0), 709.0)
    n = np.floor(xc * 1.4426950408889634 + 0.5)
    r = xc - n * 6.93145751953125e-1 - n * 1.42860682030941723212e-6
    rr = r * r
    px = r * ((1.26177193074810590878e-4 * rr + 3.02994407707441961300e-2) * rr
              + 9.99999999999999999910e-1)
    qx = ((3.00198505138664455042e-6 * rr + 2.52448340349684104192e-3) * rr
          + 2.27265548208155028766e-1) * rr + 2.00000000000000000009e0
    e = 1.0 + 2.0 * (px / (qx - px))
    e = e * _pow2_f64(np.int64(n) - 1) * 2.0      # 2ⁿ⁻¹ · 2 keeps n = 1024 representable
    if x < -707.0:
        e = 0.0
    if x > 709.0:
        e = np.inf
    if x != x:
        e = x
    return e


@intrinsic
def _fma32(typingctx, a, b, c):
    """a·b + c for float32, rounded once (``llvm.fma``: one vfmadd instruction)."""
    def codegen(context, builder, sig, args):
        return builder.fma(*args)
    return types.float32(types.float32, types.float32, types.float32), codegen


_F = np.float32
_E32 = (_F(1.9875691500e-4), _F(1.3981999507e-3), _F(8.3334519073e-3), _F(4.1665795894e-2),
        _F(1.6666665459e-1), _F(5.0000001201e-1))
_C0, _C1, _C2, _C3, _C4, _C5 = _E32
_LOG2E32, _LN2HI32, _LN2LO32 = _F(1.4426950408889634), _F(0.693359375), _F(-2.12194440e-4)
_LO32, _HI32, _HALF32, _ONE32, _TWO32 = _F(-86.0), _F(88.0), _F(0.5), _F(1.0), _F(2.0)
_ZERO32, _INF32 = _F(0.0), _F(np.inf)


def _exp32(x):
    # exp(x) = 2ⁿ · exp(r), |r| ≤ ln2 / 2; exp(r) = 1 + r + r² C(r) (Cephes expf.c), float32,
    # each step a·b + c as one fused multiply-add
    xc = min(max(x, _LO32), _HI32)
    n = np.floor(_fma32(xc, _LOG2E32, _HALF32))
    r = _fma32(n, -_LN2LO32, _fma32(n, -_LN2HI32, xc))             # xc − n·ln2 (hi, lo)
    c = _fma32(_fma32(_fma32(_fma32(_fma32(_C0, r, _C1), r, _C2), r, _C3), r, _C4), r, _C5)
    e = _fma32(c, r * r, r) + _ONE32
    e = e * _pow2_f32(np.int32(n) - np.int32(1)) * _TWO32
    if x < _LO32:
        e = _ZERO32
    if x > _HI32:
        e = _INF32
    if x != x:
        e = x
    return e


@overload(fast_exp)
def _fast_exp_overload(x):
    if x == types.float32:
        return _exp32
    if x == types.float64:
        return _exp64
    return None


# ----------------------------------------------------------------------------- BLAS threads


def _openblas_threads(module_file: str, suffixes: tuple):
    """``(set, get)`` of the number of threads of the OpenBLAS that the extension module
    ``module_file`` links (looked up through its dependencies), or ``(None, None)``: the
    symbols ``[scipy_]openblas_{set,get}_num_threads<suffix>`` of the wheels' builds."""
    try:
        lib = ctypes.CDLL(module_file)
    except OSError:
        return None, None
    for prefix in ("scipy_openblas_", "openblas_"):
        for suffix in suffixes:
            setter = getattr(lib, f"{prefix}set_num_threads{suffix}", None)
            getter = getattr(lib, f"{prefix}get_num_threads{suffix}", None)
            if setter is not None and getter is not None:
                getter.restype = ctypes.c_int
                return setter, getter
    return None, None


def _find_blas_libraries() -> list:
    """``(set, get)`` pairs of the two OpenBLAS libraries a kernel path may meet: SciPy's,
    which Numba's ``np.dot`` calls, and NumPy's, which ``np.matmul`` and ``@`` call (the
    wheels bundle one each; another build may have neither, then this list is shorter)."""
    found = []
    try:
        import scipy.linalg.cython_blas as cython_blas
        found.append(_openblas_threads(cython_blas.__file__, ("",)))
    except ImportError:
        pass
    try:
        from numpy._core import _multiarray_umath
    except ImportError:                # pragma: no cover - NumPy 1.x
        from numpy.core import _multiarray_umath
    found.append(_openblas_threads(_multiarray_umath.__file__, ("64_", "")))
    return [pair for pair in found if pair[0] is not None]


_BLAS = _find_blas_libraries()


@contextlib.contextmanager
def blas_single_thread():
    """Run the enclosed code with OpenBLAS limited to one thread (no-op where unknown).

    The kernels call BLAS from their own threads; BLAS spawning its own threads
    on top oversubscribes the cores.  One BLAS thread does not change any result (OpenBLAS
    splits a product over output blocks, never over the summed dimension).  Both libraries
    of :func:`_find_blas_libraries` are limited: NumPy's too, because a product that
    ``np.matmul`` runs on several threads leaves OpenBLAS's worker threads spinning for a
    while after it returns, on the cores the next kernel's threads need
    (``OPENBLAS_THREAD_TIMEOUT`` sets how long; BENCHMARKS.md, "NumPy's BLAS threads next
    to the kernels") — so a NumPy product inside this block runs on the calling thread only.
    """
    old = [get() for _, get in _BLAS]
    for set_threads, _ in _BLAS:
        set_threads(1)
    try:
        yield
    finally:
        for (set_threads, _), n in zip(_BLAS, old):
            set_threads(n)


# ----------------------------------------------------------------------------- tile max

@serial
def nanmax(a, b):
    """max(a, b) that propagates NaN (as NumPy's max does)."""
    return a if (a >= b or a != a) else b


@serial
def colmax(res, tmp, start, st):
    """res[ii] = max(start[ii], st[0, ii], st[1, ii], …), NaN-propagating, rows in order.

    SPEEDTIP: two rows per step into the other buffer.  The one-row form
    ``res[ii] = nanmax(res[ii], x)`` compiles to a masked store (vmaskmovps), which is
    microcoded on AMD Zen: measured 0.8–1.2 ns per element against 0.1–0.15 ns.
    """
    bk, bq = st.shape
    for ii in range(bq):
        res[ii] = start[ii]
    for jj in range(0, bk - 1, 2):
        r0 = st[jj]
        r1 = st[jj + 1]
        for ii in range(bq):
            tmp[ii] = nanmax(nanmax(res[ii], r0[ii]), r1[ii])
        for ii in range(bq):
            res[ii] = tmp[ii]
    if bk % 2 == 1:
        r0 = st[bk - 1]
        for ii in range(bq):
            tmp[ii] = nanmax(res[ii], r0[ii])
        for ii in range(bq):
            res[ii] = tmp[ii]


@serial
def rowmax(x):
    """max_u x[u], NaN if x holds a NaN, −∞ if x is empty.

    The maximum of values that are not NaN does not depend on the order of the comparisons
    (of two equal values, +0 and −0 may come out either way, which nothing downstream can
    tell apart: x − c and c + y are the same for either zero), so the result is that of a
    serial scan, bit for bit, up to the payload of a NaN.

    SPEEDTIP: eight running maxima, one per u mod 8, each a plain select, and a NaN seen
    as a flag beside them.  One running maximum waits on each comparison in turn; a select
    that also propagates NaN (:func:`nanmax`) does not vectorize (measured: BENCHMARKS.md).
    """
    n = x.shape[0]
    c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = x.dtype.type(-np.inf)
    nan = False
    for u in range(0, n - 7, 8):
        x0, x1, x2, x3 = x[u], x[u + 1], x[u + 2], x[u + 3]
        x4, x5, x6, x7 = x[u + 4], x[u + 5], x[u + 6], x[u + 7]
        c0 = x0 if x0 > c0 else c0
        c1 = x1 if x1 > c1 else c1
        c2 = x2 if x2 > c2 else c2
        c3 = x3 if x3 > c3 else c3
        c4 = x4 if x4 > c4 else c4
        c5 = x5 if x5 > c5 else c5
        c6 = x6 if x6 > c6 else c6
        c7 = x7 if x7 > c7 else c7
        nan |= ((x0 != x0) | (x1 != x1) | (x2 != x2) | (x3 != x3)
                | (x4 != x4) | (x5 != x5) | (x6 != x6) | (x7 != x7))
    for u in range(n - n % 8, n):
        c0 = x[u] if x[u] > c0 else c0
        nan |= x[u] != x[u]
    if nan:
        for u in range(n):
            if x[u] != x[u]:
                return x[u]
    c0 = c1 if c1 > c0 else c0
    c2 = c3 if c3 > c2 else c2
    c4 = c5 if c5 > c4 else c4
    c6 = c7 if c7 > c6 else c6
    c0 = c2 if c2 > c0 else c0
    c4 = c6 if c6 > c4 else c4
    return c4 if c4 > c0 else c0


@numba.njit(inline="always")
def add_rows(dst, src):
    """dst += src for 2-D arrays of one shape, element by element (inlined into the caller)."""
    for r in range(dst.shape[0]):
        for c in range(dst.shape[1]):
            dst[r, c] += src[r, c]
