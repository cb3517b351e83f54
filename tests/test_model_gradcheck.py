"""Whole-model gradient checks (float64, every parameter), for every registered variant.

The parametrization is built from ``tinyeff.attention.VARIANTS`` at collection time, so a
variant registered later is checked here automatically: every position scheme it supports,
and every sharing / low-rank / factorization option.  Reversible blocks: 12 layers of
reconstruction give the same gradients as stored-activation backpropagation.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tinyeff import masks
from tinyeff.attention import VARIANTS
from tinyeff.attention._options import option_names
from tinyeff.nn import Transformer, activation_nbytes, cross_entropy
from tinyeff.nn.attention import MHACtx, layer_options
from tinyeff.testing import GRAD_FD, GradReport

# Model-level options of variants whose first example case cannot be reused as is (an option
# the layer needs that is not a forward option, or an array option sized for the case).
OVERRIDES = {
    "lsh": {"chunk_len": 4, "n_hashes": 2, "n_buckets": 4},
    "linformer": {"k": 4},
    "sparse": {"mask": masks.local(8, 2)},          # a (N, N) pattern for N = 8
}
# variants whose test options fix the sequence length to N = 8 (E/F sized for max_len, a
# pattern of shape (8, 8), LSH chunks)
FIXED_LENGTH = {"lsh", "linformer", "sparse"}
V, D, H, L, DFF, N, B = 7, 8, 2, 2, 16, 8, 2


def model_options(name: str, *, ref: bool = True) -> dict:
    """Variant options for the small test models: the override above, else the scalar
    options of the variant's first example case; ``impl="ref"`` where the variant has it
    (fast at these tiny sizes, and the reference is the spec)."""
    mod = VARIANTS[name]
    valid, to_forward = layer_options(mod), option_names(mod, "forward")[0]
    if name in OVERRIDES:
        opts = dict(OVERRIDES[name])
    else:
        random = set(getattr(mod, "RANDOM_OPTIONS", ()))
        case = mod.example_cases(np.random.default_rng(0))[0]
        opts = {k: v for k, v in case.options.items()
                if k in valid and k not in random and k not in ("scale", "impl")
                and isinstance(v, (bool, int, float, str))}
    # (an array option sized for the example case cannot be reused: add an OVERRIDES line)
    if ref and "impl" in to_forward and "ref" in getattr(mod, "IMPLS", ("ref",)):
        opts["impl"] = "ref"
    return opts


def task_of(name: str) -> str:
    return "lm" if VARIANTS[name].SUPPORTS_CAUSAL else "classify"


def positions_of(name: str) -> list[str]:
    schemes = ["learned", "sinusoidal", "rope", "none"]
    if getattr(VARIANTS[name], "SUPPORTS_REL_BIAS", False):
        schemes += ["t5", "clipped", "alibi"]
    return schemes


def build(name: str, *, n_layers: int = L, ref: bool = True, seed: int = 0, **kwargs):
    cfg = dict(vocab_size=V, d_model=D, n_heads=H, n_layers=n_layers, d_ff=DFF, max_len=N,
               attention=name, attention_options=model_options(name, ref=ref),
               task=task_of(name), n_classes=3, seed=seed, dtype=np.float64)
    cfg.update(kwargs)
    return Transformer(**cfg)


def batch(model: Transformer, rng, *, n: int = N, padded: bool = False):
    """tokens (B, n), targets, key_padding (the last two positions of sequence 1 padded)."""
    tokens = rng.integers(0, V, (B, n))
    kp = None
    if padded and VARIANTS[model.config["attention"]].KEY_PADDING is not None:
        kp = np.ones((B, n), dtype=bool)
        kp[1, -2:] = False
    if model.task == "lm":
        targets = rng.integers(0, V, (B, n))
        if kp is not None:
            targets[~kp] = -100
    else:
        targets = rng.integers(0, 3, (B,))
    return tokens, targets, kp


def attention_invariants(ctx) -> tuple:
    """Non-differentiable choices (LSH buckets) of every attention call inside a model ctx."""
    found = []

    def walk(obj):
        if isinstance(obj, MHACtx):
            inv = getattr(VARIANTS[obj.variant], "gradcheck_invariant", None)
            if inv is not None:
                found.append(inv(obj.attn))
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for f in dataclasses.fields(obj):
                walk(getattr(obj, f.name))

    walk(ctx)
    return tuple(found)


def model_gradcheck(model, tokens, targets, rng, *, key_padding=None, label_smoothing=0.1,
                    eps: float = 1e-6, floor: float = 1e-3) -> GradReport:
    """Directional check of ∂loss/∂θ for every parameter θ, one random direction each.

    rel. error = |fd − ⟨u, g⟩| / max(|fd|, |⟨u, g⟩|, floor · s) with the central difference
    fd = (loss(θ + εu) − loss(θ − εu)) / 2ε and s the largest |⟨u, g⟩| over the model's
    parameters.  The floor matters only for parameters whose directional derivative is
    tiny next to the others, where the finite difference is mostly round-off (one ulp of an
    O(1) loss over 2ε ≈ 2e-10).  A gradient that is zero by construction (the key bias:
    softmax is shift-invariant) is checked by requiring the finite difference to vanish.
    Non-differentiable choices (LSH buckets) must not change under the perturbation.
    """
    params = model.named_parameters()
    loss, grads = model.loss_and_grads(tokens, targets, key_padding=key_padding,
                                       label_smoothing=label_smoothing)
    grads = {k: v.copy() for k, v in grads.items()}
    _, ctx0 = model.forward(tokens, key_padding=key_padding)
    inv0 = attention_invariants(ctx0)

    def loss_at():
        logits, ctx = model.forward(tokens, key_padding=key_padding)
        for a, b in zip(attention_invariants(ctx), inv0):
            assert np.array_equal(a, b), "a perturbation changed a non-differentiable choice"
        return cross_entropy(logits, targets, label_smoothing=label_smoothing)[0]

    pairs = {}
    for name, p in params.items():
        saved = p.copy()
        u = rng.standard_normal(p.shape)                           # random direction
        try:
            p[...] = saved + eps * u
            lp = loss_at()
            p[...] = saved - eps * u
            lm = loss_at()
        finally:
            p[...] = saved
        pairs[name] = (float(np.sum(u * grads[name])), (lp - lm) / (2 * eps))
    scale = max(abs(an) for an, _ in pairs.values())
    report = GradReport({})
    for name, (an, fd) in pairs.items():
        if abs(an) <= 1e-12 * scale:
            # a gradient that vanishes by construction (the key bias): the finite
            # difference must vanish too, up to round-off (one ulp of the loss over 2ε)
            report.errors[name] = 0.0 if abs(fd) <= 1e-8 * scale else 1.0
        else:
            report.errors[name] = abs(fd - an) / max(abs(fd), abs(an), floor * scale)
        report.worst[name] = ("direction", an, fd)
    return report


# --------------------------------------------------------------------------------------------

POSITION_CASES = [(name, pos) for name in VARIANTS for pos in positions_of(name)]


@pytest.mark.parametrize("name,positions", POSITION_CASES)
def test_model_gradcheck_positions(name, positions, rng):
    model = build(name, positions=positions)
    tokens, targets, kp = batch(model, rng, padded=True)
    report = model_gradcheck(model, tokens, targets, rng, key_padding=kp)
    assert len(report.errors) == len(model.named_parameters())
    report.assert_ok(GRAD_FD)


OPTION_SETS = {
    # ALBERT all-shared + factorized embeddings + low-rank projections everywhere
    "albert_all_rank_factorized": dict(share="all", rank=2, embed_dim=4),
    # shared attention, one K/V head for all query heads, classification with padding
    "share_attention_shared_kv_classify": dict(share="attention", shared_kv=True,
                                               task="classify", positions="rope"),
    # shared feed-forward, reversible blocks, chunked feed-forward, T5 bias per layer
    "share_ffn_reversible_chunked": dict(share="ffn", reversible=True, ff_chunk=3),
    # an unshared T5 table per layer, sinusoidal positions off
    "rel_bias_per_layer": dict(positions="t5", share_rel_bias=False),
    # one set of the variant's layer parameters (Linformer E/F) per head, shared by layers
    "layer_params_per_head_shared": dict(layer_params="head", share_layer_params=True),
    "layer_params_per_layer": dict(layer_params="layer", share_layer_params=False),
}


def _option_cases():
    cases = []
    for name, mod in VARIANTS.items():
        for key in OPTION_SETS:
            if key.startswith("layer_params") and not getattr(mod, "LAYER_PARAMS", ()):
                continue
            if key == "rel_bias_per_layer" and not getattr(mod, "SUPPORTS_REL_BIAS", False):
                continue
            cases.append((name, key))
    return cases


@pytest.mark.parametrize("name,key", _option_cases())
def test_model_gradcheck_options(name, key, rng):
    opts = dict(OPTION_SETS[key])
    if opts.get("task") == "classify" or not VARIANTS[name].SUPPORTS_CAUSAL:
        opts["task"] = "classify"
    model = build(name, **opts)
    tokens, targets, kp = batch(model, rng, padded=True)
    model_gradcheck(model, tokens, targets, rng, key_padding=kp).assert_ok(GRAD_FD)


@pytest.mark.parametrize("name", [n for n, m in VARIANTS.items() if m.KEY_PADDING is not None])
def test_model_gradcheck_pad_to_multiple(name, rng):
    """N = 6 padded to 8 inside every attention layer (exact gradients, padded keys unseen)."""
    model = build(name, pad_to_multiple=4)
    tokens, targets, kp = batch(model, rng, n=6, padded=True)
    model_gradcheck(model, tokens, targets, rng, key_padding=kp).assert_ok(GRAD_FD)


def test_model_gradcheck_catches_a_wrong_backward(rng):
    """Negative control: one parameter's gradient scaled by 1.001 must fail the check."""
    model = build("full", positions="t5")
    tokens, targets, _ = batch(model, rng)
    table = model.blocks[0].attn.fn.positions.grads["table"]
    original = model.backward

    def wrong(dlogits, ctx):
        original(dlogits, ctx)
        np.multiply(table, 1.001, out=table)

    model.backward = wrong
    report = model_gradcheck(model, tokens, targets, rng)
    bad = [k for k, e in report.errors.items() if e > GRAD_FD]
    assert bad == ["blocks.0.attn.fn.positions.table"]


