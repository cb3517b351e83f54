"""Non-causal kernels of Performer attention with positive softmax features (FAVOR+).

Features of a row x (tinyeff.ops.feature_maps.favor_softmax), ω the (m, D) random features:

    x̂ = √scale · x,   a = x̂ ωᵀ − ‖x̂‖²/2  (m),   c = max_f a_f,   f = exp(a − c),   ℓ = c − ½ ln m

so that φ(x) = f · exp(ℓ).  For one batch slice, with keep_j = [key j is real], the keys
counted in the normalizer J = {j : keep_j} ("exact") or every key ("values_only", which
zeroes the padded keys' values instead), C = max_{j∈J} ℓk_j and w_j = exp(ℓk_j − C):

    KV = Σ_{j∈J} w_j keep_j fk_j v_jᵀ   (m, Dv)          z = Σ_{j∈J} w_j fk_j   (m)
    out_i = fq_i KV / denom_i,   denom_i = fq_i·z + eps·exp(−ℓq_i − C)     (normalize)
    out_i = fq_i KV · exp(ℓq_i + C)                                        (normalize=False)

(tinyeff.attention._linear_engine: the shifts cancel exactly, so this is the un-stabilized
formula; an empty row gets denom = +inf and out = 0.)  Backward, with g_i = dout_i / denom_i
and δ_i = −(dout_i·out_i) / denom_i (0 with normalize=False):

    dfq_i = KV g_i + δ_i z,      dKV = Σ_i fq_i g_iᵀ,      dz = Σ_i δ_i fq_i
    dfk_j = w_j (keep_j dKV v_j + dz)   (j ∈ J; 0 otherwise),     dv_j = keep_j w_j dKVᵀ fk_j
    dx = √scale (da ω − (Σ_f da_f) x̂),   da = df ∘ f      (the shift c held constant)

Tasks as in ``kernels/linear_noncausal.py``: the sums over the keys (KV, z, with the running
maximum C of each range: a range rescales its partial sums by exp(C_old − C_new) when a
chunk raises it) and over the queries (dKV, dz) are split into ``parts`` ranges of chunks per
batch slice, the partials combined in range order (each scaled by exp(C_p − C)); the
row-wise passes are one task per (batch slice, chunk).  The features of a chunk are formed
in scratch (one ``np.dot`` for x̂ ωᵀ, the vectorizable ``fast_exp``) next to the chunk's
products and never stored; the backward recomputes them.  Every sum runs in a fixed order,
so results are bit-identical whatever the number of threads.

Arrays are (BH, L, X), C-contiguous, outputs first; tinyeff.attention._linear_engine builds
the arguments, pins BLAS to one thread, and is the only caller.
"""

from __future__ import annotations

import numpy as np

from ._jit import run_tasks, serial
from ._math import add_rows, fast_exp, nanmax, rowmax
from .linear import grad_rows, row_denominator
from .linear_noncausal import add_parts, task_span, zero_sums

__all__ = ["favor_fwd", "favor_bwd"]


# ----------------------------------------------------------------------------- features


