"""Torch peers of the attention variants, for ``python -m tinyeff bench --peers``.

A *pair* is one tinyeff variant with fixed options and one PyTorch implementation that
computes the same function on the same NumPy inputs (:func:`compare` measures how close;
tests/test_bench_peers.py holds the tolerances).  Each peer is a small function
``peer(t, opts, causal) -> out``: ``t`` holds the torch leaves (``q``, ``k``, ``v``, and
``E``, ``F`` for linformer) made from the arrays tinyeff receives, ``opts`` tinyeff's
forward options (NumPy: features, rotations), and the result is the output tensor whose
backward gives the gradients tinyeff's ``backward`` returns.

=========  =====================================================  ============================
variant    peer                                                   how the two agree
=========  =====================================================  ============================
full       torch ``F.scaled_dot_product_attention``               same call (``is_causal``)
window     local-attention ``LocalAttention(exact_windowsize)``   window_size = w, look back
                                                                  and forward 1: |i − j| ≤ w
local      local-attention ``LocalAttention``                     window_size = block; causal:
                                                                  look_forward 0 on both sides
performer  performer-pytorch ``softmax_kernel`` +                 the same ω; feature ε = 0
           ``linear_attention`` (FastAttention's non-causal       (tinyeff's formula; theirs
           path)                                                  defaults to 1e-4)
lsh        reformer-pytorch ``LSHAttention``                      rotations drawn by torch from
                                                                  a fixed seed and given to
                                                                  tinyeff; its rules: n_buckets
                                                                  = N / chunk, scale 1/√D
linear     linear-attention-transformer ``linear_attn``           inputs made so that elu + 1
                                                                  equals its softmax features
linear     linear-attention-transformer ``causal_linear_attn``    the same, exp features;
           (causal, ``bucket_size=1``)                            tinyeff eps = 0
linear     plain torch elu + 1 (fast-transformers' formula)       same inputs and options
linformer  plain torch: SDPA over E K, F V                        same E, F (both get grads)
=========  =====================================================  ============================

linear-attention-transformer's maps are not elu + 1: ``linear_attn`` takes φ(q) =
softmax over features · D^(−1/2), φ(k) = softmax over positions, no normalizer;
``causal_linear_attn`` takes φ(k) = exp(k), a normalizer clamped at 1e-3, and by default
lets a bucket of 64 queries see only earlier buckets (``bucket_size=1`` is token-causal, at
O(N·D²) memory).  Since elu(x) + 1 = exp(x) for x ≤ 0, tinyeff computes the same when given
q' = log_softmax(q) − ½ log D and k' = log_softmax over positions of k (non-causal, with
``normalize=False``) or k' = k − max k (causal); those arrays are the inputs of both sides
(softmax is unchanged by the shift, so the peer sees its usual features).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math

import numpy as np

from ..attention import VARIANTS
from ._bench_case import build_call

#: torch seed of the LSH rotations (drawn once for tinyeff, redrawn by the peer each call).
LSH_SEED = 1234


@dataclasses.dataclass(frozen=True)
class Pair:
    """One tinyeff variant and its torch peer (see the module docstring)."""

    variant: str                      # tinyeff variant
    peer: str                         # what the peer is, for the table
    package: str | None               # pip package the peer needs besides torch
    causal: bool
    options: object                   # n -> tinyeff options at length n
    run: object                       # (t, opts, causal) -> out tensor
    prepare: object = None            # (q, k, v, causal) numpy -> (q, k, v) numpy
    peer_bytes: object = None         # (b, h, n, d, itemsize) -> peer's memory, if large
    chain: object = None              # (grads, args, causal) -> grads as the peer defines them
    adapt: object = None              # (fwd, n, d, dtype) -> None: fit tinyeff's forward
    #                                   options to the peer's rules (in place), or ValueError

    @property
    def label(self) -> str:
        return self.variant + (" causal" if self.causal else "")


def available(package: str | None) -> bool:
    """Whether torch and the peer's package are importable (without importing them)."""
    names = ["torch"] + ([package.replace("-", "_")] if package else [])
    try:
        return all(importlib.util.find_spec(n) is not None for n in names)
    except (ImportError, ValueError):                     # sys.modules[name] = None
        return False


# ------------------------------------------------------------------------------- peers


def _sdpa(t, opts, causal):
    import torch.nn.functional as F
    return F.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=causal)


def _local_attention(window: bool):
    def run(t, opts, causal):
        from local_attention import LocalAttention
        size = opts["window"] if window else opts["block"]
        ahead = 0 if causal else (1 if window else opts["look_forward"])
        back = 1 if window else opts["look_backward"]
        attn = LocalAttention(window_size=size, causal=causal, look_backward=back,
                              look_forward=ahead, exact_windowsize=window,
                              use_rotary_pos_emb=False)
        return attn(t["q"], t["k"], t["v"])
    return run


