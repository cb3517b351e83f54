"""Sliding-window / dilated / Longformer-global attention.

The definition: ``window`` equals ``full`` under the dense union mask (band without the
global keys ∪ global key columns ∪ global query rows, ∩ causal ∩ key padding), in the forward
and every gradient — built here by brute force, independently of the module.
"""

from __future__ import annotations

import numpy as np
import pytest

from tinyeff.attention import full, window
from tinyeff.testing import GRAD_FD, assert_close, check_vjp, random_qkv

from .oracles import NaNEmptyNumPy, check_numba_threads


def dense_allowed(n, m, w, dilation=1, global_indices=(), causal=False):
    """(N, M) boolean, one pair at a time from the docstring's definition of A(i)."""
    g = set(int(x) for x in global_indices)
    a = np.zeros((n, m), dtype=bool)
    for i in range(n):
        for j in range(m):
            if i in g:
                ok = True                                          # global query row
            else:
                in_band = any(j == i + t * dilation for t in range(-w, w + 1))
                ok = j in g or in_band                             # global key column
            a[i, j] = ok and (j <= i or not causal)
    return a


# (N, M, options) — every option, alone and combined; N not a multiple of anything
CASES = [
    (13, 13, dict(window=2)),
    (13, 13, dict(window=0)),
    (13, 13, dict(window=20)),                                     # window wider than N
    (13, 13, dict(window=3, causal=True)),
    (14, 14, dict(window=2, dilation=3)),
    (14, 14, dict(window=1, dilation=2, causal=True)),
    (13, 13, dict(window=2, global_indices=[0, 5])),               # 5 lies in bands
    (13, 13, dict(window=2, global_indices=[12, 3], causal=True)),
    (15, 15, dict(window=2, dilation=2, global_indices=[1, 6, 7])),
    (9, 14, dict(window=3)),                                       # N < M
    (14, 9, dict(window=2, dilation=2, causal=True, global_indices=[2])),  # N > M
    (1, 1, dict(window=1)),
]


def _options(n, m, opts, rng, with_kpad, with_bias):
    extra = {}
    args = {}
    if with_kpad:
        kp = rng.random((2, 1, m)) < 0.75
        kp[1, 0, :] = False                                        # batch 1: every key padded
        kp[1, 0, -1] = True                                        # but one
        extra["key_padding_mask"] = kp
    if with_bias:
        args["rel_bias"] = rng.standard_normal((3, n + m - 1))
    return args, extra


@pytest.mark.parametrize("impl", ["ref", "numba"])
@pytest.mark.parametrize("with_kpad,with_bias", [(False, False), (True, True)])
@pytest.mark.parametrize("n,m,opts", CASES)
def test_equals_full_with_the_union_mask(n, m, opts, with_kpad, with_bias, impl, rng):
    x = random_qkv(rng, (2, 3), n=n, m=m, d=4, dv=3)
    args, extra = _options(n, m, opts, rng, with_kpad, with_bias)
    allowed = dense_allowed(n, m, opts["window"], opts.get("dilation", 1),
                            opts.get("global_indices", ()), opts.get("causal", False))
    out_f, ctx_f = full.forward(**x, **args, mask=allowed, **extra)
    out_w, ctx_w = window.forward(**x, **args, **opts, **extra, impl=impl)
    assert_close(out_w, out_f)
    assert_close(ctx_w.lse, ctx_f.lse)
    dout = rng.standard_normal(out_f.shape)
    assert_close(window.backward(dout, ctx_w), full.backward(dout, ctx_f))


def test_global_key_inside_the_band_is_counted_once(rng):
    """Pin: a global key that is also in row i's band appears once in row i's softmax."""
    n = 9
    x = random_qkv(rng, (1,), n=n, d=3)
    out, _ = window.forward(**x, window=2, global_indices=[4])
    once = full.forward(**x, mask=dense_allowed(n, n, 2, global_indices=[4]))[0]
    assert_close(out, once)
    # a double-counting implementation would give key 4 the weight 2·exp(s_i4) in rows 2…6
    bias = np.zeros((n, n))
    bias[2:7, 4] = np.log(2.0)
    twice = full.forward(**x, mask=dense_allowed(n, n, 2, global_indices=[4]), bias=bias)[0]
    assert np.abs(out[:, 2:7] - twice[:, 2:7]).max() > 1e-3