@serial
def _features(f, ell, xh, x, omega_t, root, half_log_m):
    """f (T, m) = exp(a − c), ell (T) = c − ½ ln m and xh (T, D) = x̂ for the rows of x.

    The row's shift ‖x̂‖²/2 is in both a and c, so a − c = x̂ωᵀ − max_f x̂ωᵀ: f is formed
    without it, and c = max_f x̂ωᵀ − ‖x̂‖²/2 (the same float as max_f of the rounded a_f,
    rounding being monotone).  ‖x̂‖² is summed in float64 (one value per row).

    SPEEDTIP: no pass over the (T, m) block subtracts the shift (measured: BENCHMARKS.md).
    SPEEDTIP: ‖x̂‖² of four rows at a time (four independent chains of adds, each in the
    order e = 0 … D − 1, as one row at a time would wait on each add in turn)."""
    nt, d = x.shape
    sqs = np.zeros(nt) + root * 0                                  # (T) ‖x̂‖²
    t4 = nt - nt % 4
    for t in range(0, t4, 4):
        s0 = root * 0
        s1 = s0
        s2 = s0
        s3 = s0
        for e in range(d):
            a0 = x[t, e] * root                                    # x̂ = √scale · x
            a1 = x[t + 1, e] * root
            a2 = x[t + 2, e] * root
            a3 = x[t + 3, e] * root
            xh[t, e] = a0
            xh[t + 1, e] = a1
            xh[t + 2, e] = a2
            xh[t + 3, e] = a3
            s0 += a0 * a0
            s1 += a1 * a1
            s2 += a2 * a2
            s3 += a3 * a3
        sqs[t] = s0
        sqs[t + 1] = s1
        sqs[t + 2] = s2
        sqs[t + 3] = s3
    for t in range(t4, nt):
        s0 = root * 0
        for e in range(d):
            a0 = x[t, e] * root
            xh[t, e] = a0
            s0 += a0 * a0
        sqs[t] = s0
    np.dot(xh, omega_t, f)                                         # x̂ ωᵀ
    for t in range(nt):
        row = f[t]
        mx = rowmax(row)                                           # max_f (x̂ωᵀ)_f
        for u in range(row.shape[0]):
            row[u] = fast_exp(row[u] - mx)                         # f = exp(a − c)
        c = f.dtype.type(mx - sqs[t] * 0.5)                        # c = max_f a
        ell[t] = c - half_log_m


@serial
def _dx(dx, da, f, xh, omega, root):
    """dx = √scale (da ω − (Σ_f da_f) x̂), with da = df ∘ f formed in place (da holds df)."""
    nt = da.shape[0]
    for t in range(nt):
        row = da[t]
        for u in range(row.shape[0]):
            row[u] = row[u] * f[t, u]                              # fwd: f = exp(a − c)
    np.dot(da, omega, dx)                                          # fwd: a = x̂ ωᵀ − ‖x̂‖²/2
    sums = np.dot(da, np.ones(da.shape[1], dtype=da.dtype))       # (T) Σ_f da_f
    for t in range(nt):
        s = sums[t]
        for e in range(dx.shape[1]):
            dx[t, e] = (dx[t, e] - s * xh[t, e]) * root            # fwd: x̂ = √scale · x


@serial
def _scale_part(kvp, zp, r):
    """kvp, zp *= r (a range's partial sums moved to a new maximum)."""
    for f in range(kvp.shape[0]):
        zp[f] = zp[f] * r
        for e in range(kvp.shape[1]):
            kvp[f, e] = kvp[f, e] * r


# ----------------------------------------------------------------------------- forward


