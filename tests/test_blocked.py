"""full(impl="blocked"): the FlashAttention kernel against the NumPy reference.

Small shapes with a tiny tile (so every test crosses several query and key tiles, ragged
edges included); parity with the reference in both dtypes, crossed implementations,
float64 gradient checks, bit identity across thread counts and backward schedules, and
O(N) memory.
"""

from __future__ import annotations

import tracemalloc

import numba
import numpy as np
import pytest

from tinyeff.attention import full
from tinyeff.kernels import _math
from tinyeff.kernels._jit import num_threads
from tinyeff.testing import GRAD_FD, assert_close, check_vjp, random_qkv


@pytest.fixture(autouse=True)
def small_tile(monkeypatch):
    monkeypatch.setattr(full, "BLOCKED_TILE", 4)
    monkeypatch.setattr(full, "BLOCKED_BAND", 3)   # causal diagonal tiles: bands 3 + 1


def _inputs(rng, n=9, m=11, dtype=np.float64, batch=(2, 3)):
    x = random_qkv(rng, batch, n=n, m=m, d=5, dv=3, dtype=dtype)
    kpad = rng.random((batch[0], 1, m)) < 0.7
    kpad[0, 0, :] = False                          # batch 0: every key padded
    rel = rng.standard_normal((batch[-1], n + m - 1)).astype(dtype)
    return x, kpad, rel


def _options(kpad, rel):
    return {
        "plain": {},
        "causal": {"causal": True},
        "kpad": {"key_padding_mask": kpad},
        "rel": {"rel_bias": rel, "scale": 0.6},
        "all": {"causal": True, "key_padding_mask": kpad, "rel_bias": rel},
    }


OPTION_NAMES = ["plain", "causal", "kpad", "rel", "all"]
SHAPES = [(9, 11), (11, 9), (8, 8), (1, 5), (5, 1)]


def _split_args(opts):
    """rel_bias is differentiable: it goes with q, k, v in the gradient check."""
    args = {k: v for k, v in opts.items() if k == "rel_bias"}
    return args, {k: v for k, v in opts.items() if k != "rel_bias"}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n,m", SHAPES)
@pytest.mark.parametrize("opt", OPTION_NAMES)
def test_matches_reference(opt, n, m, dtype, rng):
    x, kpad, rel = _inputs(rng, n, m, dtype)
    opts = _options(kpad, rel)[opt]
    out_r, ctx_r = full.forward(**x, impl="ref", **opts)
    out_b, ctx_b = full.forward(**x, impl="blocked", **opts)
    assert ctx_b.impl == "blocked" and ctx_b.p is None
    assert_close(out_b, out_r)
    assert_close(ctx_b.lse, ctx_r.lse)
    dout = rng.standard_normal(out_r.shape).astype(dtype)
    g_r = full.backward(dout, ctx_r)
    for schedule in ("fused", "split"):
        assert_close(full._backward_blocked(dout, ctx_b, schedule), g_r, err_msg=schedule)
    # crossed: blocked forward + reference backward, reference forward + blocked backward
    assert_close(full.backward(dout, ctx_b, impl="ref"), g_r)
    assert_close(full.backward(dout, ctx_r, impl="blocked"), g_r)


