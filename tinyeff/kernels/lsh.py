"""Numba kernels of Reformer LSH attention (:mod:`tinyeff.attention.lsh` is the spec).

Arrays are flattened over the batch dimensions: G = prod(batch), R rounds, N positions,
c = chunk_len, nc = N / c chunks per round, T = R·nc chunks in the concatenated sorted
sequence, W = 2c keys per window (the previous chunk, then the chunk itself).

* ``hash_argmax``      buckets[g, r, i] = argmax([x_i R_r ; −x_i R_r]), first maximum wins
                       (a float32 filter, then the exact float64 products of the candidates)
* ``sort_buckets``     stable counting sort of each round by bucket -> perm, inv_perm
                       (these two live in ``lsh_hash.py`` and are re-exported here)
* ``chunk_attend``     per round, per chunk: logits, softmax, o and z; rounds combined online
* ``chunk_attend_bwd_q``   dx (query side) = scale Σ_j dS_ij k̂_j, parallel over query chunks
* ``chunk_attend_bwd_kv``  dk̂, dv walked from the keys' side (the "transposed" windows),
                       dk̂ folded into dx per round: dx += rn·dk̂ − rn³⟨x, dk̂⟩x

Parallelism: ``prange`` runs over (g, chunk) of ONE round at a time; rounds run serially.
``hash_argmax`` runs over blocks of 4 positions; ``sort_buckets`` and ``row_dot`` (O(N)
work) are serial.
Within one round every position occupies exactly one slot, so a chunk owns the rows it
writes (its queries' out/dx rows, its keys' dk̂/dv rows): no atomics, and every
accumulation over rounds happens in the fixed order r = 0, 1, …, R−1, so the results are
bit-identical for any number of threads.

The backward uses the identity of the multi-round softmax (flash-attention style): with
Z_i = logsumexp_r z_i^(r), each window entry has total weight P = exp(s − Z_i), and
dS = P·(⟨dout_i, v_j⟩ − ⟨dout_i, out_i⟩); nothing of size N·W is stored.

SPEEDTIP: inner loops run over contiguous independent outputs (keys b of a logit row,
features e of an output row), so they vectorize without reassociating any sum.
"""

from __future__ import annotations

import math

import numpy as np

from ._jit import kernel, prange, serial
from .lsh_hash import hash_argmax, sort_buckets

__all__ = ["chunk_attend", "chunk_attend_bwd_kv", "chunk_attend_bwd_q", "hash_argmax",
           "row_dot", "sort_buckets"]


@serial
def _chunk_of(inv_perm, g, r, i, N, c):
    """Global chunk index of position i in round r."""
    return (r * N + inv_perm[g, r, i]) // c


