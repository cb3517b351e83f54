"""Position encodings: exact T5 bucket tables (HF ``models/t5/modeling_t5.py``) and ALiBi
slopes (``get_slopes`` of ofirpress/attention_with_linear_biases), the sinusoidal table,
RoPE's relative property, and every scheme's backward."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tinyeff.attention import VARIANTS, full
from tinyeff.nn import (
    ALiBi,
    LearnedPositions,
    MultiHeadAttention,
    RelativePositionBias,
    RoPE,
    SinusoidalPositions,
    alibi_slopes,
    t5_bucket,
)
from tinyeff.nn.positions import clipped_bucket, offsets, sinusoidal_table
from tinyeff.testing import GRAD_FD, check_vjp

from .test_model_gradcheck import model_options
from .test_nn import layer_check

BIDIRECTIONAL = [((0, 0), 0), ((7, 7), 7), ((8, 11), 8), ((12, 15), 9), ((16, 22), 10),
                 ((23, 31), 11), ((32, 45), 12), ((46, 63), 13), ((64, 90), 14),
                 ((91, 2000), 15)]
CAUSAL = [((15, 15), 15), ((16, 18), 16), ((19, 20), 17), ((21, 23), 18), ((24, 26), 19),
          ((27, 30), 20), ((31, 34), 21), ((35, 39), 22), ((40, 45), 23), ((46, 51), 24),
          ((52, 58), 25), ((59, 66), 26), ((67, 76), 27), ((77, 86), 28), ((87, 98), 29),
          ((99, 112), 30), ((113, 2000), 31)]


def test_t5_buckets_bidirectional_table():
    for (lo, hi), bucket in BIDIRECTIONAL:
        a = np.arange(lo, hi + 1)
        np.testing.assert_array_equal(t5_bucket(-a), bucket)              # keys before i
        np.testing.assert_array_equal(t5_bucket(a[a > 0]), bucket + 16)   # keys after i
    np.testing.assert_array_equal(t5_bucket(np.arange(-7, 1)), np.arange(7, -1, -1))
    assert t5_bucket(90) == 30 and t5_bucket(91) == 31


def test_t5_buckets_causal_table():
    np.testing.assert_array_equal(t5_bucket(-np.arange(16), bidirectional=False),
                                  np.arange(16))
    for (lo, hi), bucket in CAUSAL:
        n = -np.arange(lo, hi + 1)
        np.testing.assert_array_equal(t5_bucket(n, bidirectional=False), bucket)
    np.testing.assert_array_equal(t5_bucket(np.arange(1, 50), bidirectional=False), 0)


def test_clipped_buckets():
    np.testing.assert_array_equal(clipped_bucket(np.arange(-5, 6), 2),
                                  [0, 0, 0, 0, 1, 2, 3, 4, 4, 4, 4])


def test_alibi_slopes_official_rule():
    np.testing.assert_allclose(np.log2(alibi_slopes(8)), -np.arange(1, 9))
    np.testing.assert_allclose(np.log2(alibi_slopes(6)), [-2, -4, -6, -8, -1, -3])
    np.testing.assert_allclose(np.log2(alibi_slopes(12)),
                               [-1, -2, -3, -4, -5, -6, -7, -8, -0.5, -1.5, -2.5, -3.5])


def test_offsets_match_the_rel_bias_convention():
    n, m = 3, 5
    off = offsets(n, m)                                          # j − i per slot
    for i in range(n):
        for j in range(m):
            assert off[i - j + m - 1] == j - i


@pytest.mark.parametrize("kind,bidirectional", [("t5", True), ("t5", False), ("clipped", True)])
def test_relative_bias_table_gradient(kind, bidirectional, rng):
    layer = RelativePositionBias(3, kind=kind, bidirectional=bidirectional, max_offset=3,
                                 num_buckets=8, max_distance=20, rng=rng)
    layer_check(layer, {}, rng, options={"n": 9, "m": 9},
                call=lambda lay, n, m: lay.forward(n, m)).assert_ok(GRAD_FD)


def test_relative_bias_equals_the_dense_table_lookup(rng):
    layer = RelativePositionBias(2, kind="t5", rng=rng)
    x = {k: rng.standard_normal((1, 2, 6, 4)) for k in "qkv"}
    rel, _ = layer.forward(6, 6)
    i, j = np.arange(6)[:, None], np.arange(6)[None, :]
    dense = layer.params["table"][:, t5_bucket(j - i)]          # (H, N, N)
    a, _ = full.forward(**x, rel_bias=rel)
    b, _ = full.forward(**x, bias=dense)
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_alibi_bias_values():
    rel, _ = ALiBi(4).forward(3, 3)
    i, j = 2, 0
    assert rel[0, i - j + 2] == pytest.approx(-(2.0 ** -2) * 2)


REL_VARIANTS = [n for n, m in VARIANTS.items() if getattr(m, "SUPPORTS_REL_BIAS", False)]


@pytest.mark.parametrize("scheme", ["t5", "clipped", "alibi"])
@pytest.mark.parametrize("name", REL_VARIANTS)
def test_relative_schemes_reach_every_supporting_variant(name, scheme, rng):
    """Same layer weights with and without the bias: the output changes, and the table
    gradient passes the finite-difference check through the variant."""
    h = 2
    pos = (ALiBi(h) if scheme == "alibi" else
           RelativePositionBias(h, kind=scheme, max_offset=2, rng=rng))
    opts = model_options(name)
    with_bias = MultiHeadAttention(8, h, name, positions=pos, rng=np.random.default_rng(1),
                                   max_len=8, **opts)
    without = MultiHeadAttention(8, h, name, rng=np.random.default_rng(1), max_len=8, **opts)
    x = rng.standard_normal((2, 8, 8))
    assert not np.allclose(with_bias.forward(x)[0], without.forward(x)[0])
    if scheme != "alibi":
        table = pos.params["table"]

        def forward(table_):
            table[...] = table_
            return with_bias.forward(x)

        def backward(dy, ctx):
            with_bias.zero_grad()
            with_bias.backward(dy, ctx)
            return {"table_": pos.grads["table"].copy()}

        check_vjp(forward, backward, {"table_": table.copy()}, rng=rng).assert_ok(GRAD_FD)


def test_sinusoidal_table_values():
    t = sinusoidal_table(10, 6)
    assert t[3, 0] == pytest.approx(math.sin(3))
    assert t[3, 1] == pytest.approx(math.cos(3))
    assert t[3, 4] == pytest.approx(math.sin(3 / 10000 ** (4 / 6)))
    assert t[3, 5] == pytest.approx(math.cos(3 / 10000 ** (4 / 6)))
    layer = SinusoidalPositions(10, 6)
    x = np.random.default_rng(0).standard_normal((2, 4, 6))
    np.testing.assert_allclose(layer.forward(x)[0], x + t[:4])
    with pytest.raises(ValueError, match="exceeds max_len"):
        layer.forward(np.zeros((1, 11, 6)))


def test_learned_positions_gradient(rng):
    layer = LearnedPositions(7, 4, rng=rng)
    layer_check(layer, {"x": rng.standard_normal((2, 5, 4))}, rng).assert_ok(GRAD_FD)
    assert np.all(layer.grads["P"][5:] == 0)                     # rows beyond N untouched


def test_rope_scores_depend_only_on_the_offset(rng):
    rope = RoPE(6)
    q1, k1 = rng.standard_normal((2, 6))
    q = np.tile(q1, (9, 1))                                       # the same vector everywhere
    k = np.tile(k1, (9, 1))
    rq, _ = rope.forward(q)
    rk, _ = rope.forward(k)
    s = rq @ rk.T                                                 # (N, N)
    for d in range(-3, 4):
        diag = np.diagonal(s, offset=d)
        np.testing.assert_allclose(diag, diag[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(rq, axis=-1), np.linalg.norm(q, axis=-1))
    np.testing.assert_allclose(rq[0], q[0])                       # position 0: identity


def test_rope_pairs_are_interleaved():
    rope = RoPE(4, base=100.0)
    x = np.zeros((3, 4))
    x[:, 0] = 1.0
    y, _ = rope.forward(x)
    np.testing.assert_allclose(y[2, :2], [math.cos(2.0), math.sin(2.0)])   # θ_0 = 1
    np.testing.assert_allclose(y[2, 2:], 0)


def test_rope_backward(rng):
    layer_check(RoPE(6), {"x": rng.standard_normal((2, 3, 5, 6))}, rng).assert_ok(GRAD_FD)
    with pytest.raises(ValueError, match="even"):
        RoPE(5)
