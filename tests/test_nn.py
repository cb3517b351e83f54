"""Every layer's backward against finite differences (float64), and the layer machinery:
parameter trees, sharing, zero_grad, train/eval, dropout, chunking, option validation."""

from __future__ import annotations

import numpy as np
import pytest

from tinyeff.attention import VARIANTS, full
from tinyeff.nn import (
    GELU,
    ALiBi,
    Dropout,
    Embedding,
    FactorizedEmbedding,
    FeedForward,
    LayerNorm,
    Linear,
    LowRankLinear,
    MultiHeadAttention,
    PreNorm,
    RelativePositionBias,
    RoPE,
    TransformerBlock,
    attention_branch,
    ffn_branch,
)
from tinyeff.testing import GRAD_FD, check_vjp

from .test_model_gradcheck import FIXED_LENGTH, model_options


def layer_check(layer, inputs: dict, rng, *, options: dict | None = None, call=None):
    """check_vjp of ``layer`` w.r.t. its differentiable ``inputs`` and all its parameters.

    ``call(layer, **inputs, **options) -> (y, ctx)`` defaults to ``layer.forward``; the
    backward returns the input gradient (for a single input) and copies of the parameter
    gradients, accumulated from zero.
    """
    options = dict(options or {})
    call = call or (lambda lay, **kw: lay.forward(*kw.values()) if len(kw) == 1 and not options
                    else lay.forward(**kw))
    params = layer.named_parameters()
    saved = {k: v.copy() for k, v in params.items()}
    (in_name,) = inputs.keys() if len(inputs) == 1 else (None,)

    def forward(**args):
        for k in params:
            params[k][...] = args[k]
        return call(layer, **{k: args[k] for k in inputs}, **options)

    def backward(dy, ctx):
        layer.zero_grad()
        dx = layer.backward(dy, ctx)
        out = {k: v.copy() for k, v in layer.named_grads().items()}
        if in_name is not None:
            out[in_name] = dx
        return out

    args = {**inputs, **saved}
    try:
        report = check_vjp(forward, backward, args, rng=rng)
        # A parameter whose gradient is zero by construction (the key bias: softmax is
        # shift-invariant) has a relative error of round-off over round-off; check instead
        # that both the analytic gradient and the finite difference vanish.
        y, ctx = forward(**args)
        g = rng.standard_normal(y.shape)
        grads = backward(g, ctx)
        top = max(float(np.abs(v).max(initial=0)) for v in grads.values())
        for name in list(report.errors):
            if name in params and np.abs(grads[name]).max(initial=0) <= 1e-12 * top:
                u = rng.standard_normal(args[name].shape)
                fd = [float(np.sum(g * forward(**{**args, name: args[name] + e * u})[0]))
                      for e in (1e-6, -1e-6)]
                assert abs(fd[0] - fd[1]) / 2e-6 <= 1e-7 * top * np.abs(g).sum(), name
                report.errors[name] = 0.0
        return report
    finally:
        for k, v in saved.items():
            params[k][...] = v


def x_of(rng, *shape):
    return rng.standard_normal(shape)


# --------------------------------------------------------------------------------------------
# position-wise layers
# --------------------------------------------------------------------------------------------


def test_linear(rng):
    layer = Linear(5, 3, rng=rng)
    layer_check(layer, {"x": x_of(rng, 2, 4, 5)}, rng).assert_ok(GRAD_FD)


def test_low_rank_linear(rng):
    layer = LowRankLinear(6, 4, 2, rng=rng)
    assert layer.num_parameters() == 6 * 2 + 2 * 4 + 4
    layer_check(layer, {"x": x_of(rng, 3, 6)}, rng).assert_ok(GRAD_FD)


def test_low_rank_equals_dense_with_the_product_weight(rng):
    low = LowRankLinear(6, 4, 3, rng=rng)
    dense = Linear(6, 4, rng=rng)
    dense.params["W"][...] = low.params["W1"] @ low.params["W2"]
    x = x_of(rng, 2, 6)
    np.testing.assert_allclose(low.forward(x)[0], dense.forward(x)[0], rtol=1e-12)


def test_embedding_scatter_adds_repeated_tokens(rng):
    layer = Embedding(5, 3, rng=rng)
    tokens = np.array([[1, 1, 4], [0, 1, 2]])
    y, ctx = layer.forward(tokens)
    dy = rng.standard_normal(y.shape)
    layer.backward(dy, ctx)
    np.testing.assert_allclose(layer.grads["W"][1], dy[0, 0] + dy[0, 1] + dy[1, 1])
    np.testing.assert_array_equal(layer.grads["W"][3], 0)
    layer_check(layer, {}, rng, options={"tokens": tokens},
                call=lambda lay, tokens: lay.forward(tokens)).assert_ok(GRAD_FD)