def _performer(t, opts, causal):
    import torch
    from performer_pytorch.performer_pytorch import linear_attention, softmax_kernel
    omega = torch.from_numpy(opts["features"])                     # (m, D)
    phi_q = softmax_kernel(t["q"], projection_matrix=omega, is_query=True, eps=0.0)
    phi_k = softmax_kernel(t["k"], projection_matrix=omega, is_query=False, eps=0.0)
    return linear_attention(phi_q, phi_k, t["v"])


def _reformer(t, opts, causal):
    import torch
    from reformer_pytorch.reformer_pytorch import LSHAttention
    q, v = t["q"], t["v"]                                          # (B, H, N, D)
    lead = q.shape[:-2]
    attn = LSHAttention(bucket_size=opts["chunk_len"], n_hashes=opts["rotations"].shape[1],
                        causal=causal).eval()
    torch.manual_seed(LSH_SEED)                   # its first draw: the rotations tinyeff got
    out, _, _ = attn(q.reshape(-1, *q.shape[-2:]), v.reshape(-1, *v.shape[-2:]))
    return out.reshape(*lead, *out.shape[-2:])


def _lat(t, opts, causal):
    from linear_attention_transformer.linear_attention_transformer import (
        causal_linear_attn,
        linear_attn,
    )
    if causal:
        return causal_linear_attn(t["q"], t["k"], t["v"], bucket_size=1)
    return linear_attn(t["q"], t["k"], t["v"])


def _elu_linear(t, opts, causal):
    import torch.nn.functional as F
    phi_q, phi_k = F.elu(t["q"]) + 1, F.elu(t["k"]) + 1            # (B, H, N, D)
    kv = phi_k.transpose(-1, -2) @ t["v"]                          # (B, H, D, Dv)
    den = phi_q @ phi_k.sum(-2).unsqueeze(-1)                      # (B, H, N, 1)
    return (phi_q @ kv) / (den + 1e-6)


def _linformer(t, opts, causal):
    import torch.nn.functional as F
    return F.scaled_dot_product_attention(t["q"], t["E"] @ t["k"], t["F"] @ t["v"])


def _lat_inputs(q, k, v, causal):
    """Inputs on which elu + 1 gives linear-attention-transformer's features (module doc)."""
    def log_softmax(x, axis):
        x = x - x.max(axis=axis, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))
    d = q.shape[-1]
    q2 = (log_softmax(q, -1) - 0.5 * math.log(d)).astype(q.dtype)  # (..., N, D) <= 0
    k2 = k - k.max(axis=(-2, -1), keepdims=True) if causal else log_softmax(k, -2)
    return q2, k2.astype(k.dtype), v


def _lat_chain(grads, args, causal):
    """tinyeff's gradients w.r.t. the log-features, carried through the peer's softmax
    normalization of its inputs, whose Jacobian at an already normalized point x is
    (I − s 1ᵀ) with s = softmax(x): g ↦ g − s·Σg (over features for q, over positions for k;
    causal: exp(k) is not normalized and the normalized output ignores the scale of φ(q))."""
    if causal:
        return grads
    d = args["q"].shape[-1]
    s_q = np.exp(args["q"]) * math.sqrt(d)                         # softmax(q') (..., N, D)
    s_k = np.exp(args["k"])                                        # softmax over N of k'
    return {**grads,
            "q": grads["q"] - s_q * grads["q"].sum(-1, keepdims=True),
            "k": grads["k"] - s_k * grads["k"].sum(-2, keepdims=True)}