@pytest.mark.parametrize("name", [n for n, m in VARIANTS.items()
                                  if "impl" in option_names(m, "forward")[0]
                                  and len(getattr(m, "IMPLS", ())) > 1])
def test_default_impl_matches_reference_in_the_model(name, rng):
    """The variant's default implementation (Numba kernels) gives the reference's loss and
    gradients inside the model."""
    grads = {}
    for ref in (True, False):
        model = build(name, ref=ref)
        tokens, targets, kp = batch(model, np.random.default_rng(3), padded=True)
        loss, g = model.loss_and_grads(tokens, targets, key_padding=kp)
        grads[ref] = (loss, {k: v.copy() for k, v in g.items()})
    assert grads[True][0] == pytest.approx(grads[False][0], rel=1e-10)
    for k, v in grads[True][1].items():
        np.testing.assert_allclose(grads[False][1][k], v, rtol=1e-8, atol=1e-12, err_msg=k)


# --------------------------------------------------------------------------------------------
# Reversible blocks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_reversible_12_layers_gradients_equal_stored_activation_backprop(dropout, rng):
    """Reconstructing activations (y -> x) gives the same gradients as keeping them."""
    grads = {}
    for recompute in (True, False):
        model = build("full", n_layers=12, reversible=True, dropout=dropout, seed=1)
        model.recompute = recompute
        tokens, targets, _ = batch(model, np.random.default_rng(5))
        loss, g = model.loss_and_grads(tokens, targets)
        grads[recompute] = (loss, {k: v.copy() for k, v in g.items()})
    assert grads[True][0] == grads[False][0]
    # per parameter max|Δ| / max|g|; the key biases have gradient 0 (round-off only), so the
    # denominator is floored at 1e-6 of the largest gradient entry of the model
    top = max(np.abs(v).max() for v in grads[False][1].values())
    errors = {k: np.abs(grads[True][1][k] - v).max() / max(np.abs(v).max(), 1e-6 * top)
              for k, v in grads[False][1].items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-8, (worst, errors[worst])


def test_reversible_block_reconstructs_its_inputs(rng):
    model = build("full", n_layers=1, reversible=True)
    block = model.blocks[0]
    x1, x2 = rng.standard_normal((2, B, N, D))
    (y1, y2), _ = block.forward((x1, x2))
    dy = rng.standard_normal((2, B, N, D))
    (r1, r2), _ = block.backward_reconstruct((y1, y2), (dy[0], dy[1]), None,
                                             block.dropout_state())
    np.testing.assert_allclose(r1, x1, rtol=0, atol=1e-12)
    np.testing.assert_allclose(r2, x2, rtol=0, atol=1e-12)


def test_reversible_dropout_draws_fresh_masks_after_a_step(rng):
    """After the reconstructing backward the dropout Generators continue where the forward
    left them (the replay does not rewind the next step's masks)."""
    model = build("full", reversible=True, dropout=0.3, share="all")
    tokens, targets, _ = batch(model, rng)
    drop = model.blocks[0].ffn.fn.drop
    model.forward(tokens)
    after_forward = drop.get_state()
    model2 = build("full", reversible=True, dropout=0.3, share="all")
    model2.loss_and_grads(tokens, targets)
    assert model2.blocks[0].ffn.fn.drop.get_state() == after_forward


def test_reversible_activation_memory_is_flat_in_depth(rng):
    sizes = {}
    for reversible in (False, True):
        for depth in (2, 8):
            model = build("full", n_layers=depth, reversible=reversible)
            tokens, _, _ = batch(model, rng)
            sizes[reversible, depth] = activation_nbytes(model.forward(tokens)[1])
    assert sizes[True, 8] == sizes[True, 2]
    assert sizes[False, 8] > 3 * sizes[False, 2]


# --------------------------------------------------------------------------------------------
# ALBERT sharing
# --------------------------------------------------------------------------------------------


def test_albert_parameter_counts():
    counts = {share: build("full", n_layers=4, share=share).num_parameters()
              for share in (None, "attention", "ffn", "all")}
    attn = 2 * D + 4 * (D * D + D)                        # LN₁ + W_q, W_k, W_v, W_o (+ biases)
    ffn = 2 * D + (D * DFF + DFF) + (DFF * D + D)         # LN₂ + W₁, b₁, W₂, b₂
    assert counts[None] - counts["attention"] == 3 * attn
    assert counts[None] - counts["ffn"] == 3 * ffn
    assert counts[None] - counts["all"] == 3 * (attn + ffn)


def test_low_rank_and_factorized_parameter_counts():
    base = build("full").num_parameters()
    r = 2
    low = build("full", rank=r).num_parameters()
    per_layer_dense = 4 * D * D + D * DFF + DFF * D
    per_layer_low = 4 * (2 * D * r) + (D + DFF) * r * 2
    assert base - low == L * (per_layer_dense - per_layer_low)
    fact = build("full", embed_dim=3).num_parameters()
    assert base - fact == V * D - (V * 3 + 3 * D + D)


@pytest.mark.parametrize("share", ["attention", "ffn", "all"])
def test_shared_parameter_gradient_is_the_sum_over_layers(share, rng):
    shared = build("full", n_layers=3, share=share)
    plain = build("full", n_layers=3)
    # give the unshared model the shared model's weights in every layer
    sp = shared.named_parameters()
    for name, value in plain.named_parameters().items():
        parts = name.split(".")
        if parts[0] == "blocks":
            branch = parts[2]
            if (share == "all" or share == "attention" and branch == "attn"
                    or share == "ffn" and branch == "ffn"):
                parts[1] = "0"
        value[...] = sp[".".join(parts)]
    tokens, targets, _ = batch(shared, rng)
    loss_s, gs = shared.loss_and_grads(tokens, targets)
    loss_p, gp = plain.loss_and_grads(tokens, targets)
    assert loss_s == pytest.approx(loss_p, rel=1e-12)
    for name, g in gs.items():
        parts = name.split(".")
        if parts[0] == "blocks" and parts[1] == "0" and (
                share == "all" or (share == "attention") == (parts[2] == "attn")):
            total = sum(gp[".".join([parts[0], str(i), *parts[2:]])] for i in range(3))
            np.testing.assert_allclose(g, total, rtol=1e-10, atol=1e-14, err_msg=name)
