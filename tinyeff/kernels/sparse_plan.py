"""The schedule of the sparse kernels (:mod:`tinyeff.kernels.sparse`) for one CSR pattern.

Tiles: at most TILE rows; a row's longest run of consecutive keys joins its tile's dense key
range only if it has at least MIN_RUN keys; the range stays at least MIN_EFF full (Σ runs /
(rows · range)) and at most MAX_AREA entries (the (T, R) score tile). A key stored outside
the ranges by at least HEAVY_FRAC of a group's rows (a global token) is *heavy*: its scores
and gradients go through products too (at most HEAVY_MAX heavy keys per group). The
remaining (scattered) entries are walked by tasks of ROW_CHUNK rows over blocks of KEY_BLOCK
keys (scores, dp, out, dq), and by tasks of KEY_CHUNK keys over blocks of ROW_BLOCK rows
(dk, dv); at most SCAT_MAX_BLOCKS chunks or blocks. None of these changes a result beyond
rounding, and every choice is a pure function of the pattern (never of the thread count).

The plan's own kernels (the first section below; serial: O(nnz) work once per pattern)
find the runs, tiles, dense spans and phases; :class:`Plan` assembles them with NumPy.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

from ._jit import serial

# ---------------------------------------------------------------------- kernels


@numba.njit(inline="always")
def longest_runs(run_lo, run_hi, indptr, indices, min_len):
    """[run_lo_i, run_hi_i) = row i's longest run of consecutive keys (the first of that
    length), or [0, 0) if it is shorter than min_len."""
    for i in range(run_lo.shape[0]):
        e, e1 = indptr[i], indptr[i + 1]
        best_lo, best_len = 0, 0
        while e < e1:
            s = e
            while e + 1 < e1 and indices[e + 1] == indices[e] + 1:
                e += 1
            if e - s + 1 > best_len:
                best_len = e - s + 1
                best_lo = indices[s]
            e += 1
        if best_len >= min_len:
            run_lo[i] = best_lo
            run_hi[i] = best_lo + best_len
        else:
            run_lo[i] = 0
            run_hi[i] = 0


@numba.njit(inline="always")
def plan_tiles(tile_start, tile_jlo, tile_jhi, run_lo, run_hi, n, t_max, max_area, min_eff):
    """Greedy tiling of the (G·N) rows; returns the number of tiles nt.

    A tile grows row by row while it has fewer than t_max rows, stays inside one group
    (n rows), and its range [jlo, jhi) (hull of the rows' runs) satisfies
    Σ run lengths >= min_eff · rows · (jhi − jlo) and rows · (jhi − jlo) <= max_area.
    Fills tile_start[: nt + 1], tile_jlo[: nt], tile_jhi[: nt] (empty range: jlo = jhi).
    """
    rows = run_lo.shape[0]
    nt = 0
    i = 0
    while i < rows:
        start = i
        group_end = (i // n + 1) * n
        jl, jh = run_lo[i], run_hi[i]
        covered = jh - jl
        i += 1
        while i < group_end and i - start < t_max:
            length = run_hi[i] - run_lo[i]
            nl, nh = jl, jh
            if length > 0:
                if jh > jl:
                    nl, nh = min(jl, run_lo[i]), max(jh, run_hi[i])
                else:
                    nl, nh = run_lo[i], run_hi[i]
            area = (i - start + 1) * (nh - nl)
            if area > 0 and (covered + length < min_eff * area or area > max_area):
                break
            jl, jh = nl, nh
            covered += length
            i += 1
        tile_start[nt] = start
        tile_jlo[nt] = jl
        tile_jhi[nt] = jh
        nt += 1
    tile_start[nt] = rows
    return nt


@numba.njit(inline="always")
def _lower_bound(indices, lo, hi, x):
    """The first e in [lo, hi) with indices[e] >= x, else hi (indices sorted on [lo, hi);
    np.searchsorted's left side, by bisection: ``np.searchsorted`` itself compiles a generic
    sort-order machinery of its own, most of this kernel's compile time)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if indices[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


@numba.njit(inline="always")
def dense_spans(row_ea, row_eb, indptr, indices, tile_start, tile_jlo, tile_jhi):
    """[row_ea_i, row_eb_i) = the entries of row i whose key lies in its tile's range (a
    contiguous span, the indices being sorted); empty (= indptr[i], indptr[i]) if none."""
    for t in range(tile_start.shape[0] - 1):
        for row in range(tile_start[t], tile_start[t + 1]):
            e0, e1 = indptr[row], indptr[row + 1]
            if tile_jhi[t] <= tile_jlo[t]:
                row_ea[row] = e0
                row_eb[row] = e0
                continue
            row_ea[row] = _lower_bound(indices, e0, e1, tile_jlo[t])
            row_eb[row] = _lower_bound(indices, e0, e1, tile_jhi[t])


@numba.njit(inline="always")
def count_outside(counts, indptr, indices, row_ea, row_eb):
    """counts[j] = entries of key column j outside their row's dense span."""
    for row in range(indptr.shape[0] - 1):
        for e in range(indptr[row], row_ea[row]):
            counts[indices[e]] += 1
        for e in range(row_eb[row], indptr[row + 1]):
            counts[indices[e]] += 1


@serial
def plan_rows(run_lo, run_hi, tile_start, tile_jlo, tile_jhi, row_ea, row_eb, counts, indptr,
              indices, n, min_len, t_max, max_area, min_eff):
    """The row side of the plan in one kernel (one compiled function, not four):
    :func:`longest_runs`, :func:`plan_tiles`, :func:`dense_spans` of its nt tiles and
    :func:`count_outside` (counts zero-filled on entry); returns nt."""
    longest_runs(run_lo, run_hi, indptr, indices, min_len)
    nt = plan_tiles(tile_start, tile_jlo, tile_jhi, run_lo, run_hi, n, t_max, max_area,
                    min_eff)
    dense_spans(row_ea, row_eb, indptr, indices, tile_start[:nt + 1], tile_jlo[:nt],
                tile_jhi[:nt])
    count_outside(counts, indptr, indices, row_ea, row_eb)
    return nt


@serial
def color_tiles(phase, ends, tile_jlo, tile_jhi, order):
    """First-fit colouring of the tile ranges visited by increasing jlo (``order``): tiles
    of one phase have disjoint ranges.  Empty ranges go to phase 0.  Returns the count.
    ends (max(nt, 1),) is scratch (the last range end of each phase)."""
    nt = order.shape[0]
    n_ph = 1
    ends[0] = -1
    for u in range(nt):
        t = order[u]
        if tile_jhi[t] <= tile_jlo[t]:
            phase[t] = 0
            continue
        ph = 0
        while ph < n_ph and ends[ph] > tile_jlo[t]:
            ph += 1
        if ph == n_ph:
            n_ph += 1
        ends[ph] = tile_jhi[t]
        phase[t] = ph
    return n_ph


# ---------------------------------------------------------------------- the plan


class Knobs(NamedTuple):
    """The schedule's sizes and thresholds (module docstring)."""

    TILE: int = 64
    MIN_RUN: int = 16
    MIN_EFF: float = 0.5
    MAX_AREA: int = 1 << 20
    HEAVY_FRAC: float = 0.25
    HEAVY_MAX: int = 64
    ROW_CHUNK: int = 4096
    KEY_BLOCK: int = 512
    KEY_CHUNK: int = 4096
    ROW_BLOCK: int = 512
    SCAT_MAX_BLOCKS: int = 64


_DEFAULT = Knobs()


def _buckets(g, outer, inner, groups, n_outer, n_inner, chunk, block, max_blocks, order):
    """Stable bucketing of entries (given in ``order``) by (group, outer // chunk,
    inner // block): -> (bucket pointer, permutation, (chunks, blocks) per group)."""
    chunk = max(chunk, -(-n_outer // max_blocks), 1)
    block = max(block, -(-n_inner // max_blocks), 1)
    nc, nb = max(-(-n_outer // chunk), 1), max(-(-n_inner // block), 1)
    ids = (g * nc + outer // chunk) * nb + inner // block                   # (n_sc,)
    perm = order[np.argsort(ids[order], kind="stable")]                     # (n_sc,)
    ptr = np.zeros(groups * nc * nb + 1, dtype=np.int64)                    # (buckets + 1,)
    np.cumsum(np.bincount(ids, minlength=groups * nc * nb), out=ptr[1:])
    return ptr, perm, (nc, nb)


class Plan:
    """The kernels' schedule for one CSR pattern of G groups (module docstring): tiles,
    dense spans, heavy keys, the scattered entries in row and column order and, on first
    use, the backward's phases.  ``indptr`` (G·N + 1,) and ``indices`` (nnz,) are the
    canonical int64 arrays of a (G·N, G·M) pattern (``shape``)."""

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, shape: tuple[int, int],
                 groups: int, knobs: Knobs = _DEFAULT):
        rows, cols = shape
        n, m = rows // groups, cols // groups
        self.knobs = knobs
        nnz = int(indices.shape[0])
        run_lo = np.empty(rows, dtype=np.int64)                             # (G·N,)
        run_hi = np.empty(rows, dtype=np.int64)                             # (G·N,)
        start = np.zeros(rows + 1, dtype=np.int64)                          # (≤ G·N + 1,)
        jlo = np.empty(rows, dtype=np.int64)                                # (≤ G·N,)
        jhi = np.empty(rows, dtype=np.int64)                                # (≤ G·N,)
        self.row_ea = np.empty(rows, dtype=np.int64)                        # (G·N,)
        self.row_eb = np.empty(rows, dtype=np.int64)                        # (G·N,)
        outside = np.zeros(cols, dtype=np.int64)                            # (G·M,)
        # runs, tiles, dense spans, and the entries of each key outside the dense spans
        nt = plan_rows(run_lo, run_hi, start, jlo, jhi, self.row_ea, self.row_eb, outside,
                       indptr, indices, n, knobs.MIN_RUN, knobs.TILE, knobs.MAX_AREA,
                       knobs.MIN_EFF)
        self.tile_start = start[:nt + 1].copy()                             # (nt + 1,)
        self.tile_jlo = jlo[:nt].copy()                                     # (nt,)
        self.tile_jhi = jhi[:nt].copy()                                     # (nt,)
        # heavy keys: stored outside the dense spans by ≥ HEAVY_FRAC of the group's rows
        heavy = []
        for g in range(groups):
            cnt = outside[g * m:(g + 1) * m]                                # (M,)
            cand = np.nonzero(cnt >= max(knobs.HEAVY_FRAC * n, 1))[0]
            cand = cand[np.argsort(-cnt[cand], kind="stable")[:knobs.HEAVY_MAX]]
            heavy.append(np.sort(cand).astype(np.int64) + g * m)
        self.heavy_ptr = np.zeros(groups + 1, dtype=np.int64)               # (G + 1,)
        np.cumsum([h.size for h in heavy], out=self.heavy_ptr[1:])
        self.heavy_cols = np.concatenate(heavy)                             # (ΣGc,)
        self.heavy_max = max((h.size for h in heavy), default=0)
        self.hmap = np.full(cols, -1, dtype=np.int64)                       # (G·M,)
        for h in heavy:
            self.hmap[h] = np.arange(h.size)
        # heavy entries (outside the dense spans, key heavy), listed per tile
        e = np.arange(nnz, dtype=np.int64)                              # (nnz,)
        rid = np.repeat(np.arange(rows, dtype=np.int64), np.diff(indptr))   # (nnz,) row of e
        outside = (e < self.row_ea[rid]) | (e >= self.row_eb[rid])          # (nnz,)
        hv = outside & (self.hmap[indices] >= 0)                        # (nnz,)
        self.hv_e = e[hv]                                                   # (n_hv,)
        tile = np.searchsorted(self.tile_start, rid[hv], side="right") - 1  # (n_hv,)
        self.hv_r = rid[hv] - self.tile_start[tile]                         # (n_hv,)
        self.hv_h = self.hmap[indices[hv]]                              # (n_hv,)
        self.hv_ptr = np.zeros(nt + 1, dtype=np.int64)                      # (nt + 1,)
        np.cumsum(np.bincount(tile, minlength=nt), out=self.hv_ptr[1:])
        del hv, tile
        # the scattered entries (outside the dense spans, key not heavy), in two blocked
        # orders: row side, bucket (group, row chunk, key block) then (row, key); column
        # side, bucket (group, key chunk, row block) then (key, row)
        scat = outside & (self.hmap[indices] < 0)                       # (nnz,)
        es = e[scat]                                                        # (n_sc,)
        del e, scat, outside
        rows, cols = rid[es], indices[es]                               # (n_sc,) each
        g = rows // max(n, 1)
        li, lj = rows - g * n, cols - g * m                                 # (n_sc,) local
        self.r_ptr, perm_r, self.r_split = _buckets(g, li, lj, groups, n, m, knobs.ROW_CHUNK,
                                                    knobs.KEY_BLOCK, knobs.SCAT_MAX_BLOCKS,
                                                    np.arange(es.size))
        by_col = np.lexsort((rows, cols))                                   # (n_sc,)
        self.c_ptr, perm_c, self.c_split = _buckets(g, lj, li, groups, m, n, knobs.KEY_CHUNK,
                                                    knobs.ROW_BLOCK, knobs.SCAT_MAX_BLOCKS,
                                                    by_col)
        pos = np.empty(es.size, dtype=np.int64)                             # (n_sc,)
        pos[perm_c] = np.arange(es.size)
        self.r_row, self.r_col = li[perm_r], lj[perm_r]                     # (n_sc,) each
        self.r_e, self.r_pos = es[perm_r], pos[perm_r]                      # (n_sc,) each
        self.c_row, self.c_col = li[perm_c], lj[perm_c]                     # (n_sc,) each
        self.n_scattered = int(es.size)
        self._phases = None

    def phases(self):
        """-> (phase_ptr, phase_tiles): tiles of one phase have disjoint key ranges."""
        if self._phases is None:
            nt = self.tile_jlo.shape[0]
            order = np.argsort(self.tile_jlo, kind="stable")                # (nt,)
            phase = np.zeros(nt, dtype=np.int64)                            # (nt,)
            ends = np.empty(max(nt, 1), dtype=np.int64)                     # scratch
            n_ph = color_tiles(phase, ends, self.tile_jlo, self.tile_jhi, order)
            phase_ptr = np.zeros(n_ph + 1, dtype=np.int64)                  # (P + 1,)
            np.cumsum(np.bincount(phase, minlength=n_ph), out=phase_ptr[1:])
            phase_tiles = np.argsort(phase, kind="stable").astype(np.int64)  # (nt,)
            self._phases = (phase_ptr, phase_tiles)
        return self._phases
