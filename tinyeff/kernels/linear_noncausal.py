"""Non-causal kernels of linear attention with φ = elu + 1 or relu + 1 (features fused in).

For one batch slice b, with φ applied entry by entry and keep_j = [key j is real]:

    KV    = Σ_j keep_j φ(k_j) v_jᵀ                          (D, Dv)
    z     = Σ_j φ(k_j)   over j with keep_j ("exact"), over every j ("values_only")   (D)
    out_i = φ(q_i) KV / denom_i,      denom_i = φ(q_i)·z (+ eps when eps > 0)

("values_only" keeps a padded key in the normalizer and zeroes its value; "exact" drops it:
tinyeff.attention.linear.)  An empty row (no key seen, or denom = 0) gets denom = +inf and
out = 0; with normalize=False, denom = 1.  Backward, with g_i = dout_i / denom_i (= dnum_i)
and δ_i = −(dout_i·out_i) / denom_i (= dden_i; 0 with normalize=False):

    dφ(q_i) = KV g_i + δ_i z,                  dq_i = φ'(q_i) ∘ dφ(q_i)
    dKV     = Σ_i φ(q_i) g_iᵀ,                 dz   = Σ_i δ_i φ(q_i)
    dφ(k_j) = keep_j dKV v_j + dz,             dk_j = φ'(k_j) ∘ dφ(k_j)   (0 if padded, "exact")
    dv_j    = keep_j dKVᵀ φ(k_j)

φ'(x) = [x > 0] for relu + 1 and min(φ(x), 1) for elu + 1 (1 for x > 0, eˣ = φ(x) below).

Tasks.  A sum over rows (KV and z over the keys; dKV and dz over the queries) is split into
``parts`` consecutive ranges of chunks per batch slice; a task walks its range one chunk of
``chunk`` rows at a time — φ of the chunk into scratch, then one ``np.dot`` (BLAS) for the
chunk's product — into a partial of its own, and the partials are added in range order.
The row-wise products (out; dq; dk, dv) are one task per (batch slice, chunk), each writing
its own rows.  ``parts`` and ``chunk`` depend on the shapes only, and every sum runs in a
fixed order, so results are bit-identical whatever the number of threads.

The kernels are ``serial`` (no ``prange``): ``noncausal_fwd`` and ``noncausal_bwd`` hand
each pass's tasks to ``run_tasks`` (kernels/_jit.py), one block of tasks per thread.
SPEEDTIP: that compiles in about half the time of the same passes as ``prange`` loops (no
gufuncs), at the cost of a few Python calls per pass.

SPEEDTIP: the loops over a chunk's rows index the (BH, L, X) arguments and the scratch
directly (x[b, i, f], a[t, f]), never through a view of the chunk or of one row
(``x[b, i0:i1]``, ``a[t]``): the loops over views ran several times slower (BENCHMARKS.md,
"Loops over views").  Views remain only as the operands of ``np.dot``.

SPEEDTIP: the products with KVᵀ and dKVᵀ take C-contiguous copies of them (made once per
call), not transposed views: OpenBLAS runs the (T, Dv) · (Dv, D) product faster so.

SPEEDTIP: the features are formed in scratch with the vectorizable ``fast_exp`` (≤ 1 ulp
float32, ≤ 2 ulp float64; kernels/_math.py) and never stored: the backward recomputes them.
``np.dot`` calls SciPy's OpenBLAS, which the caller pins to one thread
(``blas_single_thread``) so that it does not fight the Numba threads.

Arrays are (BH, L, X), C-contiguous, outputs first; tinyeff.attention._linear_engine builds
the arguments and is the only caller.
"""

from __future__ import annotations

import numpy as np

from ._jit import run_tasks, serial
from ._math import add_rows, fast_exp
from .linear import row_denominator

__all__ = ["add_parts", "n_parts", "noncausal_bwd", "noncausal_fwd", "task_span", "zero_sums"]

MAX_PARTS = 8       # ranges per batch slice of a sum over rows (bounds the partials' memory)


