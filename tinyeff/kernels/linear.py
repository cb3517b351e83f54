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

The C's are constants of the backward (they cancel exactly; see tinyeff.attention.linear).
The N×F×Dv stack of prefix states is never built: one (F, Dv) state per batch slice.

Every kernel processes one *chunk* of time steps t0 … t0 + T − 1 for all batch slices, rows
and keys aligned on the same t (row t of the chunk is query t0 + t, key t is key t0 + t;
nq ≤ T rows and nk ≤ T keys exist in the chunk), carrying the scan state across calls in
in/out arrays, so the caller never holds more than one chunk of features.

Parallel over the batch slices (``prange``); every sum runs serially in a fixed order, so
results are bit-identical whatever the thread count.  SPEEDTIP: every inner loop runs over
the last (contiguous) axis with no reduction, so it vectorizes without fastmath: the forward
keeps S as (F, Dv), the dq scan keeps Sᵀ (Dv, F), the reverse scan keeps both Ũ and Ũᵀ.
"""

from __future__ import annotations

import numpy as np

from ._jit import kernel, prange


@kernel
def causal_fwd(num, den, cmax, S, z, c, fq, fk, lk, v):
    """num_t = fq_t S_t, den_t = fq_t·z_t, cmax_t = C_t for the chunk; updates (S, z, c).

    num (BH, nq, Dv), den (BH, nq), cmax (BH, nq): outputs.  S (BH, F, Dv), z (BH, F),
    c (BH,): scan state in/out (start: zeros and −inf).  fq (BH, nq, F), fk (BH, nk, F),
    lk (BH, nk), v (BH, nk, Dv).
    """
    bh, nq, n_f = fq.shape
    nk = fk.shape[1]
    dv = v.shape[2]
    for b in prange(bh):
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


@kernel
def causal_bwd_q(dfq, St, z, c, fk, lk, v, dnum, dden):
    """dfq_t = S_t dnum_t + dden_t z_t, rebuilding Sᵀ in a forward scan.

    dfq (BH, nq, F): output.  St (BH, Dv, F), z (BH, F), c (BH,): scan state in/out.
    fk (BH, nk, F), lk (BH, nk), v (BH, nk, Dv), dnum (BH, nq, Dv), dden (BH, nq).
    """
    bh, nq, n_f = dfq.shape
    nk = fk.shape[1]
    dv = v.shape[2]
    for b in prange(bh):
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


@kernel
def causal_bwd_kv(dfk, dvv, U, Ut, r, cn, fq, dnum, dden, cmax, fk, lk, v):
    """dfk and dv of the chunk by a reverse scan over t = T − 1 … 0.

    dfk (BH, nk, F), dvv (BH, nk, Dv): outputs.  U (BH, F, Dv), Ut (BH, Dv, F), r (BH, F),
    cn (BH,): reverse-scan state in/out (start: zeros and −inf; cn is the C of the last row
    added).  fq (BH, nq, F), dnum (BH, nq, Dv), dden (BH, nq), cmax (BH, nq) (the forward's
    C_t), fk (BH, nk, F), lk (BH, nk), v (BH, nk, Dv).
    """
    bh, nq, n_f = fq.shape
    nk = fk.shape[1]
    dv = v.shape[2]
    for b in prange(bh):
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
