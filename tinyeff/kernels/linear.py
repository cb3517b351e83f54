"""Causal prefix-sum kernels of kernelized attention (linear attention, Performer).

For one batch slice b, with query features fq (N, F), key features fk (M, F), key log-scales
lk (M) and values v (M, Dv), row i sees the keys J(i) = {j ≤ i} (top-left alignment) and

    C_i   = max_{j ∈ J(i)} lk_j                                  key scale of row i
    S_i   = Σ_{j ∈ J(i)} exp(lk_j − C_i) fk_j v_jᵀ               (F, Dv)
    z_i   = Σ_{j ∈ J(i)} exp(lk_j − C_i) fk_j                    (F)
    num_i = fq_i S_i,     den_i = fq_i · z_i

The scan keeps (S, z, C) of the current row and rescales S and z by exp(C_old − C_new)
when a key raises the maximum (the online-softmax trick), so every exponent is ≤ 0 and
nothing overflows.  Keys with lk = −inf (padding) are skipped.  With lk ≡ 0 (linear
attention) C_i = 0 and the scan is the plain prefix sum of Katharopoulos et al. (2020).

Backward (the paper's appendix, as fast-transformers' causal_product_cpu), given
dnum (N, Dv) and dden (N):

    dfq_i = S_i dnum_i + dden_i z_i                           a forward scan rebuilding S_i
    Ũ_j   = Σ_{i ≥ j} exp(C_j − C_i) fq_i dnum_iᵀ              a reverse scan (F, Dv)
    r̃_j   = Σ_{i ≥ j} exp(C_j − C_i) dden_i fq_i               (F)
    dfk_j = exp(lk_j − C_j) (Ũ_j v_j + r̃_j),   dv_j = exp(lk_j − C_j) Ũ_jᵀ fk_j

The C's are constants of the backward (they cancel exactly; see tinyeff.attention._linear_engine).
The N×F×Dv stack of prefix states is never built: one (F, Dv) state per batch slice.

Every kernel processes one *chunk* of time steps t0 … t0 + T − 1 for all batch slices, rows
and keys aligned on the same t (row t of the chunk is query t0 + t, key t is key t0 + t;
nq ≤ T rows and nk ≤ T keys exist in the chunk), carrying the scan state across calls in
in/out arrays, so the caller never holds more than one chunk of features.

Parallel over the batch slices (``run_tasks``, kernels/_jit.py: serial kernels over blocks
of slices on threads); every sum runs serially in a fixed order, so results are
bit-identical whatever the thread count.  SPEEDTIP: every inner loop runs over
the last (contiguous) axis with no reduction, so it vectorizes without fastmath: the forward
keeps S as (F, Dv), the dq scan keeps Sᵀ (Dv, F), the reverse scan keeps both Ũ and Ũᵀ.
"""

from __future__ import annotations

import numpy as np

from ._jit import run_tasks, serial


@serial
def _fwd_slices(lo, hi, num, den, cmax, S, z, c, fq, fk, lk, v):
    """Batch slices lo … hi − 1 of :func:`causal_fwd`."""
    for b in range(lo, hi):
        bh, nq, n_f = fq.shape
        nk = fk.shape[1]
        dv = v.shape[2]
        Sb = S[b]
        zb = z[b]
        cb = c[b]
        for t in range(max(nq, nk)):
            if t < nk and lk[b, t] != -np.inf:
                l = lk[b, t]
                if l > cb:                                 # new maximum: rescale the state
                    r = np.exp(cb - l)                     # 0 when cb = −inf
                    for f in range(n_f):
                        zb[f] *= r
                        for e in range(dv):
                            Sb[f, e] *= r
                    cb = l
                w = np.exp(l - cb)
                for f in range(n_f):
                    a = w * fk[b, t, f]
                    zb[f] += a
                    for e in range(dv):
                        Sb[f, e] += a * v[b, t, e]
            if t < nq:
                acc = 0.0
                for e in range(dv):
                    num[b, t, e] = 0.0
                for f in range(n_f):
                    qf = fq[b, t, f]
                    acc += qf * zb[f]
                    for e in range(dv):
                        num[b, t, e] += qf * Sb[f, e]
                den[b, t] = acc
                cmax[b, t] = cb
        c[b] = cb


