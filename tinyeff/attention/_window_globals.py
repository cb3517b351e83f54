"""The global tokens of ``window`` (Longformer §3.1 "global attention"): validation, the one
form both paths hold them in, and the dense NumPy products of the global rows and columns.

With the set G of global positions (per batch item with ``global_mask``), row i ∉ G attends
the global key columns next to its band, and row g ∈ G attends every key:

    s_ig = q_i·k_g · scale + rel_bias[i − g + M − 1]                 (columns, i ∉ G)
    s_gj = q_r,g·k_r,j · scale + rel_bias[g − j + M − 1]             (rows, j ∈ A(g))

with (q_r, k_r, v_r) = (q, k, v), or the global projections (q_global, k_global, v_global).
``tinyeff/attention/window.py`` (reference) and ``tinyeff/attention/_window_numba.py`` (Numba)
combine these with the band.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import _checks
from . import _band

PROJECTIONS = ("q_global", "k_global", "v_global")


def check_indices(value, n, m) -> np.ndarray:
    """Validate ``global_indices`` -> sorted int64 (G,) array (empty if None)."""
    if value is None:
        return np.zeros(0, dtype=np.int64)
    arr = np.asarray(value)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer) and arr.size:
        raise TypeError(f"global_indices must be integers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"global_indices must be 1-D, got shape {arr.shape}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= min(n, m)):
        raise ValueError(f"global_indices must lie in [0, min(N, M)) = [0, {min(n, m)}), "
                         f"got values from {arr.min()} to {arr.max()} (N={n}, M={m})")
    out = np.unique(arr)
    if out.size != arr.size:
        raise ValueError(f"global_indices must be distinct, got {arr.tolist()}")
    return out


def check_mask(value, batch, n, m):
    """Validate ``global_mask`` (..., N) bool; True only at positions < min(N, M)."""
    mask = _checks.position_mask(value, batch, n, "global_mask", "True = global token")
    if mask is not None and n > m and mask[..., m:].any():
        first = int(np.nonzero(mask[..., m:].any(axis=tuple(range(mask.ndim - 1))))[0][0]) + m
        raise ValueError(f"global_mask may be True only at positions < min(N, M) = {m} (a "
                         f"global token is a query row and a key column), got True at "
                         f"position {first} (N={n}, M={m})")
    return mask


def check_projections(q_global, k_global, v_global, q, k, v):
    """Validate the global projections: all three or none, shaped and typed like q, k, v."""
    given = {name: x for name, x in zip(PROJECTIONS, (q_global, k_global, v_global))
             if x is not None}
    if not given:
        return None, None, None
    if len(given) < 3:
        missing = [name for name in PROJECTIONS if name not in given]
        raise ValueError(f"q_global, k_global and v_global go together (all three or none): "
                         f"got {', '.join(given)} without {', '.join(missing)}")
    for (name, x), like in zip(given.items(), (q, k, v)):
        _checks.float_array(x, name, dtype=q.dtype)
        if x.shape != like.shape:
            raise ValueError(f"{name} must have the shape of {name[0]}, {like.shape}, got "
                             f"{x.shape}")
    return q_global, k_global, v_global


@dataclasses.dataclass(frozen=True)
class Globals:
    """The global tokens in the one form both paths use.

    From ``global_indices`` (shared by the whole batch): ``idx`` is the sorted (G,) positions,
    ``ok`` is None, ``rows`` (N,) and ``cols`` (M,).  From ``global_mask``: ``idx`` (..., G)
    holds each batch item's positions in ascending order in its first count slots and 0 in
    the rest, ``ok`` (..., G) marks the filled slots, ``rows`` (..., N), ``cols`` (..., M);
    G is the largest count in the batch.  Slot c of a batch item is global position idx[c].
    """

    idx: np.ndarray              # (G,) or (..., G) int64
    ok: np.ndarray | None        # None or (..., G) bool
    rows: np.ndarray             # (N,) or (..., N) bool: global query rows
    cols: np.ndarray             # (M,) or (..., M) bool: global key columns

    @property
    def size(self) -> int:
        return self.idx.shape[-1]


def make_globals(gidx, global_mask, batch, n, m) -> Globals:
    is_grow = np.zeros(n, dtype=bool)                              # (N,)
    is_grow[gidx] = True
    is_gcol = np.zeros(m, dtype=bool)                              # (M,)
    is_gcol[gidx] = True
    count = 0 if global_mask is None else int(global_mask.sum(axis=-1).max(initial=0))
    if count == 0:
        return Globals(gidx, None, is_grow, is_gcol)
    # a stable sort of "not global" puts each item's global positions first, ascending
    order = np.argsort(~global_mask, axis=-1, kind="stable")[..., :count]  # (..', G)
    ok = np.arange(count) < global_mask.sum(axis=-1)[..., None]   # (..', G)
    idx = np.where(ok, order, 0).astype(np.int64)                  # (..', G)
    rows = np.broadcast_to(global_mask, (*batch, n))               # (..., N)
    cols = np.zeros((*batch, m), dtype=bool)                       # (..., M)
    cols[..., :min(n, m)] = rows[..., :min(n, m)]
    return Globals(np.broadcast_to(idx, (*batch, count)),
                    np.broadcast_to(ok, (*batch, count)), rows, cols)


def global_qkv(q, k, v, q_global, k_global, v_global):
    """The q, k, v of the global rows: the global projections when given."""
    if q_global is None:
        return q, k, v
    return q_global, k_global, v_global


def rows_at(x, gl):
    """x (..., L, C) -> (..., G, C): the rows at the global positions, in slot order."""
    if gl.ok is None:
        return x[..., gl.idx, :]
    return np.take_along_axis(x, gl.idx[..., None], axis=-2)


def entries_at(x, gl):
    """x (..., L) -> (..., G): the entries at the global positions, in slot order."""
    if gl.ok is None:
        return x[..., gl.idx]
    return np.take_along_axis(x, gl.idx, axis=-1)


def put(dst, gl, vals, *, add=False, rows=True):
    """dst[..., G, :] = vals (``rows``; dst[..., G] otherwise), or += with ``add``; the
    empty slots of a per-item list are skipped.  Positions are distinct per batch item."""
    if gl.ok is None:
        at = (Ellipsis, gl.idx, slice(None)) if rows else (Ellipsis, gl.idx)
    else:
        sel = np.nonzero(gl.ok)                                    # (batch…, slot) of filled slots
        at = (*sel[:-1], gl.idx[sel])
        vals = vals[sel]
    if add:
        dst[at] += vals
    else:
        dst[at] = vals


def gcol_scores(q, k_g, gl, causal, key_ok, rel_bias, scale):
    """Scores and allowed flags of the global key columns (keys k_g = k at G) for the
    non-global rows."""
    n, m = q.shape[-2], key_ok.shape[-1]
    batch = q.shape[:-2]
    s = (q @ k_g.swapaxes(-1, -2)) * scale                         # (..., N, G)
    i = np.arange(n)[:, None]                                      # (N, 1)
    gj = gl.idx[..., None, :]                                      # (1, G) or (..., 1, G)
    if rel_bias is not None:
        s = s + _band.rel_bias_at(rel_bias, batch, m, i - gj, gl.ok is not None)  # (..., N, G)
    ok = ~gl.rows[..., :, None] & entries_at(key_ok, gl)[..., None, :]  # (..., N, G)
    if gl.ok is not None:
        ok = ok & gl.ok[..., None, :]                              # empty slots
    if causal:
        ok = ok & (gj <= i)                                        # (..., N, G)
    return s, np.broadcast_to(ok, s.shape)


def grow_scores(q_g, k, gl, causal, key_ok, rel_bias, scale):
    """Scores and allowed flags of the global query rows (queries q_g = q at G, or the
    global projection at G; they attend every key k)."""
    m = k.shape[-2]
    batch = q_g.shape[:-2]
    s = (q_g @ k.swapaxes(-1, -2)) * scale                         # (..., G, M)
    j = np.arange(m)[None, :]                                      # (1, M)
    gi = gl.idx[..., :, None]                                      # (G, 1) or (..., G, 1)
    if rel_bias is not None:
        s = s + _band.rel_bias_at(rel_bias, batch, m, gi - j, gl.ok is not None)  # (..., G, M)
    ok = key_ok[..., None, :]                                      # (..., 1, M)
    if gl.ok is not None:
        ok = ok & gl.ok[..., :, None]                              # empty slots
    if causal:
        ok = ok & (j <= gi)                                        # (..., G, M)
    return s, np.broadcast_to(ok, s.shape)


def exp_minus(s, lse, ok):
    """p = exp(s − lse) on the allowed entries, 0 elsewhere (and on empty rows)."""
    live = ok & (lse[..., None] != -np.inf)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.where(live, np.exp(np.where(live, s - lse[..., None], 0)), 0)


def rel_bias_grad_gparts(drel, ds_gcol, ds_grow, gl, n, m):
    """Accumulate the offset-bias gradient of the global columns and rows into drel
    (..., N + M − 1), a C-contiguous array of the full batch shape."""
    if gl.ok is None:
        for c, g in enumerate(gl.idx):
            # fwd (columns): s[i, g] += rel_bias[i − g + M − 1],  i = 0 … N − 1
            drel[..., m - 1 - g:m - 1 - g + n] += ds_gcol[..., :, c]
            # fwd (rows): s[g, j] += rel_bias[g − j + M − 1],  j = M − 1 … 0
            drel[..., g:g + m] += ds_grow[..., c, ::-1]
        return
    size = gl.size
    flat = drel.reshape(-1, drel.shape[-1])                        # (BH, N + M − 1) view
    gi = gl.idx.reshape(-1, size)                                  # (BH, G)
    b = np.arange(flat.shape[0])[:, None]                          # (BH, 1)
    dc = ds_gcol.reshape(-1, n, size)                              # (BH, N, G)
    dr = ds_grow.reshape(-1, size, m)                              # (BH, G, M)
    for c in range(size):                  # (empty slots carry ds = 0)
        # fwd (columns): s[i, g] += rel_bias[i − g + M − 1],  i = 0 … N − 1
        flat[b, (m - 1 - gi[:, c])[:, None] + np.arange(n)] += dc[:, :, c]
        # fwd (rows): s[g, j] += rel_bias[g − j + M − 1],  j = M − 1 … 0
        flat[b, gi[:, c][:, None] + np.arange(m)] += dr[:, c, ::-1]


def global_grads(grads, ctx):
    """The gradient arrays of the global rows' (q, k, v): those of q, k, v, or (with global
    projections) new zero arrays entered into ``grads``."""
    if ctx.q_global is None:
        return grads["q"], grads["k"], grads["v"]
    for name in PROJECTIONS:
        grads[name] = np.zeros_like(getattr(ctx, name))
    return tuple(grads[name] for name in PROJECTIONS)

