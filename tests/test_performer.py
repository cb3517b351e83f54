"""Performer (FAVOR+): convergence to full, exact stabilizer cancellation, prefix safety,
extreme inputs, parity of the Numba path, random options."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tinyeff.attention import _linear_engine as engine
from tinyeff.attention import full, linear, performer
from tinyeff.kernels._jit import num_threads
from tinyeff.testing import GRAD_FD, assert_close, check_vjp, random_qkv


def _omega(seed, d, m, orthogonal=True, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return performer.draw_random_options(rng, d, dtype, m=m, orthogonal=orthogonal)["features"]


def _small_inputs(rng, d=8, n=16, scale_qk=0.5):
    x = random_qkv(rng, (2, 2), n=n, d=d, dv=4)
    x["q"] *= scale_qk
    x["k"] *= scale_qk
    return x


def _rms_error(x, ref, m, orthogonal, draws, causal=False):
    d = x["q"].shape[-1]
    errs = []
    for s in range(draws):
        out, _ = performer.forward(**x, features=_omega(1000 * m + s, d, m, orthogonal),
                                   causal=causal)
        errs.append(np.sqrt(np.mean((out - ref) ** 2)))
    return float(np.mean(errs))


@pytest.mark.parametrize("causal", [False, True])
def test_error_against_full_falls_like_one_over_sqrt_m(causal, rng):
    x = _small_inputs(rng)
    ref, _ = full.forward(**x, causal=causal)
    errs = {m: _rms_error(x, ref, m, False, 20, causal) for m in (32, 128, 512, 2048)}
    assert errs[32] > errs[128] > errs[512] > errs[2048]
    ratio = errs[128] / errs[2048]                                 # 16× the features: ~4×
    assert 2.5 < ratio < 6.5, errs


def test_orthogonal_features_beat_iid(rng):
    x = _small_inputs(rng, d=16)
    ref, _ = full.forward(**x)
    iid = _rms_error(x, ref, 16, False, 40)
    orth = _rms_error(x, ref, 16, True, 40)
    assert orth < 0.95 * iid, (orth, iid)


def unstabilized(q, k, v, omega, scale, causal=False, eps=0.0, pad=None):
    """The textbook estimator, no max shifts: φ(x)_f = m^(−1/2) exp(ω_f·x̂ − ‖x̂‖²/2)."""
    def phi(x):
        xh = x * math.sqrt(scale)
        return np.exp(xh @ omega.T - 0.5 * np.sum(xh**2, -1, keepdims=True)) / math.sqrt(
            omega.shape[0])
    a = phi(q) @ phi(k).swapaxes(-1, -2)                           # (..., N, M)
    if causal:
        a = a * np.tri(q.shape[-2], k.shape[-2])
    if pad is not None:
        a = a * pad[..., None, :]
    return (a @ v) / (a.sum(-1, keepdims=True) + eps)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("eps", [0.0, 1e-3])
@pytest.mark.parametrize("impl", ["ref", "numba"])
def test_stabilizer_cancels_exactly(causal, eps, impl, rng):
    x = random_qkv(rng, (2, 2), n=9, m=11, d=6, dv=3)
    x["k"] *= 1.5                       # keys of different norms: the running max moves
    omega = _omega(7, 6, 13)
    pad = rng.random((2, 1, 11)) < 0.8
    pad[..., 0] = True
    out, _ = performer.forward(**x, features=omega, causal=causal, eps=eps, key_padding_mask=pad,
                               impl=impl)
    ref = unstabilized(**x, omega=omega, scale=1 / math.sqrt(6), causal=causal, eps=eps,
                       pad=pad)
    assert_close(out, ref, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("impl", ["ref", "numba"])
def test_causal_outputs_never_see_the_future(impl, rng, monkeypatch):
    """performer-pytorch #82: a huge later key must not change earlier rows.

    Not compared bit for bit: BLAS may round ω x̂ differently for a different number of
    rows.  A leak through the stabilizer would show at the eps or underflow level, far
    above 1e-12."""
    monkeypatch.setattr(engine, "CHUNK", 4)
    x = random_qkv(rng, (2, 2), n=12, d=8, dv=3)
    x["k"][..., 7, :] *= 30                                        # dominates any global max
    omega = _omega(3, 8, 20)
    out, _ = performer.forward(**x, features=omega, causal=True, impl=impl, eps=1e-3)
    for t in (1, 5, 7, 11):
        part, _ = performer.forward(**{a: b[..., :t, :] for a, b in x.items()},
                                    features=omega, causal=True, impl=impl, eps=1e-3)
        assert_close(part, out[..., :t, :], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_large_inputs_stay_finite(dtype, causal, kernel, rng):
    d = 16
    x = random_qkv(rng, (2, 2), n=10, d=d, dv=4, dtype=dtype)
    omega = _omega(1, d, 40, dtype=dtype)
    for factor in ("x10", "norm100"):
        y = dict(x)
        for a in "qk":
            y[a] = (x[a] * 10 if factor == "x10"
                    else x[a] * (100 / np.linalg.norm(x[a], axis=-1, keepdims=True))).astype(dtype)
        out, ctx = performer.forward(**y, features=omega, causal=causal, kernel=kernel)
        assert out.dtype == dtype and np.all(np.isfinite(out)), factor
        if factor == "norm100" and dtype == np.float32 and kernel == "softmax":
            continue    # documented limit: the backward may overflow (module docstring)
        g = performer.backward(np.ones_like(out), ctx)
        assert all(np.all(np.isfinite(a)) for a in g.values()), factor


def test_x10_inputs_still_equal_the_estimator_in_float64(rng):
    x = random_qkv(rng, (1, 2), n=8, d=8, dv=3)
    x["q"] *= 10
    x["k"] *= 10
    omega = _omega(2, 8, 32)
    out, _ = performer.forward(**x, features=omega)
    # the textbook form underflows here (exp(−400)); compare in log space instead
    xh = {a: x[a] * 8 ** -0.25 for a in "qk"}
    lq = xh["q"] @ omega.T - 0.5 * np.sum(xh["q"] ** 2, -1, keepdims=True)
    lk = xh["k"] @ omega.T - 0.5 * np.sum(xh["k"] ** 2, -1, keepdims=True)
    logw = np.logaddexp.reduce(lq[..., :, None, :] + lk[..., None, :, :], axis=-1)  # (.., N, M)
    w = np.exp(logw - logw.max(-1, keepdims=True))
    assert_close(out, (w @ x["v"]) / w.sum(-1, keepdims=True), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 4, 64])
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_mode", ["exact", "values_only"])
def test_numba_matches_reference_and_crosswires(chunk, kernel, causal, mask_mode, rng,
                                                monkeypatch):
    """Every path: the chunked kernels and, non-causal softmax, the fused ones (chunk 4:
    keys in two ranges whose maxima differ, combined by rescaling)."""
    monkeypatch.setattr(engine, "CHUNK", chunk)
    monkeypatch.setattr(engine, "CHUNK_FUSED", chunk)
    monkeypatch.setattr(engine, "CHUNK_FAVOR", chunk)
    n, m = (1, 1) if chunk == 1 else (9, 7)
    x = random_qkv(rng, (2, 2), n=n, m=m, d=5, dv=3)
    x["k"] *= np.linspace(0.5, 2, m)[:, None]                      # growing norms: rescaling
    opts = {"features": _omega(0, 5, 11), "kernel": kernel, "causal": causal,
            "key_padding_mask": rng.random((2, 2, m)) < 0.8, "mask_mode": mask_mode,
            "normalize": chunk != 64}
    out_r, ctx_r = performer.forward(**x, **opts, impl="ref")
    out_n, ctx_n = performer.forward(**x, **opts, impl="numba")
    assert_close(out_n, out_r)
    dout = rng.standard_normal(out_r.shape)
    ref = performer._backward_ref
    g_ref = engine.attend_backward(dout, ctx_r, "ref", backward_ref=ref)
    assert_close(engine.attend_backward(dout, ctx_r, "numba", backward_ref=ref), g_ref)
    assert_close(performer.backward(dout, ctx_n), g_ref)


@pytest.mark.numba_threads
@pytest.mark.parametrize("causal", [False, True])
def test_one_and_two_threads_bit_identical(causal, rng, monkeypatch):
    monkeypatch.setattr(engine, "CHUNK", 6)
    monkeypatch.setattr(engine, "CHUNK_FAVOR", 2)                  # 7 chunks, 7 ranges
    x = random_qkv(rng, (2, 3), n=14, d=4, dv=3)
    x["k"] *= np.linspace(0.5, 3, 14)[:, None]
    dout = rng.standard_normal((2, 3, 14, 3))
    res = []
    for threads in (1, 2):
        with num_threads(threads):
            out, ctx = performer.forward(**x, features=_omega(0, 4, 9), causal=causal)
            res.append((out, performer.backward(dout, ctx)))
    np.testing.assert_array_equal(res[0][0], res[1][0])
    for name in "qkv":
        np.testing.assert_array_equal(res[0][1][name], res[1][1][name])


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_large_norm(causal, rng, monkeypatch):
    """Gradients stay exact when the stabilizers are far from 0 (keys of norm ~10; the
    fused non-causal path with its keys in three ranges)."""
    monkeypatch.setattr(engine, "CHUNK_FAVOR", 2)
    x = random_qkv(rng, (1, 2), n=6, d=4, dv=2)
    x["k"] *= 4
    check_vjp(performer.forward, performer.backward, x,
              {"features": _omega(5, 4, 6), "causal": causal}, rng=rng).assert_ok(GRAD_FD)


def test_values_only_keeps_padded_keys_in_the_denominator(rng):
    x = random_qkv(rng, (2,), n=5, m=7, d=4, dv=2)
    omega = _omega(0, 4, 8)
    pad = (np.arange(7) < 4)[None, :]                              # (1, M)
    vo, _ = performer.forward(**x, features=omega, key_padding_mask=pad, mask_mode="values_only")
    v0 = x["v"] * pad[0, :, None]
    assert_close(vo, unstabilized(x["q"], x["k"], v0, omega, 0.5))
    ex, _ = performer.forward(**x, features=omega, key_padding_mask=pad)
    trimmed, _ = performer.forward(x["q"], x["k"][:, :4], x["v"][:, :4], features=omega)
    assert_close(ex, trimmed)


def test_relu_kernel_formula_and_identity_features(rng):
    x = random_qkv(rng, (2,), n=5, d=4, dv=3)
    omega = _omega(0, 4, 6)
    out, _ = performer.forward(**x, features=omega, kernel="relu", kernel_eps=0.01)
    phi = {a: np.maximum((x[a] * 0.5 ** 0.5) @ omega.T, 0) + 0.01 for a in "qk"}
    a = phi["q"] @ phi["k"].swapaxes(-1, -2)
    assert_close(out, (a @ x["v"]) / a.sum(-1, keepdims=True))
    out_i, _ = performer.forward(**x, kernel="relu", scale=1.0)
    out_e, _ = performer.forward(**x, kernel="relu", scale=1.0, features=np.eye(4))
    assert_close(out_i, out_e)


def test_draw_random_options(rng):
    opts = performer.draw_random_options(np.random.default_rng(0), 64, np.float32,
                                         causal=True, kernel="relu")   # other options ignored
    assert opts["features"].shape == (266, 64) and opts["features"].dtype == np.float32
    again = performer.draw_random_options(np.random.default_rng(0), 64, np.float32)
    np.testing.assert_array_equal(opts["features"], again["features"])
    iid = performer.draw_random_options(rng, 8, m=5, orthogonal=False)["features"]
    assert iid.shape == (5, 8)


def test_invalid_input(rng):
    x = random_qkv(rng, (2,), n=4, d=3)
    with pytest.raises(ValueError, match="features"):
        performer.forward(**x)
    with pytest.raises(TypeError, match="features"):
        performer.forward(**x, features=np.ones((5, 3), np.float32))
    with pytest.raises(ValueError, match="features"):
        performer.forward(**x, features=np.ones((5, 4)))
    with pytest.raises(ValueError, match="features"):
        performer.forward(**x, features=np.full((5, 3), np.nan))
    with pytest.raises(ValueError, match="kernel"):
        performer.forward(**x, features=np.ones((5, 3)), kernel="exp")
    with pytest.raises(TypeError, match="ctx"):
        out, ctx = full.forward(**x)
        performer.backward(out, ctx)


@pytest.mark.parametrize("case_index", range(9))
def test_reference_in_this_module_is_the_engine_on_favor_features(case_index, rng):
    """performer._forward_ref/_backward_ref (the FAVOR+ specification, read top to bottom)
    give the bits of linear's generic reference on the same feature map, and impl="ref"
    runs them."""
    case = performer.example_cases(np.random.default_rng(3))[case_index]
    calls = []

    def spy(fn):
        def wrapped(*args):
            calls.append(fn.__name__)
            return fn(*args)
        return wrapped

    opts = {**case.options, "impl": "ref"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(performer, "_forward_ref", spy(performer._forward_ref))
        mp.setattr(performer, "_backward_ref", spy(performer._backward_ref))
        out, ctx = performer.forward(**case.args, **opts)
        dout = rng.standard_normal(out.shape)
        grads = performer.backward(dout, ctx)
    assert calls == ["_forward_ref", "_backward_ref"]
    a = case.args
    fmap, mask = ctx.fmap, ctx.key_padding_mask
    want = linear._forward_ref(a["q"], a["k"], a["v"], fmap, ctx.causal, mask,
                               ctx.mask_mode)
    got = performer._forward_ref(a["q"], a["k"], a["v"], fmap, ctx.causal, mask, ctx.mask_mode)
    for x, y in zip(got, want):
        if y is None:
            assert x is None
        else:
            np.testing.assert_array_equal(x, y)
    generic = linear._backward_ref(dout, ctx)
    for name in ("q", "k", "v"):
        np.testing.assert_array_equal(grads[name], generic[name])
