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
The N×F×Dv stack of prefix states is never built: one state per batch slice, kept with the
normalizer as its last column — S' = [S | z] and Ũ' = [Ũ | r̃], (F, Dv + 1) — so that with
v'_j = [v_j, 1] and dnum'_i = [dnum_i, dden_i] every formula above is one product:
[num_i, den_i] = fq_i S'_i, dfq_i = S'_i dnum'_i, dfk_j ∝ Ũ'_j v'_j.

Chunkwise form.  The scan advances by *sub-chunks* of T positions with matrix products
(the form of the chunkwise linear-attention literature, e.g. Hua et al. 2022, "Transformer
Quality in Linear Time", and Yang et al. 2024, "Gated Linear Attention Transformers").
For a sub-chunk with state S' at scale C_prev, row maxima C_i and M = the last C_i, with

    W_ij = exp(lk_j − C_i) for key j ≤ row i, 0 otherwise (≤ 1),   a_i = exp(C_prev − C_i) ≤ 1,
    g_j = exp(lk_j − M) ≤ 1

the rows Fq (T, F), keys Fk (T, F), V' (T, Dv + 1) and dnum' (T, Dv + 1):

    [num | den] = diag(a) Fq S' + ((Fq Fkᵀ) ∘ W) V'
    S' ← exp(C_prev − M) S' + Fkᵀ diag(g) V',   C ← M             (the scan's own shifts)
    dfq = diag(a) dnum' S'ᵀ + ((dnum' V'ᵀ) ∘ W) Fk

