"""Multi-head attention over any registered variant: ``MultiHeadAttention(d, H, attention=name)``.

    q = x W_q,  k = x W_k,  v = x W_v              (B, N, d) -> (B, H, N, Dh),  Dh = d / H
    q, k = RoPE(q), RoPE(k)                         if positions is a RoPE
    o = VARIANTS[name].forward(q, k, v, **options)  (B, H, N, Dh)
    y = Dropout(concat_heads(o) W_o)                (B, N, d)

The layer uses nothing but ``tinyeff.attention.VARIANTS[name]`` and the capability constants
of the contract (``tinyeff/attention/__init__.py``), so a variant registered later works here
with no change:

* ``SUPPORTS_CAUSAL``: ``causal=True`` is passed to the variant only if the variant supports
  it; otherwise the constructor raises.
* ``KEY_PADDING``: the name of the variant's per-key padding option; the layer's
  ``key_padding`` (B, N) bool (True = real token) is passed under that name with shape
  (B, 1, N).  A variant with ``KEY_PADDING = None`` rejects ``key_padding``.
* ``SUPPORTS_REL_BIAS``: relative position biases (clipped, T5, ALiBi) reach the variant as
  ``rel_bias`` (H, N + M − 1) and their gradient comes back under ``"rel_bias"``.
* ``SHARED_QK`` (Reformer): the layer has no K projection; the variant is called with
  ``k`` the very array ``q`` and returns the whole gradient of the shared q/k under ``"q"``.
* ``LAYER_PARAMS`` + ``init_layer_params(rng, m, dtype, **options)`` (Linformer's E, F): the
  layer owns them as parameters (in a :class:`VariantParams` child, with m = ``max_len``),
  passes them as keyword arguments and accumulates their gradients, returned under the same
  names.  ``layer_params="layer"`` (default) keeps one set per layer shared by all heads, as
  ``init_layer_params`` returns it; ``"head"`` draws one set per head and stacks them on a new
  leading axis (H, …), which the variant receives broadcast against the (B, H) batch.
  Sharing across layers: pass one :class:`VariantParams` to several layers
  (``Transformer(share_layer_params=True)``).
* ``RANDOM_OPTIONS`` + ``draw_random_options(rng, d, dtype, **options)`` (Performer
  features, LSH rotations): drawn *once*, at construction, from the layer's seeded Generator
  with d = Dh, and kept in ``layer.buffers`` (so they are saved in checkpoints).  Redraw
  policy: never automatically; call :meth:`MultiHeadAttention.redraw` (e.g. every K steps, as
  performer-pytorch's ``feature_redraw_interval``).  An explicit value passed as an option is
  used as given and never redrawn.

Valid options are the keyword parameters of the variant's ``forward`` minus those the layer
sets itself (``causal``, the key-padding option, ``rel_bias``, the layer parameters), plus
the keyword parameters of ``draw_random_options`` / ``init_layer_params`` (LSH's
``n_hashes``, Linformer's ``k``); any other option raises a ``ValueError`` listing them.
Each callable receives the options its signature names (``tinyeff.attention._options``
routes them; nothing here inspects signatures).

Length constraints (e.g. LSH: N a multiple of the chunk length): the variant's own error is
raised unchanged, or pass ``pad_to_multiple=c``: the layer then pads the sequence with zero
rows up to a multiple of c, marks them as padding through the variant's key-padding option
(so they are invisible to every real query), and drops their outputs; gradients are exact.

Global projections (Longformer, ``SUPPORTS_GLOBAL_PROJECTIONS``; ``window``):
``global_projections=True`` creates a second set of Q, K, V projections (Longformer's
Q_g, K_g, V_g; HF's ``query_global`` / ``key_global`` / ``value_global``), passed to the
variant under the names of its ``GLOBAL_PROJECTIONS``; the rows of global tokens attend
with them (same RoPE, ``shared_kv`` and ``rank`` as the main projections).  Which tokens are
global: ``global_indices=`` among the layer options (the same for every sequence), or per
sequence ``forward(x, global_tokens=)`` (B, N) bool, True = global token, passed as the
variant's ``GLOBAL_MASK`` option with shape (B, 1, N) (padding positions added by
``pad_to_multiple`` are not global).  ``Transformer`` passes only key padding to its layers,
so inside a ``Transformer`` use ``global_indices``.

Multi-head factorization: ``shared_kv=True`` projects one K/V head of width Dh that every
query head uses (multi-query attention, Shazeer 2019); its gradient is the sum over heads.
Projection compression: ``rank=r`` makes the four projections :class:`LowRankLinear`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import _checks
from ..attention import VARIANTS
from ..attention._options import (
    accepted_options,
    options_for,
    required_options,
    unknown_options,
)
from ..ctx import Ctx
from . import checks
from .base import Layer
from .layers import Dropout, make_linear
from .positions import ALiBi, RelativePositionBias, RoPE


def variant_module(name: str):
    """``VARIANTS[name]``, or a ValueError listing the registered names."""
    if name not in VARIANTS:
        raise ValueError(f"attention must be one of {sorted(VARIANTS)}, got {name!r}")
    return VARIANTS[name]


def reserved_options(mod) -> set:
    """The options a layer of variant ``mod`` sets itself, which a user may not pass:
    ``causal``, ``rel_bias``, the key-padding and global-mask options, the layer parameters
    and the global projections."""
    reserved = {"causal", "rel_bias", *getattr(mod, "LAYER_PARAMS", ()),
                *getattr(mod, "GLOBAL_PROJECTIONS", ())}
    for option in (mod.KEY_PADDING, getattr(mod, "GLOBAL_MASK", None)):
        if option is not None:
            reserved.add(option)
    return reserved


def layer_options(mod) -> set:
    """What a user may pass to a layer of variant ``mod``: the options of its ``forward``
    and of the helpers it uses (such as LSH's ``n_hashes``), minus :func:`reserved_options`
    (routing and validation: ``tinyeff.attention._options``)."""
    return accepted_options(mod, reserved_options(mod))[0]


#: What the required options of the registered variants mean (for the error that names
#: a missing one).
OPTION_MEANINGS = {
    "window": "the one-sided window w, an int (query i sees keys i - w ... i + w, causal: "
              "i - w ... i; python -m tinyeff demo uses 64)",
    "block": "the block length, an int (python -m tinyeff demo uses 64 for local, 16 for "
             "hierarchical)",
    "chunk_len": "the LSH chunk length c, an int; N must be a multiple of c or pass "
                 "pad_to_multiple=c (python -m tinyeff demo uses 32)",
    "mask": "the sparsity pattern, a boolean scipy.sparse (N, N) array such as "
            "tinyeff.masks.bigbird(...)",
    "n_hashes": "the number of LSH hashing rounds, an int (python -m tinyeff demo uses 2)",
    "n_buckets": "the number of LSH buckets, an even int; "
                 "tinyeff.attention.lsh.suggest_n_buckets(N, chunk_len) gives trax's rule",
    "k": "Linformer's projected length, an int (python -m tinyeff demo uses N/4, at most 64)",
}


def layer_required_options(mod) -> set:
    """The options a layer of variant ``mod`` cannot run without: keyword parameters of its
    ``forward`` with no default that the layer does not set itself or draw (random options)
    or own (layer parameters)."""
    return (required_options(mod) - reserved_options(mod)
            - set(getattr(mod, "RANDOM_OPTIONS", ())))


class VariantParams(Layer):
    """The differentiable arrays a variant needs from its layer (``LAYER_PARAMS``).

    Shared across layers by passing the same object to several :class:`MultiHeadAttention`.
    """

    def __init__(self, mod, max_len: int, n_heads: int, *, per_head: bool, rng, dtype,
                 options: dict):
        super().__init__()
        self.names = tuple(getattr(mod, "LAYER_PARAMS", ()))
        if not self.names:
            return
        options = options_for(mod, "init_layer_params", options)
        draws = [mod.init_layer_params(rng, max_len, dtype, **options)
                 for _ in range(n_heads if per_head else 1)]
        for name in self.names:
            value = np.stack([d[name] for d in draws]) if per_head else draws[0][name]
            self.add_param(name, np.ascontiguousarray(value, dtype=dtype))


@dataclasses.dataclass(frozen=True)
class MHACtx(Ctx):
    variant: str
    n: int                        # sequence length N of the input
    n_pad: int                    # length after padding to a multiple (= N without padding)
    q: object                     # ctx of the Q projection
    k: object                     # ctx of the K projection (None for SHARED_QK)
    v: object                     # ctx of the V projection
    rope_q: object                # RoPE ctxs (None without RoPE)
    rope_k: object
    rel: object                   # ctx of the relative-bias layer (None without)
    attn: Ctx                     # the variant's ctx
    o: object                     # ctx of the output projection
    drop: object                  # ctx of the output dropout
    glob: object = None           # ctxs of the global projections (q, k, v, rope_q, rope_k)


class MultiHeadAttention(Layer):
    """Multi-head self-attention through ``VARIANTS[attention]``; see the module docstring.

    Parameters
    ----------
    d_model, n_heads : model width d and number of heads H (d % H == 0).
    attention : a registered variant name.
    causal : pass ``causal=True`` to the variant (requires ``SUPPORTS_CAUSAL``).
    rank : low-rank projections (``LowRankLinear``) of rank r, or None for dense ones.
    shared_kv : one K/V head shared by all query heads (multi-query attention).
    positions : a :class:`RelativePositionBias`, :class:`ALiBi` or :class:`RoPE` layer (it
        may be shared between layers), or None.
    max_len : the longest sequence; required by variants with ``LAYER_PARAMS``.
    layer_params : "layer" (one set shared by the heads) or "head" (one set per head).
    variant_params : an existing :class:`VariantParams` to share across layers.
    pad_to_multiple : pad the sequence to a multiple of this length (see the module docstring).
    global_projections : create the global Q, K, V projections (requires the variant's
        ``SUPPORTS_GLOBAL_PROJECTIONS``; see the module docstring).
    dropout : dropout probability on the output.
    rng, dtype : seeded Generator for initialisation and random options; float32/float64.
    **options : the variant's own options (``window=``, ``n_features=``, …).
    """

    def __init__(self, d_model: int, n_heads: int, attention: str = "full", *,
                 causal: bool = False, rank: int | None = None, shared_kv: bool = False,
                 positions: Layer | None = None, max_len: int | None = None,
                 layer_params: str = "layer", variant_params: VariantParams | None = None,
                 pad_to_multiple: int | None = None, global_projections: bool = False,
                 dropout: float = 0.0, rng=None, dtype=np.float64, **options):
        super().__init__()
        rng, self.dtype = checks.generator(rng), checks.float_dtype(dtype)
        self.d_model, self.n_heads = checks.heads(d_model, n_heads)
        self.head_dim = d_model // n_heads
        self.attention = attention
        self.mod = mod = variant_module(attention)
        self.causal = _checks.flag(causal, "causal")
        self.shared_kv = _checks.flag(shared_kv, "shared_kv")
        self.shared_qk = bool(getattr(mod, "SHARED_QK", False))
        if self.causal and not mod.SUPPORTS_CAUSAL:
            raise ValueError(f"attention {attention!r} does not support causal=True "
                             "(SUPPORTS_CAUSAL is False); use it in an encoder (task='classify')")

        unknown, valid = unknown_options(mod, options, reserved_options(mod))
        if unknown:
            raise ValueError(f"attention {attention!r} does not accept option(s) {unknown}; "
                             f"valid options: {valid}")
        missing = sorted(layer_required_options(mod) - set(options))
        if missing:
            see = f"see tinyeff.attention.{attention}"
            meaning = "; ".join(f"{k} = {OPTION_MEANINGS.get(k, see)}" for k in missing)
            raise ValueError(f"attention {attention!r} needs the option(s) {missing}, which "
                             f"have no default: {meaning}.  Pass {missing[0]}=... (in a "
                             f"Transformer: attention_options={{{missing[0]!r}: ...}})")
        self.options = dict(options)              # everything the user passed
        self.forward_options = options_for(mod, "forward", options)

        if positions is not None and not isinstance(positions, (RelativePositionBias, ALiBi,
                                                                RoPE)):
            raise TypeError("positions must be a RelativePositionBias, ALiBi or RoPE layer, got "
                            f"{type(positions).__name__}")
        if isinstance(positions, (RelativePositionBias, ALiBi)):
            if not getattr(mod, "SUPPORTS_REL_BIAS", False):
                raise ValueError(f"attention {attention!r} does not support relative position "
                                 "biases (SUPPORTS_REL_BIAS is False); use RoPE or absolute "
                                 "positions")
            if positions.n_heads != n_heads:
                raise ValueError(f"the relative bias has {positions.n_heads} heads, the "
                                 f"attention {n_heads}")
        if isinstance(positions, RoPE) and positions.head_dim != self.head_dim:
            raise ValueError(f"RoPE head_dim {positions.head_dim} != d_model/n_heads = "
                             f"{self.head_dim}")
        if positions is not None and positions.dtype != self.dtype:
            raise TypeError(f"positions has dtype {positions.dtype}, the layer {self.dtype}")
        self.positions = positions

        self.pad_to_multiple = (None if pad_to_multiple is None else
                                _checks.integer(pad_to_multiple, "pad_to_multiple", minimum=1))
        if self.pad_to_multiple is not None and mod.KEY_PADDING is None:
            raise ValueError(f"pad_to_multiple needs a key-padding option, and attention "
                             f"{attention!r} has none (KEY_PADDING is None)")

        d, dh = d_model, self.head_dim
        d_kv = dh if self.shared_kv else d
        self.q_proj = make_linear(d, d, rank, rng=rng, dtype=dtype)
        self.k_proj = None if self.shared_qk else make_linear(d, d_kv, rank, rng=rng,
                                                              dtype=dtype)
        self.v_proj = make_linear(d, d_kv, rank, rng=rng, dtype=dtype)
        self.o_proj = make_linear(d, d, rank, rng=rng, dtype=dtype)
        self.global_projections = _checks.flag(global_projections, "global_projections")
        if self.global_projections and not getattr(mod, "SUPPORTS_GLOBAL_PROJECTIONS", False):
            raise ValueError(f"attention {attention!r} has no global projections "
                             "(SUPPORTS_GLOBAL_PROJECTIONS is False)")
        self.qg_proj = self.kg_proj = self.vg_proj = None
        if self.global_projections:
            self.qg_proj = make_linear(d, d, rank, rng=rng, dtype=dtype)
            self.kg_proj = make_linear(d, d_kv, rank, rng=rng, dtype=dtype)
            self.vg_proj = make_linear(d, d_kv, rank, rng=rng, dtype=dtype)
        self.drop = Dropout(dropout, seed=int(rng.integers(2**63)))

        self.layer_params = _checks.choice(layer_params, "layer_params", ("layer", "head"))
        if getattr(mod, "LAYER_PARAMS", ()):
            if variant_params is None:
                if max_len is None:
                    raise ValueError(f"attention {attention!r} has layer parameters "
                                     f"{tuple(mod.LAYER_PARAMS)}: pass max_len")
                variant_params = VariantParams(mod, max_len, n_heads,
                                               per_head=layer_params == "head", rng=rng,
                                               dtype=self.dtype, options=self.options)
            self.variant_params = variant_params
        else:
            self.variant_params = None

        self._fixed_random = {n for n in getattr(mod, "RANDOM_OPTIONS", ()) if n in options}
        self.redraw(rng)
        # the variant's non-differentiable choices (REPLAY, e.g. LSH buckets): those of the
        # last forward, and those the next forward must reuse (set by reversible blocks)
        self.last_replay: dict = {}
        self.replay_next: dict | None = None

    def redraw(self, rng: np.random.Generator) -> None:
        """Draw the variant's random options (those not passed explicitly) into ``buffers``."""
        names = [n for n in getattr(self.mod, "RANDOM_OPTIONS", ()) if n not in
                 self._fixed_random]
        if not names:
            return
        opts = {k: v for k, v in self.options.items() if k not in names}
        drawn = self.mod.draw_random_options(checks.generator(rng), self.head_dim, self.dtype,
                                             **options_for(self.mod, "draw_random_options",
                                                           opts))
        for name in names:
            self.buffers[name] = drawn[name]

    # ------------------------------------------------------------------------------------
    def _heads(self, y, n_heads):
        b, n, _ = y.shape
        return np.ascontiguousarray(y.reshape(b, n, n_heads, self.head_dim)
                                    .transpose(0, 2, 1, 3))       # (B, h, N, Dh)

    def _merge(self, y):
        b, h, n, dh = y.shape
        return y.transpose(0, 2, 1, 3).reshape(b, n, h * dh)       # (B, N, d)

    def _project(self, x, q_proj, k_proj, v_proj):
        """(q, k, v) (B, H, N, Dh) of one set of projections, with RoPE and shared K/V, and
        the ctxs (q, k, v, rope_q, rope_k); k is None for SHARED_QK."""
        b, n, _ = x.shape
        h = self.n_heads
        q2, cq = q_proj.forward(x)                                 # (B, N, d)
        q = self._heads(q2, h)                                     # (B, H, N, Dh)
        k = ck = None
        if not self.shared_qk:
            k2, ck = k_proj.forward(x)                             # (B, N, d_kv)
            k = self._heads(k2, 1 if self.shared_kv else h)        # (B, H or 1, N, Dh)
        v2, cv = v_proj.forward(x)                                 # (B, N, d_kv)
        v = self._heads(v2, 1 if self.shared_kv else h)            # (B, H or 1, N, Dh)
        if self.shared_kv:
            v = np.ascontiguousarray(np.broadcast_to(v, (b, h, n, self.head_dim)))
            if not self.shared_qk:
                k = np.ascontiguousarray(np.broadcast_to(k, (b, h, n, self.head_dim)))
        crq = crk = None
        if isinstance(self.positions, RoPE):
            q, crq = self.positions.forward(q)                     # (B, H, N, Dh)
            if not self.shared_qk:
                k, crk = self.positions.forward(k)                 # (B, H, N, Dh)
        return (q, k, v), (cq, ck, cv, crq, crk)

    def _project_backward(self, dq, dk, dv, ctxs, q_proj, k_proj, v_proj):
        """Backward of :meth:`_project`: dq, dk, dv (B, H, N, Dh) -> dx (B, N, d)."""
        cq, ck, cv, crq, crk = ctxs
        if crq is not None:
            # fwd: q = rope(q) ; k = rope(k)
            dq = self.positions.backward(dq, crq)                  # (B, H, N, Dh)
            if dk is not None:
                dk = self.positions.backward(dk, crk)              # (B, H, N, Dh)
        if self.shared_kv:
            # fwd: v = broadcast_to(v1, (B, H, N, Dh))  ->  sum over the heads
            dv = dv.sum(axis=1, keepdims=True)                     # (B, 1, N, Dh)
            if dk is not None:
                dk = dk.sum(axis=1, keepdims=True)                 # (B, 1, N, Dh)
        # fwd: q = heads(q_proj(x)), k = heads(k_proj(x)), v = heads(v_proj(x))
        dx = q_proj.backward(self._merge(dq), cq)                  # (B, N, d)
        dx = dx + v_proj.backward(self._merge(dv), cv)             # (B, N, d)
        if dk is not None:
            dx = dx + k_proj.backward(self._merge(dk), ck)         # (B, N, d)
        return dx

    def forward(self, x, key_padding=None, global_tokens=None):
        """x (B, N, d), key_padding (B, N) bool or None, global_tokens (B, N) bool or None
        (True = global token; variants with ``GLOBAL_MASK``) -> (y (B, N, d), ctx)."""
        b, n = checks.sequence_input(x, self.dtype, self.d_model)
        mod = self.mod
        if key_padding is not None:
            if mod.KEY_PADDING is None:
                raise ValueError(f"attention {self.attention!r} does not support key padding "
                                 "(KEY_PADDING is None)")
            checks.token_mask(key_padding, b, n)
        if global_tokens is not None:
            if getattr(mod, "GLOBAL_MASK", None) is None:
                raise ValueError(f"attention {self.attention!r} does not take per-sequence "
                                 "global tokens (GLOBAL_MASK is None)")
            checks.token_mask(global_tokens, b, n, name="global_tokens",
                              meaning="True = global token")

        (q, k, v), (cq, ck, cv, crq, crk) = self._project(x, self.q_proj, self.k_proj,
                                                          self.v_proj)
        glob = cglob = None
        if self.global_projections:
            # fwd: (q_g, k_g, v_g) = the same heads of the global projections of x
            glob, cglob = self._project(x, self.qg_proj, self.kg_proj, self.vg_proj)

        n_pad = n
        if self.pad_to_multiple is not None:
            n_pad = -(-n // self.pad_to_multiple) * self.pad_to_multiple
            if key_padding is None:
                key_padding = np.ones((b, n), dtype=bool)
        if n_pad != n:
            widths = ((0, 0), (0, 0), (0, n_pad - n), (0, 0))
            q, v = np.pad(q, widths), np.pad(v, widths)            # (B, H, N_pad, Dh)
            if not self.shared_qk:
                k = np.pad(k, widths)                              # (B, H, N_pad, Dh)
            key_padding = np.pad(key_padding, ((0, 0), (0, n_pad - n)))  # (B, N_pad)
            if glob is not None:
                glob = tuple(np.pad(a, widths) for a in glob)      # (B, H, N_pad, Dh)
            if global_tokens is not None:
                global_tokens = np.pad(global_tokens, ((0, 0), (0, n_pad - n)))  # (B, N_pad)
        if self.shared_qk:
            k = q                                                  # the contract: k is q

        opts = dict(self.forward_options)
        opts.update(self.buffers)
        if self.causal:
            opts["causal"] = True
        if key_padding is not None:
            opts[mod.KEY_PADDING] = key_padding[:, None, :]        # (B, 1, N_pad)
        if global_tokens is not None:
            opts[mod.GLOBAL_MASK] = global_tokens[:, None, :]      # (B, 1, N_pad)
        if glob is not None:
            opts.update(zip(mod.GLOBAL_PROJECTIONS, glob))         # (B, H, N_pad, Dh) each
        crel = None
        if isinstance(self.positions, (RelativePositionBias, ALiBi)):
            opts["rel_bias"], crel = self.positions.forward(n_pad, n_pad)  # (H, 2N_pad − 1)
        if self.variant_params is not None:
            opts.update(self.variant_params.params)
        if self.replay_next is not None:
            opts.update(self.replay_next)                          # recompute: same choices
            self.replay_next = None
        o, cattn = mod.forward(q, k, v, **opts)                    # (B, H, N_pad, Dh)
        self.last_replay = {opt: getattr(cattn, field)
                            for opt, field in getattr(mod, "REPLAY", {}).items()}
        o = o[:, :, :n]                                            # (B, H, N, Dh)
        y, co = self.o_proj.forward(self._merge(o))                # (B, N, d)
        y, cd = self.drop.forward(y)                               # (B, N, d)
        return y, MHACtx(variant=self.attention, n=n, n_pad=n_pad, q=cq, k=ck, v=cv,
                         rope_q=crq, rope_k=crk, rel=crel, attn=cattn, o=co, drop=cd,
                         glob=cglob)

    def backward(self, dy, ctx: MHACtx):
        mod, n, h = self.mod, ctx.n, self.n_heads
        # fwd: y = drop(o_proj(merge(o)))
        dm = self.o_proj.backward(self.drop.backward(dy, ctx.drop), ctx.o)  # (B, N, d)
        do = self._heads(dm, h)                                    # (B, H, N, Dh)
        if ctx.n_pad != n:
            # fwd: o = o_pad[:, :, :N]
            do = np.pad(do, ((0, 0), (0, 0), (0, ctx.n_pad - n), (0, 0)))  # (B, H, N_pad, Dh)
        # fwd: o = VARIANTS[name].forward(q, k, v, **opts)
        g = mod.backward(do, ctx.attn)
        dq = g["q"][:, :, :n]                                      # (B, H, N, Dh)
        dv = g["v"][:, :, :n]                                      # (B, H, N, Dh)
        dk = None if self.shared_qk else g["k"][:, :, :n]          # (B, H, N, Dh)
        if ctx.rel is not None:
            self.positions.backward(g["rel_bias"], ctx.rel)
        if self.variant_params is not None:
            for name in self.variant_params.names:
                self.variant_params.grads[name] += g[name]
        dx = self._project_backward(dq, dk, dv, (ctx.q, ctx.k, ctx.v, ctx.rope_q, ctx.rope_k),
                                    self.q_proj, self.k_proj, self.v_proj)  # (B, N, d)
        if ctx.glob is not None:
            # fwd: (q_g, k_g, v_g) = the global projections of x
            dg = [g[name][:, :, :n] for name in mod.GLOBAL_PROJECTIONS]  # (B, H, N, Dh) each
            dx = dx + self._project_backward(*dg, ctx.glob, self.qg_proj, self.kg_proj,
                                             self.vg_proj)         # (B, N, d)
        return dx