def test_embedding_rejects_bad_tokens(rng):
    layer = Embedding(5, 3, rng=rng)
    with pytest.raises(ValueError, match="tokens must lie in"):
        layer.forward(np.array([[0, 5]]))
    with pytest.raises(TypeError, match="integer"):
        layer.forward(np.array([[0.0, 1.0]]))


def test_factorized_embedding(rng):
    layer = FactorizedEmbedding(11, 3, 8, rng=rng)
    assert layer.num_parameters() == 11 * 3 + 3 * 8 + 8
    layer_check(layer, {}, rng, options={"tokens": rng.integers(0, 11, (2, 5))},
                call=lambda lay, tokens: lay.forward(tokens)).assert_ok(GRAD_FD)


def test_layer_norm(rng):
    layer = LayerNorm(6)
    layer.params["gamma"][...] = rng.standard_normal(6)
    layer.params["beta"][...] = rng.standard_normal(6)
    layer_check(layer, {"x": x_of(rng, 2, 3, 6)}, rng).assert_ok(GRAD_FD)
    y, _ = LayerNorm(6).forward(x_of(rng, 4, 6))
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(-1), 1, rtol=1e-4)         # eps = 1e-5


def test_gelu_is_exact_erf_form(rng):
    x = x_of(rng, 3, 4)
    y, _ = GELU().forward(x)
    from scipy.stats import norm
    np.testing.assert_allclose(y, x * norm.cdf(x), rtol=1e-12)
    layer_check(GELU(), {"x": x}, rng).assert_ok(GRAD_FD)


def test_dropout_mask_is_seeded_and_reused_in_backward(rng):
    x = x_of(rng, 4, 50)
    d1, d2 = Dropout(0.3, seed=7), Dropout(0.3, seed=7)
    y1, c1 = d1.forward(x)
    y2, _ = d2.forward(x)
    np.testing.assert_array_equal(y1, y2)                       # same seed, same mask
    assert 0.5 < c1.keep.mean() < 0.9
    np.testing.assert_allclose(y1, x * c1.keep / 0.7)
    dy = rng.standard_normal(x.shape)
    np.testing.assert_allclose(d1.backward(dy, c1), dy * c1.keep / 0.7)
    y3, _ = d1.forward(x)
    assert not np.array_equal(y1, y3)                           # a fresh mask each call
    d1.eval()
    np.testing.assert_array_equal(d1.forward(x)[0], x)          # identity in eval mode
    state = d2.get_state()
    a, _ = d2.forward(x)
    d2.set_state(state)
    np.testing.assert_array_equal(d2.forward(x)[0], a)          # replayable


def test_dropout_rejects_bad_p():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Dropout(1.0)


@pytest.mark.parametrize("rank", [None, 3])
def test_feed_forward(rank, rng):
    layer = FeedForward(6, 10, rank=rank, rng=rng)
    layer_check(layer, {"x": x_of(rng, 2, 5, 6)}, rng).assert_ok(GRAD_FD)


def test_chunked_feed_forward_equals_unchunked(rng):
    plain = FeedForward(6, 10, rng=np.random.default_rng(1))
    chunked = FeedForward(6, 10, chunk=2, rng=np.random.default_rng(1))
    x, dy = x_of(rng, 2, 7, 6), x_of(rng, 2, 7, 6)
    y1, c1 = plain.forward(x)
    y2, c2 = chunked.forward(x)
    np.testing.assert_allclose(y2, y1, rtol=1e-13)
    np.testing.assert_allclose(chunked.backward(dy, c2), plain.backward(dy, c1), rtol=1e-12)
    for k, g in plain.named_grads().items():
        np.testing.assert_allclose(chunked.named_grads()[k], g, rtol=1e-12, err_msg=k)
    chunked.zero_grad()
    y3, dx3 = chunked.vjp(x, dy)                                # chunk-by-chunk recompute
    np.testing.assert_allclose(y3, y1, rtol=1e-13)
    np.testing.assert_allclose(dx3, plain.backward(dy, c1), rtol=1e-12)
    layer_check(chunked, {"x": x}, rng).assert_ok(GRAD_FD)


def test_prenorm_and_block(rng):
    ffn = ffn_branch(8, 12, rng=rng, dtype=np.float64)
    layer_check(ffn, {"x": x_of(rng, 2, 4, 8)}, rng).assert_ok(GRAD_FD)
    block = TransformerBlock(attention_branch(8, 2, rng=rng, dtype=np.float64, causal=True),
                             ffn)
    layer_check(block, {"x": x_of(rng, 2, 4, 8)}, rng).assert_ok(GRAD_FD)


# --------------------------------------------------------------------------------------------
# multi-head attention
# --------------------------------------------------------------------------------------------

