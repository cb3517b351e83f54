"""The test helpers themselves: the checkers can fail, assert_close is strict."""

from __future__ import annotations

import numpy as np
import pytest

from tinyeff import _checks
from tinyeff.attention import full
from tinyeff.ctx import Ctx
from tinyeff.testing import GRAD_FD, assert_close, check_elementwise, check_vjp, random_qkv
from tinyeff.testing.gradcheck import default_vjp_atol


def test_elementwise_check_passes_and_reports_worst_index(rng):
    x = random_qkv(rng, (1,), n=3, m=4, d=2)
    report = check_elementwise(full.forward, full.backward, x, {"causal": True}, rng=rng)
    assert report.max() < 1e-7
    assert set(report.worst) == {"q", "k", "v"}
    assert "argument" in str(report)


def test_elementwise_check_catches_a_wrong_backward(rng):
    x = random_qkv(rng, (1,), n=3, d=2)

    def wrong(dout, ctx):
        g = full.backward(dout, ctx)
        g["k"] = g["k"] + 1e-3
        return g

    report = check_elementwise(full.forward, wrong, x, rng=rng)
    assert report.errors["k"] > 1e-4
    with pytest.raises(AssertionError, match="k"):
        report.assert_ok()


def test_vjp_check_rejects_missing_or_misshapen_gradients(rng):
    x = random_qkv(rng, (1,), n=3, d=2)
    with pytest.raises(AssertionError, match="expected exactly"):
        check_vjp(full.forward, lambda d, c: {"q": full.backward(d, c)["q"]}, x, rng=rng)
    with pytest.raises(TypeError, match="float64"):
        check_vjp(full.forward, full.backward, random_qkv(rng, dtype=np.float32), rng=rng)


def test_vjp_check_detects_a_changed_invariant(rng):
    x = random_qkv(rng, (1,), n=3, d=2)
    calls = iter(range(100))
    with pytest.raises(AssertionError, match="non-differentiable"):
        check_vjp(full.forward, full.backward, x, rng=rng,
                  invariant=lambda ctx: np.array(next(calls)))


def _softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _shifted_forward(x, b, v):
    """softmax(x + b) @ v with b a per-row shift (N, 1): softmax is shift invariant, so the
    gradient of b is zero by structure (its backward gives rounding residues ~1e-17)."""
    p = _softmax(x + b)
    return p @ v, (p, v)


def _shifted_backward(g, ctx):
    p, v = ctx
    dp = g @ v.T                                       # out = p @ v
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))    # p = softmax(x + b)
    return {"x": ds, "b": ds.sum(-1, keepdims=True), "v": p.T @ g}


def _shifted_args(rng, n=4, m=5, d=3, v_scale=1.0):
    return {"x": 3 * rng.standard_normal((n, m)), "b": rng.standard_normal((n, 1)),
            "v": v_scale * rng.standard_normal((m, d))}


@pytest.mark.parametrize("v_scale", [1e-2, 1.0, 1e3])
def test_vjp_check_passes_a_structurally_zero_gradient(v_scale):
    """The absolute floor: b's gradient is 0 by structure; FD and analytic are both rounding
    residues.  Without the floor (atol=0) their relative error is O(1) on some draw."""
    bare = 0.0
    for seed in range(10):
        args = _shifted_args(np.random.default_rng(seed), v_scale=v_scale)
        report = check_vjp(_shifted_forward, _shifted_backward, args,
                           rng=np.random.default_rng(seed))
        report.assert_ok(GRAD_FD)
        bare = max(bare, check_vjp(_shifted_forward, _shifted_backward, args, atol=0.0,
                                   rng=np.random.default_rng(seed)).errors["b"])
    assert bare > 1e-3, bare                           # the floor is what makes it pass


def test_vjp_check_passes_linear_attention_with_one_feature():
    """linear with D = 1: φ(q) cancels in the normalized output, dq lives in the eps term
    (the case tests/test_fuzz.py had to skip): atol=0 reports ~1e-3, the floor passes it."""
    from tinyeff.attention import linear

    bare = 0.0
    for seed in range(5):
        x = random_qkv(np.random.default_rng(seed), (1, 2), n=5, d=1)
        check_vjp(linear.forward, linear.backward, x,
                  rng=np.random.default_rng(seed)).assert_ok(GRAD_FD)
        bare = max(bare, check_vjp(linear.forward, linear.backward, x, atol=0.0,
                                   rng=np.random.default_rng(seed)).errors["q"])
    assert bare > GRAD_FD