def n_parts(length: int, chunk: int) -> int:
    """The number of ranges a sum over ``length`` rows is split into (a function of the
    shapes only, so that the order of every sum is)."""
    return max(1, min(MAX_PARTS, -(-length // chunk)))


# ----------------------------------------------------------------------------- row helpers


@serial
def _phi(a, x, b, r0, nt, relu, zero):
    """a[t] = φ(x[b, r0 + t]) for t < nt: relu(x) + 1, or elu(x) + 1 = exp(min(x, 0)) +
    max(x, 0)."""
    one = zero + np.float32(1)
    for t in range(nt):
        if relu:
            for f in range(x.shape[2]):
                a[t, f] = max(x[b, r0 + t, f], zero) + one
        else:
            for f in range(x.shape[2]):
                xf = x[b, r0 + t, f]
                a[t, f] = fast_exp(min(xf, zero)) + max(xf, zero)


@serial
def _dphi(g, a, t, x, b, i, relu, zero):
    """g[b, i] *= φ'(x[b, i]), from a[t] = φ(x[b, i]): [x > 0] for relu + 1; min(φ, 1) for
    elu + 1 (as tinyeff.kernels.linear.dphi)."""
    one = zero + np.float32(1)
    for f in range(x.shape[2]):
        if relu:
            if not x[b, i, f] > zero:
                g[b, i, f] = g[b, i, f] * zero
        else:
            g[b, i, f] = g[b, i, f] * min(a[t, f], one)


@serial
def _grad_rows(g, dl, dout, out, denom, b, i0, nt, normalize, zero):
    """For the rows i = i0 + t, t < nt: g[t] = dnum_i = dout_i / denom_i and dl[t] = dden_i =
    −(dout_i·out_i) / denom_i (0 if unnormalized), as tinyeff.kernels.linear.grad_rows.

    SPEEDTIP: dout_i·out_i of four rows at a time (four independent chains of adds, each in
    the order e = 0 … Dv − 1, the bits of one row at a time)."""
    dv = dout.shape[2]
    t4 = nt - nt % 4
    for t in range(0, t4, 4):
        i = i0 + t
        s0 = zero
        s1 = zero
        s2 = zero
        s3 = zero
        for e in range(dv):
            s0 += dout[b, i, e] * out[b, i, e]
            s1 += dout[b, i + 1, e] * out[b, i + 1, e]
            s2 += dout[b, i + 2, e] * out[b, i + 2, e]
            s3 += dout[b, i + 3, e] * out[b, i + 3, e]
        dl[t] = s0
        dl[t + 1] = s1
        dl[t + 2] = s2
        dl[t + 3] = s3
    for t in range(t4, nt):
        s0 = zero
        for e in range(dv):
            s0 += dout[b, i0 + t, e] * out[b, i0 + t, e]
        dl[t] = s0
    for t in range(nt):
        den = denom[b, i0 + t]
        for e in range(dv):
            g[t, e] = dout[b, i0 + t, e] / den
        dl[t] = -dl[t] / den if normalize else zero


@serial
def task_span(task, parts, length, chunk):
    """(b, first row, end row) of range ``task`` of a sum split into ``parts`` ranges."""
    b = task // parts
    p = task - b * parts
    n_chunks = -(-length // chunk)
    per = -(-n_chunks // parts)                                    # chunks per range
    lo = min(p * per * chunk, length)
    return b, lo, min(lo + per * chunk, length)


@serial
def add_parts(kv, z, kv_part, z_part, parts):
    """kv[b] = Σ_p kv_part[b·parts + p] and z[b] = Σ_p z_part[b·parts + p], in order p."""
    bh, d, dv = kv.shape
    for b in range(bh):
        for f in range(d):
            z[b, f] = z_part[b * parts, f]
            for e in range(dv):
                kv[b, f, e] = kv_part[b * parts, f, e]
        for p in range(1, parts):
            for f in range(d):
                z[b, f] += z_part[b * parts + p, f]
                for e in range(dv):
                    kv[b, f, e] += kv_part[b * parts + p, f, e]


@serial
def zero_sums(kvp, zp, zero):
    """kvp (D, Dv) and zp (D) set to 0."""
    for f in range(kvp.shape[0]):
        zp[f] = zero
        for e in range(kvp.shape[1]):
            kvp[f, e] = zero


# ----------------------------------------------------------------------------- forward


@serial
def sum_keys(lo, hi, kv_part, z_part, k, v, keep, relu, exact, parts, chunk, zero):
    """Tasks [lo, hi) of the sums over the keys (ranges: kv_part, z_part rows lo … hi − 1)."""
    m, d = k.shape[1:]
    dv = v.shape[2]
    a = np.empty((chunk, d), dtype=k.dtype)                            # (T, D) φ(k) of a chunk
    tmp = np.empty((d, dv), dtype=k.dtype)                             # (D, Dv)
    for task in range(lo, hi):
        b, j_lo, j_hi = task_span(task, parts, m, chunk)
        kvp = kv_part[task]                                            # (D, Dv)
        zero_sums(kvp, z_part[task], zero)
        for j0 in range(j_lo, j_hi, chunk):
            nt = min(chunk, j_hi - j0)
            _phi(a, k, b, j0, nt, relu, zero)
            for t in range(nt):
                if keep[b, j0 + t] or not exact:                       # z = Σ φ(k_j)
                    for f in range(d):
                        z_part[task, f] += a[t, f]
                if not keep[b, j0 + t]:                                # KV: keep_j φ(k_j)
                    for f in range(d):
                        a[t, f] = zero
            np.dot(a[:nt].T, v[b, j0:j0 + nt], tmp)                    # Σ_chunk φ(k_j) v_jᵀ
            add_rows(kvp, tmp)


@serial
def rows_fwd(lo, hi, out, denom, kv, z, q, seen, normalize, eps, chunk, relu, zero):
    """Tasks [lo, hi) of the rows of the forward (chunks of rows)."""
    n, d = q.shape[1:]
    n_chunks = -(-n // chunk)
    one = zero + np.float32(1)
    inf = zero + np.float32(np.inf)
    scratch = np.empty((chunk, d), dtype=q.dtype)                      # (T, D) φ(q)
    for task in range(lo, hi):
        b = task // n_chunks
        i0 = (task - b * n_chunks) * chunk
        nt = min(chunk, n - i0)
        a = scratch[:nt]
        _phi(a, q, b, i0, nt, relu, zero)
        np.dot(a, kv[b], out[b, i0:i0 + nt])                           # num = φ(q) KV (T, Dv)
        dens = np.dot(a, z[b])                                         # (T) φ(q_i)·z
        for t in range(nt):
            den = row_denominator(dens[t], one, seen[b], normalize, eps, inf)
            for e in range(out.shape[2]):
                out[b, i0 + t, e] = out[b, i0 + t, e] / den
            denom[b, i0 + t] = den


def noncausal_fwd(out, denom, kv, z, kv_part, z_part, q, k, v, keep, seen, relu, exact,
                  normalize, eps, chunk, parts, zero):
    """out = φ(q) KV / denom (module docstring), one pass over the keys, one over the rows.

    out (BH, N, Dv), denom (BH, N) (+inf for an empty row), kv (BH, D, Dv), z (BH, D):
    outputs; kv_part (BH·parts, D, Dv), z_part (BH·parts, D): scratch.  keep (BH, M): real
    keys; seen (BH,): the slice has a key its rows see; ``parts`` = n_parts(M, chunk).
    """
    bh, n = q.shape[:2]
    run_tasks(sum_keys, bh * parts, kv_part, z_part, k, v, keep, relu, exact, parts, chunk,
              zero)
    add_parts(kv, z, kv_part, z_part, parts)
    run_tasks(rows_fwd, bh * -(-n // chunk), out, denom, kv, z, q, seen, normalize, eps,
              chunk, relu, zero)


# ----------------------------------------------------------------------------- backward


@serial
def grad_queries(lo, hi, dq, dkv_part, dz_part, q, dout, out, denom, kvt, z, normalize, parts,
                 chunk, relu, zero):
    """Tasks [lo, hi) of the backward's pass over the rows (ranges of rows); kvt = KVᵀ."""
    n, d = q.shape[1:]
    dv = dout.shape[2]
    a = np.empty((chunk, d), dtype=q.dtype)                            # (T, D) φ(q)
    g = np.empty((chunk, dv), dtype=q.dtype)                           # (T, Dv) dnum
    dl = np.empty(chunk, dtype=q.dtype)                                # (T) dden
    tmp = np.empty((d, dv), dtype=q.dtype)                             # (D, Dv)
    for task in range(lo, hi):
        b, i_lo, i_hi = task_span(task, parts, n, chunk)
        dkvp = dkv_part[task]                                          # (D, Dv)
        zero_sums(dkvp, dz_part[task], zero)
        for i0 in range(i_lo, i_hi, chunk):
            nt = min(chunk, i_hi - i0)
            # fwd: out = num / denom
            _grad_rows(g, dl, dout, out, denom, b, i0, nt, normalize, zero)
            _phi(a, q, b, i0, nt, relu, zero)
            # fwd: num_i = φ(q_i) KV,  den_i = φ(q_i)·z
            np.dot(g[:nt], kvt[b], dq[b, i0:i0 + nt])                  # KV g_i  (T, D)
            for t in range(nt):
                for f in range(d):
                    dq[b, i0 + t, f] += dl[t] * z[b, f]                # + δ_i z
                _dphi(dq, a, t, q, b, i0 + t, relu, zero)              # fwd: φ(q_i) from q_i
            np.dot(a[:nt].T, g[:nt], tmp)                              # Σ_chunk φ(q_i) g_iᵀ
            add_rows(dkvp, tmp)
            for t in range(nt):
                for f in range(d):
                    dz_part[task, f] += dl[t] * a[t, f]                # Σ δ_i φ(q_i)


@serial
def grad_keys(lo, hi, dk, dv_out, k, v, keep, dkv, dkvt, dz, exact, chunk, relu, zero):
    """Tasks [lo, hi) of the backward's pass over the keys (chunks of keys); dkvt = dKVᵀ."""
    m, d = k.shape[1:]
    n_chunks = -(-m // chunk)
    scratch = np.empty((chunk, d), dtype=k.dtype)                      # (T, D) φ(k)
    for task in range(lo, hi):
        b = task // n_chunks
        j0 = (task - b * n_chunks) * chunk
        nt = min(chunk, m - j0)
        _phi(scratch, k, b, j0, nt, relu, zero)
        # fwd: KV = Σ_j keep_j φ(k_j) v_jᵀ,   z = Σ_j φ(k_j)
        np.dot(v[b, j0:j0 + nt], dkvt[b], dk[b, j0:j0 + nt])           # dKV v_j  (T, D)
        for t in range(nt):
            j = j0 + t
            if keep[b, j]:
                for f in range(d):
                    dk[b, j, f] += dz[b, f]
            elif exact:                                                # dropped key
                for f in range(d):
                    dk[b, j, f] = zero
            else:                                                      # values_only: v_j = 0
                for f in range(d):
                    dk[b, j, f] = dz[b, f]
            _dphi(dk, scratch, t, k, b, j, relu, zero)                 # fwd: φ(k_j) from k_j
            if not keep[b, j]:
                for f in range(d):
                    scratch[t, f] = zero
        np.dot(scratch[:nt], dkv[b], dv_out[b, j0:j0 + nt])            # dv_j = keep_j dKVᵀ φ(k_j)


def noncausal_bwd(dq, dk, dv_out, dkv, dz, dkv_part, dz_part, q, k, v, keep, dout, out,
                  denom, kv, z, relu, exact, normalize, chunk, parts, zero):
    """dq, dk, dv of :func:`noncausal_fwd` (module docstring): one pass over the rows (dq,
    and dKV, dz summed by ranges), one over the keys.

    dq (BH, N, D), dk (BH, M, D), dv_out (BH, M, Dv), dkv (BH, D, Dv), dz (BH, D): outputs;
    dkv_part (BH·parts, D, Dv), dz_part (BH·parts, D): scratch.  dout, out (BH, N, Dv),
    denom (BH, N), kv (BH, D, Dv), z (BH, D) from the forward; ``parts`` = n_parts(N, chunk).
    """
    bh = q.shape[0]
    m = k.shape[1]
    kvt = np.ascontiguousarray(kv.transpose(0, 2, 1))             # (BH, Dv, D) KVᵀ
    run_tasks(grad_queries, bh * parts, dq, dkv_part, dz_part, q, dout, out, denom, kvt, z,
              normalize, parts, chunk, relu, zero)
    add_parts(dkv, dz, dkv_part, dz_part, parts)
    dkvt = np.ascontiguousarray(dkv.transpose(0, 2, 1))           # (BH, Dv, D) dKVᵀ
    run_tasks(grad_keys, bh * -(-m // chunk), dk, dv_out, k, v, keep, dkv, dkvt, dz, exact,
              chunk, relu, zero)
