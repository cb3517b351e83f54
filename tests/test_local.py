"""Segment-local attention with look-back / look-forward buffers.

The definition: ``local`` equals ``full`` under the dense mask
[σ(i) − look_backward ≤ σ(j) ≤ σ(i) + look_forward] (σ(p) = ⌊p / block⌋), ∩ causal ∩ key
padding, in the forward and every gradient — built here pair by pair.
"""

from __future__ import annotations

import numpy as np
import pytest

from tinyeff.attention import full, local
from tinyeff.testing import GRAD_FD, assert_close, check_vjp, random_qkv

from .oracles import NaNEmptyNumPy, check_numba_threads


def dense_allowed(n, m, block, look_backward=1, look_forward=0, causal=False):
    a = np.zeros((n, m), dtype=bool)
    for i in range(n):
        for j in range(m):
            si, sj = i // block, j // block
            a[i, j] = si - look_backward <= sj <= si + look_forward and (j <= i or not causal)
    return a


# (N, M, options): shorter last segment, absent segments at both ends, N != M
CASES = [
    (13, 13, dict(block=4)),                                       # last segment of 1
    (13, 13, dict(block=4, look_backward=0)),                      # block-diagonal
    (12, 12, dict(block=3, look_backward=2, look_forward=1)),
    (13, 13, dict(block=5, look_backward=1, look_forward=1, causal=True)),
    (11, 11, dict(block=2, look_backward=0, look_forward=3)),
    (11, 11, dict(block=20)),                                      # one segment = full
    (9, 14, dict(block=4, look_forward=1)),                        # N < M
    (14, 9, dict(block=3, look_backward=2, causal=True)),          # N > M
    (70, 70, dict(block=1, look_backward=3)),                      # tiles group segments
    (300, 300, dict(block=150, look_backward=1, look_forward=1)),  # tiles split segments
]


@pytest.mark.parametrize("impl", ["ref", "numba"])
@pytest.mark.parametrize("with_kpad,with_bias", [(False, False), (True, True)])
@pytest.mark.parametrize("n,m,opts", CASES)
def test_equals_full_with_the_segment_mask(n, m, opts, with_kpad, with_bias, impl, rng):
    x = random_qkv(rng, (2, 2), n=n, m=m, d=4, dv=3)
    extra = {}
    if with_kpad:
        kp = rng.random((2, 1, m)) < 0.75
        kp[0, 0, : min(m, 2 * opts["block"])] = False              # pad the first segments
        extra["key_padding_mask"] = kp
    if with_bias:
        x["rel_bias"] = rng.standard_normal((2, n + m - 1))
    allowed = dense_allowed(n, m, **opts)
    out_f, ctx_f = full.forward(**x, mask=allowed, **extra)
    out_l, ctx_l = local.forward(**x, **opts, **extra, impl=impl)
    assert_close(out_l, out_f)
    assert_close(ctx_l.lse, ctx_f.lse)
    dout = rng.standard_normal(out_f.shape)
    assert_close(local.backward(dout, ctx_l), full.backward(dout, ctx_f))


GRAD_CASES = [
    dict(block=3),
    dict(block=4, look_backward=1, look_forward=1, causal=True),
    dict(block=2, look_backward=0, look_forward=2),
]


@pytest.mark.parametrize("impl", ["ref", "numba"])
@pytest.mark.parametrize("opts", GRAD_CASES)
def test_gradcheck(opts, impl, rng):
    n = 11
    x = random_qkv(rng, (2, 2), n=n, d=4, dv=3)
    x["rel_bias"] = rng.standard_normal((2, 2 * n - 1))
    kp = rng.random((2, 1, n)) < 0.8
    report = check_vjp(local.forward, local.backward, x,
                       {**opts, "key_padding_mask": kp, "impl": impl}, rng=rng)
    report.assert_ok(GRAD_FD)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_numba_matches_reference_and_crossed_pairs(dtype, rng):
    n = 203
    x = random_qkv(rng, (2, 2), n=n, d=8, dv=5, dtype=dtype)
    x["rel_bias"] = rng.standard_normal((2, 2 * n - 1)).astype(dtype)
    kp = rng.random((2, 1, n)) < 0.9
    opts = dict(block=16, look_backward=2, look_forward=1, causal=True, key_padding_mask=kp)
    out_r, ctx_r = local.forward(**x, **opts, impl="ref")
    out_n, ctx_n = local.forward(**x, **opts, impl="numba")
    assert_close(out_n, out_r)
    dout = rng.standard_normal(out_r.shape).astype(dtype)
    g_ref = local.backward(dout, ctx_r)
    assert_close(local.backward(dout, ctx_n), g_ref)
    assert_close(local.backward(dout, ctx_r, impl="numba"), g_ref)
    assert_close(local.backward(dout, ctx_n, impl="ref"), g_ref)


def test_one_and_two_threads_give_the_same_bits(rng):
    n = 260
    x = random_qkv(rng, (1, 3), n=n, d=8, dv=8)
    x["rel_bias"] = rng.standard_normal((3, 2 * n - 1))
    opts = dict(block=32, look_backward=1, look_forward=1)
    dout = rng.standard_normal((1, 3, n, 8))
    check_numba_threads(local, x, opts, dout)


def test_many_tiles_backward_blocks_and_seams(rng):
    """Enough kernel tiles (40 per head) for several backward blocks: every seam between
    blocks matches the reference, and 1 and 2 threads give the same bits."""
    n = 2560                                                       # 40 tiles of 64 rows
    x = random_qkv(rng, (1, 2), n=n, d=4, dv=3)
    x["rel_bias"] = rng.standard_normal((2, 2 * n - 1))
    kp = rng.random((1, 1, n)) < 0.9
    opts = dict(block=8, look_backward=2, look_forward=1, key_padding_mask=kp)
    dout = rng.standard_normal((1, 2, n, 3))
    check_numba_threads(local, x, opts, dout, reference=True)


