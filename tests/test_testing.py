"""The test helpers themselves: the checkers can fail, assert_close is strict."""

from __future__ import annotations

import numpy as np
import pytest

from tinyeff import _checks
from tinyeff.attention import full
from tinyeff.ctx import Ctx
from tinyeff.testing import assert_close, check_elementwise, check_vjp, random_qkv


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