def test_vjp_check_passes_an_argument_the_output_ignores(rng):
    """FD and analytic both exactly 0: error 0 (not 0/0)."""
    def forward(x, z):
        return 2.0 * x, None

    def backward(g, ctx):
        return {"x": 2.0 * g, "z": np.zeros((3,))}

    report = check_vjp(forward, backward, {"x": rng.standard_normal((2, 3)),
                                           "z": rng.standard_normal(3)}, rng=rng)
    assert report.errors == {"x": report.errors["x"], "z": 0.0}
    assert report.errors["x"] < 1e-9


@pytest.mark.parametrize("size", [1e-4, 1e-5, 1e-6])
def test_vjp_check_catches_a_small_wrong_gradient_where_the_true_one_is_zero(size):
    """Negative control for the floor: a gradient that should be 0 but is ``size``·noise
    (far below the O(1) gradients of x and v) is still reported."""
    def wrong(g, ctx):
        grads = _shifted_backward(g, ctx)
        grads["b"] = grads["b"] + size * np.random.default_rng(1).standard_normal((4, 1))
        return grads

    for seed in range(5):
        args = _shifted_args(np.random.default_rng(seed))
        report = check_vjp(_shifted_forward, wrong, args, rng=np.random.default_rng(seed))
        assert report.errors["b"] > GRAD_FD, (seed, report)
        assert report.errors["x"] <= GRAD_FD and report.errors["v"] <= GRAD_FD
        with pytest.raises(AssertionError, match="b"):
            report.assert_ok(GRAD_FD)


def test_vjp_check_catches_a_slightly_scaled_gradient():
    """A 0.1 % error in an ordinary gradient reports ~1e-3 (the floor is far below it)."""
    def wrong(g, ctx):
        grads = _shifted_backward(g, ctx)
        grads["x"] = grads["x"] * 1.001
        return grads

    for seed in range(5):
        args = _shifted_args(np.random.default_rng(seed))
        report = check_vjp(_shifted_forward, wrong, args, rng=np.random.default_rng(seed))
        assert report.errors["x"] > 1e-4, report


def test_vjp_check_reports_non_finite_gradients_and_validates_atol(rng):
    def nan_backward(g, ctx):
        grads = _shifted_backward(g, ctx)
        grads["v"] = grads["v"] * np.nan
        return grads

    args = _shifted_args(rng)
    report = check_vjp(_shifted_forward, nan_backward, args, rng=rng)
    assert report.errors["v"] == np.inf and not report.ok()
    assert report.worst["v"][0].startswith("direction")
    with pytest.raises(ValueError, match="atol"):
        check_vjp(_shifted_forward, _shifted_backward, args, rng=rng, atol=-1.0)


def test_default_vjp_atol_is_documented_value():
    assert default_vjp_atol() == pytest.approx(100 * np.finfo(np.float64).eps / 1e-12)
    assert default_vjp_atol() == pytest.approx(2.22e-2, rel=1e-3)
    assert default_vjp_atol(np.float32) > default_vjp_atol(np.float64)


def test_assert_close_is_strict_about_dtype_and_shape():
    a = np.zeros(3)
    with pytest.raises(AssertionError):
        assert_close(a.astype(np.float32), a)
    with pytest.raises(AssertionError):
        assert_close(a[None], a)
    with pytest.raises(AssertionError, match="keys"):
        assert_close({"q": a}, {"q": a, "k": a})
    assert_close({"q": a}, {"q": a + 1e-13})


def test_reduce_to_shape_is_the_backward_of_broadcasting(rng):
    g = rng.standard_normal((2, 3, 4, 5))
    for shape in [(4, 5), (1, 5), (3, 1, 5), (2, 1, 4, 1), (1, 1, 1, 1)]:
        r = _checks.reduce_to_shape(g, shape)
        assert r.shape == shape
        x = rng.standard_normal(shape)
        # <g, broadcast(x)> == <reduce(g), x>
        assert np.isclose(np.sum(g * np.broadcast_to(x, g.shape)), np.sum(r * x))


def test_ctx_arrays_and_nbytes(rng):
    x = random_qkv(rng, (2,), n=4, m=6, d=3)
    _, ctx = full.forward(**x)
    assert isinstance(ctx, Ctx)
    names = set(ctx.arrays())
    assert {"q", "k", "v", "p", "lse"} <= names
    assert ctx.nbytes() == sum(a.nbytes for a in ctx.arrays().values())