MHA_OPTIONS = {
    "plain": {},
    "causal": {"causal": True},
    "low_rank": {"rank": 2, "causal": True},
    "shared_kv": {"shared_kv": True},
    "rope": {"positions": "rope", "causal": True},
    "t5": {"positions": "t5"},
    "t5_causal": {"positions": "t5", "causal": True},
    "clipped": {"positions": "clipped"},
    "alibi_causal": {"positions": "alibi", "causal": True},
    "key_padding": {"key_padding": True},
    "pad_to_multiple": {"pad_to_multiple": 4, "causal": True},
}


def make_mha(name: str, key: str, rng, d=8, h=2, n=6):
    mod = VARIANTS[name]
    opts = dict(MHA_OPTIONS[key])
    opts.pop("key_padding", None)
    pos = opts.pop("positions", None)
    causal = opts.get("causal", False)
    if pos == "rope":
        opts["positions"] = RoPE(d // h)
    elif pos in ("t5", "clipped"):
        opts["positions"] = RelativePositionBias(h, kind=pos, bidirectional=not causal,
                                                 max_offset=2, rng=rng)
    elif pos == "alibi":
        opts["positions"] = ALiBi(h)
    if causal and not mod.SUPPORTS_CAUSAL:
        opts["causal"] = False
    return MultiHeadAttention(d, h, name, max_len=8, rng=rng, **opts, **model_options(name))


def _mha_cases():
    cases = []
    for name, mod in VARIANTS.items():
        for key, opts in MHA_OPTIONS.items():
            pos = opts.get("positions")
            if pos in ("t5", "clipped", "alibi") and not getattr(mod, "SUPPORTS_REL_BIAS", False):
                continue
            if (key in ("key_padding", "pad_to_multiple")) and mod.KEY_PADDING is None:
                continue
            if getattr(mod, "LAYER_PARAMS", ()) and key == "pad_to_multiple":
                continue              # E/F are sized for max_len = 8 = the padded length only
            cases.append((name, key))
    return cases


@pytest.mark.parametrize("name,key", _mha_cases())
def test_multi_head_attention_gradcheck(name, key, rng):
    n = 8 if name in FIXED_LENGTH and key != "pad_to_multiple" else 6
    layer = make_mha(name, key, rng, n=n)
    x = x_of(rng, 2, n, 8)
    options = {}
    if key == "key_padding":
        kp = np.ones((2, n), dtype=bool)
        kp[1, -2:] = False
        options["key_padding"] = kp
    report = layer_check(layer, {"x": x}, rng, options=options,
                         call=lambda lay, x, **kw: lay.forward(x, **kw))
    report.assert_ok(GRAD_FD)


def test_mha_full_equals_manual_attention(rng):
    """The layer is exactly: project, split heads, full.forward with the ALiBi bias, merge."""
    layer = MultiHeadAttention(8, 2, "full", causal=True, positions=ALiBi(2), rng=rng)
    x = x_of(rng, 2, 5, 8)
    y, _ = layer.forward(x)
    p = layer.named_parameters()

    def heads(t):
        return t.reshape(2, 5, 2, 4).transpose(0, 2, 1, 3)

    q = heads(x @ p["q_proj.W"] + p["q_proj.b"])
    k = heads(x @ p["k_proj.W"] + p["k_proj.b"])
    v = heads(x @ p["v_proj.W"] + p["v_proj.b"])
    i, j = np.arange(5)[:, None], np.arange(5)[None, :]
    slopes = np.array([2.0 ** -4, 2.0 ** -8])                    # H = 2: 2^(−8h/2)
    bias = -slopes[:, None, None] * np.abs(i - j)                # (H, N, N)
    o, _ = full.forward(q, k, v, causal=True, bias=bias)
    ref = o.transpose(0, 2, 1, 3).reshape(2, 5, 8) @ p["o_proj.W"] + p["o_proj.b"]
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-14)


def test_pad_to_multiple_does_not_change_real_outputs(rng):
    a = MultiHeadAttention(8, 2, "full", causal=True, rng=np.random.default_rng(0))
    b = MultiHeadAttention(8, 2, "full", causal=True, pad_to_multiple=4,
                           rng=np.random.default_rng(0))
    x = x_of(rng, 2, 5, 8)
    np.testing.assert_allclose(b.forward(x)[0], a.forward(x)[0], rtol=1e-12, atol=1e-14)


def test_mha_rejects_unknown_options_listing_the_valid_ones(rng):
    with pytest.raises(ValueError, match=r"does not accept option\(s\) \['windw'\]; valid"):
        MultiHeadAttention(8, 2, "full", windw=3, rng=rng)
    with pytest.raises(ValueError, match="attention must be one of"):
        MultiHeadAttention(8, 2, "nope", rng=rng)
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(9, 2, "full", rng=rng)