@serial
def _sum_keys_tasks(lo, hi, kv_part, z_part, c_part, k, v, keep, omega_t, root, half_log_m,
                    exact, parts, chunk, zero):
    """Tasks lo … hi − 1 of the sums over the keys."""
    m, d = k.shape[1:]
    nf = omega_t.shape[1]
    dv = v.shape[2]
    xh = np.empty((chunk, d), dtype=k.dtype)                           # (T, D) k̂
    fk = np.empty((chunk, nf), dtype=k.dtype)                          # (T, m) features
    ell = np.empty(chunk, dtype=k.dtype)                               # (T) ℓk
    tmp = np.empty((nf, dv), dtype=k.dtype)                            # (m, Dv)
    inf = zero - np.float32(np.inf)
    for task in range(lo, hi):
        b, j_lo, j_hi = task_span(task, parts, m, chunk)
        kvp = kv_part[task]                                            # (m, Dv)
        zp = z_part[task]                                              # (m)
        zero_sums(kvp, zp, zero)
        cp = inf                                                       # C_p = −inf: no key yet
        for j0 in range(j_lo, j_hi, chunk):
            nt = min(chunk, j_hi - j0)
            ft = fk[:nt]
            _features(ft, ell, xh[:nt], k[b, j0:j0 + nt], omega_t, root, half_log_m)
            cm = inf
            for t in range(nt):
                if keep[b, j0 + t] or not exact:
                    cm = nanmax(cm, ell[t])
            if cm > cp or cm != cm:                                    # online max: rescale
                if cp > inf:                                           # (a NaN max propagates)
                    _scale_part(kvp, zp, np.exp(cp - cm))
                cp = cm
            for t in range(nt):
                row = ft[t]
                counted = keep[b, j0 + t] or not exact
                w = np.exp(ell[t] - cp) if counted else zero           # w_j = exp(ℓk_j − C_p)
                for u in range(nf):
                    row[u] = row[u] * w
                if counted:
                    for u in range(nf):
                        zp[u] += row[u]                                # z = Σ w_j fk_j
                if not keep[b, j0 + t]:                                # KV: keep_j w_j fk_j
                    for u in range(nf):
                        row[u] = zero
            np.dot(ft.T, v[b, j0:j0 + nt], tmp)                        # Σ_chunk w_j fk_j v_jᵀ
            add_rows(kvp, tmp)
        c_part[task] = cp


@serial
def _combine(kv, z, c, kv_part, z_part, c_part, parts):
    """C = max_p C_p and KV, z = Σ_p exp(C_p − C) (KV_p, z_p), in order p (0 for C_p = −inf)."""
    bh, nf, dv = kv.shape
    for b in range(bh):
        cb = c_part[b * parts]
        for p in range(1, parts):
            cb = nanmax(cb, c_part[b * parts + p])
        c[b] = cb
        for f in range(nf):
            z[b, f] = 0
            for e in range(dv):
                kv[b, f, e] = 0
        for p in range(parts):
            cp = c_part[b * parts + p]
            if cp == -np.inf:
                continue
            r = np.exp(cp - cb)
            for f in range(nf):
                z[b, f] += z_part[b * parts + p, f] * r
                for e in range(dv):
                    kv[b, f, e] += kv_part[b * parts + p, f, e] * r