@pytest.mark.parametrize("band", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("n,m", [(9, 11), (11, 9), (8, 8)])
def test_causal_diagonal_bands_match_reference(band, n, m, monkeypatch, rng):
    """A causal diagonal tile taken in bands of keys, each against the queries that see it:
    every band width (1, ragged 3, 4 = the whole tile of 4, 5 > tile) and both backward
    schedules agree with the reference, and with the tile taken whole to float rounding."""
    monkeypatch.setattr(full, "BLOCKED_BAND", band)
    x, kpad, rel = _inputs(rng, n, m)
    opts = _options(kpad, rel)["all"]
    out_r, ctx_r = full.forward(**x, impl="ref", **opts)
    out_b, ctx_b = full.forward(**x, impl="blocked", **opts)
    assert ctx_b.band == band
    assert_close(out_b, out_r)
    assert_close(ctx_b.lse, ctx_r.lse)
    dout = rng.standard_normal(out_r.shape)
    g_r = full.backward(dout, ctx_r)
    for schedule in ("fused", "split"):
        assert_close(full._backward_blocked(dout, ctx_b, schedule), g_r, err_msg=schedule)


@pytest.mark.parametrize("scale", [0.7, 0.0, -0.9])
@pytest.mark.parametrize("opt", ["plain", "causal"])
def test_any_scale_sign_matches_reference(scale, opt, rng):
    """Unmasked tiles with scale > 0 take max_j S_raw · scale and form S in the exp pass;
    scale 0 and scale < 0 (where that max would be the minimum, and exp would overflow on
    these logits of several hundred) take the logits pass."""
    x, kpad, rel = _inputs(rng)
    x = {**x, "q": x["q"] * 60}                    # |S| up to about 10³
    opts = {**_options(kpad, rel)[opt], "scale": scale}
    out_r, ctx_r = full.forward(**x, impl="ref", **opts)
    out_b, ctx_b = full.forward(**x, impl="blocked", **opts)
    assert_close(out_b, out_r)
    assert_close(ctx_b.lse, ctx_r.lse)
    dout = rng.standard_normal(out_r.shape)
    assert_close(full.backward(dout, ctx_b), full.backward(dout, ctx_r))


@pytest.mark.parametrize("opt", OPTION_NAMES)
def test_gradcheck_float64(opt, rng):
    x, kpad, rel = _inputs(rng, 7, 10)
    args, opts = _split_args(_options(kpad, rel)[opt])
    check_vjp(full.forward, full.backward, {**x, **args}, {**opts, "impl": "blocked"},
              rng=rng).assert_ok(GRAD_FD)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")
@pytest.mark.parametrize("opt", ["plain", "all"])
def test_bit_identical_across_threads_and_schedules(opt, rng):
    x, kpad, rel = _inputs(rng, 13, 10, batch=(3,))
    opts = _options(kpad[:, 0], rel)[opt]
    results = []
    for threads in (1, 2):
        with num_threads(threads):
            out, ctx = full.forward(**x, impl="blocked", **opts)
            dout = np.linspace(-1, 1, out.size).reshape(out.shape)
            for schedule in ("fused", "split"):
                results.append((out, ctx.lse, full._backward_blocked(dout, ctx, schedule)))
    out0, lse0, g0 = results[0]
    for out, lse, g in results[1:]:
        np.testing.assert_array_equal(out, out0)
        np.testing.assert_array_equal(lse, lse0)
        for name in g0:
            np.testing.assert_array_equal(g[name], g0[name], err_msg=name)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")
@pytest.mark.parametrize("n,m,batch", [(3, 2, (1,)), (6, 5, (1,)), (9, 11, (5,))])
def test_bit_identical_across_threads_for_any_task_count(n, m, batch, rng):
    """Fewer tasks than threads (one tile, one head), a few, and an odd number per pass:
    every split of the tasks into per-thread blocks gives the same bits, rel_bias too."""
    x, kpad, rel = _inputs(rng, n, m, batch=batch)
    opts = _options(kpad[:, 0], rel[:1])["all"]
    results = []
    for threads in (1, 2):
        with num_threads(threads):
            out, ctx = full.forward(**x, impl="blocked", **opts)
            dout = np.linspace(-1, 1, out.size).reshape(out.shape)
            for schedule in ("fused", "split"):
                results.append((out, ctx.lse, full._backward_blocked(dout, ctx, schedule)))
    out0, lse0, g0 = results[0]
    assert set(g0) == {"q", "k", "v", "rel_bias"}
    for out, lse, g in results[1:]:
        np.testing.assert_array_equal(out, out0)
        np.testing.assert_array_equal(lse, lse0)
        for name in g0:
            np.testing.assert_array_equal(g[name], g0[name], err_msg=name)


@pytest.mark.skipif(numba.config.DISABLE_JIT, reason="NUMBA_DISABLE_JIT: nothing is compiled")
def test_kernels_are_serial_over_task_ranges():
    """No ``prange`` kernel (each compiles a gufunc of its own, kernels/_jit.py): every
    compiled function of the module is ``serial`` and the passes are plain Python."""
    from numba.core.registry import CPUDispatcher

    from tinyeff.kernels import blocked
    compiled = {name: f for name, f in vars(blocked).items()
                if isinstance(f, CPUDispatcher) and f.py_func.__module__ == blocked.__name__}
    assert "_fwd_tasks" in compiled and "_rel_tasks" in compiled
    for name, f in compiled.items():
        assert not f.targetoptions.get("parallel"), name
        assert f.targetoptions.get("nogil"), name
    for name in ("flash_fwd", "flash_bwd_dq", "flash_bwd_dkdv", "flash_bwd_fused",
                 "flash_bwd_rel_parts"):
        assert name not in compiled, name


def test_fully_masked_rows_give_zero_output_and_gradient(rng):
    x, kpad, _ = _inputs(rng)
    out, ctx = full.forward(**x, key_padding_mask=kpad, impl="blocked")
    assert np.all(out[0] == 0) and np.all(ctx.lse[0] == -np.inf)
    g = full.backward(rng.standard_normal(out.shape), ctx)
    assert np.all(g["q"][0] == 0) and np.all(g["k"][0] == 0) and np.all(g["v"][0] == 0)
    assert all(np.all(np.isfinite(a)) for a in g.values())


def test_empty_axes(rng):
    for n, m in ((0, 4), (3, 0)):
        x = random_qkv(rng, (2,), n=n, m=m, d=3, dv=2)
        out_b, ctx_b = full.forward(**x, impl="blocked")
        out_r, ctx_r = full.forward(**x, impl="ref")
        assert_close(out_b, out_r)
        dout = np.ones_like(out_b)
        assert_close(full.backward(dout, ctx_b), full.backward(dout, ctx_r))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_logits_stay_finite_and_match(dtype, rng):
    x = random_qkv(rng, (2,), n=9, d=4, dtype=dtype)
    x["q"] = (x["q"] * 1e4).astype(dtype)
    out_b, ctx_b = full.forward(**x, causal=True, scale=1.0, impl="blocked")
    out_r, _ = full.forward(**x, causal=True, scale=1.0, impl="ref")
    g = full.backward(np.ones_like(out_b), ctx_b)
    assert np.all(np.isfinite(out_b)) and all(np.all(np.isfinite(a)) for a in g.values())
    assert_close(out_b, out_r)


def test_nan_propagates_only_to_its_row(rng):
    x = random_qkv(rng, (1,), n=9, m=9)
    x["q"] = x["q"].copy()
    x["q"][0, 5, 1] = np.nan
    out, _ = full.forward(**x, impl="blocked")
    assert np.all(np.isnan(out[0, 5]))
    assert np.all(np.isfinite(np.delete(out[0], 5, axis=0)))


def test_noncontiguous_inputs(rng):
    x = random_qkv(rng, (2, 2), n=10, d=4)
    ref, _ = full.forward(**x, impl="ref", causal=True)
    fortran = {k: np.asfortranarray(a) for k, a in x.items()}
    heads_last = {k: np.moveaxis(np.moveaxis(a, 1, -1).copy(), -1, 1) for k, a in x.items()}
    for variant in (fortran, heads_last):
        assert_close(full.forward(**variant, impl="blocked", causal=True)[0], ref)


def test_dense_mask_or_bias_is_rejected_by_blocked_and_routed_by_auto(rng, monkeypatch):
    x = random_qkv(rng, (2,), n=6, d=4)
    mask = rng.random((6, 6)) < 0.5
    with pytest.raises(ValueError, match="impl='blocked'.*mask"):
        full.forward(**x, mask=mask, impl="blocked")
    with pytest.raises(ValueError, match="bias"):
        full.forward(**x, bias=np.zeros((6, 6)), impl="blocked")
    monkeypatch.setattr(full, "AUTO_BLOCKED_MIN_NM", 36)
    assert full.forward(**x, mask=mask)[1].impl == "ref"
    assert full.forward(**x, causal=True)[1].impl == "blocked"
    monkeypatch.setattr(full, "AUTO_BLOCKED_MIN_NM", 37)
    assert full.forward(**x, causal=True)[1].impl == "ref"
    _, ctx = full.forward(**x, mask=mask)
    with pytest.raises(ValueError, match="dense"):
        full.backward(np.ones((2, 6, 4)), ctx, impl="blocked")


def test_memory_is_linear_in_n(rng, monkeypatch):
    """N = 2048: the (N, N) scores would be 32 MiB; the blocked pass needs far less."""
    monkeypatch.setattr(full, "BLOCKED_TILE", 128)
    x = random_qkv(rng, (1,), n=2048, d=8)
    full.forward(**{k: a[:, :256] for k, a in x.items()}, impl="blocked")   # compile first
    tracemalloc.start()
    try:
        out, ctx = full.forward(**x, impl="blocked", causal=True)
        full.backward(out, ctx)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2**20, peak
    assert ctx.p is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_exp_is_within_two_ulp(dtype):
    x = np.concatenate([-np.geomspace(1e-8, 80, 2000), np.geomspace(1e-8, 80, 2000),
                        [0.0, -np.inf, np.nan]]).astype(dtype)
    got = np.empty_like(x)
    _vexp(got, x)
    want = np.exp(x.astype(np.float64)).astype(dtype)
    fin = np.isfinite(want)
    ulp = np.abs(got[fin].astype(np.float64) - want[fin]) / np.spacing(want[fin])
    assert ulp.max() <= 2
    assert got[-2] == 0 and np.isnan(got[-1])


@numba.njit(cache=True)
def _vexp(out, x):
    for i in range(x.size):
        out[i] = _math.fast_exp(x[i])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rowmax_is_the_serial_maximum_nan_included(dtype, rng):
    """_math.rowmax (eight lanes and a NaN flag) against max(): every length around the
    lane count, ±inf, ±0, and a NaN in any lane (the flag: without it a lane's select drops
    the NaN)."""
    for n in range(0, 26):
        x = rng.standard_normal(n).astype(dtype)
        assert _math.rowmax(x) == (np.max(x) if n else -np.inf)
        for u in range(n):
            y = x.copy()
            y[u] = np.inf
            assert _math.rowmax(y) == np.inf
            y[u] = np.nan
            assert np.isnan(_math.rowmax(y)), (n, u)
            y[:] = -np.inf
            assert _math.rowmax(y) == -np.inf
    z = np.array([-0.0, 0.0, -1.0] * 5, dtype=dtype)
    assert _math.rowmax(z) == 0
