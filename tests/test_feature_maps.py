"""Feature maps (elu+1, relu+1, FAVOR+ softmax and relu) and the random-feature samplers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tinyeff.ops import feature_maps as fm
from tinyeff.testing import assert_close


def _fmap(kind, rng, d=4, m=7, scale=0.5):
    omega = None if kind in ("elu", "relu") else rng.standard_normal((m, d))
    return fm.FeatureMap(kind=kind, omega=omega, scale=scale, kernel_eps=1e-3)


@pytest.mark.parametrize("kind", fm.KINDS)
def test_backward_matches_finite_differences(kind, rng):
    """⟨g, f(x+εu) − f(x−εu)⟩/2ε with the stabilizer c held at its value at x (a constant)."""
    fmap = _fmap(kind, rng)
    x = rng.standard_normal((2, 5, 4))
    f, ell = fmap.forward(x)
    g = rng.standard_normal(f.shape)
    dx = fmap.backward(g, f, x)
    eps = 1e-6
    for _ in range(3):
        u = rng.standard_normal(x.shape)
        vals = []
        for sign in (1, -1):
            fp, ellp = fmap.forward(x + sign * eps * u)
            if ell is not None:                    # exp(a − c0) = f · exp(ℓ − ℓ0)
                fp = fp * np.exp(ellp - ell)[..., None]
            vals.append(np.sum(g * fp))
        lhs = (vals[0] - vals[1]) / (2 * eps)
        rhs = np.sum(u * dx)
        assert abs(lhs - rhs) <= 1e-7 * max(abs(lhs), abs(rhs), 1), (kind, lhs, rhs)


def test_elu_and_relu_values():
    x = np.array([-2.0, -0.5, 0.0, 0.5, 3.0])
    assert_close(fm.elu_plus_one(x), np.array([np.exp(-2), np.exp(-0.5), 1.0, 1.5, 4.0]))
    assert_close(fm.relu_plus_one(x), np.array([1.0, 1.0, 1.0, 1.5, 4.0]))


def test_favor_softmax_equals_unstabilized_formula(rng):
    d, m, scale = 6, 9, 1 / math.sqrt(6)
    omega = rng.standard_normal((m, d))
    x = rng.standard_normal((3, 4, d))
    f, ell = fm.favor_softmax(x, omega, scale)
    xh = x * math.sqrt(scale)
    direct = np.exp(xh @ omega.T - 0.5 * np.sum(xh**2, -1, keepdims=True)) / math.sqrt(m)
    assert_close(f * np.exp(ell)[..., None], direct)
    assert np.all(f <= 1) and np.all(f.max(-1) == 1)


def test_favor_softmax_no_overflow_for_norm_100_in_float32(rng):
    d, m = 64, 266
    omega = fm.orthogonal_features(rng, m, d, np.float32)
    x = rng.standard_normal((2, 8, d)).astype(np.float32)
    x *= 100 / np.linalg.norm(x, axis=-1, keepdims=True)
    f, ell = fm.favor_softmax(x, omega, 1 / math.sqrt(d))
    assert f.dtype == np.float32 and ell.dtype == np.float32
    assert np.all(np.isfinite(f)) and np.all(np.isfinite(ell))
    df = fm.favor_softmax_backward(np.ones_like(f), f, x, omega, 1 / math.sqrt(d))
    assert np.all(np.isfinite(df))


def test_positive_features_are_unbiased(rng):
    """E_ω[φ(q)·φ(k)] = exp(q·k·scale): average over many i.i.d. draws."""
    d, scale = 4, 0.5
    q, k = rng.standard_normal(d) * 0.6, rng.standard_normal(d) * 0.6
    omega = fm.gaussian_features(rng, 200_000, d)
    fq, lq = fm.favor_softmax(q[None], omega, scale)
    fk, lk = fm.favor_softmax(k[None], omega, scale)
    est = float((fq @ fk.T)[0, 0] * np.exp(lq[0] + lk[0]))
    assert est == pytest.approx(math.exp(q @ k * scale), rel=0.02)


@pytest.mark.parametrize("m,d", [(8, 8), (20, 8), (5, 8), (1, 3)])
def test_orthogonal_blocks(m, d, rng):
    w = fm.orthogonal_features(rng, m, d, scaling="sqrt_d")
    assert w.shape == (m, d)
    assert_close(np.linalg.norm(w, axis=1), np.full(m, math.sqrt(d)))
    for start in range(0, m, d):
        block = w[start:start + d]
        gram = block @ block.T
        assert_close(gram, d * np.eye(len(block)), atol=1e-10)


def test_orthogonal_chi_norms_and_reproducibility():
    d, m = 16, 4000
    w = fm.orthogonal_features(np.random.default_rng(3), m, d)
    norms2 = np.sum(w**2, axis=1)                  # chi²_d: mean d, variance 2d
    assert norms2.mean() == pytest.approx(d, rel=0.03)
    assert norms2.var() == pytest.approx(2 * d, rel=0.15)
    w2 = fm.orthogonal_features(np.random.default_rng(3), m, d)
    np.testing.assert_array_equal(w, w2)
    assert fm.orthogonal_features(np.random.default_rng(3), 5, d, np.float32).dtype == np.float32


def test_sampler_errors(rng):
    with pytest.raises(TypeError, match="Generator"):
        fm.gaussian_features(0, 3, 4)
    with pytest.raises(ValueError, match="scaling"):
        fm.orthogonal_features(rng, 3, 4, scaling="unit")


def test_default_num_features():
    assert fm.default_num_features(64) == 266     # ⌊64 ln 64⌋, performer-pytorch's default
    assert fm.default_num_features(1) == 1
