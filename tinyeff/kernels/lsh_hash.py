"""Numba kernels of Reformer LSH attention: the hashing (:mod:`tinyeff.kernels.lsh` has the
attention kernels and re-exports these two).

* ``hash_argmax``   buckets[g, r, i] = argmax([x_i R_r ; −x_i R_r]), first maximum wins
                    (a float32 filter, then the exact float64 products of the candidates),
                    parallel over blocks of 4 positions
* ``sort_buckets``  stable counting sort of each round by bucket -> perm, inv_perm (serial:
                    O(N) work per round)

Results do not depend on the thread count.
"""

from __future__ import annotations

import math

import numpy as np

from ._jit import kernel, prange, serial

__all__ = ["hash_argmax", "sort_buckets"]


@serial
def _hash_block(gb, buckets, x, rot32, rot_t, tol, tol_abs):
    """Block gb = (g, 4 positions) of :func:`hash_argmax`, every round."""
    G, R, N = buckets.shape
    D = x.shape[2]
    D4 = rot32.shape[1]
    H = rot32.shape[2]
    nblk = (N + 3) // 4
    g = gb // nblk
    i0 = (gb % nblk) * 4
    nr = min(4, N - i0)
    xb = np.zeros((4, D4), np.float32)                         # (4, D4) rows, rounded
    xe = np.zeros((4, D))                                      # (4, D) rows, float64
    xn = np.zeros(4)                                           # (4,) ‖x_i‖
    for k in range(nr):
        acc = 0.0
        for d in range(D):
            xd = np.float64(x[g, i0 + k, d])
            xe[k, d] = xd
            xb[k, d] = xd
            acc += xd * xd
        xn[k] = math.sqrt(acc)
    p = np.empty((4, H), np.float32)                           # (4, H) filter products
    pb = p.view(np.uint32)                                     # |p| ordered as its bits
    one = np.empty(1, np.float32)                              # (1,) float32 <-> bits
    one_b = one.view(np.uint32)
    ngrp = (H + 31) // 32
    grp = np.empty(ngrp, np.uint32)                            # (H/32,) group max |p|
    p0 = p[0]
    p1 = p[1]
    p2 = p[2]
    p3 = p[3]
    for r in range(R):
        p[:, :] = 0.0
        for d in range(0, D4, 4):
            ra = rot32[r, d]
            rb = rot32[r, d + 1]
            rc = rot32[r, d + 2]
            rd = rot32[r, d + 3]
            a0, a1, a2, a3 = xb[0, d], xb[0, d + 1], xb[0, d + 2], xb[0, d + 3]
            b0, b1, b2, b3 = xb[1, d], xb[1, d + 1], xb[1, d + 2], xb[1, d + 3]
            c0, c1, c2, c3 = xb[2, d], xb[2, d + 1], xb[2, d + 2], xb[2, d + 3]
            e0, e1, e2, e3 = xb[3, d], xb[3, d + 1], xb[3, d + 2], xb[3, d + 3]
            for h in range(H):                                 # SPEEDTIP: vectorizes
                qa = ra[h]
                qb = rb[h]
                qc = rc[h]
                qd = rd[h]
                p0[h] += (a0 * qa + a1 * qb) + (a2 * qc + a3 * qd)
                p1[h] += (b0 * qa + b1 * qb) + (b2 * qc + b3 * qd)
                p2[h] += (c0 * qa + c1 * qb) + (c2 * qc + c3 * qd)
                p3[h] += (e0 * qa + e1 * qb) + (e2 * qc + e3 * qd)
        for k in range(nr):
            b = tol[r] * xn[k] + tol_abs[r]
            buckets[g, r, i0 + k] = _pick_bucket(p[k], pb[k], xe[k], rot_t[r], b, grp,
                                                 one, one_b)


