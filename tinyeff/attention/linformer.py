"""Linformer: softmax attention over k projected keys and values (Wang et al. 2020).

    K̃   = E (m ⊙ K)                                   (..., k, D)    E: (k, M) or (..., k, M)
    Ṽ   = F (m ⊙ V)                                   (..., k, Dv)   F: (k, M) or (..., k, M)
    S   = Q K̃ᵀ · scale                                (..., N, k)
    P   = softmax(S) over the k projected keys        (..., N, k)
    out = P Ṽ                                         (..., N, Dv)

m_j is the key-padding mask (1 = real key, 0 = padding; all ones without a mask), applied
with ``where`` so that a padded key (even a NaN one) contributes exactly nothing to E K and
F V.  Everything after the projections is exact attention over k keys, i.e.
``out == full.forward(q, E @ K, F @ V)`` — a test checks this.

Paper: S. Wang, B. Z. Li, M. Khabsa, H. Fang, H. Ma, "Linformer: Self-Attention with Linear
Complexity", arXiv:2006.04768 (2020).

Shapes: q (..., N, D), k (..., M, D), v (..., M, Dv), E and F (k, M) or (..., k, M) whose
leading dimensions broadcast to the batch dimensions without enlarging them (e.g. (H, k, M)
for (B, H) batches: one projection per head).  k is the Linformer rank.  Cost O(N·k·D +
k·M·D) time and O(N + k·M) memory: the forward saves K̃, Ṽ and the row log-sum-exp, not
P, and the backward recomputes P in row blocks (in tiles with impl="blocked").
Everything runs one batch element at a time (the elements sharing a projection together;
impl="blocked" runs the projections' products as tasks on the threads, same products)
and in blocks of ~2¹⁹–2²¹ entries, so the only large arrays are the output and the
gradients (no (…, N, k), no (…, k, M) from E broadcast over the heads, no (…, M, D) masked
or transposed copy of k or v — with a key-padding mask the forward makes one (M, D) masked
copy per batch element): the work space beyond the returned arrays is the saved K̃, Ṽ, lse,
a few buffers of ~2¹⁹–2²¹ entries and the kernels' per-tile scratch
(docs/semantics/linformer.md, "Implementation notes", has the measured figure).

Options
-------
E, F : float arrays of the inputs' dtype; *differentiable* arguments (``backward`` returns
    ``"E"`` and ``"F"``, reduced to their own shapes).  ``E.shape[-1]`` must equal M: a
    different length is an error, never silently sliced (lucidrains and fairseq use
    ``E[:, :M]`` for shorter inputs; pass that explicitly to reproduce them).  E and F must
    have the same rank k >= 1.
key_padding_mask : boolean (..., M), True = real key, one dimension per batch dimension
    (size 1 broadcasts).  Padded keys are removed exactly from the projections: the output
    equals the output of the same call with those keys deleted from k, v and their columns deleted
    from E and F.  (fairseq's Linformer ignores the padding mask in self-attention, so its
    padded tokens leak into every projected key; LRA and lucidrains take no mask at all.
    To reproduce them pass no mask.)  Note that, unlike in ``full``, a padded key does not
    disappear from the softmax's key set: the k projected keys are always all present.
causal : must be False.  Linformer has no causal form: every projected key mixes all
    positions, so a query would see the future.  ``causal=True`` raises ValueError.
scale : float, default 1/sqrt(D).
impl : "auto" | "ref" | "blocked".  Both compute the projections with the same NumPy
    products (so K̃ and Ṽ are the same bits) and differ only in the attention over the k
    projected keys.  "ref" is the NumPy path below (the spec): row blocks, softmax in
    place.  "blocked" runs that exact, unmasked attention of q against K̃, Ṽ through the
    FlashAttention kernels of ``full(impl="blocked")`` (:mod:`tinyeff.kernels.blocked`,
    tiles of ``BLOCKED_TILE`` queries and projected keys; the backward recomputes P from
    the saved log-sum-exp, as the reference's does).  "auto" picks "blocked" when
    N·k >= ``AUTO_BLOCKED_MIN_NK``, else "ref".  The two agree to float rounding
    (``tinyeff.testing.PARITY``); ``backward(dout, ctx, impl=...)`` may cross them.

Sharing modes (the paper's head-wise, key-value and layer-wise sharing) are shapes and
identities of the arguments: head-wise is one (k, M) E for all heads; key-value sharing
passes the same array as E and F — the gradients are still returned separately under "E"
and "F" (a layer owning one shared parameter adds them); layer-wise sharing is the layer's
business (``tinyeff.nn``).

Edge cases
----------
* Every query sees k >= 1 projected keys, so no row is ever fully masked; if all M keys are
  padded (or M = 0) then K̃ = Ṽ = 0 and the output is exactly 0 with zero gradients.
* N = 0 gives an empty output.
* Numerically stable: each row's maximum is subtracted before the exponential (a constant
  of the backward).

Layers (``tinyeff.nn``) create the projections with :func:`init_layer_params`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from .. import _checks, memory
from .._random import random_qkv
from ..ctx import Ctx
from ._case import Case
from .full import _heads  # (..., L, C) -> (BH, L, C) contiguous, writeable

NAME = "linformer"
SUPPORTS_MASK = False
SUPPORTS_CAUSAL = False
SUPPORTS_BIAS = False
SUPPORTS_REL_BIAS = False
KEY_PADDING = "key_padding_mask"
DIFFERENTIABLE = ("q", "k", "v", "E", "F")
LAYER_PARAMS = ("E", "F")

IMPLS = ("auto", "ref", "blocked")
BLOCKED_TILE = 256                 # query and key tile of impl="blocked"
AUTO_BLOCKED_MIN_NK = 1 << 18      # impl="auto" uses "blocked" from N·k = 512² on
_ROW_BLOCK = 1 << 21        # entries of one (rows, k) score block (8 MiB in float32)
_KEY_BLOCK = 1 << 19        # entries of one (keys, S·D) block of the projection backward
_MIN_KEY_BLOCKS = 4         # key blocks of the projection backward, when M >= 4


@dataclasses.dataclass(frozen=True)
class LinformerCtx(Ctx):
    q: np.ndarray                   # (..., N, D)
    k: np.ndarray                   # (..., M, D)
    v: np.ndarray                   # (..., M, Dv)
    E: np.ndarray                   # (k, M) or (..., k, M)
    F: np.ndarray                   # (k, M) or (..., k, M)
    key_padding_mask: np.ndarray | None   # (..., M) as given, or None
    kp: np.ndarray                  # (..., k, D)  K̃ = E (m ⊙ K)
    vp: np.ndarray                  # (..., k, Dv) Ṽ = F (m ⊙ V)
    out: np.ndarray                 # (..., N, Dv) the output (δ = rowsum(dout ⊙ out))
    lse: np.ndarray                 # (..., N) log-sum-exp of each row of S
    scale: float
    impl: str                       # "ref" or "blocked": the implementation that made this ctx
    tile: int                       # query/key tile of the blocked forward (0 for "ref")


def init_layer_params(rng: np.random.Generator, m: int, dtype=np.float64, *, k: int,
                      share_kv: bool = False, **_) -> dict:
    """Projections for a layer over sequences of length ``m``: {"E": (k, m), "F": (k, m)}.

    Entries are i.i.d. uniform on [−1/√k, 1/√k] (lucidrains/linformer's ``init_``; the
    paper's JL argument uses N(0, 1/k) — same order of magnitude).  ``share_kv=True``
    returns the *same* array object under "E" and "F" (key-value sharing).
    """
    rng = _checks.generator(rng)                  # an int/None/RandomState: clear TypeError
    k = _checks.integer(k, "k", minimum=1)
    m = _checks.integer(m, "m", minimum=0)
    bound = 1.0 / math.sqrt(k)
    e = rng.uniform(-bound, bound, size=(k, m)).astype(dtype)      # (k, M)
    f = e if share_kv else rng.uniform(-bound, bound, size=(k, m)).astype(dtype)  # (k, M)
    return {"E": e, "F": f}


def _projection(value, name: str, batch: tuple, m: int, dtype) -> np.ndarray:
    """E or F: a float array (k, M) or (..., k, M) with leading dims broadcastable to batch."""
    _checks.float_array(value, name, min_ndim=2, dtype=dtype)
    if value.shape[-1] != m:
        raise ValueError(
            f"{name} has shape {value.shape} but there are M = {m} keys: {name}.shape[-1] must "
            f"equal M (no silent slicing; pass {name}[..., :{m}] explicitly to project a "
            "shorter sequence as lucidrains/fairseq do)")
    if value.shape[-2] < 1:
        raise ValueError(f"{name} must have a rank k >= 1, got shape {value.shape}")
    if not _checks._fits(value.shape[:-2], batch):
        raise ValueError(f"{name} of shape {value.shape}: its leading dimensions "
                         f"{value.shape[:-2]} do not broadcast to the batch dimensions {batch} "
                         "without enlarging them")
    return value


def forward(q, k, v, *, E, F, key_padding_mask=None, causal=False, scale=None, impl="auto"):
    """Linformer attention.  Returns ``(out (..., N, Dv), ctx)``; see the module docstring."""
    batch, n, m, d, dv, dtype = _checks.qkv(q, k, v)
    if _checks.flag(causal, "causal"):
        raise ValueError("causal=True is not defined for Linformer: each projected key E·K "
                         "mixes all M positions, so every query would see the future "
                         "(lucidrains/linformer#4); use a causal variant instead")
    E = _projection(E, "E", batch, m, dtype)
    F = _projection(F, "F", batch, m, dtype)
    if E.shape[-2] != F.shape[-2]:
        raise ValueError(f"E and F must have the same rank k, got E {E.shape}, F {F.shape}")
    key_padding_mask = _checks.key_padding_mask(key_padding_mask, batch, m,
                                                name="key_padding_mask")
    scale = _checks.scale(scale, d)
    impl = _checks.choice(impl, "impl", IMPLS)
    if impl == "auto":
        impl = "blocked" if n * E.shape[-2] >= AUTO_BLOCKED_MIN_NK else "ref"
    if impl == "blocked":
        return _forward_blocked(q, k, v, E, F, key_padding_mask, scale)
    return _forward_ref(q, k, v, E, F, key_padding_mask, scale)


def backward(dout, ctx: LinformerCtx, *, impl=None) -> dict:
    """Gradients ``{"q", "k", "v", "E", "F"}`` (E's and F's reduced to their own shapes).

    ``impl`` (default: the one that made ``ctx``) may cross the implementations: both save
    the same K̃, Ṽ, output and log-sum-exp.
    """
    if not isinstance(ctx, LinformerCtx):
        raise TypeError(f"ctx must be the LinformerCtx returned by linformer.forward, got "
                        f"{type(ctx).__name__}")
    impl = ctx.impl if impl is None else _checks.choice(impl, "impl", ("ref", "blocked"))
    dout = _checks.dout(dout, ctx.q.shape[:-1] + ctx.v.shape[-1:], ctx.q.dtype)
    if impl == "blocked":
        return _backward_blocked(dout, ctx)
    return _backward_ref(dout, ctx)


def _masked(x, keep):
    """m ⊙ x for x (M, C) and keep (M,) or None: padded rows become exactly 0 (even NaN ones)."""
    if keep is None:
        return x
    return np.where(keep[:, None], x, 0)                           # (M, C)


def _groups(lead: tuple, batch: tuple):
    """The batch indices grouped by the slice of a broadcast projection they share.

    ``lead`` is E.shape[:-2] (broadcastable to ``batch`` without enlarging it).  Yields
    ``(e_index, members)``: ``E[e_index]`` is the (k, M) matrix that every batch index in
    ``members`` uses (for a head-shared (k, M) E: one group holding every (b, h)).
    """
    nb, ne = len(batch), len(lead)
    full = (1,) * (nb - ne) + tuple(lead)
    kept = [a for a in range(nb) if full[a] != 1]
    summed = [a for a in range(nb) if full[a] == 1]
    for ki in np.ndindex(*(batch[a] for a in kept)):
        at = dict(zip(kept, ki))
        e_index = tuple(at.get(a, 0) for a in range(nb - ne, nb))
        members = []                                               # empty if a summed axis is 0
        for si in np.ndindex(*(batch[a] for a in summed)):
            idx = [0] * nb
            for a, j in zip(kept, ki):
                idx[a] = j
            for a, j in zip(summed, si):
                idx[a] = j
            members.append(tuple(idx))
        yield e_index, members


def _key_blocks(m: int, width: int):
    """Slices of the M keys, each a (keys, width) block of at most ~_KEY_BLOCK entries, and
    at least ``_MIN_KEY_BLOCKS`` of them when M allows (tasks for the threads; a function of
    the shapes only, so that the products, and their bits, are)."""
    step = max(1, min(_KEY_BLOCK // max(1, width), -(-m // _MIN_KEY_BLOCKS)))
    return [slice(c0, min(m, c0 + step)) for c0 in range(0, m, step)]


def _first(blocks: list) -> int:
    """Keys in the first (largest) of a run of ``_key_blocks``; 0 if there are none (M = 0)."""
    return blocks[0].stop - blocks[0].start if blocks else 0


def _in_order(fn, n_tasks: int, *args) -> None:
    """The reference's task runner: ``fn(0, n_tasks, *args)``, every task in order here."""
    fn(0, n_tasks, *args)


def _on_threads(fn, n_tasks: int, *args) -> None:
    """impl="blocked"'s task runner: ``fn(lo, hi, *args)`` over blocks of the tasks on
    tinyeff's threads (``run_tasks``), each NumPy product on one BLAS thread, so that no
    OpenBLAS worker is left spinning on the cores the next kernel needs
    (``blas_single_thread``).  Every task does the products the reference does, and one
    BLAS thread or several give the same bits, so the results do not depend on the runner."""
    from ..kernels import blas_single_thread, run_tasks
    with blas_single_thread():
        run_tasks(fn, n_tasks, *args)


def _project(k, v, E, F, kpm, run=_in_order):
    """K̃ = E (m ⊙ K) (..., k, D) and Ṽ = F (m ⊙ V) (..., k, Dv), one batch element per task
    (``run``: :func:`_in_order` or :func:`_on_threads`): no (…, k, M) copy of E broadcast over
    the heads, no (…, M, D) masked copy of k or v."""
    batch, m = k.shape[:-2], k.shape[-2]
    kk = E.shape[-2]
    Eb = np.broadcast_to(E, (*batch, kk, m))                       # (..., k, M) view
    Fb = np.broadcast_to(F, (*batch, kk, m))                       # (..., k, M) view
    mb = None if kpm is None else np.broadcast_to(kpm, (*batch, m))   # (..., M) view
    kp = np.empty((*batch, kk, k.shape[-1]), dtype=k.dtype)        # (..., k, D)
    vp = np.empty((*batch, kk, v.shape[-1]), dtype=k.dtype)        # (..., k, Dv)
    items = list(np.ndindex(*batch))
    run(_project_tasks, len(items), kp, vp, items, Eb, Fb, mb, k, v)
    return kp, vp


def _project_tasks(lo, hi, kp, vp, items, Eb, Fb, mb, k, v) -> None:
    """Batch elements ``items[lo:hi]`` of :func:`_project`."""
    for i in items[lo:hi]:
        keep = None if mb is None else mb[i]                       # (M,)
        np.matmul(Eb[i], _masked(k[i], keep), out=kp[i])           # (k, D)  K̃ = E (m ⊙ K)
        np.matmul(Fb[i], _masked(v[i], keep), out=vp[i])           # (k, Dv) Ṽ = F (m ⊙ V)


def _forward_ref(q, k, v, E, F, kpm, scale):
    # The projections, then one batch element at a time, rows in blocks: no (…, N, k) array.
    batch, n = q.shape[:-2], q.shape[-2]
    kk = E.shape[-2]
    kp, vp = _project(k, v, E, F, kpm)                             # (..., k, D), (..., k, Dv)
    out = memory.empty((*batch, n, v.shape[-1]), q.dtype)          # (..., N, Dv)
    lse = np.empty((*batch, n), dtype=q.dtype)                     # (..., N)
    step = max(1, _ROW_BLOCK // max(1, kk))
    s_buf = memory.empty((min(n, step), kk), q.dtype)              # (R, k) reused per block
    for i in np.ndindex(*batch):
        for r0 in range(0, n, step):                               # rows are independent
            rows = slice(r0, min(n, r0 + step))
            s = s_buf[:rows.stop - r0]                             # (R, k)
            np.matmul(q[i][rows], kp[i].T, out=s)
            s *= scale                                             # S = Q K̃ᵀ·scale
            # P = softmax(S), in place (same operations as ops.softmax.forward, which would
            # allocate three (R, k) temporaries per block)
            c = s.max(axis=-1, keepdims=True)                      # (R, 1)
            c[c == -np.inf] = 0                                    # all −inf row: any shift
            s -= c
            np.exp(s, out=s)                                       # e = exp(S − c)
            z = s.sum(axis=-1, keepdims=True)                      # (R, 1)
            s /= np.where(z > 0, z, 1)                             # P = e / z
            with np.errstate(divide="ignore"):
                lse[i][rows] = (c + np.log(z))[:, 0]               # (R,)
            np.matmul(s, vp[i], out=out[i][rows])                  # (R, Dv) out = P Ṽ
    ctx = LinformerCtx(q=q, k=k, v=v, E=E, F=F, key_padding_mask=kpm, kp=kp, vp=vp, out=out,
                       lse=lse, scale=scale, impl="ref", tile=0)
    return out, ctx


def _project_back(W, dproj, mb, dx, run=_in_order) -> None:
    """dx = m ⊙ (Wᵀ dproj) for every batch element, written into dx (..., M, C).

    The batch elements sharing one W slice (e.g. every head, for a head-shared E) are done
    in one (keys, k) @ (k, S·C) product per block of keys — a wider, faster product than
    one per head, and in key blocks because a single (M, k) @ (k, C) product makes OpenBLAS
    touch a buffer of ~¾ of W's size (48 MiB at M = 65,536, k = 256).  One block of keys
    is one task of ``run``.
    """
    batch, m = dproj.shape[:-2], dx.shape[-2]
    for e_index, members in _groups(W.shape[:-2], batch):
        if not members:
            continue
        a = np.concatenate([dproj[i] for i in members], axis=1)    # (k, S·C)
        blocks = _key_blocks(m, a.shape[1])
        run(_project_back_tasks, len(blocks), W[e_index], a, dx, blocks, members)
    if mb is not None:
        for i in np.ndindex(*batch):
            dx[i][~mb[i]] = 0                                      # (M, C) padded keys: 0


def _project_back_tasks(lo, hi, w, a, dx, blocks, members) -> None:
    """Key blocks ``blocks[lo:hi]`` of :func:`_project_back` for one (k, M) slice ``w`` and
    the batch elements ``members`` sharing it (a = their dproj side by side, (k, S·C))."""
    c_dim = dx.shape[-1]
    if len(members) == 1:
        for c in blocks[lo:hi]:
            np.matmul(w[:, c].T, a, out=dx[members[0]][c])         # (keys, C)
        return
    t_buf = memory.empty((_first(blocks[lo:hi]), a.shape[1]), dx.dtype)  # (keys, S·C) reused
    for c in blocks[lo:hi]:
        t = t_buf[:c.stop - c.start]                               # (keys, S·C)
        np.matmul(w[:, c].T, a, out=t)
        for j, i in enumerate(members):
            dx[i][c] = t[:, j * c_dim:(j + 1) * c_dim]             # (keys, C)


def _weight_grad(dproj, x, mb, shape: tuple, dtype, run=_in_order) -> np.ndarray:
    """dW = Σ over the broadcast batch axes of dproj (m ⊙ x)ᵀ, returned with W's ``shape``.

    dproj (..., k, C), x (..., M, C), mb (..., M) or None -> (k, M) or (..., k, M).  The
    batch elements sharing one W slice (S of them) are folded into the contraction: one
    (k, S·C) @ (S·C, keys) product per block of keys, written straight into dW, so neither
    a (batch, k, M) temporary nor a transposed copy of x is formed — only a (keys, S·C)
    gather of m ⊙ x, ~_KEY_BLOCK entries, into one buffer reused by every block of a task
    (none for a single unmasked element).  One block of keys is one task of ``run``.
    """
    batch, m = dproj.shape[:-2], x.shape[-2]
    dw = memory.empty(shape, dtype)                                # W's shape
    for e_index, members in _groups(shape[:-2], batch):
        if not members:                                            # a sum over no elements
            dw[e_index] = 0
            continue
        a = np.concatenate([dproj[i] for i in members], axis=1)    # (k, S·C)
        blocks = _key_blocks(m, a.shape[1])
        run(_weight_grad_tasks, len(blocks), dw[e_index], a, x, mb, blocks, members)
    return dw


def _weight_grad_tasks(lo, hi, dw, a, x, mb, blocks, members) -> None:
    """Key blocks ``blocks[lo:hi]`` of :func:`_weight_grad` for one (k, M) slice ``dw`` and
    the batch elements ``members`` sharing it (a = their dproj side by side, (k, S·C))."""
    if len(members) == 1 and mb is None:                           # x's own rows, no gather
        for c in blocks[lo:hi]:
            np.matmul(a, x[members[0]][c].T, out=dw[:, c])         # (k, keys)
        return
    g_buf = memory.empty((_first(blocks[lo:hi]), len(members), x.shape[-1]), dw.dtype)
    for c in blocks[lo:hi]:
        g = g_buf[:c.stop - c.start]                               # (keys, S, C) m ⊙ x
        for j, i in enumerate(members):
            g[:, j] = x[i][c]
            if mb is not None:
                g[~mb[i][c], j] = 0                                # padded keys: exactly 0
        np.matmul(a, g.reshape(len(g), -1).T, out=dw[:, c])        # (k, keys)


def _backward_attention(dout, q, kp, vp, lse, scale):
    """(dQ, dK̃, dṼ) of the attention over the k projected keys, rows in blocks.

    A function of its own so that its two (R, k) work buffers are freed when it returns,
    before the (…, M, D) and (k, M) gradients are filled.
    """
    batch, n, kk = q.shape[:-2], q.shape[-2], kp.shape[-2]
    dq = memory.empty(q.shape, q.dtype)                            # (..., N, D)
    dkp = np.zeros(kp.shape, dtype=q.dtype)                        # (..., k, D)
    dvp = np.zeros(vp.shape, dtype=q.dtype)                        # (..., k, Dv)
    step = max(1, _ROW_BLOCK // max(1, kk))
    p_buf = memory.empty((min(n, step), kk), q.dtype)              # (R, k) reused per block
    dp_buf = memory.empty(p_buf.shape, q.dtype)                    # (R, k)
    for i in np.ndindex(*batch):
        for r0 in range(0, n, step):
            rows = slice(r0, min(n, r0 + step))
            qc, dc = q[i][rows], dout[i][rows]                     # (R, D), (R, Dv)
            p, dp = p_buf[:rows.stop - r0], dp_buf[:rows.stop - r0]   # (R, k) views
            # recompute P = softmax(S) from the saved log-sum-exp
            np.matmul(qc, kp[i].T, out=p)
            p *= scale
            p -= lse[i][rows, None]
            np.exp(p, out=p)                                       # P = exp(S − lse)
            # fwd: out = P Ṽ
            dvp[i] += p.T @ dc                                     # (k, Dv)
            np.matmul(dc, vp[i].T, out=dp)                         # (R, k)
            # fwd: P = softmax(S)  ->  dS = P ⊙ (dP − rowsum(dP ⊙ P)), in place in dp
            # (the operations of ops.softmax.backward, without its (R, k) temporaries)
            dp -= np.sum(dp * p, axis=-1, keepdims=True)
            dp *= p                                                # dS
            # fwd: S = Q K̃ᵀ · scale
            dqc = dq[i][rows]                                      # (R, D) view
            np.matmul(dp, kp[i], out=dqc)
            dqc *= scale
            dkp[i] += (dp.T @ qc) * scale                          # (k, D)
    return dq, dkp, dvp


def _backward_ref(dout, ctx: LinformerCtx) -> dict:
    dq, dkp, dvp = _backward_attention(dout, ctx.q, ctx.kp, ctx.vp, ctx.lse, ctx.scale)
    return _backward_projections(ctx, dq, dkp, dvp)


def _backward_projections(ctx: LinformerCtx, dq, dkp, dvp, run=_in_order) -> dict:
    """The gradients of q, k, v, E, F from dQ, dK̃ (..., k, D) and dṼ (..., k, Dv); the
    products as tasks of ``run`` (:func:`_in_order` or :func:`_on_threads`)."""
    q, k, v = ctx.q, ctx.k, ctx.v
    kpm = ctx.key_padding_mask
    mb = None if kpm is None else np.broadcast_to(kpm, (*q.shape[:-2], k.shape[-2]))  # (..., M)
    # fwd: K̃ = E (m ⊙ K)
    dk = memory.empty(k.shape, k.dtype)                            # (..., M, D)
    _project_back(ctx.E, dkp, mb, dk, run)
    dE = _weight_grad(dkp, k, mb, ctx.E.shape, q.dtype, run)       # E's shape
    # fwd: Ṽ = F (m ⊙ V)
    dv = memory.empty(v.shape, v.dtype)                            # (..., M, Dv)
    _project_back(ctx.F, dvp, mb, dv, run)
    dF = _weight_grad(dvp, v, mb, ctx.F.shape, q.dtype, run)       # F's shape
    return {"q": dq, "k": dk, "v": dv, "E": dE, "F": dF}


# ----------------------------------------------------------------- impl="blocked" (Numba)

def _forward_blocked(q, k, v, E, F, kpm, scale):
    # the projections as in the reference, then the attention over the k projected keys by
    # the FlashAttention kernel (no mask: the key padding acted inside the projections)
    from ..kernels import blas_single_thread, blocked
    batch, n, dv = q.shape[:-2], q.shape[-2], v.shape[-1]
    bh = math.prod(batch)
    dtype = q.dtype
    tile = BLOCKED_TILE
    kp, vp = _project(k, v, E, F, kpm, _on_threads)                # (..., k, D), (..., k, Dv)
    out = memory.empty((*batch, n, dv), dtype)                     # (..., N, Dv)
    lse = np.empty((*batch, n), dtype=dtype)                       # (..., N)
    if bh and n:
        no_kpad = np.zeros((1, 1), dtype=bool)                     # unused by the kernel
        no_rel = np.zeros((1, 1), dtype=dtype)                     # unused by the kernel
        with blas_single_thread():
            blocked.flash_fwd(out.reshape(bh, n, dv), lse.reshape(bh, n), _heads(q, bh),
                              kp.reshape(bh, *kp.shape[-2:]), vp.reshape(bh, *vp.shape[-2:]),
                              no_kpad, no_rel, dtype.type(scale), False, False, False, tile,
                              tile)                              # band: not causal, unused
    ctx = LinformerCtx(q=q, k=k, v=v, E=E, F=F, key_padding_mask=kpm, kp=kp, vp=vp, out=out,
                       lse=lse, scale=scale, impl="blocked", tile=tile)
    return out, ctx


def _backward_attention_blocked(dout, ctx: LinformerCtx):
    """(dQ, dK̃, dṼ) by the FlashAttention backward kernels (P recomputed from the lse)."""
    import numba

    from ..kernels import blas_single_thread, blocked
    q, kp, vp = ctx.q, ctx.kp, ctx.vp
    batch, n, kk, d, dv = q.shape[:-2], q.shape[-2], kp.shape[-2], q.shape[-1], vp.shape[-1]
    bh = math.prod(batch)
    dtype = q.dtype
    tile = ctx.tile or BLOCKED_TILE
    dq = memory.empty((bh, n, d), dtype)                           # (BH, N, D)
    dq.fill(0)                                                     # the fused kernel adds to it
    dkp = np.zeros((bh, kk, d), dtype=dtype)                       # (BH, k, D)
    dvp = np.zeros((bh, kk, dv), dtype=dtype)                      # (BH, k, Dv)
    if bh and n:
        dout3 = _heads(dout, bh)                                   # (BH, N, Dv)
        # δ_i = Σ_c dout_ic · out_ic  (= Σ_j P_ij dP_ij, the softmax backward's row term)
        delta = np.einsum("bnc,bnc->bn", dout3, ctx.out.reshape(bh, n, dv))   # (BH, N)
        lse = np.ascontiguousarray(ctx.lse.reshape(bh, n))         # (BH, N)
        no_kpad = np.zeros((1, 1), dtype=bool)                     # unused by the kernel
        no_rel = np.zeros((1, 1), dtype=dtype)                     # unused by the kernel
        args = (_heads(q, bh), kp.reshape(bh, kk, d), vp.reshape(bh, kk, dv), dout3, lse,
                delta, no_kpad, no_rel, dtype.type(ctx.scale), False, False, False, tile,
                tile)                                              # band: not causal, unused
        threads = numba.get_num_threads()
        with blas_single_thread():
            if bh >= 4 * threads or (bh >= threads and bh % threads == 0):
                blocked.flash_bwd_fused(dq, dkp, dvp, *args)      # one thread per head
            else:
                blocked.flash_bwd_dq(dq, *args)
                blocked.flash_bwd_dkdv(dkp, dvp, *args)
    return (dq.reshape(q.shape), dkp.reshape(kp.shape), dvp.reshape(vp.shape))


def _backward_blocked(dout, ctx: LinformerCtx) -> dict:
    dq, dkp, dvp = _backward_attention_blocked(dout, ctx)
    return _backward_projections(ctx, dq, dkp, dvp, _on_threads)


def example_cases(rng: np.random.Generator, dtype=np.float64) -> list[Case]:
    """Small valid calls covering every option (used by the contract tests and golden files)."""
    b, h, n, m, d, dv, kk = 2, 2, 7, 6, 5, 3, 4

    qkv = functools.partial(random_qkv, rng, (b, h), d=d, dv=dv, dtype=dtype)  # qkv(N, M)

    def proj(*shape):
        return (rng.standard_normal(shape) / math.sqrt(shape[-1])).astype(dtype)

    kpad = np.ones((b, 1, m), dtype=bool)
    kpad[1, :, -2:] = False                                        # key padding of batch 1
    return [
        Case("plain", {**qkv(n, m), "E": proj(kk, m), "F": proj(kk, m)}, {}),
        Case("per_head", {**qkv(n, m), "E": proj(h, kk, m), "F": proj(1, kk, m)}, {"scale": 0.6}),
        Case("per_example", {**qkv(5, 9), "E": proj(b, h, kk, 9), "F": proj(kk, 9)}, {}),
        Case("rank_above_m", {**qkv(n, m), "E": proj(m + 2, m), "F": proj(m + 2, m)}, {}),
        Case("kpad", {**qkv(n, m), "E": proj(kk, m), "F": proj(h, kk, m)},
             {"key_padding_mask": kpad}),
    ]


# ----------------------------------------------------------------------------- benchmark data
def bench_options(n: int) -> dict:
    """Options ``python -m tinyeff bench`` runs at length n (``--opt`` overrides them)."""
    return {"k": 256}


def useful_flops(n: int, d: int, options: dict, causal: bool) -> int:
    """Forward flops of the matrix products per batch·head at rank k: the E, F projections
    4·k·N·D plus attention to k keys 4·N·k·D."""
    k = int(options.get("k", 256))
    return 4 * k * n * d + 4 * n * k * d


def extra_bytes(n: int, d: int, itemsize: int, options: dict, causal: bool) -> int:
    """Generous bound on the saved context and temporaries per batch·head: eight (N, k)."""
    return 8 * n * int(options.get("k", 256)) * itemsize


def demo_options(n: int, causal: bool) -> dict:
    """Options ``python -m tinyeff demo`` trains with at length n (``--opt`` overrides them)."""
    from ._demo import span
    return {"k": span(n)}