def causal_fwd(num, den, cmax, S, z, c, fq, fk, lk, v):
    """num_t = fq_t S_t, den_t = fq_t·z_t, cmax_t = C_t for the chunk; updates (S, z, c).

    num (BH, nq, Dv), den (BH, nq), cmax (BH, nq): outputs.  S (BH, F, Dv), z (BH, F),
    c (BH,): scan state in/out (start: zeros and −inf).  fq (BH, nq, F), fk (BH, nk, F),
    lk (BH, nk), v (BH, nk, Dv).
    """
    run_tasks(_fwd_slices, fq.shape[0], num, den, cmax, S, z, c, fq, fk, lk, v)


@serial
def _bwd_q_slices(lo, hi, dfq, St, z, c, fk, lk, v, dnum, dden):
    """Batch slices lo … hi − 1 of :func:`causal_bwd_q`."""
    for b in range(lo, hi):
        bh, nq, n_f = dfq.shape
        nk = fk.shape[1]
        dv = v.shape[2]
        Sb = St[b]
        zb = z[b]
        cb = c[b]
        a = np.empty(n_f, dtype=fk.dtype)
        for t in range(max(nq, nk)):
            if t < nk and lk[b, t] != -np.inf:
                l = lk[b, t]
                if l > cb:
                    r = np.exp(cb - l)
                    for f in range(n_f):
                        zb[f] *= r
                    for e in range(dv):
                        for f in range(n_f):
                            Sb[e, f] *= r
                    cb = l
                w = np.exp(l - cb)
                for f in range(n_f):
                    a[f] = w * fk[b, t, f]
                    zb[f] += a[f]
                for e in range(dv):
                    ve = v[b, t, e]
                    for f in range(n_f):
                        Sb[e, f] += a[f] * ve
            if t < nq:
                g = dden[b, t]
                for f in range(n_f):
                    dfq[b, t, f] = g * zb[f]
                for e in range(dv):
                    ge = dnum[b, t, e]
                    for f in range(n_f):
                        dfq[b, t, f] += ge * Sb[e, f]
        c[b] = cb


def causal_bwd_q(dfq, St, z, c, fk, lk, v, dnum, dden):
    """dfq_t = S_t dnum_t + dden_t z_t, rebuilding Sᵀ in a forward scan.

    dfq (BH, nq, F): output.  St (BH, Dv, F), z (BH, F), c (BH,): scan state in/out.
    fk (BH, nk, F), lk (BH, nk), v (BH, nk, Dv), dnum (BH, nq, Dv), dden (BH, nq).
    """
    run_tasks(_bwd_q_slices, dfq.shape[0], dfq, St, z, c, fk, lk, v, dnum, dden)


@serial
def _bwd_kv_slices(lo, hi, dfk, dvv, U, Ut, r, cn, fq, dnum, dden, cmax, fk, lk, v):
    """Batch slices lo … hi − 1 of :func:`causal_bwd_kv`."""
    for b in range(lo, hi):
        bh, nq, n_f = fq.shape
        nk = fk.shape[1]
        dv = v.shape[2]
        Ub = U[b]
        Utb = Ut[b]
        rb = r[b]
        cb = cn[b]
        for t in range(max(nq, nk) - 1, -1, -1):
            if t < nq:
                ct = cmax[b, t]
                if ct < cb:                                # earlier rows have smaller C
                    s = np.exp(ct - cb)
                    for f in range(n_f):
                        rb[f] *= s
                        for e in range(dv):
                            Ub[f, e] *= s
                    for e in range(dv):
                        for f in range(n_f):
                            Utb[e, f] *= s
                cb = ct
                g = dden[b, t]
                for f in range(n_f):
                    qf = fq[b, t, f]
                    rb[f] += g * qf
                    for e in range(dv):
                        Ub[f, e] += qf * dnum[b, t, e]
                for e in range(dv):
                    ge = dnum[b, t, e]
                    for f in range(n_f):
                        Utb[e, f] += ge * fq[b, t, f]
            if t < nk:
                for f in range(n_f):
                    dfk[b, t, f] = 0.0
                for e in range(dv):
                    dvv[b, t, e] = 0.0
                if t < nq and lk[b, t] != -np.inf:
                    w = np.exp(lk[b, t] - cmax[b, t])
                    for f in range(n_f):
                        dfk[b, t, f] = rb[f]
                    for e in range(dv):
                        ve = v[b, t, e]
                        for f in range(n_f):
                            dfk[b, t, f] += ve * Utb[e, f]
                    for f in range(n_f):
                        dfk[b, t, f] *= w
                    for f in range(n_f):
                        a = fk[b, t, f]
                        for e in range(dv):
                            dvv[b, t, e] += a * Ub[f, e]
                    for e in range(dv):
                        dvv[b, t, e] *= w
        cn[b] = cb