@serial
def _rows_fwd_tasks(lo, hi, out, denom, kv, z, c, q, omega_t, root, half_log_m, normalize,
                    eps, chunk, zero):
    """Tasks lo … hi − 1 (batch slice, chunk of rows) of the forward: out = fq KV / denom."""
    n, d = q.shape[1:]
    nf = omega_t.shape[1]
    n_chunks = -(-n // chunk)
    xh = np.empty((chunk, d), dtype=q.dtype)                       # (T, D) q̂
    fq = np.empty((chunk, nf), dtype=q.dtype)                      # (T, m)
    ell = np.empty(chunk, dtype=q.dtype)                           # (T) ℓq
    one = zero + np.float32(1)
    inf = zero + np.float32(np.inf)
    for task in range(lo, hi):
        b = task // n_chunks
        i0 = (task - b * n_chunks) * chunk
        nt = min(chunk, n - i0)
        ft = fq[:nt]
        _features(ft, ell, xh[:nt], q[b, i0:i0 + nt], omega_t, root, half_log_m)
        o = out[b, i0:i0 + nt]                                     # (T, Dv)
        np.dot(ft, kv[b], o)                                       # num = fq KV
        seen = c[b] > -inf
        dens = np.dot(ft, z[b])                                    # (T) fq·z
        for t in range(nt):
            corr = np.exp(-(ell[t] + c[b])) if seen else one       # exp(−ℓq − C)
            den = row_denominator(dens[t], corr, seen, normalize, eps, inf)
            ot = o[t]
            for e in range(ot.shape[0]):
                ot[e] = ot[e] / den
            denom[b, i0 + t] = den


def favor_fwd(out, denom, kv, z, c, kv_part, z_part, c_part, q, k, v, keep, omega_t, root,
              half_log_m, exact, normalize, eps, chunk, parts, zero):
    """out (module docstring): one pass over the keys (KV, z, C), one over the rows.

    out (BH, N, Dv), denom (BH, N) (+inf for an empty row), kv (BH, m, Dv), z (BH, m),
    c (BH,) = C (−inf when no key is counted): outputs; kv_part (BH·parts, m, Dv),
    z_part (BH·parts, m), c_part (BH·parts,): scratch.  keep (BH, M) real keys; omega_t
    (D, m) = ωᵀ; root = √scale, half_log_m = ½ ln m in the dtype; parts = n_parts(M, chunk).
    """
    bh, n = q.shape[:2]
    run_tasks(_sum_keys_tasks, bh * parts, kv_part, z_part, c_part, k, v, keep, omega_t, root,
              half_log_m, exact, parts, chunk, zero)
    _combine(kv, z, c, kv_part, z_part, c_part, parts)
    run_tasks(_rows_fwd_tasks, bh * -(-n // chunk), out, denom, kv, z, c, q, omega_t, root,
              half_log_m, normalize, eps, chunk, zero)


# ----------------------------------------------------------------------------- backward


@serial
def _grad_queries_tasks(lo, hi, dq, dkv_part, dz_part, q, dout, out, denom, kv, z, omega,
                        omega_t, root, half_log_m, normalize, parts, chunk, zero):
    """Tasks lo … hi − 1 of the backward's pass over the rows."""
    n, d = q.shape[1:]
    nf = omega.shape[0]
    dv = dout.shape[2]
    xh = np.empty((chunk, d), dtype=q.dtype)                           # (T, D) q̂
    fq = np.empty((chunk, nf), dtype=q.dtype)                          # (T, m)
    df = np.empty((chunk, nf), dtype=q.dtype)                          # (T, m) dfq, then da
    ell = np.empty(chunk, dtype=q.dtype)                               # (T)
    g = np.empty((chunk, dv), dtype=q.dtype)                           # (T, Dv) dnum
    dl = np.empty(chunk, dtype=q.dtype)                                # (T) dden
    tmp = np.empty((nf, dv), dtype=q.dtype)                            # (m, Dv)
    for task in range(lo, hi):
        b, i_lo, i_hi = task_span(task, parts, n, chunk)
        dkvp = dkv_part[task]                                          # (m, Dv)
        dzp = dz_part[task]                                            # (m)
        zero_sums(dkvp, dzp, zero)
        for i0 in range(i_lo, i_hi, chunk):
            nt = min(chunk, i_hi - i0)
            ft = fq[:nt]
            gt = g[:nt]
            dft = df[:nt]
            for t in range(nt):                                        # fwd: out = num / denom
                dl[t] = grad_rows(gt[t], dout[b, i0 + t], out[b, i0 + t], denom[b, i0 + t],
                                  normalize, zero)
            _features(ft, ell, xh[:nt], q[b, i0:i0 + nt], omega_t, root, half_log_m)
            # fwd: num_i = fq_i KV,  den_i = fq_i·z
            np.dot(gt, kv[b].T, dft)                                   # KV g_i
            for t in range(nt):
                for u in range(nf):
                    dft[t, u] += dl[t] * z[b, u]                       # + δ_i z
            np.dot(ft.T, gt, tmp)                                      # Σ_chunk fq_i g_iᵀ
            add_rows(dkvp, tmp)
            for t in range(nt):
                for u in range(nf):
                    dzp[u] += dl[t] * ft[t, u]                         # Σ δ_i fq_i
            _dx(dq[b, i0:i0 + nt], dft, ft, xh[:nt], omega, root)     # fwd: fq from q


@serial
def _grad_keys_tasks(lo, hi, dk, dv_out, k, v, keep, dkv, dz, c, omega, omega_t, root,
                     half_log_m, exact, chunk, zero):
    """Tasks lo … hi − 1 (batch slice, chunk of keys) of the backward: dk, dv."""
    m, d = k.shape[1:]
    nf = omega.shape[0]
    n_chunks = -(-m // chunk)
    xh = np.empty((chunk, d), dtype=k.dtype)                       # (T, D) k̂
    fk = np.empty((chunk, nf), dtype=k.dtype)                      # (T, m)
    df = np.empty((chunk, nf), dtype=k.dtype)                      # (T, m) dfk, then da
    fw = np.empty((chunk, nf), dtype=k.dtype)                      # (T, m) keep_j w_j fk_j
    ell = np.empty(chunk, dtype=k.dtype)                           # (T)
    for task in range(lo, hi):
        b = task // n_chunks
        j0 = (task - b * n_chunks) * chunk
        nt = min(chunk, m - j0)
        ft = fk[:nt]
        dft = df[:nt]
        fwt = fw[:nt]
        _features(ft, ell, xh[:nt], k[b, j0:j0 + nt], omega_t, root, half_log_m)
        # fwd: KV = Σ_j w_j keep_j fk_j v_jᵀ,   z = Σ_j w_j fk_j   (w_j = exp(ℓk_j − C) constant)
        np.dot(v[b, j0:j0 + nt], dkv[b].T, dft)                    # dKV v_j
        for t in range(nt):
            counted = keep[b, j0 + t] or not exact
            w = np.exp(ell[t] - c[b]) if counted else zero
            row = dft[t]
            if keep[b, j0 + t]:
                for u in range(nf):
                    row[u] = (row[u] + dz[b, u]) * w
            elif exact:                                            # dropped key
                for u in range(nf):
                    row[u] = zero
            else:                                                  # values_only: v_j = 0
                for u in range(nf):
                    row[u] = dz[b, u] * w
            w_v = w if keep[b, j0 + t] else zero
            for u in range(nf):
                fwt[t, u] = ft[t, u] * w_v                         # keep_j w_j fk_j
        np.dot(fwt, dkv[b], dv_out[b, j0:j0 + nt])                 # dv_j = keep_j w_j dKVᵀ fk_j
        _dx(dk[b, j0:j0 + nt], dft, ft, xh[:nt], omega, root)     # fwd: fk from k
        if exact:
            for t in range(nt):
                if not keep[b, j0 + t]:
                    for e in range(d):
                        dk[b, j0 + t, e] = zero


def favor_bwd(dq, dk, dv_out, dkv, dz, dkv_part, dz_part, q, k, v, keep, dout, out, denom, kv,
              z, c, omega, omega_t, root, half_log_m, exact, normalize, chunk, parts, zero):
    """dq, dk, dv of :func:`favor_fwd` (module docstring): one pass over the rows (dq, and
    dKV, dz summed by ranges), one over the keys.

    dq (BH, N, D), dk (BH, M, D), dv_out (BH, M, Dv), dkv (BH, m, Dv), dz (BH, m): outputs;
    dkv_part (BH·parts, m, Dv), dz_part (BH·parts, m): scratch; dout, out (BH, N, Dv),
    denom (BH, N), kv (BH, m, Dv), z (BH, m), c (BH,) from the forward; omega (m, D) and
    omega_t (D, m) = ωᵀ; parts = n_parts(N, chunk).
    """
    bh = q.shape[0]
    m = k.shape[1]
    run_tasks(_grad_queries_tasks, bh * parts, dq, dkv_part, dz_part, q, dout, out, denom, kv,
              z, omega, omega_t, root, half_log_m, normalize, parts, chunk, zero)
    add_parts(dkv, dz, dkv_part, dz_part, parts)
    run_tasks(_grad_keys_tasks, bh * -(-m // chunk), dk, dv_out, k, v, keep, dkv, dz, c, omega,
              omega_t, root, half_log_m, exact, chunk, zero)