@pytest.mark.parametrize("name", [n for n, m in VARIANTS.items() if not m.SUPPORTS_CAUSAL])
def test_mha_rejects_causal_for_non_causal_variants(name, rng):
    with pytest.raises(ValueError, match="does not support causal"):
        MultiHeadAttention(8, 2, name, causal=True, max_len=8, rng=rng, **model_options(name))


@pytest.mark.parametrize("name", [n for n, m in VARIANTS.items()
                                  if not getattr(m, "SUPPORTS_REL_BIAS", False)])
def test_mha_rejects_relative_bias_for_variants_without_it(name, rng):
    with pytest.raises(ValueError, match="relative position"):
        MultiHeadAttention(8, 2, name, positions=ALiBi(2), max_len=8, rng=rng,
                           **model_options(name))


@pytest.mark.parametrize("name", [n for n, m in VARIANTS.items()
                                  if getattr(m, "RANDOM_OPTIONS", ())])
def test_random_options_are_drawn_once_seeded_and_redrawable(name):
    a = MultiHeadAttention(8, 2, name, max_len=8, rng=np.random.default_rng(3),
                           **model_options(name))
    b = MultiHeadAttention(8, 2, name, max_len=8, rng=np.random.default_rng(3),
                           **model_options(name))
    assert set(a.buffers) == set(VARIANTS[name].RANDOM_OPTIONS)
    x = np.random.default_rng(0).standard_normal((1, 8, 8))
    np.testing.assert_array_equal(a.forward(x)[0], a.forward(x)[0])   # fixed between calls
    for k in a.buffers:
        np.testing.assert_array_equal(a.buffers[k], b.buffers[k])      # seeded
    before = {k: v.copy() for k, v in a.buffers.items()}
    a.redraw(np.random.default_rng(4))
    assert any(not np.array_equal(before[k], a.buffers[k]) for k in before)


# --------------------------------------------------------------------------------------------
# the layer tree
# --------------------------------------------------------------------------------------------


def test_shared_layers_are_listed_once_and_accumulate(rng):
    ffn = ffn_branch(4, 6, rng=rng, dtype=np.float64)
    attn = attention_branch(4, 2, rng=rng, dtype=np.float64)
    b1, b2 = TransformerBlock(attn, ffn), TransformerBlock(attn, ffn)

    class Two(PreNorm):
        def __init__(self):
            super().__init__(4, b1, dtype=np.float64)
            self.other = b2

    model = Two()
    names = list(model.named_parameters())
    assert not any(n.startswith("other.") for n in names)       # b2 is b1's layers again
    assert model.num_parameters() == LayerNorm(4).num_parameters() + b1.num_parameters()
    x = x_of(rng, 1, 3, 4)
    y1, c1 = b1.forward(x)
    y2, c2 = b2.forward(y1)
    dy = rng.standard_normal(y2.shape)
    model.zero_grad()
    dy1 = b2.backward(dy, c2)
    g2 = {k: v.copy() for k, v in b1.named_grads().items()}    # second call's share
    b1.backward(dy1, c1)
    both = {k: v.copy() for k, v in b1.named_grads().items()}
    model.zero_grad()
    assert all(np.all(g == 0) for g in model.named_grads().values())
    b1.backward(dy1, c1)
    for k, g1 in b1.named_grads().items():                      # accumulated = sum of calls
        np.testing.assert_allclose(both[k], g1 + g2[k], rtol=1e-12, atol=1e-15, err_msg=k)


def test_train_eval_switch_reaches_every_layer(rng):
    block = TransformerBlock(attention_branch(4, 2, rng=rng, dtype=np.float64, dropout=0.5),
                             ffn_branch(4, 6, rng=rng, dtype=np.float64, dropout=0.5))
    block.eval()
    assert all(not layer.training for _, layer in block.named_layers())
    x = x_of(rng, 1, 3, 4)
    np.testing.assert_array_equal(block.forward(x)[0], block.forward(x)[0])
    block.train()
    assert all(layer.training for _, layer in block.named_layers())
    assert not np.array_equal(block.forward(x)[0], block.forward(x)[0])


def test_float32_layers_keep_float32(rng):
    layer = MultiHeadAttention(8, 2, "full", causal=True, rank=2,
                               positions=RoPE(4, dtype=np.float32), rng=rng, dtype=np.float32)
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    y, ctx = layer.forward(x)
    assert y.dtype == np.float32
    assert layer.backward(np.ones_like(y), ctx).dtype == np.float32
    assert all(g.dtype == np.float32 for g in layer.named_grads().values())
    with pytest.raises(TypeError, match="no silent casting"):
        layer.forward(x.astype(np.float64))
