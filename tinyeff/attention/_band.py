"""The band engine shared by ``window`` and ``local``: one plan builder and the only calls
into the Numba kernels of ``tinyeff/kernels/band.py``.

Both variants let query row i attend one contiguous range of keys [lo_i, hi_i) whose ends
never decrease with i, after an optional regrouping of the positions into d residue classes
(position p = i'·d + r is row i' of group r; ``window``'s dilation, where the dilated band
becomes a plain band; d = 1 keeps the positions as they are):

    A(i')    = { j' : lo_{i'} ≤ j' < hi_{i'}, key_ok_{j'} }  if row_ok_{i'}, else ∅
    s_{i'j'} = q_{i'}·k_{j'} · scale + bias[i' − j' − off_min]      (group coordinates)
    out_{i'} = Σ_{j'∈A(i')} exp(s_{i'j'} − lse_{i'}) v_{j'},  lse_{i'} = log Σ_{A(i')} exp s_{i'j'}

where bias slot s = i' − j' − off_min is the position offset i − j = (s + off_min)·d.

A variant supplies only its own key ranges, tiles and flags (:func:`make_plan`); this module
builds the rest (tile key ranges, backward phases, the regrouped contiguous views, the bias
of each offset slot), runs the kernels with one BLAS thread and maps the results back:
:func:`forward` returns (out, lse), :func:`backward` the gradients of q, k, v and of the
``rel_bias`` entries the band reads.

Also shared by both variants' references: :func:`key_ok` and :func:`rel_bias_at`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import memory
from ..kernels import band as kernels
from ..kernels import blas_single_thread

__all__ = ["BandPlan", "make_plan", "forward", "backward", "key_ok", "rel_bias_at"]


class BandPlan(NamedTuple):
    """The band problem in group coordinates (Ln = ⌈N/d⌉ rows, Lm = ⌈M/d⌉ keys per group;
    BH the product of the batch dimensions)."""

    batch: tuple                 # the leading (batch) dimensions of q
    n: int                       # query positions N
    m: int                       # key positions M
    groups: int                  # d: residue classes (1: positions as given)
    tile_start: np.ndarray       # (nt + 1,) int64: tile t = rows [tile_start[t], tile_start[t+1])
    tile_jlo: np.ndarray         # (nt,) int64: key range [tile_jlo[t], tile_jhi[t]) of tile t
    tile_jhi: np.ndarray         # (nt,) int64
    lo: np.ndarray               # (Ln,) int64: row i' sees keys [lo[i'], hi[i'])
    hi: np.ndarray               # (Ln,) int64, hi >= lo
    row_ok: np.ndarray           # (BH·d, Ln) bool: rows the band serves
    key_ok: np.ndarray           # (BH·d, Lm) bool: keys the band may use
    bias: np.ndarray             # (BH·d, S) bias of each offset slot, or (1, 1) zeros
    has_bias: bool
    off_min: int                 # slot s holds the group offset i' − j' = s + off_min
    n_phases: int                # tiles t, t + n_phases have disjoint key ranges
    slot_offsets: np.ndarray     # (S,) int64: position offset i − j of each slot

    @property
    def bh(self) -> int:
        return int(np.prod(self.batch, dtype=np.int64))


def make_plan(q, k, *, groups, lo, hi, tile_start, row_ok, key_ok, rel_bias, off_min,
              n_off) -> BandPlan:
    """The band problem of q (..., N, D) against k (..., M, D).

    groups: d.  lo, hi (Ln,): each row's key range in group coordinates, non-decreasing
    (hi is raised to lo where smaller).  tile_start (nt + 1,): the query tiles, from 0 to
    Ln.  row_ok: None (every row) or bool broadcastable to (..., N); key_ok: bool
    broadcastable to (..., M).  rel_bias: None or (..., N + M − 1), read at the n_off slots
    i − j = (s + off_min)·d.
    """
    batch, n, m = q.shape[:-2], q.shape[-2], k.shape[-2]
    bh = int(np.prod(batch, dtype=np.int64))
    lo = np.asarray(lo).astype(np.int64)                           # (Ln,)
    hi = np.maximum(hi, lo).astype(np.int64)                       # (Ln,)
    tile_start = np.asarray(tile_start).astype(np.int64)           # (nt + 1,)
    tile_jlo = lo[tile_start[:-1]].copy()                          # (nt,) first row's lo
    tile_jhi = hi[tile_start[1:] - 1].copy()                       # (nt,) last row's hi
    if row_ok is None:
        row_ok = np.ones(n, dtype=bool)                            # (N,)
    row_ok = np.broadcast_to(row_ok, (*batch, n)).reshape(bh, n)   # (BH, N)
    key_ok = np.broadcast_to(key_ok, (*batch, m)).reshape(bh, m)   # (BH, M)
    slot_offsets = (np.arange(n_off) + off_min) * groups           # (S,) offsets i − j
    if rel_bias is None:
        has_bias, bias = False, np.zeros((1, 1), dtype=q.dtype)
    else:
        has_bias = True
        b = rel_bias_at(rel_bias, batch, m, slot_offsets).reshape(bh, n_off)   # (BH, S)
        bias = np.ascontiguousarray(np.repeat(b, groups, axis=0))  # (BH·d, S)
    return BandPlan(
        batch=batch, n=n, m=m, groups=groups, tile_start=tile_start, tile_jlo=tile_jlo,
        tile_jhi=tile_jhi, lo=lo, hi=hi,
        row_ok=_plane(_to_groups(row_ok[..., None], groups, n)),   # (BH·d, Ln)
        key_ok=_plane(_to_groups(key_ok[..., None], groups, m)),   # (BH·d, Lm)
        bias=bias, has_bias=has_bias, off_min=off_min,
        n_phases=kernels.plan_phases(tile_jlo, tile_jhi), slot_offsets=slot_offsets)


def forward(plan: BandPlan, q, k, v, scale):
    """out (..., N, Dv) and lse (..., N) of the band attention (``-inf``: a row with no key)."""
    dt = q.dtype
    qc, kc, vc = _rows(plan, q), _keys(plan, k), _keys(plan, v)
    out_c = memory.empty(qc.shape[:-1] + vc.shape[-1:], dt)        # (BH·d, Ln, Dv)
    lse_c = np.empty(qc.shape[:-1], dtype=dt)                      # (BH·d, Ln)
    with blas_single_thread():
        kernels.attend_band(out_c, lse_c, qc, kc, vc, *_band_args(plan), dt.type(scale),
                            kernels.n_chunks())
    out = _from_groups(out_c, plan.bh, plan.groups, plan.n)        # (BH, N, Dv)
    lse = _from_groups(lse_c[..., None], plan.bh, plan.groups, plan.n)  # (BH, N, 1)
    return (np.ascontiguousarray(out.reshape(*plan.batch, plan.n, -1)),
            np.ascontiguousarray(lse.reshape(*plan.batch, plan.n)))


def backward(plan: BandPlan, dout, out, lse, q, k, v, scale):
    """Gradients of the band attention given dout (..., N, Dv) and the forward's out, lse.

    Returns dq, dk, dv (shaped like q, k, v) and drel: None without ``rel_bias``, else the
    (..., N + M − 1) gradient of the full-batch ``rel_bias`` at the entries the band reads.
    """
    dt = q.dtype
    bh, d, n, m = plan.bh, plan.groups, plan.n, plan.m
    qc, kc, vc, doc = _rows(plan, q), _keys(plan, k), _keys(plan, v), _rows(plan, dout)
    dqc = memory.empty(qc.shape, dt)                               # (BH·d, Ln, D) (the kernel
    dkc = memory.empty(kc.shape, dt)                               # (BH·d, Lm, D)  fills or
    dvc = memory.empty(vc.shape, dt)                               # (BH·d, Lm, Dv) zeroes them)
    n_off = plan.slot_offsets.shape[0]
    nt = plan.tile_jlo.shape[0]
    dbias_part = np.zeros((qc.shape[0], nt, n_off if plan.has_bias else 1), dtype=dt)
    with blas_single_thread():
        kernels.attend_band_bwd(dqc, dkc, dvc, dbias_part, doc, _rows(plan, out),
                                _plane(_rows(plan, lse[..., None])), qc, kc, vc,
                                *_band_args(plan), plan.n_phases, dt.type(scale),
                                kernels.n_chunks())
    dq = _from_groups(dqc, bh, d, n).reshape(q.shape)              # (..., N, D)
    dk = _from_groups(dkc, bh, d, m).reshape(k.shape)              # (..., M, D)
    dv = _from_groups(dvc, bh, d, m).reshape(v.shape)              # (..., M, Dv)
    if d > 1:
        dq, dk, dv = np.array(dq), np.array(dk), np.array(dv)
    if not plan.has_bias:
        return dq, dk, dv, None
    # fwd: s_ij += bias[slot of i − j]: sum over tiles, then over the d groups of a head
    dslot = dbias_part.sum(axis=1).reshape(bh, d, n_off).sum(axis=1)   # (BH, S)
    dslot = dslot.reshape(*plan.batch, n_off)                      # (..., S)
    # fwd: bias[slot] = rel_bias[i − j + M − 1] for the slots inside [−(M − 1), N − 1]
    o = plan.slot_offsets
    inside = (o >= -(m - 1)) & (o <= n - 1)                        # (S,)
    drel = np.zeros((*plan.batch, n + m - 1), dtype=dt)            # (..., N + M − 1)
    drel[..., o[inside] + m - 1] = dslot[..., inside]
    return dq, dk, dv, drel


def key_ok(key_padding_mask, batch, m):
    """(..., M) bool: True = real key (all True without a key padding mask)."""
    if key_padding_mask is None:
        return np.ones((*batch, m), dtype=bool)                    # (..., M)
    return np.broadcast_to(key_padding_mask, (*batch, m))          # (..., M)


def rel_bias_at(rel_bias, batch, m, offsets, per_item=False):
    """rel_bias[..., i − j + M − 1] for an integer array of offsets i − j (clipped index):
    offsets (A,) or (A, B) shared by the batch, or (``per_item``) (..., A, B)."""
    top = rel_bias.shape[-1] - 1
    idx = np.clip(offsets + (m - 1), 0, top)
    full = np.broadcast_to(rel_bias, (*batch, rel_bias.shape[-1]))   # (..., N + M − 1)
    if not per_item:
        return full[..., idx]
    flat = idx.reshape(*idx.shape[:-2], -1)                        # (..., A·B)
    return np.take_along_axis(full, flat, axis=-1).reshape(idx.shape)


# ------------------------------------------------------------------------------------------
# layout: (..., L, C) positions <-> (BH·d, ⌈L/d⌉, C) groups, contiguous and writeable

def _band_args(plan: BandPlan) -> tuple:
    """The band arguments both kernels take, in their order (after the arrays)."""
    return (plan.tile_start, plan.tile_jlo, plan.tile_jhi, plan.lo, plan.hi, plan.row_ok,
            plan.key_ok, plan.bias, plan.has_bias, plan.off_min)


def _rows(plan: BandPlan, x):  # (..., N, C) -> (BH·d, Ln, C)
    return _to_groups(np.ascontiguousarray(x).reshape(plan.bh, plan.n, -1), plan.groups, plan.n)


def _keys(plan: BandPlan, x):  # (..., M, C) -> (BH·d, Lm, C)
    return _to_groups(np.ascontiguousarray(x).reshape(plan.bh, plan.m, -1), plan.groups, plan.m)


def _plane(x):  # (B', L, 1) -> contiguous (B', L): one kernel specialization (C layout)
    return np.ascontiguousarray(x[..., 0])


def _to_groups(x, d, length):
    """(BH, L, C) -> (BH·d, ⌈L/d⌉, C): rows regrouped by residue class (row r + u·d)."""
    bh, _, c = x.shape
    if d == 1:
        return np.require(x, requirements="CW")  # writeable: one kernel specialization
    lc = -(-length // d)
    pad = np.zeros((bh, lc * d, c), dtype=x.dtype)                 # (BH, Lc·d, C)
    pad[:, :length] = x
    return np.ascontiguousarray(pad.reshape(bh, lc, d, c).transpose(0, 2, 1, 3)
                                .reshape(bh * d, lc, c))


def _from_groups(x, bh, d, length):
    """Inverse of :func:`_to_groups`: (BH·d, Lc, C) -> (BH, length, C)."""
    _, lc, c = x.shape
    if d == 1:
        return x
    return x.reshape(bh, d, lc, c).transpose(0, 2, 1, 3).reshape(bh, lc * d, c)[:, :length]


def cost_model(scored_pairs):
    """The bench's ``useful_flops`` and ``extra_bytes`` of a band variant, from its
    ``scored_pairs(n, options, causal)`` (the attention package's contract)."""

    def useful_flops(n: int, d: int, options: dict, causal: bool) -> int | None:
        """Forward flops of the matrix products per batch·head: 2·P·D (q kᵀ) + 2·P·D (P v)."""
        pairs = scored_pairs(n, options, causal)
        return None if pairs is None else 4 * pairs * d

    def extra_bytes(n: int, d: int, itemsize: int, options: dict, causal: bool) -> int:
        """Generous bound on the saved context and temporaries per batch·head: the band
        kernel keeps per-row statistics only; the reference path a few arrays per pair."""
        if options.get("impl", "auto") != "ref":
            return 2 * n * 8
        return 5 * scored_pairs(n, options, causal) * (itemsize + 8)

    return useful_flops, extra_bytes
