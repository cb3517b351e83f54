"""Numba kernels of banded ("interval") attention, used by ``window`` and ``local``.

Both variants are special cases of one structure: query row i may attend the keys of one
contiguous interval [lo_i, hi_i) (intersected with a per-key validity flag), and lo_i, hi_i
never decrease with i.  A *tile* of consecutive query rows [i0, i1) then needs only the
contiguous key range [jlo, jhi) = [lo_{i0}, hi_{i1−1}), so its scores are one small dense
matrix product, done by BLAS through ``np.dot`` on contiguous 2-D slices:

    S_t = q[i0:i1] k[jlo:jhi]ᵀ                      (T, R)     then an explicit band mask
    P_t = masked row softmax(S_t · scale + bias)     (T, R)
    out[i0:i1] = P_t v[jlo:jhi]                      (T, Dv)

``bias`` depends only on the offset i − j: bias_ij = bias[b, i − j − off_min].

Backward (P recomputed from the saved log-sum-exp, as in FlashAttention; O(N) saved state):

    P_t  = exp(S_t · scale + bias − lse_i) on the band, 0 elsewhere
    dP_t = dout[i0:i1] v[jlo:jhi]ᵀ
    dS_t = P_t ⊙ (dP_t − δ_i),     δ_i = dout_i · out_i  (= Σ_j P_ij dP_ij)
    dq[i0:i1]   = dS_t k[jlo:jhi] · scale
    dk[jlo:jhi] += dS_tᵀ q[i0:i1] · scale,    dv[jlo:jhi] += P_tᵀ dout[i0:i1]

The key ranges of neighbouring tiles overlap, so dk/dv would race if all tiles ran at once.
Tiles are coloured into P *phases* (tile t runs in phase t mod P) such that the tiles of one
phase have disjoint key ranges; phases run one after the other and each key row receives its
contributions in a fixed order whatever the number of threads (no atomics; bit-identical
results with 1 or 2 threads).  The bias gradient is written per tile, ``dbias_part[b, t]``,
and summed over tiles by the caller in a fixed order.

NOTE: ``np.dot`` inside Numba calls SciPy's OpenBLAS.  When OpenBLAS itself is
multi-threaded, its threads fight the Numba threads (measured: 36 GF/s instead of 99 GF/s
on 2 cores); :func:`blas_single_thread` pins SciPy's OpenBLAS to one thread around a call.

Kernels take contiguous arrays, outputs first, and do no validation (the variant modules do).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os

import numpy as np

from ._jit import kernel, prange


@kernel
def attend_band(out, lse, q, k, v, tile_start, tile_jlo, tile_jhi, lo, hi, row_ok, key_ok,
                bias, has_bias, off_min, scale):
    """out_i = Σ_{j∈[lo_i,hi_i), key_ok} softmax_j(q_i·k_j·scale + bias[i−j−off_min]) v_j.

    out (BH, N, Dv), lse (BH, N); q (BH, N, D), k (BH, M, D), v (BH, M, Dv);
    tile_start (nt+1,), tile_jlo/tile_jhi (nt,), lo/hi (N,) int64; row_ok (BH, N) and
    key_ok (BH, M) bool; bias (BH, n_off); scale of q's dtype.
    """
    bh = q.shape[0]
    nt = tile_start.shape[0] - 1
    for task in prange(bh * nt):
        b = task // nt
        t = task - b * nt
        i0 = tile_start[t]
        i1 = tile_start[t + 1]
        jl = tile_jlo[t]
        jh = tile_jhi[t]
        if jh <= jl:
            for i in range(i0, i1):
                out[b, i, :] = 0
                lse[b, i] = -np.inf
            continue
        s = np.dot(q[b, i0:i1], k[b, jl:jh].T)                       # (T, R) raw scores
        for r in range(i1 - i0):
            i = i0 + r
            a = max(lo[i], jl)
            e = min(hi[i], jh)
            found = False
            mx = s[r, 0]
            if row_ok[b, i]:
                for j in range(a, e):
                    if key_ok[b, j]:
                        x = s[r, j - jl] * scale
                        if has_bias:
                            x += bias[b, i - j - off_min]
                        s[r, j - jl] = x
                        if not found:
                            mx = x
                            found = True
                        elif x > mx or x != x:
                            mx = x
            s[r, :a - jl] = 0                                        # left of the band
            s[r, e - jl:] = 0                                        # right of the band
            if not found or mx == -np.inf:                           # no admissible key
                s[r, a - jl:e - jl] = 0
                lse[b, i] = -np.inf
                continue
            z = 0.0                                                  # serial, fixed order
            for j in range(a, e):
                if key_ok[b, j]:
                    p = np.exp(s[r, j - jl] - mx)
                    s[r, j - jl] = p
                    z += p
                else:
                    s[r, j - jl] = 0
            for j in range(a, e):
                s[r, j - jl] = s[r, j - jl] / z
            lse[b, i] = mx + np.log(z)
        out[b, i0:i1] = np.dot(s, v[b, jl:jh])                        # (T, Dv)


@kernel
def attend_band_bwd(dq, dk, dv, dbias_part, dout, delta, lse, q, k, v, tile_start, tile_jlo,
                    tile_jhi, n_phases, lo, hi, row_ok, key_ok, bias, has_bias, off_min, scale):
    """Backward of :func:`attend_band`; dk and dv must be zero on entry (they accumulate).

    dq (BH, N, D), dk (BH, M, D), dv (BH, M, Dv), dbias_part (BH, nt, n_off) zeroed;
    dout (BH, N, Dv), delta (BH, N) = Σ_d dout·out, lse (BH, N) from the forward.
    """
    bh = q.shape[0]
    nt = tile_start.shape[0] - 1
    for ph in range(n_phases):
        ntp = (nt - ph + n_phases - 1) // n_phases                   # tiles ph, ph + P, …
        for task in prange(bh * ntp):
            b = task // ntp
            t = ph + n_phases * (task - b * ntp)
            i0 = tile_start[t]
            i1 = tile_start[t + 1]
            jl = tile_jlo[t]
            jh = tile_jhi[t]
            if jh <= jl:
                continue
            s = np.dot(q[b, i0:i1], k[b, jl:jh].T)                   # (T, R) raw scores
            dp = np.dot(dout[b, i0:i1], v[b, jl:jh].T)               # (T, R)
            for r in range(i1 - i0):
                i = i0 + r
                a = max(lo[i], jl)
                e = min(hi[i], jh)
                li = lse[b, i]
                di = delta[b, i]
                s[r, :a - jl] = 0                                    # outside the band
                s[r, e - jl:] = 0
                dp[r, :a - jl] = 0
                dp[r, e - jl:] = 0
                if not row_ok[b, i] or li == -np.inf:                # empty or skipped row
                    s[r, a - jl:e - jl] = 0
                    dp[r, a - jl:e - jl] = 0
                    continue
                for j in range(a, e):
                    c = j - jl
                    if key_ok[b, j]:
                        x = s[r, c] * scale
                        if has_bias:
                            x += bias[b, i - j - off_min]
                        # fwd: p = exp(x − max) / z  ==  exp(x − lse)
                        p = np.exp(x - li)
                        s[r, c] = p
                        # fwd: p = softmax(x)  ->  ds = p (dp − Σ_j p dp)
                        g = p * (dp[r, c] - di)
                        if has_bias:
                            dbias_part[b, t, i - j - off_min] += g
                        dp[r, c] = g * scale                         # ds · scale
                    else:
                        s[r, c] = 0
                        dp[r, c] = 0
            # fwd: x = (q kᵀ) · scale   (dp now holds ds · scale)
            dq[b, i0:i1] = np.dot(dp, k[b, jl:jh])                    # (T, D)
            dk[b, jl:jh] += np.dot(dp.T, q[b, i0:i1])                 # (R, D)
            # fwd: out = p v
            dv[b, jl:jh] += np.dot(s.T, dout[b, i0:i1])               # (R, Dv)


def plan_phases(tile_jlo: np.ndarray, tile_jhi: np.ndarray) -> int:
    """Smallest P such that tiles t and t + P (hence t and t + 2P, …) have disjoint key ranges.

    The ranges must be non-decreasing in both ends (as every interval pattern here is).
    Empty ranges never conflict.
    """
    nt = tile_jlo.shape[0]
    if nt == 0:
        return 1
    # first tile t' > t whose range starts at or after the end of tile t's range
    first_free = np.searchsorted(tile_jlo, tile_jhi, side="left")   # (nt,)
    first_free = np.maximum(first_free, np.arange(1, nt + 1))
    empty = tile_jhi <= tile_jlo
    need = np.where(empty, 1, first_free - np.arange(nt))            # (nt,)
    return int(max(1, need.max()))


def _find_scipy_openblas():
    try:
        import scipy
        import scipy.linalg.cython_blas  # noqa: F401  (loads the library Numba's np.dot uses)
        here = os.path.join(os.path.dirname(scipy.__file__), os.pardir, "scipy.libs")
        for path in sorted(glob.glob(os.path.join(here, "libscipy_openblas*.so*"))):
            lib = ctypes.CDLL(path)
            get = getattr(lib, "scipy_openblas_get_num_threads", None)
            put = getattr(lib, "scipy_openblas_set_num_threads", None)
            if get is not None and put is not None:
                get.restype = ctypes.c_int
                put.argtypes = [ctypes.c_int]
                return get, put
    except (OSError, ImportError, AttributeError):
        pass
    return None


_OPENBLAS = _find_scipy_openblas()


@contextlib.contextmanager
def blas_single_thread():
    """Pin SciPy's bundled OpenBLAS (the BLAS of Numba's ``np.dot``) to one thread inside.

    A no-op when that library is not found (another BLAS, a SciPy built differently).
    The setting is process-wide while it lasts; it is restored on exit.
    """
    if _OPENBLAS is None:
        yield
        return
    get, put = _OPENBLAS
    old = get()
    put(1)
    try:
        yield
    finally:
        put(old)
