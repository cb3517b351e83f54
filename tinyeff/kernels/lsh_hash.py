"""Numba kernels of Reformer LSH attention: the hashing (:mod:`tinyeff.kernels.lsh` has the
attention kernels and re-exports these two).

* ``hash_argmax``   buckets[g, r, i] = argmax([x_i R_r ; −x_i R_r]), first maximum wins
                    (a float32 filter by BLAS products, then the exact float64 products of
                    the candidates), over blocks of positions, in parallel on the threads of
                    ``run_tasks`` (the wrapper pins BLAS to one thread)
* ``sort_buckets``  stable counting sort of each round by bucket -> perm, inv_perm (serial:
                    O(N) work per round)

Results do not depend on the thread count.
"""

from __future__ import annotations

import math

import numpy as np

from ._jit import run_tasks, serial

__all__ = ["HASH_BLOCK", "hash_argmax", "hash_blocks", "sort_buckets"]

HASH_BLOCK = 32      # positions per task of hash_argmax (one sgemm of (32, D) by (D, nb/2))


@serial
def hash_blocks(lo, hi, buckets, x, x32, rot32, rot_t, tol, tol_abs, blk):
    """Blocks lo … hi − 1 of :func:`hash_argmax` (block gb = (g, blk positions)), every
    round."""
    G, R, N = buckets.shape
    D = x.shape[2]
    H = rot32.shape[2]
    nblk = (N + blk - 1) // blk
    buf = np.empty((blk, H), np.float32)                       # (blk, H) filter products
    buf_b = buf.view(np.uint32)                                # |p| ordered as its bits
    xe = np.empty((blk, D))                                    # (blk, D) rows in float64
    xn = np.empty(blk)                                         # (blk,) ‖x_i‖
    one2 = np.empty((1, 1), np.float32)                        # (1, 1) float32 <-> bits
    one2_b = one2.view(np.uint32)                              # (a 2-D view, as buf_b's)
    one, one_b = one2[0], one2_b[0]                            # (1,) each
    for gb in range(lo, hi):
        g = gb // nblk
        i0 = (gb % nblk) * blk
        nr = min(blk, N - i0)
        p = buf[:nr]                                           # (nr, H)
        pb = buf_b[:nr]                                        # (nr, H) its bits
        for k in range(nr):
            acc = 0.0
            for d in range(D):
                xd = np.float64(x[g, i0 + k, d])
                xe[k, d] = xd
                acc += xd * xd
            xn[k] = math.sqrt(acc)
        for r in range(R):
            np.dot(x32[g, i0:i0 + nr], rot32[r], p)            # stage 1: float32 products
            for k in range(nr):
                b = tol[r] * xn[k] + tol_abs[r]
                buckets[g, r, i0 + k] = _pick_bucket(p[k], pb[k], xe[k], rot_t[r], b, one,
                                                     one_b)


def hash_argmax(buckets, x, x32, rot32, rot_t, tol, tol_abs):
    """buckets[g, r, i] = argmax_k [e ; −e]_k,  e_h = Σ_d x_id R[d, r, h] summed in float64 in
    the order d = 0, 1, …, D−1; ties -> the first k.

    Two stages per block of positions and round r (the result is exactly that definition):

    1. filter: p_h ≈ x_i·R_h for every h in float32, one BLAS product (``np.dot``, sgemm)
       of the block's rows by R_r.  Whatever the order in which it sums the D products (and
       with or without fused multiply-adds), |p_h − x_i·R_h| ≤ γ_D Σ_d |x_id R_dh| plus the
       roundings of x and R to float32;
    2. exact: e_h in float64, in order, only for the candidates |p_h| ≥ M − 2·b_i with
       M = max_h |p_h| and b_i = tol[r]·‖x_i‖ + tol_abs[r] ≥ max_h |p_h − e_h| (the wrapper
       derives tol from the float32 and float64 rounding bounds, with a factor 2 to spare).
       A non-candidate has |e_h| < M − b ≤ |e_h*| (h* = argmax |p|), so every index that
       attains max_h |e_h| is a candidate, and the first-maximum rule over the candidates
       in increasing h picks the same k as over the whole list.  A single candidate h*
       (the usual case) is that argmax, with the sign of p_h* (|p − e| ≤ b < M): no exact
       product is needed.  If M or b is not finite (inf/NaN inputs, float64 values beyond
       float32's range) every h is a candidate.

    buckets (G, R, N) int64 out; x (G, N, D) float32/float64; x32 (G, N, D) float32 (x
    rounded, or x itself); rot32 (R, D, H) float32 (the rotations rounded); rot_t (R, H, D)
    float64 (the rotations transposed); tol, tol_abs (R,) float64.  Results do not depend
    on the thread count or on the filter's rounding (only the exact stage decides).  The
    blocks of HASH_BLOCK positions run on the threads of :func:`run_tasks`.
    """
    G, N = buckets.shape[0], buckets.shape[2]
    run_tasks(hash_blocks, G * -(-N // HASH_BLOCK), buckets, x, x32, rot32, rot_t, tol,
              tol_abs, HASH_BLOCK)


@serial
def _pick_bucket(p, pb, xe, rot_t, b, one, one_b):
    """Stage 2 of ``hash_argmax`` for one position and round: p (H,) the filter's products,
    pb their bits, xe (D,) the position in float64, rot_t (H, D) float64, b the bound on
    |p_h − e_h|; one and one_b are scratch.  Returns the bucket."""
    H = p.shape[0]
    D = xe.shape[0]
    absmask = np.uint32(0x7FFFFFFF)
    # max |p| on the bits (monotone for non-negative floats; NaN bits above inf); an
    # integer max, so the loop vectorizes
    mb = np.uint32(0)
    for h in range(H):
        mb = max(mb, pb[h] & absmask)
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
        n_cand = 0                                 # the candidates' count and index sum
        h_sum = 0                                  # (integer sums: the loop vectorizes)
        for h in range(H):
            is_cand = (pb[h] & absmask) >= tb
            n_cand += 1 if is_cand else 0
            h_sum += h if is_cand else 0
        if n_cand == 1:
            # the only candidate h* = h_sum is the unique argmax of |e|, and
            # |p − e| ≤ b < M = |p_h*| gives e_h* the sign of p_h*: no exact product needed
            return h_sum if p[h_sum] > 0 else H + h_sum
    first = True
    best_p = 0.0
    best_m = 0.0
    arg_p = 0
    arg_m = 0
    for h in range(H):                                             # increasing h
        if (pb[h] & absmask) < tb:
            continue
        e = 0.0
        for d in range(D):                                         # in order, float64
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
def sort_buckets(perm, inv_perm, buckets, start):
    """Stable counting sort of each (g, r) row by bucket in [0, n_slots).

    perm[g, r, s] = position at sorted slot s; inv_perm[g, r, perm[g, r, s]] = s;
    start (n_slots + 1,) int64 is scratch (given by the caller: no allocation to compile).
    """
    G, R, N = buckets.shape
    n_slots = start.shape[0] - 1
    for gr in range(G * R):                    # O(N) per row: serial (SPEEDTIP in _jit.py)
        g = gr // R
        r = gr % R
        for b in range(n_slots + 1):
            start[b] = 0
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