def causal_bwd_kv(dfk, dvv, U, Ut, r, cn, fq, dnum, dden, cmax, fk, lk, v):
    """dfk and dv of the chunk by a reverse scan over t = T − 1 … 0.

    dfk (BH, nk, F), dvv (BH, nk, Dv): outputs.  U (BH, F, Dv), Ut (BH, Dv, F), r (BH, F),
    cn (BH,): reverse-scan state in/out (start: zeros and −inf; cn is the C of the last row
    added).  fq (BH, nq, F), dnum (BH, nq, Dv), dden (BH, nq), cmax (BH, nq) (the forward's
    C_t), fk (BH, nk, F), lk (BH, nk), v (BH, nk, Dv).
    """
    run_tasks(_bwd_kv_slices, fq.shape[0], dfk, dvv, U, Ut, r, cn, fq, dnum, dden, cmax, fk,
              lk, v)


# --------------------------------------------------------------------------- fused elu / relu
#
# Linear attention's own maps (φ = elu + 1 or relu + 1) have no log-scale (ℓ ≡ 0, C ∈ {0,
# −inf}), so the causal scan needs no rescaling and the features of one row can be made in
# the kernel, from q_t and k_t, when the scan reaches it.  These kernels do the whole causal
# path of tinyeff.attention._linear_engine for those maps in one pass each — features, scan,
# normalization, and the feature maps' chain rule — so no (…, N, F) feature array, no
# (…, N, Dv) numerator and no per-chunk temporaries exist.  Same sums in the same order as
# the chunked kernels above.
#
# Common arguments: q (BH, N, D), k (BH, M, D), v (BH, M, Dv); keep (BH, M) bool (False =
# padded key); relu: the map (False: elu + 1); exact: the mask mode (True: a padded key is
# removed; False, "values_only": its φ(k) still counts in z and its v is taken as 0);
# zero: 0 in the input dtype (with ``one = zero + float32(1)`` it keeps every scalar of the
# kernels in the input dtype, as the NumPy reference computes).  Every row of a batch
# slice is processed by the thread that owns the slice.


@serial
def _phi(a, x, relu, zero):
    """a = φ(x): relu(x) + 1, or elu(x) + 1 = exp(min(x, 0)) + max(x, 0)."""
    one = zero + np.float32(1)
    for f in range(x.shape[0]):
        if relu:
            a[f] = max(x[f], zero) + one
        else:
            a[f] = np.exp(min(x[f], zero)) + max(x[f], zero)


@serial
def dphi(g, a, x, relu, zero):
    """g *= φ'(x), from a = φ(x): [x > 0] for relu + 1; min(φ, 1) for elu + 1 (1 for x > 0,
    eˣ = φ(x) for x ≤ 0) — the chunked path's ``df · min(f, 1)``."""
    one = zero + np.float32(1)
    for f in range(x.shape[0]):
        if relu:
            if not x[f] > zero:
                g[f] = g[f] * zero
        else:
            g[f] = g[f] * min(a[f], one)