@serial
def dedup_count(inv_perm, g, i, j, N, c, nc, T):
    """N_ij: occurrences of key j in the windows of query i over all rounds."""
    R = inv_perm.shape[1]
    count = 0
    for r2 in range(R):
        tq = _chunk_of(inv_perm, g, r2, i, N, c)
        tp = (tq + T - 1) % T
        if _chunk_of(inv_perm, g, tp // nc, j, N, c) == tp:
            count += 1
        if _chunk_of(inv_perm, g, tq // nc, j, N, c) == tq:
            count += 1
    return count


@serial
def _logit(sdot, i, j, g, kp, use_kp, causal, dedup, inv_perm, scale, penalty, N, c, nc, T):
    """The window logit of (query i, key j) from sdot = ⟨x_i, k̂_j⟩; −inf if excluded."""
    if causal and j > i:
        return -np.inf
    if use_kp and not kp[g, j]:
        return -np.inf
    val = penalty if j == i else scale * sdot
    if dedup:
        val -= math.log(dedup_count(inv_perm, g, i, j, N, c, nc, T))
    return val


@serial
def _gather_window(kpos, kT, vb, x, v, rn, perm, g, t, c, nc, T):
    """Window of global chunk t: positions, normalized keys kT (D, W), values vb (W, Dv)."""
    tp = (t + T - 1) % T
    for b in range(c):
        kpos[b] = perm[g, tp // nc, (tp % nc) * c + b]             # look-back chunk first
        kpos[c + b] = perm[g, t // nc, (t % nc) * c + b]
    D = x.shape[2]
    Dv = v.shape[2]
    for b in range(kpos.shape[0]):
        j = kpos[b]
        rj = np.float64(rn[g, j])
        for d in range(D):
            kT[d, b] = np.float64(x[g, j, d]) * rj
        for e in range(Dv):
            vb[b, e] = v[g, j, e]


@serial
def _attend_chunk(gt, r, out, lse, z, x, v, rn, perm, inv_perm, kp, use_kp, causal, dedup,
                  scale, c, penalty):
    """Chunk gt = (g, chunk) of round r in :func:`chunk_attend`."""
    G, R, N = perm.shape
    D = x.shape[2]
    Dv = v.shape[2]
    nc = N // c
    T = R * nc
    W = 2 * c
    g = gt // nc
    t = r * nc + gt % nc
    kpos = np.empty(W, np.int64)                           # (W,)
    kT = np.empty((D, W))                                  # (D, W)
    vb = np.empty((W, Dv))                                 # (W, Dv)
    s = np.empty(W)                                        # (W,)
    o = np.empty(Dv)                                       # (Dv,)
    _gather_window(kpos, kT, vb, x, v, rn, perm, g, t, c, nc, T)
    for a in range(c):
        i = kpos[c + a]
        s[:] = 0.0
        for d in range(D):
            xd = np.float64(x[g, i, d])
            for b in range(W):
                s[b] += xd * kT[d, b]
        m = -np.inf
        for b in range(W):
            s[b] = _logit(s[b], i, kpos[b], g, kp, use_kp, causal, dedup, inv_perm,
                          scale, penalty, N, c, nc, T)
            if s[b] > m:
                m = s[b]
        o[:] = 0.0
        if m == -np.inf:
            zr = -np.inf
        else:
            tot = 0.0
            for b in range(W):
                if s[b] == -np.inf:
                    continue
                eb = math.exp(s[b] - m)
                tot += eb
                for e in range(Dv):
                    o[e] += eb * vb[b, e]
            for e in range(Dv):
                o[e] /= tot
            zr = m + math.log(tot)
        z[g, r, i] = zr
        if r == 0:
            lse[g, i] = zr
            for e in range(Dv):
                out[g, i, e] = o[e]
        else:
            zo = lse[g, i]
            mx = max(zo, zr)
            if mx == -np.inf:
                continue                                   # still nothing seen
            wo = math.exp(zo - mx)
            wn = math.exp(zr - mx)
            zn = mx + math.log(wo + wn)
            wo = math.exp(zo - zn)
            wn = math.exp(zr - zn)
            for e in range(Dv):
                out[g, i, e] = np.float64(out[g, i, e]) * wo + o[e] * wn
            lse[g, i] = zn


@kernel
def chunk_attend(out, lse, z, x, v, rn, perm, inv_perm, kp, use_kp, causal, dedup, scale,
                 c, penalty):
    """out_i = Σ_r exp(z_i^(r) − Z_i) o_i^(r), combined online over r; lse = Z, z per round.

    out (G, N, Dv), lse (G, N) float64, z (G, R, N) float64 are outputs (fully written).
    """
    G, R, N = perm.shape
    nc = N // c
    for r in range(R):
        for gt in prange(G * nc):
            _attend_chunk(np.int64(gt), r, out, lse, z, x, v, rn, perm, inv_perm, kp, use_kp,
                          causal, dedup, scale, c, penalty)


@serial
def _bwd_q_chunk(gt, r, dx, dout, dd, lse, x, v, rn, perm, inv_perm, kp, use_kp, causal, dedup,
                 scale, c, penalty):
    """Chunk gt = (g, chunk) of round r in :func:`chunk_attend_bwd_q`."""
    G, R, N = perm.shape
    D = x.shape[2]
    Dv = v.shape[2]
    nc = N // c
    T = R * nc
    W = 2 * c
    g = gt // nc
    t = r * nc + gt % nc
    kpos = np.empty(W, np.int64)                           # (W,)
    kT = np.empty((D, W))                                  # (D, W)
    vb = np.empty((W, Dv))                                 # (W, Dv)
    _gather_window(kpos, kT, vb, x, v, rn, perm, g, t, c, nc, T)
    kb = np.ascontiguousarray(kT.T)                        # (W, D)
    vT = np.ascontiguousarray(vb.T)                        # (Dv, W)
    s = np.empty(W)                                        # (W,)
    dp = np.empty(W)                                       # (W,)
    acc = np.empty(D)                                      # (D,)
    for a in range(c):
        i = kpos[c + a]
        zi = lse[g, i]
        if zi == -np.inf:
            continue                                       # empty row: no gradient
        s[:] = 0.0
        for d in range(D):
            xd = np.float64(x[g, i, d])
            for b in range(W):
                s[b] += xd * kT[d, b]
        dp[:] = 0.0
        for e in range(Dv):
            de = np.float64(dout[g, i, e])
            for b in range(W):
                dp[b] += de * vT[e, b]
        acc[:] = 0.0
        for b in range(W):
            j = kpos[b]
            sb = _logit(s[b], i, j, g, kp, use_kp, causal, dedup, inv_perm, scale,
                        penalty, N, c, nc, T)
            if sb == -np.inf or j == i:                    # excluded, or constant logit
                continue
            dsb = math.exp(sb - zi) * (dp[b] - dd[g, i])
            for d in range(D):
                acc[d] += dsb * kb[b, d]
        for d in range(D):
            dx[g, i, d] += scale * acc[d]


@kernel
def chunk_attend_bwd_q(dx, dout, dd, lse, x, v, rn, perm, inv_perm, kp, use_kp, causal,
                       dedup, scale, c, penalty):
    """dx_i += scale Σ_r Σ_{j ∈ window} dS_ij k̂_j  with dS = P (⟨dout_i, v_j⟩ − dd_i).

    dx (G, N, D) must be zero on entry; dd_i = ⟨dout_i, out_i⟩; P = exp(s − lse_i).
    """
    G, R, N = perm.shape
    nc = N // c
    for r in range(R):
        for gt in prange(G * nc):
            _bwd_q_chunk(np.int64(gt), r, dx, dout, dd, lse, x, v, rn, perm, inv_perm, kp,
                         use_kp, causal, dedup, scale, c, penalty)


@serial
def _bwd_kv_chunk(gt, r, dx, dv, dout, dd, lse, x, v, rn, perm, inv_perm, kp, use_kp, causal,
                  dedup, scale, c, penalty):
    """Chunk gt = (g, chunk) of round r in :func:`chunk_attend_bwd_kv`."""
    G, R, N = perm.shape
    D = x.shape[2]
    Dv = v.shape[2]
    nc = N // c
    T = R * nc
    g = gt // nc
    t = r * nc + gt % nc
    jpos = np.empty(c, np.int64)                           # (c,)
    kT = np.empty((D, c))                                  # (D, c)
    vT = np.empty((Dv, c))                                 # (Dv, c)
    for b in range(c):
        j = perm[g, r, (t % nc) * c + b]
        jpos[b] = j
        rj = np.float64(rn[g, j])
        for d in range(D):
            kT[d, b] = np.float64(x[g, j, d]) * rj
        for e in range(Dv):
            vT[e, b] = v[g, j, e]
    dk_acc = np.zeros((c, D))                              # (c, D)
    dv_acc = np.zeros((c, Dv))                             # (c, Dv)
    s = np.empty(c)                                        # (c,)
    dp = np.empty(c)                                       # (c,)
    xi = np.empty(D)                                       # (D,)
    doi = np.empty(Dv)                                     # (Dv,)
    for side in range(2):
        tq = t if side == 0 else (t + 1) % T               # query chunk
        for a in range(c):
            i = perm[g, tq // nc, (tq % nc) * c + a]
            zi = lse[g, i]
            if zi == -np.inf:
                continue
            for d in range(D):
                xi[d] = x[g, i, d]
            for e in range(Dv):
                doi[e] = dout[g, i, e]
            s[:] = 0.0
            for d in range(D):
                for b in range(c):
                    s[b] += xi[d] * kT[d, b]
            dp[:] = 0.0
            for e in range(Dv):
                for b in range(c):
                    dp[b] += doi[e] * vT[e, b]
            for b in range(c):
                j = jpos[b]
                sb = _logit(s[b], i, j, g, kp, use_kp, causal, dedup, inv_perm,
                            scale, penalty, N, c, nc, T)
                if sb == -np.inf:
                    continue
                p = math.exp(sb - zi)
                for e in range(Dv):
                    dv_acc[b, e] += p * doi[e]
                if j == i:
                    continue                               # constant logit
                dsb = scale * p * (dp[b] - dd[g, i])
                for d in range(D):
                    dk_acc[b, d] += dsb * xi[d]
    for b in range(c):
        j = jpos[b]
        # fwd: k̂_j = x_j · rn_j,  rn_j = (‖x_j‖² + D·ε)^(−1/2)
        rj = np.float64(rn[g, j])
        dot = 0.0
        for d in range(D):
            dot += np.float64(x[g, j, d]) * dk_acc[b, d]
        for d in range(D):
            dx[g, j, d] += rj * dk_acc[b, d] - rj * rj * rj * dot * x[g, j, d]
        for e in range(Dv):
            dv[g, j, e] += dv_acc[b, e]


@kernel
def chunk_attend_bwd_kv(dx, dv, dout, dd, lse, x, v, rn, perm, inv_perm, kp, use_kp,
                        causal, dedup, scale, c, penalty):
    """The keys' side, one round at a time: dk̂_j^(r) = scale Σ dS_ij x_i and
    dv_j += Σ P_ij dout_i over the windows j appears in during round r, and then, through
    k̂_j = x_j·rn_j, dx_j += rn_j dk̂_j^(r) − rn_j³ ⟨x_j, dk̂_j^(r)⟩ x_j  (no (G, N, D) dk̂).

    Walked from the keys' side: the keys of chunk t are seen by the queries of chunk t (as
    the current chunk) and of chunk t+1 (as its look-back), cyclically.  dx (G, N, D) holds
    the query side on entry (``chunk_attend_bwd_q``); dv (G, N, Dv) must be zero on entry.
    """
    G, R, N = perm.shape
    nc = N // c
    for r in range(R):
        for gt in prange(G * nc):
            _bwd_kv_chunk(np.int64(gt), r, dx, dv, dout, dd, lse, x, v, rn, perm, inv_perm, kp,
                          use_kp, causal, dedup, scale, c, penalty)


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