and the reverse scan, with the state Ũ' of the later rows at its scale C' (≥ every C_i of
the sub-chunk; s_j = exp(lk_j − C') ≤ 1):

    dfk = diag(s) V' Ũ'ᵀ + ((V' dnum'ᵀ) ∘ Wᵀ) Fq
    dv  = diag(s) Fk Ũ + ((Fk Fqᵀ) ∘ Wᵀ) dnum
    Ũ' ← exp(C_0 − C') Ũ' + Fqᵀ diag(exp(C_0 − C_i)) dnum',   C' ← C_0

(C_0 the sub-chunk's first row's, its smallest).  Every exponent is ≤ 0 and is the scan's
own or a product of two of the scan's weights, so nothing overflows, and a row's weights
involve only the keys it sees: its result does not depend, not even in its rounding, on
later keys (the masked products add exact zeros).  Every product is one ``np.dot`` of 2-D
arrays (BLAS; a transposed operand is passed as a transposed view, not copied: three
signatures per dtype).  Where the rows or the keys have ended (N ≠ M), the positions left
are rows that see every key (fq S' alone; in reverse they join the state) or keys no row
sees (gradient 0).  A sub-chunk holding a NaN or inf that the products would carry into
other rows as 0 · NaN (v and, for dfq, fk; fq, dnum and dden for the reverse scan) is run
one position at a time (T = 1: no product mixes two positions).  Linear attention
(lk ≡ 0) has W = tril(1), a = g = s = 1.

Every kernel processes one *chunk* of time steps t0 … t0 + L − 1 for all batch slices, rows
and keys aligned on the same t (row t of the chunk is query t0 + t, key t is key t0 + t;
nq ≤ L rows and nk ≤ L keys exist in the chunk), carrying the scan state across calls in
in/out arrays, so the caller never holds more than one chunk of features.  The sub-chunks
start at multiples of ``sub`` within the chunk.

Parallel over the batch slices (``run_tasks``, kernels/_jit.py: serial kernels over blocks
of slices on threads); every sum runs serially in a fixed order (the caller pins BLAS to
one thread), so results are bit-identical whatever the thread count.  SPEEDTIP: no loop
outside the products reduces over an axis (a reduction without fastmath runs one add at a
time): the normalizer columns fold den, z and r̃ into the products.
"""

from __future__ import annotations

import numpy as np

from ._jit import run_tasks, serial


@serial
def _ones_col(dst, src, last, scale):
    """dst[j] = scale_j [src_j, last_j] for the rows of src (T, Dv) into dst (T, Dv + 1)."""
    dv = src.shape[1]
    for j in range(src.shape[0]):
        s = scale[j]
        for e in range(dv):
            dst[j, e] = s * src[j, e]
        dst[j, dv] = s * last[j]


@serial
def _running_max(ct, lk_s, cb):
    """ct[t] = max(cb, lk_s[0 … t]) (the scan's C_t, NaN never raising it); returns the last."""
    for t in range(lk_s.shape[0]):
        l = lk_s[t]
        if l > cb:
            cb = l
        ct[t] = cb
    return cb


@serial
def _all_finite(x):
    """Every entry of the 2-D x finite (a sub-chunk whose rows hold a NaN or inf runs one
    position at a time: the products would carry 0 · NaN into rows that must not see it)."""
    ok = True
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            ok &= np.abs(x[i, j]) < np.inf
    return ok


@serial
def _pair_weights(att, lk_s, ct, w, zero, upper):
    """att[i, j] *= exp(lk_j − C_i) for key j ≤ row i, = 0 elsewhere and for lk_j = −inf;
    ``upper``: att is (key j, row i), the same entries transposed.  w (T): scratch.

    SPEEDTIP: C_i is a running maximum, mostly equal to C_{i−1}: row i then reuses row
    i − 1's exp(lk_j − C_i) (the same operands, so the same bits) and computes one exp, not i."""
    nt = att.shape[0]
    for i in range(nt):
        c = ct[i]
        same = i > 0 and c == ct[i - 1]                            # w[j < i] = exp(lk_j − c)
        for j in range(nt):
            l = lk_s[j]
            if j > i or l == -np.inf:                              # assigned: 0 · NaN = NaN
                a = zero
            else:
                if not (same and j < i):
                    w[j] = np.exp(l - c)
                a = (att[j, i] if upper else att[i, j]) * w[j]
            if upper:
                att[j, i] = a
            else:
                att[i, j] = a


@serial
def _scan_slices(lo, hi, grad, num, den, cmax, dfq, S, c, fq, fk, lk, v, dnum, dden, sub):
    """Batch slices lo … hi − 1 of the forward-direction scan: the rows of :func:`causal_fwd`
    (grad False: num, den, cmax from fq) or of :func:`causal_bwd_q` (grad True: dfq from
    dnum, dden).  One kernel for both, since they share the keys' side (it compiles once)."""
    bh, n_rows, n_f = (dfq if grad else fq).shape
    nk = fk.shape[1]
    dv = v.shape[2]
    dt = fk.dtype
    vp = np.empty((sub, dv + 1), dtype=dt)                         # (T, Dv + 1) V'
    vg = np.empty((sub, dv + 1), dtype=dt)                         # (T, Dv + 1) diag(g) V'
    gp = np.empty((sub, dv + 1), dtype=dt)                         # (T, Dv + 1) dnum'
    p1 = np.empty((sub, dv + 1), dtype=dt)                         # (T, Dv + 1) Fq S'
    p2 = np.empty((sub, dv + 1), dtype=dt)                         # (T, Dv + 1)
    pf = np.empty((sub, n_f), dtype=dt)                            # (T, F)
    ds = np.empty((n_f, dv + 1), dtype=dt)                         # (F, Dv + 1)
    ct = np.empty(sub, dtype=dt)                                   # (T) C_i
    g = np.empty(sub, dtype=dt)                                    # (T) g_j
    g2 = np.empty(sub, dtype=dt)                                   # (T) scratch
    one = np.ones(sub, dtype=dt)
    zero = np.zeros(1, dtype=dt)[0]
    t_end = max(n_rows, nk)
    for b in range(lo, hi):
        Sb = S[b]
        cb = c[b]
        for u0 in range(0, t_end, sub):
            u1 = min(u0 + sub, t_end)
            um = max(u0, min(u1, n_rows, nk))                      # rows and keys: u0 … um − 1
            # keys past the last row: no row reads the state any more
            step = um - u0
            if step > 0 and not (_all_finite(v[b, u0:um])
                                 and (not grad or _all_finite(fk[b, u0:um]))):
                step = 1                                           # one position at a time
            for t0 in range(u0, um, max(step, 1)):
                t1 = min(t0 + step, um)
                nt = t1 - t0
                big_m = _running_max(ct[:nt], lk[b, t0:t1], cb)        # C_i; M = C_{T−1}
                for j in range(nt):
                    l = lk[b, t0 + j]
                    g[j] = zero if l == -np.inf else np.exp(l - big_m)
                ks = fk[b, t0:t1]                                      # (T, F)
                _ones_col(vp, v[b, t0:t1], one, one)                   # V'
                _ones_col(vg, v[b, t0:t1], one, g)                     # diag(g) V'
                att = np.empty((nt, nt), dtype=dt)                     # (T, T) (row i, key j)
                if grad:
                    out = dfq[b, t0:t1]                                # (T, F)
                    _ones_col(gp, dnum[b, t0:t1], dden[b, t0:t1], one)  # dnum'
                    # fwd: [num | den] = diag(a) Fq S' + tril(diag(h) Fq Fkᵀ diag(g)) V'
                    np.dot(gp[:nt], Sb.T, out)                         # S'_prev dnum'_i
                    np.dot(gp[:nt], vp[:nt].T, att)                    # v'_j·dnum'_i
                else:
                    qs = fq[b, t0:t1]                                  # (T, F)
                    np.dot(qs, ks.T, att)                              # fq_i·fk_j
                    np.dot(qs, Sb, p1[:nt])                            # [fq_i S, fq_i·z]
                _pair_weights(att, lk[b, t0:t1], ct[:nt], g2, zero, False)
                if grad:
                    np.dot(att, ks, pf[:nt])
                    for i in range(nt):
                        ai = zero if cb == -np.inf else np.exp(cb - ct[i])   # a_i
                        for f in range(n_f):
                            out[i, f] = ai * out[i, f] + pf[i, f]
                else:
                    np.dot(att, vp[:nt], p2[:nt])
                    for i in range(nt):
                        ai = zero if cb == -np.inf else np.exp(cb - ct[i])   # a_i
                        for e in range(dv):
                            num[b, t0 + i, e] = ai * p1[i, e] + p2[i, e]
                        den[b, t0 + i] = ai * p1[i, dv] + p2[i, dv]
                        cmax[b, t0 + i] = ct[i]
                r = zero if cb == -np.inf else np.exp(cb - big_m)     # the scan's rescaling
                np.dot(ks.T, vg[:nt], ds)                              # Fkᵀ diag(g) V'
                for f in range(n_f):
                    for e in range(dv + 1):
                        Sb[f, e] = Sb[f, e] * r + ds[f, e]
                cb = big_m
            if n_rows > nk and um < u1:                            # rows past the last key:
                r1 = min(u1, n_rows)                               # C = cb, a = 1, no key
                if grad:
                    _ones_col(gp, dnum[b, um:r1], dden[b, um:r1], one)
                    np.dot(gp[:r1 - um], Sb.T, dfq[b, um:r1])      # dfq_i = S' dnum'_i
                else:
                    np.dot(fq[b, um:r1], Sb, p1[:r1 - um])         # [num_i, den_i] = fq_i S'
                    for i in range(r1 - um):
                        for e in range(dv):
                            num[b, um + i, e] = p1[i, e]
                        den[b, um + i] = p1[i, dv]
                        cmax[b, um + i] = cb
        c[b] = cb


def causal_fwd(num, den, cmax, S, c, fq, fk, lk, v, sub):
    """num_t = fq_t S_t, den_t = fq_t·z_t, cmax_t = C_t for the chunk; updates (S', c).

    num (BH, nq, Dv), den (BH, nq), cmax (BH, nq): outputs.  S (BH, F, Dv + 1) = [S | z],
    c (BH,): scan state in/out (start: zeros and −inf).  fq (BH, nq, F), fk (BH, nk, F),
    lk (BH, nk), v (BH, nk, Dv); sub: positions per sub-chunk.
    """
    bh, nq, n_f = fq.shape
    run_tasks(_scan_slices, bh, False, num, den, cmax, np.empty((bh, 0, n_f), fq.dtype), S, c,
              fq, fk, lk, v, np.empty((bh, 0, v.shape[2]), fq.dtype), den[:, :0], sub)


def causal_bwd_q(dfq, S, c, fk, lk, v, dnum, dden, sub):
    """dfq_t = S_t dnum_t + dden_t z_t, rebuilding S' = [S | z] in a forward scan.

    dfq (BH, nq, F): output.  S (BH, F, Dv + 1), c (BH,): scan state in/out (start: zeros
    and −inf).  fk (BH, nk, F), lk (BH, nk), v (BH, nk, Dv), dnum (BH, nq, Dv),
    dden (BH, nq); sub as in :func:`causal_fwd`.
    """
    bh = dfq.shape[0]
    run_tasks(_scan_slices, bh, True, dnum[:, :0], dden[:, :0], dden[:, :0], dfq, S, c,
              np.empty((bh, 0, dfq.shape[2]), dfq.dtype), fk, lk, v, dnum, dden, sub)


@serial
def _bwd_kv_slices(lo, hi, dfk, dvv, U, cn, fq, dnum, dden, cmax, fk, lk, v, sub):
    """Batch slices lo … hi − 1 of :func:`causal_bwd_kv`."""
    bh, nq, n_f = fq.shape
    nk = fk.shape[1]
    dv = v.shape[2]
    dt = fq.dtype
    vp = np.empty((sub, dv + 1), dtype=dt)                         # (T, Dv + 1) V'
    gp = np.empty((sub, dv + 1), dtype=dt)                         # (T, Dv + 1) dnum'
    hg = np.empty((sub, dv + 1), dtype=dt)                         # (T, Dv + 1) diag(h) dnum'
    pf = np.empty((sub, n_f), dtype=dt)                            # (T, F)
    p1 = np.empty((sub, dv + 1), dtype=dt)                         # (T, Dv + 1)
    p2 = np.empty((sub, dv + 1), dtype=dt)                         # (T, Dv + 1)
    du = np.empty((n_f, dv + 1), dtype=dt)                         # (F, Dv + 1)
    h = np.empty(sub, dtype=dt)                                    # (T) h_i
    h2 = np.empty(sub, dtype=dt)                                   # (T) scratch
    one = np.ones(sub, dtype=dt)
    zero = np.zeros(1, dtype=dt)[0]
    t_end = max(nq, nk)
    for b in range(lo, hi):
        Ub = U[b]
        cb = cn[b]
        for u0 in range(((t_end - 1) // sub) * sub, -1, -sub):
            u1 = min(u0 + sub, t_end)
            um = max(u0, min(u1, nq, nk))                          # rows and keys: u0 … um − 1
            for t in range(um, min(u1, nk)):                       # keys past the last row
                for f in range(n_f):
                    dfk[b, t, f] = zero
                for e in range(dv):
                    dvv[b, t, e] = zero
            if nk < nq and um < u1:                                # rows past the last key:
                r1 = min(u1, nq)                                   # one C, the last; they join
                c0 = cmax[b, um]                                   # the state at scale c0
                if cb > -np.inf:
                    s = np.exp(c0 - cb)                            # 0 when c0 = −inf
                    for f in range(n_f):
                        for e in range(dv + 1):
                            Ub[f, e] *= s
                _ones_col(hg, dnum[b, um:r1], dden[b, um:r1], one)  # dnum'
                np.dot(fq[b, um:r1].T, hg[:r1 - um], du)           # Fqᵀ dnum'
                for f in range(n_f):
                    for e in range(dv + 1):
                        Ub[f, e] += du[f, e]
                cb = c0
            step = um - u0
            ok = _all_finite(fq[b, u0:um]) and _all_finite(dnum[b, u0:um])
            for i in range(u0, um):
                ok = ok and np.abs(dden[b, i]) < np.inf
            if not ok:
                step = 1                                           # one position at a time
            step = max(step, 1)
            for t0 in range(u0 + ((um - u0 - 1) // step) * step, u0 - 1, -step):
                t1 = min(t0 + step, um)
                nt = t1 - t0
                cs = cmax[b, t0:t1]                                    # (T) C_i
                qs = fq[b, t0:t1]                                      # (T, F)
                ks = fk[b, t0:t1]                                      # (T, F)
                dks = dfk[b, t0:t1]                                    # (T, F)
                dvs = dvv[b, t0:t1]                                    # (T, Dv)
                _ones_col(vp, v[b, t0:t1], one, one)                   # V'
                _ones_col(gp, dnum[b, t0:t1], dden[b, t0:t1], one)     # dnum'
                att = np.empty((nt, nt), dtype=dt)                     # (T, T) (key j, row i)
                # fwd: S'_i += exp(ℓk_j − C_i) fk_j v'_jᵀ   (rows i ≥ j)
                np.dot(vp[:nt], Ub.T, dks)                             # later rows: Ũ v_j + r̃
                np.dot(ks, Ub, p1[:nt])                                # later rows: Ũᵀ fk_j
                np.dot(vp[:nt], gp[:nt].T, att)                        # v'_j·dnum'_i
                _pair_weights(att, lk[b, t0:t1], cs, h2, zero, True)
                np.dot(att, qs, pf[:nt])
                np.dot(ks, qs.T, att)                                  # fk_j·fq_i
                _pair_weights(att, lk[b, t0:t1], cs, h2, zero, True)
                np.dot(att, gp[:nt], p2[:nt])
                for j in range(nt):
                    l = lk[b, t0 + j]
                    sj = zero if (l == -np.inf or cb == -np.inf) else np.exp(l - cb)
                    for f in range(n_f):
                        dks[j, f] = sj * dks[j, f] + pf[j, f]
                    for e in range(dv):
                        dvs[j, e] = sj * p1[j, e] + p2[j, e]
                # the sub-chunk's rows join the state, at the scale C_t0 (≤ every C_i joined)
                c0 = cs[0]
                for i in range(nt):
                    h[i] = one[0] if cs[i] == c0 else np.exp(c0 - cs[i])
                _ones_col(hg, dnum[b, t0:t1], dden[b, t0:t1], h)       # diag(h) dnum'
                np.dot(qs.T, hg[:nt], du)                              # Fqᵀ diag(h) dnum'
                if cb > -np.inf:
                    s = np.exp(c0 - cb)                                # 0 when c0 = −inf
                    for f in range(n_f):                               # one pass: Ũ' s + du
                        for e in range(dv + 1):
                            Ub[f, e] = Ub[f, e] * s + du[f, e]
                else:
                    for f in range(n_f):
                        for e in range(dv + 1):
                            Ub[f, e] += du[f, e]
                cb = c0
        cn[b] = cb


def causal_bwd_kv(dfk, dvv, U, cn, fq, dnum, dden, cmax, fk, lk, v, sub):
    """dfk and dv of the chunk by a reverse scan over t = L − 1 … 0.

    dfk (BH, nk, F), dvv (BH, nk, Dv): outputs.  U (BH, F, Dv + 1) = [Ũ | r̃], cn (BH,):
    reverse-scan state in/out (start: zeros and −inf; cn is the scale of the state, a C of
    the rows added, ≥ the C of every row not yet added).  fq (BH, nq, F), dnum (BH, nq, Dv),
    dden (BH, nq), cmax (BH, nq) (the forward's C_t), fk (BH, nk, F), lk (BH, nk),
    v (BH, nk, Dv); sub as in :func:`causal_fwd`.
    """
    run_tasks(_bwd_kv_slices, fq.shape[0], dfk, dvv, U, cn, fq, dnum, dden, cmax, fk, lk, v,
              sub)


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
            den = row_denominator(den, one, seen, normalize, eps, inf)
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
def row_denominator(den, corr, seen, normalize, eps, inf):
    """A row's denominator from den = fq·z: den + eps·corr when normalized (corr rescales eps
    to the sums' scale; 1 without log-scales), corr when not; ``inf`` (the output becomes 0)
    for a row that sees no key or whose normalized denominator is 0."""
    if normalize:
        if eps > 0:
            den = den + eps * corr
        empty = not seen or den == 0
    else:
        den = corr
        empty = not seen
    return inf if empty else den


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