@kernel
def hash_argmax(buckets, x, rot32, rot_t, tol, tol_abs):
    """buckets[g, r, i] = argmax_k [e ; −e]_k,  e_h = Σ_d x_id R[d, r, h] summed in float64 in
    the order d = 0, 1, …, D−1; ties -> the first k.

    Two stages per block of 4 positions and round r (the result is exactly that definition):

    1. filter: p_h ≈ x_i·R_h for every h in float32 (4 positions × 4 features per step, a
       register-blocked product that runs near the machine's float32 rate);
    2. exact: e_h in float64, in order, only for the candidates |p_h| ≥ M − 2·b_i with
       M = max_h |p_h| and b_i = tol[r]·‖x_i‖ + tol_abs[r] ≥ max_h |p_h − e_h| (the wrapper
       derives tol from the float32 and float64 rounding bounds, with a factor 2 to spare).
       A non-candidate has |e_h| < M − b ≤ |e_h*| (h* = argmax |p|), so every index that
       attains max_h |e_h| is a candidate, and the first-maximum rule over the candidates
       in increasing h picks the same k as over the whole list.  A single candidate h*
       (the usual case) is that argmax, with the sign of p_h* (|p − e| ≤ b < M): no exact
       product is needed.  If M or b is not finite (inf/NaN inputs, float64 values beyond
       float32's range) every h is a candidate.

    buckets (G, R, N) int64 out; x (G, N, D) float32/float64; rot32 (R, D4, H) float32 (the
    rotations rounded, zero-padded to D4 = a multiple of 4 features); rot_t (R, H, D) float64
    (the rotations transposed); tol, tol_abs (R,) float64.  Results do not depend on the
    thread count or on the filter's rounding (only the exact stage decides).
    """
    G, N = buckets.shape[0], buckets.shape[2]
    nblk = (N + 3) // 4
    for gb in prange(G * nblk):                # SPEEDTIP: bodies in serial helpers (_jit.py)
        _hash_block(np.int64(gb), buckets, x, rot32, rot_t, tol, tol_abs)


@serial
def _pick_bucket(p, pb, xe, rot_t, b, grp, one, one_b):
    """Stage 2 of ``hash_argmax`` for one position and round: p (H,) the filter's products,
    pb their bits, xe (D,) the position in float64, rot_t (H, D) float64, b the bound on
    |p_h − e_h|; grp (⌈H/32⌉,), one and one_b are scratch.  Returns the bucket."""
    H = p.shape[0]
    D = xe.shape[0]
    ngrp = grp.shape[0]
    # max |p| on the bits (monotone for non-negative floats; NaN bits above inf), per group
    # of 32 so that the candidate scans skip whole groups
    mb = np.uint32(0)
    for q in range(ngrp):
        gm = np.uint32(0)
        for h in range(q * 32, min(q * 32 + 32, H)):
            gm = max(gm, pb[h] & np.uint32(0x7FFFFFFF))
        grp[q] = gm
        mb = max(mb, gm)
    tb = np.uint32(0)                                              # every h a candidate
    if mb < np.uint32(0x7F800000) and b < np.inf:
        one_b[0] = mb
        thr = np.float64(one[0]) - 2.0 * b
        if thr > 0.0:
            one[0] = np.float32(thr)
            if np.float64(one[0]) > thr:                           # round down
                one_b[0] -= np.uint32(1)
            tb = one_b[0]
    if tb > 0:
        n_cand = 0
        h_cand = 0
        for q in range(ngrp):
            if grp[q] >= tb:
                for h in range(q * 32, min(q * 32 + 32, H)):
                    if (pb[h] & np.uint32(0x7FFFFFFF)) >= tb:
                        n_cand += 1
                        h_cand = h
        if n_cand == 1:
            # the only candidate h* is the unique argmax of |e|, and |p − e| ≤ b < M = |p_h*|
            # gives e_h* the sign of p_h*: no exact product needed
            return h_cand if p[h_cand] > 0 else H + h_cand
    first = True
    best_p = 0.0
    best_m = 0.0
    arg_p = 0
    arg_m = 0
    for q in range(ngrp):                                          # increasing h
        if grp[q] < tb:
            continue
        for h in range(q * 32, min(q * 32 + 32, H)):
            if (pb[h] & np.uint32(0x7FFFFFFF)) < tb:
                continue
            e = 0.0
            for d in range(D):                                     # in order, float64
                e += xe[d] * rot_t[h, d]
            if first:
                best_p = e
                arg_p = h
                best_m = -e
                arg_m = h
                first = False
            else:
                if e > best_p:
                    best_p = e
                    arg_p = h
                if -e > best_m:
                    best_m = -e
                    arg_m = h
    # the "+" half precedes the "−" half, so a tie goes to the "+" index
    return H + arg_m if best_m > best_p else arg_p


@serial
def sort_buckets(perm, inv_perm, buckets, n_slots):
    """Stable counting sort of each (g, r) row by bucket in [0, n_slots).

    perm[g, r, s] = position at sorted slot s; inv_perm[g, r, perm[g, r, s]] = s.
    """
    G, R, N = buckets.shape
    for gr in range(G * R):                    # O(N) per row: serial (SPEEDTIP in _jit.py)
        g = gr // R
        r = gr % R
        start = np.zeros(n_slots + 1, np.int64)                    # (n_slots + 1,)
        for i in range(N):
            start[buckets[g, r, i] + 1] += 1
        for b in range(n_slots):
            start[b + 1] += start[b]
        for i in range(N):                                         # increasing i: stable
            b = buckets[g, r, i]
            s = start[b]
            start[b] = s + 1
            perm[g, r, s] = i
            inv_perm[g, r, i] = s
