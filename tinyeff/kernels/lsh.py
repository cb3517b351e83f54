"""Numba kernels of Reformer LSH attention (:mod:`tinyeff.attention.lsh` is the spec).

Arrays are flattened over the batch dimensions: G = prod(batch), R rounds, N positions,
c = chunk_len, nc = N / c chunks per round, T = R·nc chunks in the concatenated sorted
sequence, W = 2c keys per window (the previous chunk, then the chunk itself).

* ``hash_argmax``      buckets[g, r, i] = argmax([x_i R_r ; −x_i R_r]), first maximum wins
                       (a float32 BLAS filter, then the exact float64 products of the
                       candidates)
* ``sort_buckets``     stable counting sort of each round by bucket -> perm, inv_perm
                       (these two live in ``lsh_hash.py`` and are re-exported here)
* ``chunk_attend``     per round, per chunk: logits, softmax, o and z; rounds combined online
* ``chunk_attend_bwd`` per round, per chunk: P and dS once, then dqk (query side), dk̂ and dv
                       (key side, both halves of the window); dk̂ folded into dqk through
                       the key normalization: dx += rn·dk̂ − rn³⟨x, dk̂⟩x

Each chunk is a handful of tile products in the input dtype (float32 stays float32,
float64 stays float64), with the window gathered once into contiguous tiles: the queries
Q (c, D) (rows x_i), the normalized keys K̂ (W, D) and the values V (W, Dv).  Tiles are
held transposed, Sᵀ = K̂ Qᵀ (W, c), so each query's max and sum run down a column: serial
in key order per query, vectorized across queries (as ``kernels/blocked.py``)::

    forward   Sᵀ = K̂ Qᵀ -> logits -> P̃ᵀ = exp(Sᵀ − m) -> o = P̃ V / Σ P̃,  z = m + log Σ P̃
    backward  Pᵀ = exp(Sᵀ − Z),  dPᵀ = V doutᵀ,  dSᵀ = scale·Pᵀ ∘ (dPᵀ − δ)
              dq = dS K̂,  dk̂ = dSᵀ Q,  dv = Pᵀ dout                 (5 tile products)

The logits are formed per key row of Sᵀ: a padded key excludes its whole row, causality is
a select across the queries, and with dedup N_ij is counted from small tables of the
chunk of every query and key of the window in every round (``_dedup_logits``).

With dedup the self entries' logit −1e5 − log N_ii is not exact in float32 (−1e5 alone
is): their probability in the backward, and the forward's z of a row whose maximum is its
self entry, use the float64 value, so ``lse`` and the gradients agree with the float64
reference (and across the reference's and the kernel's contexts) in every row.

Parallelism and order: the (g, chunk) tasks of ONE round at a time run on the threads of
:func:`run_tasks` (``kernels/_jit.py``: serial ``nogil`` kernels over blocks of tasks, one
block per thread); rounds run serially, in order.  Within one round every position
occupies exactly one slot, so a forward chunk owns its queries' rows of out, lse and z.  A
backward chunk writes the rows of its own positions (its queries' dqk, its keys' dk̂ and
dv) and of the previous chunk's positions (the look-back half of its window): the backward
runs the even chunks of a round, then the odd ones, so no two chunks in flight write the
same row.  The look-back of chunk 0 of a round is the last chunk of another round, whose
positions may be anywhere in this one: chunk 0 leaves that half in a buffer that phase 2
of the backward kernel adds after the round (one task per g).  No atomics, and every row
receives its terms in an order fixed by (round, phase, chunk), so the results are
bit-identical for any number of threads.  ``hash_argmax`` runs over blocks of positions
the same way; ``sort_buckets`` and ``row_dot`` (O(N) work) are serial.

The backward uses the identity of the multi-round softmax (flash-attention style): with
Z_i = logsumexp_r z_i^(r), each window entry has total weight P = exp(s − Z_i), and
dS = P·(⟨dout_i, v_j⟩ − ⟨dout_i, out_i⟩); nothing of size N·W is stored.

SPEEDTIP: the tile products are ``np.dot`` on 2-D tiles (BLAS ``gemm``; the wrappers run
the kernels under :func:`tinyeff.kernels.blas_single_thread`), and the exps use the
vectorizable ``fast_exp`` (``kernels/_math.py``, ≤ 1 ulp float32, ≤ 2 ulp float64).
"""