def test_global_rows_see_everything_and_everyone_sees_global_keys(rng):
    n = 16
    x = random_qkv(rng, (2,), n=n, d=4)
    out, _ = window.forward(**x, window=1, global_indices=[3])
    assert_close(out[:, 3], full.forward(**x)[0][:, 3])            # global row = full row
    # perturbing global key 3 changes every row; perturbing key 10 changes only rows 9…11
    x2 = dict(x, v=x["v"].copy())
    x2["v"][:, 3] += 1.0
    assert np.all(np.abs(window.forward(**x2, window=1, global_indices=[3])[0] - out)
                  .max(-1) > 0)
    x3 = dict(x, v=x["v"].copy())
    x3["v"][:, 10] += 1.0
    changed = np.abs(window.forward(**x3, window=1, global_indices=[3])[0] - out).max(-1) > 0
    assert changed.any(axis=0).nonzero()[0].tolist() == [3, 9, 10, 11]


GRAD_CASES = [
    dict(window=2),
    dict(window=2, dilation=2, causal=True),
    dict(window=1, global_indices=[0, 7], causal=True),
    dict(window=2, dilation=3, global_indices=[5]),
]


@pytest.mark.parametrize("impl", ["ref", "numba"])
@pytest.mark.parametrize("opts", GRAD_CASES)
def test_gradcheck(opts, impl, rng):
    n = 12
    x = random_qkv(rng, (2, 2), n=n, d=4, dv=3)
    x["rel_bias"] = rng.standard_normal((2, 2 * n - 1))
    kp = rng.random((2, 1, n)) < 0.8
    report = check_vjp(window.forward, window.backward, x,
                       {**opts, "key_padding_mask": kp, "impl": impl}, rng=rng)
    report.assert_ok(GRAD_FD)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("opts", [dict(window=5, global_indices=[2, 60], causal=True),
                                  dict(window=7, dilation=3)])
def test_numba_matches_reference_and_crossed_pairs(opts, dtype, rng):
    n = 150                                                        # several tiles and phases
    x = random_qkv(rng, (2, 2), n=n, d=8, dv=5, dtype=dtype)
    x["rel_bias"] = rng.standard_normal((2, 2 * n - 1)).astype(dtype)
    kp = rng.random((2, 1, n)) < 0.9
    out_r, ctx_r = window.forward(**x, **opts, key_padding_mask=kp, impl="ref")
    out_n, ctx_n = window.forward(**x, **opts, key_padding_mask=kp, impl="numba")
    assert_close(out_n, out_r)
    assert_close(ctx_n.lse, ctx_r.lse)
    dout = rng.standard_normal(out_r.shape).astype(dtype)
    g_ref = window.backward(dout, ctx_r)
    assert_close(window.backward(dout, ctx_n), g_ref)              # numba fwd + numba bwd
    assert_close(window.backward(dout, ctx_r, impl="numba"), g_ref)  # ref fwd + numba bwd
    assert_close(window.backward(dout, ctx_n, impl="ref"), g_ref)  # numba fwd + ref bwd


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("scale", [0.9, 0.0, -0.7])
def test_numba_matches_reference_for_any_finite_scale(scale, dtype, rng):
    """Without a bias the band forward scales S inside its exp pass when scale > 0 and
    before it otherwise (scale 0: uniform weights over each row's band)."""
    n = 120
    x = random_qkv(rng, (2, 2), n=n, d=8, dv=5, dtype=dtype)
    kp = rng.random((2, 1, n)) < 0.9
    opts = dict(window=6, key_padding_mask=kp, scale=scale)
    out_r, ctx_r = window.forward(**x, **opts, impl="ref")
    out_n, ctx_n = window.forward(**x, **opts, impl="numba")
    assert_close(out_n, out_r)
    assert_close(ctx_n.lse, ctx_r.lse)
    dout = rng.standard_normal(out_r.shape).astype(dtype)
    assert_close(window.backward(dout, ctx_n), window.backward(dout, ctx_r))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_numba_rows_whose_band_lies_past_the_last_key(dtype, rng):
    """N ≫ M: whole kernel tiles of rows see no key at all (their band starts after M)."""
    n, m = 150, 20
    x = random_qkv(rng, (2,), n=n, m=m, d=4, dv=3, dtype=dtype)
    for opts in (dict(window=3), dict(window=2, dilation=2, causal=True)):
        out_r, ctx_r = window.forward(**x, **opts, impl="ref")
        out_n, ctx_n = window.forward(**x, **opts, impl="numba")
        assert_close(out_n, out_r)
        assert np.all(out_n[:, 40:] == 0) and np.all(ctx_n.lse[:, 40:] == -np.inf)
        dout = rng.standard_normal(out_r.shape).astype(dtype)
        assert_close(window.backward(dout, ctx_n), window.backward(dout, ctx_r))