@serial
def _phi_fwd_slices(lo, hi, out, denom, cmax, q, k, v, keep, relu, exact, normalize, eps,
                    zero):
    """Batch slices lo … hi − 1 of :func:`causal_phi_fwd`."""
    for b in range(lo, hi):
        bh, n, d = q.shape
        m = k.shape[1]
        dv = v.shape[2]
        one = zero + np.float32(1)
        inf = zero + np.float32(np.inf)
        S = np.zeros((d, dv), dtype=v.dtype)                       # (F, Dv) Σ φ(k_j) v_jᵀ
        z = np.zeros(d, dtype=v.dtype)                             # (F)     Σ φ(k_j)
        a = np.empty(d, dtype=v.dtype)                             # (F)     φ(k_t), φ(q_t)
        seen = False
        for t in range(n):                                         # keys ≥ N: seen by no row
            if t < m and (keep[b, t] or not exact):
                seen = True
                _phi(a, k[b, t], relu, zero)
                for f in range(d):
                    z[f] += a[f]
                if keep[b, t]:                                     # values_only: v_t = 0
                    for f in range(d):
                        af = a[f]
                        for e in range(dv):
                            S[f, e] += af * v[b, t, e]
            _phi(a, q[b, t], relu, zero)
            den = zero
            for e in range(dv):
                out[b, t, e] = zero
            for f in range(d):
                qf = a[f]
                den += qf * z[f]
                for e in range(dv):
                    out[b, t, e] += qf * S[f, e]
            if normalize:
                if eps > 0:
                    den = den + eps
                empty = not seen or den == 0
            else:
                den = one
                empty = not seen
            if empty:
                den = inf
            for e in range(dv):
                out[b, t, e] /= den
            denom[b, t] = den
            cmax[b, t] = zero if seen else -inf


def causal_phi_fwd(out, denom, cmax, q, k, v, keep, relu, exact, normalize, eps, zero):
    """out_t = φ(q_t) S_t / denom_t (tinyeff.attention._linear_engine's ``_finish``, corr = 1).

    out (BH, N, Dv), denom (BH, N) (+inf for a row that sees no key), cmax (BH, N) (C_t:
    0, or −inf for a row that sees no key): outputs.
    """
    run_tasks(_phi_fwd_slices, q.shape[0], out, denom, cmax, q, k, v, keep, relu, exact,
              normalize, eps, zero)


@serial
def grad_rows(g, dout, out, den, normalize, zero):
    """g[:Dv] = dnum = dout / denom; returns dden = −(dout·out) / denom (0 if unnormalized)."""
    dv = dout.shape[0]
    acc = zero
    for e in range(dv):
        g[e] = dout[e] / den
        acc += dout[e] * out[e]
    return -acc / den if normalize else zero


@serial
def _phi_bwd_q_slice(b, dq, q, k, v, keep, dout, out, denom, relu, exact, normalize, zero):
    """Batch slice b of the forward scan of :func:`causal_phi_bwd` (dq)."""
    bh, n, d = q.shape
    m = k.shape[1]
    dv = v.shape[2]
    St = np.zeros((dv, d), dtype=v.dtype)                      # (Dv, F) Sᵀ
    z = np.zeros(d, dtype=v.dtype)                             # (F)
    a = np.empty(d, dtype=v.dtype)                             # (F) φ(k_t), φ(q_t)
    g = np.empty(dv, dtype=v.dtype)                            # (Dv) dnum_t
    for t in range(n):
        if t < m and (keep[b, t] or not exact):
            _phi(a, k[b, t], relu, zero)
            for f in range(d):
                z[f] += a[f]
            if keep[b, t]:
                for e in range(dv):
                    ve = v[b, t, e]
                    for f in range(d):
                        St[e, f] += a[f] * ve
        # fwd: out_t = num_t / denom_t,  num_t = φ(q_t) S_t,  den_t = φ(q_t)·z_t
        dden = grad_rows(g, dout[b, t], out[b, t], denom[b, t], normalize, zero)
        for f in range(d):
            dq[b, t, f] = dden * z[f]
        for e in range(dv):
            ge = g[e]
            for f in range(d):
                dq[b, t, f] += ge * St[e, f]
        # fwd: φ(q_t) from q_t
        _phi(a, q[b, t], relu, zero)
        dphi(dq[b, t], a, q[b, t], relu, zero)