def _lsh_options(n):
    return {"chunk_len": 64, "n_hashes": 4, "n_buckets": max(2, n // 64)}


def _reformer_adapt(fwd, n, d, dtype):
    """reformer-pytorch's rules: an extra 1/√D, n_buckets = N / chunk_len, N a multiple of
    2·chunk_len, and the rotations it draws from ``LSH_SEED`` (given to tinyeff)."""
    import torch
    fwd["scale"] = d ** -0.5
    r, half = fwd["rotations"].shape[1:]
    torch.manual_seed(LSH_SEED)
    rot = torch.randn((1, d, r, half), dtype=getattr(torch, dtype.name))
    fwd["rotations"] = rot[0].numpy()
    if n % (2 * fwd["chunk_len"]) or n // fwd["chunk_len"] != fwd["n_buckets"]:
        raise ValueError("reformer-pytorch needs N a multiple of 2·chunk_len and "
                         "n_buckets = N / chunk_len")


PAIRS = (
    Pair("full", "torch sdpa", None, False, lambda n: {}, _sdpa),
    Pair("full", "torch sdpa", None, True, lambda n: {}, _sdpa),
    Pair("window", "local-attention (exact window)", "local-attention", False,
         lambda n: {"window": 128}, _local_attention(window=True)),
    Pair("window", "local-attention (exact window)", "local-attention", True,
         lambda n: {"window": 128}, _local_attention(window=True)),
    Pair("local", "local-attention", "local-attention", False,
         lambda n: {"block": 128, "look_backward": 1, "look_forward": 1},
         _local_attention(window=False)),
    Pair("local", "local-attention", "local-attention", True,
         lambda n: {"block": 128, "look_backward": 1, "look_forward": 0},
         _local_attention(window=False)),
    Pair("performer", "performer-pytorch (same features)", "performer-pytorch", False,
         lambda n: {"m": 256}, _performer),
    Pair("lsh", "reformer-pytorch LSHAttention", "reformer-pytorch", False, _lsh_options,
         _reformer, adapt=_reformer_adapt),
    Pair("linear", "linear-attention-transformer", "linear-attention-transformer", False,
         lambda n: {"normalize": False}, _lat, prepare=_lat_inputs, chain=_lat_chain),
    Pair("linear", "linear-attention-transformer", "linear-attention-transformer", True,
         lambda n: {"eps": 0.0}, _lat, prepare=_lat_inputs,
         peer_bytes=lambda b, h, n, d, size: 6 * b * h * n * d * d * size),
    Pair("linear", "torch elu+1", None, False, lambda n: {}, _elu_linear),
    Pair("linformer", "torch (same E, F)", None, False, lambda n: {"k": 256}, _linformer),
)


# ------------------------------------------------------------------------- the two calls


def make_pair(pair: Pair, b: int, h: int, n: int, d: int, dtype, options: dict | None = None,
              seed: int = 0):
    """(tinyeff_step, peer_step, info): each step runs one forward + backward on the same
    inputs and returns ``(out, grads)`` as NumPy arrays (grads keyed like tinyeff's
    ``backward``); ``info`` holds the tinyeff ``module``, its ``options`` and ``args``.

    ``options`` replaces ``pair.options(n)`` (small sizes in tests).  Raises ValueError
    when the options or the length do not suit the pair.
    """
    import torch
    mod = VARIANTS[pair.variant]
    shared_qk = getattr(mod, "SHARED_QK", False)      # forward takes q only (k = q)
    dtype = np.dtype(dtype)
    opts = dict(pair.options(n) if options is None else options)
    args, fwd = build_call(mod, b, h, n, d, dtype, opts, pair.causal, seed)
    if pair.prepare is not None:
        args["q"], args["k"], args["v"] = pair.prepare(args["q"], args["k"], args["v"],
                                                       pair.causal)
    if pair.adapt is not None:
        pair.adapt(fwd, n, d, dtype)
        if "scale" in fwd:                            # the table shows the scale it set
            opts["scale"] = fwd["scale"]
    if shared_qk:
        del args["k"]
    dout = np.random.default_rng(seed + 1).standard_normal(
        (b, h, n, args["v"].shape[-1])).astype(dtype)              # (B, H, N, Dv)
    wrt = [name for name in mod.DIFFERENTIABLE if name in args or name in fwd]

    def tinyeff_step():
        out, ctx = mod.forward(**args, **fwd)
        grads = mod.backward(dout, ctx)
        return out, {name: grads[name] for name in wrt}

    def peer_step():
        t = {}
        for name in wrt:
            src = args[name] if name in args else fwd[name]
            t[name] = torch.from_numpy(src).requires_grad_(True)
        if shared_qk:
            t["k"] = t["q"]
        out = pair.run(t, fwd, pair.causal)
        out.backward(torch.from_numpy(dout))
        return out.detach().numpy(), {name: t[name].grad.numpy() for name in wrt}

    return tinyeff_step, peer_step, {"module": mod, "options": opts, "args": args}


def compare(pair: Pair, b: int, h: int, n: int, d: int, dtype, options: dict | None = None,
            seed: int = 0) -> dict:
    """Largest difference between tinyeff and the peer, output and each gradient, relative
    to the largest magnitude of tinyeff's array: ``{"out": e, "q": e, ...}`` (gradients
    through ``pair.chain`` first, where the peer normalizes its inputs).

    Known differences beyond rounding: lsh normalizes keys by sqrt(‖k‖² + D·1e-6) where
    reformer-pytorch uses ‖k‖ (about 1e-6 relative on unit-scale inputs).
    """
    tinyeff_step, peer_step, info = make_pair(pair, b, h, n, d, dtype, options, seed)
    out_a, grads_a = tinyeff_step()
    if pair.chain is not None:
        grads_a = pair.chain(grads_a, info["args"], pair.causal)
    out_b, grads_b = peer_step()
    errors = {"out": _rel(out_a, out_b)}
    errors.update({name: _rel(grads_a[name], grads_b[name]) for name in grads_a})
    return errors


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: tinyeff {a.shape}, peer {b.shape}")
    scale = float(np.max(np.abs(a))) or 1.0
    return float(np.max(np.abs(a.astype(np.float64) - b))) / scale