def test_one_and_two_threads_give_the_same_bits(rng):
    n = 300
    x = random_qkv(rng, (1, 3), n=n, d=8, dv=8)
    x["rel_bias"] = rng.standard_normal((3, 2 * n - 1))
    opts = dict(window=9, dilation=2, global_indices=[7], causal=True)
    dout = rng.standard_normal((1, 3, n, 8))
    check_numba_threads(window, x, opts, dout)


def test_many_tiles_backward_blocks_and_seams(rng):
    """Enough kernel tiles (40 per head) for several backward blocks: every seam between
    blocks matches the reference, and 1 and 2 threads give the same bits."""
    n = 2560                                                       # 40 tiles of 64 rows
    x = random_qkv(rng, (1, 2), n=n, d=4, dv=3)
    x["rel_bias"] = rng.standard_normal((2, 2 * n - 1))
    kp = rng.random((1, 1, n)) < 0.9
    opts = dict(window=40, global_indices=[5, 1500], key_padding_mask=kp)
    dout = rng.standard_normal((1, 2, n, 3))
    check_numba_threads(window, x, opts, dout, reference=True)


@pytest.mark.parametrize("n,m,opts", [(150, 20, dict(window=3)),
                              (150, 150, dict(window=5, dilation=3, global_indices=[2, 60]))])
def test_numba_writes_every_entry_of_its_uninitialised_outputs(n, m, opts, rng, monkeypatch):
    """The wrappers hand np.empty outputs to the kernels (rows of key-less tiles included)."""
    monkeypatch.setattr(window, "np", NaNEmptyNumPy())
    x = random_qkv(rng, (2, 2), n=n, m=m, d=4, dv=3)
    kp = rng.random((2, 1, m)) < 0.8
    out_r, ctx_r = window.forward(**x, **opts, key_padding_mask=kp, impl="ref")
    out_n, ctx_n = window.forward(**x, **opts, key_padding_mask=kp, impl="numba")
    assert_close(out_n, out_r)
    dout = rng.standard_normal(out_r.shape)
    assert_close(window.backward(dout, ctx_n), window.backward(dout, ctx_r))


def test_fully_masked_rows_are_zero_with_zero_gradient(rng):
    x = random_qkv(rng, (2,), n=10, d=3)
    kp = np.ones((2, 10), dtype=bool)
    kp[:, :5] = False                                              # rows 0…2 see only pads
    for impl in ("ref", "numba"):
        out, ctx = window.forward(**x, window=2, key_padding_mask=kp, impl=impl)
        assert np.all(out[:, :3] == 0)
        assert np.all(ctx.lse[:, :3] == -np.inf)
        g = window.backward(rng.standard_normal(out.shape), ctx)
        assert np.all(g["q"][:, :3] == 0)
        assert all(np.all(np.isfinite(a)) for a in g.values())