@serial
def _phi_bwd_kv_slice(b, dk, dv_out, q, k, v, keep, dout, out, denom, relu, exact, normalize,
                      zero):
    """Batch slice b of the reverse scan of :func:`causal_phi_bwd` (dk, dv)."""
    bh, n, d = q.shape
    m = k.shape[1]
    dv = v.shape[2]
    U = np.zeros((d, dv), dtype=v.dtype)                       # (F, Dv) Ũ
    Ut = np.zeros((dv, d), dtype=v.dtype)                      # (Dv, F) Ũᵀ
    r = np.zeros(d, dtype=v.dtype)                             # (F) r̃
    a = np.empty(d, dtype=v.dtype)                             # (F) φ(q_t), φ(k_t)
    g = np.empty(dv, dtype=v.dtype)                            # (Dv) dnum_t
    for t in range(max(n, m) - 1, -1, -1):
        if t < n:
            dden = grad_rows(g, dout[b, t], out[b, t], denom[b, t], normalize, zero)
            _phi(a, q[b, t], relu, zero)
            for f in range(d):
                qf = a[f]
                r[f] += dden * qf
                for e in range(dv):
                    U[f, e] += qf * g[e]
            for e in range(dv):
                ge = g[e]
                for f in range(d):
                    Ut[e, f] += ge * a[f]
        if t < m:
            for f in range(d):
                dk[b, t, f] = zero
            for e in range(dv):
                dv_out[b, t, e] = zero
            if t < n and (keep[b, t] or not exact):
                # fwd: z += φ(k_t);  S += φ(k_t) v_tᵀ   (v_t = 0 if padded, values_only)
                _phi(a, k[b, t], relu, zero)
                for f in range(d):
                    dk[b, t, f] = r[f]
                if keep[b, t]:
                    for e in range(dv):
                        ve = v[b, t, e]
                        for f in range(d):
                            dk[b, t, f] += ve * Ut[e, f]
                    for f in range(d):
                        af = a[f]
                        for e in range(dv):
                            dv_out[b, t, e] += af * U[f, e]
                dphi(dk[b, t], a, k[b, t], relu, zero)


@serial
def _phi_bwd_tasks(lo, hi, dq, dk, dv_out, q, k, v, keep, dout, out, denom, relu, exact,
                   normalize, zero):
    """Tasks lo … hi − 1 of :func:`causal_phi_bwd`: t < BH the forward scan of slice t,
    t ≥ BH the reverse scan of slice t − BH."""
    bh = q.shape[0]
    for t in range(lo, hi):
        if t < bh:
            _phi_bwd_q_slice(t, dq, q, k, v, keep, dout, out, denom, relu, exact, normalize,
                             zero)
        else:
            _phi_bwd_kv_slice(t - bh, dk, dv_out, q, k, v, keep, dout, out, denom, relu,
                              exact, normalize, zero)


def causal_phi_bwd(dq, dk, dv_out, q, k, v, keep, dout, out, denom, relu, exact, normalize,
                   zero):
    """dq_t = φ'(q_t) ∘ (S_t dnum_t + dden_t z_t), rebuilding Sᵀ in a forward scan, and
    dk_t = φ'(k_t) ∘ (Ũ_t v_t + r̃_t), dv_t = Ũ_tᵀ φ(k_t) by a reverse scan over rows: the two
    scans of a batch slice are independent tasks for ``run_tasks`` (0 … BH − 1 the forward
    scans, BH … 2·BH − 1 the reverse ones).

    dq (BH, N, D), dk (BH, M, D), dv_out (BH, M, Dv): outputs (dk, dv: 0 for padded keys in
    "exact" mode, 0 dv for padded keys in "values_only" mode, 0 for keys no row sees).
    dout, out (BH, N, Dv), denom (BH, N) from the forward.
    """
    run_tasks(_phi_bwd_tasks, 2 * q.shape[0], dq, dk, dv_out, q, k, v, keep, dout, out, denom,
              relu, exact, normalize, zero)