def test_plain_tiles_give_the_bits_of_the_general_path(rng):
    """Tiles without padding, empty rows or bias skip the backward's per-element select; a
    zero rel_bias and an all-True key padding mask force the general path: same bits."""
    n = 300
    x = random_qkv(rng, (2, 2), n=n, d=8, dv=5)
    dout = rng.standard_normal((2, 2, n, 5))
    opts = dict(block=50, look_backward=1, look_forward=1, impl="numba")
    out, ctx = local.forward(**x, **opts)
    grads = local.backward(dout, ctx)
    general = dict(rel_bias=np.zeros(2 * n - 1), key_padding_mask=np.ones((1, 1, n), dtype=bool))
    out_g, ctx_g = local.forward(**x, **opts, **general)
    grads_g = local.backward(dout, ctx_g)
    np.testing.assert_array_equal(out, out_g)
    np.testing.assert_array_equal(ctx.lse, ctx_g.lse)
    for name in grads:
        np.testing.assert_array_equal(grads[name], grads_g[name], err_msg=name)


@pytest.mark.parametrize("n,m,opts", [(14, 9, dict(block=3, look_backward=2, causal=True)),
                              (150, 20, dict(block=4, look_backward=0))])
def test_numba_writes_every_entry_of_its_uninitialised_outputs(n, m, opts, rng, monkeypatch):
    """The wrappers hand np.empty outputs to the kernels (rows of key-less tiles included)."""
    monkeypatch.setattr(local, "np", NaNEmptyNumPy())
    x = random_qkv(rng, (2, 2), n=n, m=m, d=4, dv=3)
    kp = rng.random((2, 1, m)) < 0.8
    out_r, ctx_r = local.forward(**x, **opts, key_padding_mask=kp, impl="ref")
    out_n, ctx_n = local.forward(**x, **opts, key_padding_mask=kp, impl="numba")
    assert_close(out_n, out_r)
    dout = rng.standard_normal(out_r.shape)
    assert_close(local.backward(dout, ctx_n), local.backward(dout, ctx_r))


def test_causal_prefix_consistency(rng):
    """Causal output at positions < t does not depend on anything at positions >= t."""
    n, t = 20, 13
    x = random_qkv(rng, (2,), n=n, d=3)
    opts = dict(block=4, look_backward=2, look_forward=1, causal=True)
    out, _ = local.forward(**x, **opts)
    short = {name: a[:, :t] for name, a in x.items()}
    assert_close(local.forward(**short, **opts)[0], out[:, :t])


def test_fully_masked_rows_are_zero_with_zero_gradient(rng):
    x = random_qkv(rng, (2,), n=12, d=3)
    kp = np.ones((2, 12), dtype=bool)
    kp[:, :8] = False                                              # segments 0, 1 padded
    for impl in ("ref", "numba"):
        out, ctx = local.forward(**x, block=4, look_backward=0, key_padding_mask=kp, impl=impl)
        assert np.all(out[:, :8] == 0)
        g = local.backward(rng.standard_normal(out.shape), ctx)
        assert np.all(g["q"][:, :8] == 0)
        assert all(np.all(np.isfinite(a)) for a in g.values())


def test_invalid_options_raise_clear_errors(rng):
    x = random_qkv(rng, (1,), n=6, d=3)
    with pytest.raises(ValueError, match="block"):
        local.forward(**x, block=0)
    with pytest.raises(TypeError, match="block"):
        local.forward(**x, block=2.0)
    with pytest.raises(ValueError, match="look_backward"):
        local.forward(**x, block=2, look_backward=-1)
    with pytest.raises(ValueError, match="look_forward"):
        local.forward(**x, block=2, look_forward=-1)
    with pytest.raises(ValueError, match="key_padding_mask"):
        local.forward(**x, block=2, key_padding_mask=np.ones((1, 5), bool))
    with pytest.raises(TypeError, match="ctx"):
        local.backward(np.zeros((1, 6, 3)), object())


def test_read_only_inputs_add_no_kernel_signature():
    """Read-only q, k, v, key padding, rel_bias and dout reach the band kernels as writeable
    copies, so they reuse the specializations compiled for writeable inputs (issue 11)."""
    from tinyeff.kernels import band as kernels
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 2, 12, 4)) for _ in range(3))
    kp = np.ones((2, 2, 12), dtype=bool)
    kp[0, 1, 3] = False
    rel = rng.standard_normal((2, 2, 23))
    dout = rng.standard_normal(q.shape)

    def run(q_, k_, v_, kp_, rel_, dout_):
        out, ctx = local.forward(q_, k_, v_, block=4, key_padding_mask=kp_, rel_bias=rel_,
                                 impl="numba")
        return out, local.backward(dout_, ctx)

    def signatures():
        return {n: list(f.signatures) for n, f in vars(kernels).items()
                if hasattr(f, "signatures")}

    want = run(q, k, v, kp, rel, dout)
    before = signatures()

    def ro(a):
        a = a.copy()
        a.setflags(write=False)
        return a

    got = run(*(ro(a) for a in (q, k, v, kp, rel, dout)))
    assert signatures() == before
    np.testing.assert_array_equal(got[0], want[0])
    for name in want[1]:
        np.testing.assert_array_equal(got[1][name], want[1][name])