from __future__ import annotations

import math

import numpy as np

from ._jit import run_tasks, serial
from ._math import colmax, fast_exp
from .lsh_hash import hash_argmax, sort_buckets

__all__ = ["chunk_attend", "chunk_attend_bwd", "hash_argmax", "row_dot",
           "sort_buckets"]


@serial
def _chunk_of(inv_perm, g, r, i, N, c):
    """Global chunk index of position i in round r."""
    return (r * N + inv_perm[g, r, i]) // c


@serial
def _window(kpos, lbself, perm, inv_perm, g, t, c, nc, T):
    """Positions of chunk t's window: kpos (W,) = look-back chunk, then chunk t.

    lbself[b] = a if the look-back key b is query a of chunk t (the look-back chunk is then
    another round's chunk, or chunk t itself when T = 1), else −1.  Query a's self entries
    are (c + a, a) and the (b, a) with lbself[b] = a.
    """
    tp = (t + T - 1) % T
    r = t // nc
    for b in range(c):
        kpos[b] = perm[g, tp // nc, (tp % nc) * c + b]             # look-back chunk first
        kpos[c + b] = perm[g, r, (t % nc) * c + b]
    for b in range(c):
        sl = inv_perm[g, r, kpos[b]]                               # its slot in round r
        lbself[b] = sl % c if sl // c == t % nc else -1


@serial
def _gather(qa, kb, vb, kpos, x, v, rn, g, c):
    """Tiles of a window: queries qa (c, D) = x rows, normalized keys kb (W, D), values vb."""
    D = x.shape[2]
    Dv = v.shape[2]
    for b in range(kb.shape[0]):
        j = kpos[b]
        rj = rn[g, j]
        for d in range(D):
            kb[b, d] = x[g, j, d] * rj
        for e in range(Dv):
            vb[b, e] = v[g, j, e]
    for a in range(c):
        i = kpos[c + a]
        for d in range(D):
            qa[a, d] = x[g, i, d]


@serial
def _dedup_logits(st, nself, kpos, g, kp, use_kp, causal, inv_perm, scale, penalty, c, T):
    """:func:`_logits` with dedup (the raw products become the logits s_ij − log N_ij),
    N_ij = Σ_r2 [j in chunk tp_i(r2)] + [j in chunk tq_i(r2)] (i's own chunk tq and
    look-back tp in round r2), counted from the window's chunk ids in every round;
    nself[a] = N_ii of query a."""
    W = st.shape[0]
    R, N = inv_perm.shape[1], inv_perm.shape[2]
    qtq = np.empty((R, c), np.int64)               # (R, c) chunk of query a in round r2
    qtp = np.empty((R, c), np.int64)               # (R, c) its look-back chunk
    kc = np.empty((W, R), np.int64)                # (W, R) chunk of key b in round r2
    cnt = np.empty(c, np.int64)                    # (c,) N_ij of one key row
    logs = np.empty(2 * R + 1)                     # (2R + 1,) log k
    for k in range(1, 2 * R + 1):
        logs[k] = math.log(k)
    for r2 in range(R):
        for a in range(c):
            tq = _chunk_of(inv_perm, g, r2, kpos[c + a], N, c)
            qtq[r2, a] = tq
            qtp[r2, a] = (tq + T - 1) % T          # in round r2, or r2 − 1 (mod R)
    for b in range(W):
        for r2 in range(R):
            kc[b, r2] = _chunk_of(inv_perm, g, r2, kpos[b], N, c)
    for b in range(W):
        j = kpos[b]
        for a in range(c):
            cnt[a] = 0
        for r2 in range(R):
            k_same = kc[b, r2]                     # chunk ids are global: at most one of
            k_prev = kc[b, (r2 + R - 1) % R] if R > 1 else -1     # these can match tp
            for a in range(c):
                tp = qtp[r2, a]
                cnt[a] += ((1 if k_same == tp else 0) + (1 if k_prev == tp else 0)
                           + (1 if k_same == qtq[r2, a] else 0))
        if b >= c:
            nself[b - c] = cnt[b - c]              # key b is query b − c
        row = st[b]
        for a in range(c):
            i = kpos[c + a]
            if (causal and j > i) or (use_kp and not kp[g, j]):
                row[a] = -np.inf
            else:
                val = penalty if j == i else scale * row[a]
                row[a] = val - logs[cnt[a]]


@serial
def _logits(st, kpos, lbself, g, kp, use_kp, causal, scale, penalty, c):
    """In place: the raw products st[b, a] = ⟨x_i, k̂_j⟩ (i = kpos[c + a], j = kpos[b])
    become the window logits s_ij (−inf where excluded), without dedup."""
    W = st.shape[0]
    for b in range(W):                             # one key per row of Sᵀ
        j = kpos[b]
        row = st[b]
        if use_kp and not kp[g, j]:
            for a in range(c):
                row[a] = -np.inf
        elif causal:
            for a in range(c):
                row[a] = -np.inf if j > kpos[c + a] else row[a] * scale
        else:
            for a in range(c):
                row[a] = row[a] * scale
    # the query itself (a key at the same position is never causally excluded), in its own
    # chunk and in the look-back chunk
    for a in range(c):
        if not (use_kp and not kp[g, kpos[c + a]]):
            st[c + a, a] = penalty
    for b in range(c):
        if lbself[b] >= 0 and not (use_kp and not kp[g, kpos[b]]):
            st[b, lbself[b]] = penalty


def _attend_kernel(dedup):
    """The forward task kernel with ``dedup`` a compile-time constant: only the branches of
    that setting are compiled (a runtime flag would compile both on every first call)."""

    @serial
    def attend_chunks(lo, hi, r, out, lse, z, x, v, rn, perm, inv_perm, kp, use_kp, causal,
                      scale, c, penalty):
        """Tasks lo … hi − 1 of round r in :func:`chunk_attend` (task gt = (g, chunk))."""
        G, R, N = perm.shape
        D = x.shape[2]
        Dv = v.shape[2]
        nc = N // c
        T = R * nc
        W = 2 * c
        dt = x.dtype
        kpos = np.empty(W, np.int64)                           # (W,) window positions
        lbself = np.empty(c, np.int64)                         # (c,)
        nself = np.empty(c, np.int64)                          # (c,) N_ii (dedup)
        qa = np.empty((c, D), dt)                              # (c, D) queries
        kb = np.empty((W, D), dt)                              # (W, D) normalized keys
        vb = np.empty((W, Dv), dt)                             # (W, Dv) values
        st = np.empty((W, c), dt)                              # (W, c) Sᵀ, then P̃ᵀ
        o = np.empty((c, Dv), dt)                              # (c, Dv) P̃ V
        m = np.empty(c, dt)                                    # (c,) row max
        tmp = np.empty(c, dt)                                  # (c,) scratch of colmax
        start = np.empty(c, dt)                                # (c,) −∞
        for a in range(c):
            start[a] = -np.inf
        msub = np.empty(c, dt)                                 # (c,) m, −∞ -> 0
        rsum = np.empty(c, dt)                                 # (c,) Σ_j P̃
        mz = np.empty(c)                                       # (c,) m in float64
        for gt in range(lo, hi):
            g = gt // nc
            t = r * nc + gt % nc
            _window(kpos, lbself, perm, inv_perm, g, t, c, nc, T)
            _gather(qa, kb, vb, kpos, x, v, rn, g, c)
            np.dot(kb, qa.T, st)                               # Sᵀ = K̂ Qᵀ, raw
            if dedup:                                  # a constant: one branch is compiled
                _dedup_logits(st, nself, kpos, g, kp, use_kp, causal, inv_perm, scale, penalty,
                              c, T)
            else:
                _logits(st, kpos, lbself, g, kp, use_kp, causal, scale, penalty, c)
            colmax(m, tmp, start, st)
            for a in range(c):
                msub[a] = 0 if m[a] == -np.inf else m[a]
                rsum[a] = 0
                mz[a] = m[a]
                if dedup and m[a] == st[c + a, a]:         # the max is the self logit: exact
                    mz[a] = penalty - math.log(nself[a])
            for b in range(W):
                row = st[b]
                for a in range(c):
                    e = fast_exp(row[a] - msub[a])
                    row[a] = e
                    rsum[a] += e
            np.dot(st.T, vb, o)                                # (c, Dv)
            for a in range(c):
                i = kpos[c + a]
                if m[a] == -np.inf:                            # nothing seen in this round
                    z[g, r, i] = -np.inf
                    if r == 0:
                        lse[g, i] = -np.inf
                        for e in range(Dv):
                            out[g, i, e] = 0
                    continue
                zr = mz[a] + math.log(rsum[a])
                z[g, r, i] = zr
                outi = out[g, i]
                if r == 0:
                    lse[g, i] = zr
                    cn = 1.0 / rsum[a]
                    for e in range(Dv):
                        outi[e] = o[a, e] * cn
                    continue
                # out <- out·exp(Z_old − Z_new) + o^(r)·exp(z^(r) − Z_new)
                zo = lse[g, i]
                mx = max(zo, zr)
                zn = mx + math.log(math.exp(zo - mx) + math.exp(zr - mx))
                wo = math.exp(zo - zn)
                cn = math.exp(zr - zn) / rsum[a]
                for e in range(Dv):
                    outi[e] = outi[e] * wo + o[a, e] * cn
                lse[g, i] = zn

    return attend_chunks


_ATTEND_CHUNKS = {d: _attend_kernel(d) for d in (False, True)}   # dedup -> kernel


def chunk_attend(out, lse, z, x, v, rn, perm, inv_perm, kp, use_kp, causal, dedup, scale,
                 c, penalty):
    """out_i = Σ_r exp(z_i^(r) − Z_i) o_i^(r), combined online over r; lse = Z, z per round.

    out (G, N, Dv) of x's dtype, lse (G, N) float64, z (G, R, N) float64 are outputs (fully
    written); scale is of x's dtype, penalty a float64.  Rounds in order, the (g, chunk)
    tasks of a round on the threads of :func:`run_tasks`.
    """
    G, R, N = perm.shape
    kernel = _ATTEND_CHUNKS[bool(dedup)]
    for r in range(R):
        run_tasks(kernel, G * (N // c), r, out, lse, z, x, v, rn, perm, inv_perm, kp, use_kp,
                  causal, scale, c, penalty)


@serial
def _add_key_grad(dx, dv, g, j, dk, dvr, x, rn):
    """dx_j += rn_j dk − rn_j³ ⟨x_j, dk⟩ x_j  and  dv_j += dvr  (dk (D,) = dk̂_j's term)."""
    D = x.shape[2]
    # fwd: k̂_j = x_j · rn_j,  rn_j = (‖x_j‖² + D·ε)^(−1/2)
    xj = x[g, j]
    s0 = s1 = s2 = s3 = 0.0                # ⟨x_j, dk⟩ in float64, 4 partial sums
    d4 = D - D % 4
    for d in range(0, d4, 4):
        s0 += np.float64(xj[d]) * np.float64(dk[d])
        s1 += np.float64(xj[d + 1]) * np.float64(dk[d + 1])
        s2 += np.float64(xj[d + 2]) * np.float64(dk[d + 2])
        s3 += np.float64(xj[d + 3]) * np.float64(dk[d + 3])
    for d in range(d4, D):
        s0 += np.float64(xj[d]) * np.float64(dk[d])
    rj = np.float64(rn[g, j])
    coef = rj * rj * rj * ((s0 + s1) + (s2 + s3))
    dxj = dx[g, j]
    for d in range(D):
        dxj[d] += rj * dk[d] - coef * xj[d]
    dvj = dv[g, j]
    for e in range(dv.shape[2]):
        dvj[e] += dvr[e]


def _bwd_kernel(dedup):
    """The backward task kernel with ``dedup`` a compile-time constant (as
    :func:`_attend_kernel`)."""

    @serial
    def bwd_chunks(lo, hi, phase, r, dx, dv, lbk, lbv, dout, dd, lse, x, v, rn, perm, inv_perm,
                   kp, use_kp, causal, scale, c, penalty):
        """Tasks lo … hi − 1 of a phase (0: even chunks, 1: odd chunks) of round r in
        :func:`chunk_attend_bwd` (task it = (g, chunk u = 2·(it mod n_phase) + phase));
        phase 2: task g adds the look-back half of chunk 0 of round r (left in lbk, lbv)
        into its keys' rows (a phase of this kernel rather than a kernel of its own)."""
        G, R, N = perm.shape
        D = x.shape[2]
        Dv = v.shape[2]
        nc = N // c
        T = R * nc
        if phase == 2:
            tp = (r * nc + T - 1) % T                      # chunk 0's look-back chunk
            for g in range(lo, hi):
                for b in range(c):
                    j = perm[g, tp // nc, (tp % nc) * c + b]
                    _add_key_grad(dx, dv, g, j, lbk[g, b], lbv[g, b], x, rn)
            return
        W = 2 * c
        dt = x.dtype
        npp = (nc + 1 - phase) // 2                            # chunks of the phase per g
        kpos = np.empty(W, np.int64)                           # (W,) window positions
        lbself = np.empty(c, np.int64)                         # (c,)
        nself = np.empty(c, np.int64)                          # (c,) N_ii (dedup)
        qa = np.empty((c, D), dt)                              # (c, D) queries
        kb = np.empty((W, D), dt)                              # (W, D) normalized keys
        vb = np.empty((W, Dv), dt)                             # (W, Dv) values
        doa = np.empty((c, Dv), dt)                            # (c, Dv) dout of the queries
        st = np.empty((W, c), dt)                              # (W, c) Sᵀ, then Pᵀ
        dst = np.empty((W, c), dt)                             # (W, c) dPᵀ, then dSᵀ·scale
        dq = np.empty((c, D), dt)                              # (c, D)
        dkw = np.empty((W, D), dt)                             # (W, D) dk̂ of the window
        dvw = np.empty((W, Dv), dt)                            # (W, Dv) dv of the window
        zhi = np.empty(c, dt)                                  # (c,) Z = zhi + zlo
        zlo = np.empty(c, dt)                                  # (c,)
        ddt = np.empty(c, dt)                                  # (c,) δ_i = ⟨dout_i, out_i⟩
        for it in range(lo, hi):
            g = it // npp
            u = 2 * (it % npp) + phase                         # chunk within round r
            t = r * nc + u
            _window(kpos, lbself, perm, inv_perm, g, t, c, nc, T)
            _gather(qa, kb, vb, kpos, x, v, rn, g, c)
            for a in range(c):
                i = kpos[c + a]
                for e in range(Dv):
                    doa[a, e] = dout[g, i, e]
                zi = lse[g, i]
                if zi == -np.inf:                              # empty row: P = 0, no gradient
                    zhi[a] = np.inf
                    zlo[a] = 0
                else:
                    zhi[a] = zi
                    zlo[a] = zi - np.float64(zhi[a])
                ddt[a] = dd[g, i]
            np.dot(kb, qa.T, st)                               # Sᵀ = K̂ Qᵀ, raw
            if dedup:                                  # a constant: one branch is compiled
                _dedup_logits(st, nself, kpos, g, kp, use_kp, causal, inv_perm, scale, penalty,
                              c, T)
            else:
                _logits(st, kpos, lbself, g, kp, use_kp, causal, scale, penalty, c)
            np.dot(vb, doa.T, dst)                             # dPᵀ = V doutᵀ
            for b in range(W):
                prow = st[b]
                drow = dst[b]
                for a in range(c):
                    # fwd: P = exp(S − Z)   (S − zhi is exact near S = Z; one rounding after)
                    p = fast_exp((prow[a] - zhi[a]) - zlo[a])
                    prow[a] = p
                    # fwd: out = P v, P a softmax over all rounds  ->  dS = P ∘ (dP − δ)
                    drow[a] = (scale * p) * (drow[a] - ddt[a])
            # fwd: s = SELF_PENALTY (− log N_ii) on self entries, a constant: dS = 0 there
            for a in range(c):
                i = kpos[c + a]
                dst[c + a, a] = 0
                if dedup and zhi[a] < np.inf and not (use_kp and not kp[g, i]):
                    st[c + a, a] = math.exp((penalty - math.log(nself[a])) - lse[g, i])
            for b in range(c):
                a = lbself[b]
                if a >= 0:
                    dst[b, a] = 0
                    st[b, a] = st[c + a, a]
            # fwd: S = Q K̂ᵀ · scale  ->  dq = dS K̂ · scale,  dk̂ = dSᵀ Q · scale
            np.dot(dst.T, kb, dq)                              # (c, D)
            np.dot(dst, qa, dkw)                               # (W, D)
            # fwd: o = P V  ->  dv = Pᵀ dout
            np.dot(st, doa, dvw)                               # (W, Dv)
            for a in range(c):
                i = kpos[c + a]
                for d in range(D):
                    dx[g, i, d] += dq[a, d]
            for b in range(W):
                if b < c and u == 0:                           # another round's chunk: later
                    for d in range(D):
                        lbk[g, b, d] = dkw[b, d]
                    for e in range(Dv):
                        lbv[g, b, e] = dvw[b, e]
                else:
                    _add_key_grad(dx, dv, g, kpos[b], dkw[b], dvw[b], x, rn)

    return bwd_chunks


_BWD_CHUNKS = {d: _bwd_kernel(d) for d in (False, True)}   # dedup -> kernel


def chunk_attend_bwd(dx, dv, dout, dd, lse, x, v, rn, perm, inv_perm, kp, use_kp, causal,
                     dedup, scale, c, penalty):
    """dx_i += scale Σ_r Σ_{j ∈ window} dS_ij k̂_j  (query side), and for every key j of a
    window dk̂_j = scale Σ_i dS_ij x_i and dv_j += Σ_i P_ij dout_i, with dk̂ folded into dx
    through k̂_j = x_j·rn_j:  dx_j += rn_j dk̂_j − rn_j³ ⟨x_j, dk̂_j⟩ x_j  (no (G, N, D) dk̂).

    dS = P (⟨dout_i, v_j⟩ − dd_i), P = exp(s − lse_i), dd_i = ⟨dout_i, out_i⟩.  dx (G, N, D)
    and dv (G, N, Dv) must be zero on entry.  Per round: the even chunks, then the odd ones
    (a chunk writes its own rows and the look-back chunk's), each on the threads of
    :func:`run_tasks`; then (phase 2, one task per g) the look-back half of chunk 0
    (another round's chunk).
    """
    G, R, N = perm.shape
    nc = N // c
    lbk = np.empty((G, c, x.shape[2]), x.dtype)            # (G, c, D) chunk 0's look-back
    lbv = np.empty((G, c, v.shape[2]), x.dtype)            # (G, c, Dv)
    kernel = _BWD_CHUNKS[bool(dedup)]
    for r in range(R):
        for phase in range(3):
            tasks = G if phase == 2 else G * ((nc + 1 - phase) // 2)
            run_tasks(kernel, tasks, phase, r, dx, dv, lbk, lbv, dout, dd, lse, x, v, rn, perm,
                      inv_perm, kp, use_kp, causal, scale, c, penalty)


@serial
def row_dot(dd, a, b):
    """dd[g, i] = Σ_e a[g, i, e] b[g, i, e] in float64 (no float64 copies of a and b)."""
    G, N, E = a.shape
    for gi in range(G * N):                    # O(N·E): serial (SPEEDTIP in _jit.py)
        g = gi // N
        i = gi % N
        acc = 0.0
        for e in range(E):
            acc += np.float64(a[g, i, e]) * np.float64(b[g, i, e])
        dd[g, i] = acc