def test_saved_context_is_linear_in_n(rng):
    n = 2048
    x = random_qkv(rng, (1,), n=n, d=4)
    _, ctx = window.forward(**x, window=64)
    assert ctx.lse.shape == (1, n)
    extra = ctx.nbytes() - sum(a.nbytes for a in x.values())
    assert extra <= 8 * n * (4 + 1) + 1024                         # out (N, 4) and lse (N,)


def test_invalid_options_raise_clear_errors(rng):
    x = random_qkv(rng, (1,), n=6, d=3)
    with pytest.raises(TypeError, match="window"):
        window.forward(**x, window=1.5)
    with pytest.raises(ValueError, match="window"):
        window.forward(**x, window=-1)
    with pytest.raises(ValueError, match="dilation"):
        window.forward(**x, window=1, dilation=0)
    with pytest.raises(ValueError, match="global_indices"):
        window.forward(**x, window=1, global_indices=[6])
    with pytest.raises(ValueError, match="global_indices"):
        window.forward(**x, window=1, global_indices=[1, 1])
    with pytest.raises(TypeError, match="global_indices"):
        window.forward(**x, window=1, global_indices=[0.5])
    with pytest.raises(ValueError, match="rel_bias"):
        window.forward(**x, window=1, rel_bias=np.zeros(6))
    with pytest.raises(ValueError, match="impl"):
        window.forward(**x, window=1, impl="cuda")
    with pytest.raises(TypeError, match="ctx"):
        window.backward(np.zeros((1, 6, 3)), object())


def _float64_names(fn, arg_types):
    """The named variables that Numba types float64 in ``fn`` (a kernel of tinyeff.kernels)
    compiled afresh, without its cache, for ``arg_types``: {name: source line}."""
    import io
    import re

    import numba

    fresh = numba.njit(fn.py_func)                                 # typed here, not loaded
    fresh.compile(tuple(arg_types))
    text = io.StringIO()
    fresh.inspect_types(file=text)
    names = {}
    for line in text.getvalue().splitlines():
        m = re.match(r"\s*#\s+([A-Za-z_]\w*)(\.\d+)? = .*::\s*float64\s*$", line)
        if m:                                  # a source name (SSA copies name.1, name.2)
            names[m.group(1)] = line.strip()
    return names


def test_band_tile_scalars_stay_float32():
    """Every float scalar of the band tiles is float32 for float32 arrays (but the backward's
    δ, summed in float64 on purpose): a float64 one (``scale * 0`` types float64) made the
    forward's exp pass run in float64 (BENCHMARKS.md, "The band forward's exp pass")."""
    from numba import types

    from tinyeff.kernels import band

    a1, a2, a3 = (types.Array(types.float32, nd, "C") for nd in (1, 2, 3))
    i64, b2 = types.int64, types.Array(types.boolean, 2, "C")
    idx = types.Array(types.int64, 1, "C")
    f32, flag = types.float32, types.boolean
    # out, lse, q, k, v, b, i0, i1, jl, jh, lo, hi, row_ok, key_ok, bias, has_bias, off_min,
    # scale, buf, qbuf, mx, tmp, msub, z
    fwd = (a3, a2, a3, a3, a3, i64, i64, i64, i64, i64, idx, idx, b2, b2, a2, flag, i64,
           f32, a1, a1, a1, a1, a1, a1)
    assert _float64_names(band._fwd_tile, fwd) == {}
    # dq, dk, dv, dbias_part, dout, out, lse, q, k, v, b, t, i0, i1, jl, jh, lo, hi, row_ok,
    # key_ok, bias, has_bias, off_min, scale, sbuf, gbuf, kbuf, vbuf, qbuf, dbuf, lt, dl, live
    bwd = (a3, a3, a3, a3, a3, a3, a2, a3, a3, a3, i64, i64, i64, i64, i64, i64, idx, idx,
           b2, b2, a2, flag, i64, f32, a1, a1, a1, a1, a1, a1, a1, a1,
           types.Array(types.boolean, 1, "C"))
    assert set(_float64_names(band._bwd_tile, bwd)) == {"acc"}     # δ_i in float64
