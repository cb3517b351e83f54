"""The causal prefix-sum kernels (tinyeff/kernels/linear.py) in their chunkwise form: sub-chunks
as matrix products (rows or keys past the other's end, NaN one position at a time), against the
one-position-at-a-time NumPy reference (tinyeff.attention._linear_engine)."""

from __future__ import annotations

import numpy as np
import pytest

from tinyeff.attention import _linear_engine as engine
from tinyeff.attention import performer
from tinyeff.kernels import linear as kernels
from tinyeff.kernels._jit import num_threads
from tinyeff.testing import GRAD_FD, assert_close, check_vjp, random_qkv


def _scan(fq, fk, lk, v, dnum, dden, chunk, sub):
    """num, den, C, dfq, dfk, dv by the kernels, over chunks of ``chunk`` positions."""
    bh, n, nf = fq.shape
    m, dvd = v.shape[1:]
    dt = fq.dtype
    num = np.empty((bh, n, dvd), dt)                               # (BH, N, Dv)
    den = np.empty((bh, n), dt)                                    # (BH, N)
    cm = np.empty((bh, n), dt)                                     # (BH, N)
    dfq = np.empty(fq.shape, dt)                                   # (BH, N, F)
    dfk = np.empty(fk.shape, dt)                                   # (BH, M, F)
    dv = np.empty(v.shape, dt)                                     # (BH, M, Dv)
    chunks = engine._chunk_slices(n, m, chunk)
    fwd = (np.zeros((bh, nf, dvd + 1), dt), np.full(bh, -np.inf, dt))    # [S | z], C
    bwd_q = (np.zeros((bh, nf, dvd + 1), dt), np.full(bh, -np.inf, dt))
    for qs, ks in chunks:
        nq, nk = qs.stop - qs.start, ks.stop - ks.start
        out = (np.empty((bh, nq, dvd), dt), np.empty((bh, nq), dt), np.empty((bh, nq), dt))
        keys = (np.ascontiguousarray(fk[:, ks]), np.ascontiguousarray(lk[:, ks]),
                np.ascontiguousarray(v[:, ks]))
        kernels.causal_fwd(*out, *fwd, np.ascontiguousarray(fq[:, qs]), *keys, sub)
        num[:, qs], den[:, qs], cm[:, qs] = out
        g = np.empty((bh, nq, nf), dt)
        kernels.causal_bwd_q(g, *bwd_q, *keys, np.ascontiguousarray(dnum[:, qs]),
                             np.ascontiguousarray(dden[:, qs]), sub)
        dfq[:, qs] = g
    bwd_kv = (np.zeros((bh, nf, dvd + 1), dt), np.full(bh, -np.inf, dt))  # [Ũ | r̃], scale
    for qs, ks in reversed(chunks):
        nk = ks.stop - ks.start
        gk, gv = np.empty((bh, nk, nf), dt), np.empty((bh, nk, dvd), dt)
        kernels.causal_bwd_kv(gk, gv, *bwd_kv, *(np.ascontiguousarray(x[:, qs])
                                                  for x in (fq, dnum, dden, cm)),
                              *(np.ascontiguousarray(x[:, ks]) for x in (fk, lk, v)), sub)
        dfk[:, ks], dv[:, ks] = gk, gv
    return num, den, cm, dfq, dfk, dv


def _reference(fq, fk, lk, v, dnum, dden):
    num, den, cm = engine._causal_scan_ref(fq, fk, lk, v)
    ctx = type("Ctx", (), {"causal": True, "key_scale": cm})
    return (num, den, cm) + engine.sums_backward_ref(fq, fk, lk, v, dnum, dden, ctx)


def _inputs(rng, bh, n, m, nf, dvd, lk, dtype=np.float64):
    fq = rng.random((bh, n, nf)).astype(dtype)                     # features: positive
    fk = rng.random((bh, m, nf)).astype(dtype)
    v = rng.standard_normal((bh, m, dvd)).astype(dtype)
    dnum = rng.standard_normal((bh, n, dvd)).astype(dtype)
    dden = rng.standard_normal((bh, n)).astype(dtype)
    fk[lk == -np.inf] = 0                                          # "exact" padding
    return fq, fk, lk.astype(dtype), v, dnum, dden


def _log_scales(rng, bh, m, kind):
    if kind == "zero":                                             # linear attention
        return np.zeros((bh, m))
    if kind == "small":
        return np.sort(rng.normal(0, 1, (bh, m)), axis=1) * 0.5 + rng.normal(0, 1, (bh, m))
    if kind == "jumps":                                            # C rising by 30 and 60
        lk = rng.normal(0, 1, (bh, m)) + 30.0 * (np.arange(m) // 4)[None, :]
        lk[:, 5] += 60.0
        return lk
    lk = rng.normal(0, 1, (bh, m))                                 # "padded": −inf keys
    lk[:, :3] = -np.inf                                            # rows with no key yet
    lk[:, 7::5] = -np.inf
    return lk


NAMES = ("num", "den", "C", "dfq", "dfk", "dv")


@pytest.mark.parametrize("kind", ["zero", "small", "jumps", "padded"])
@pytest.mark.parametrize("shape", [(13, 13), (11, 16), (16, 9)])
@pytest.mark.parametrize("chunk,sub", [(7, 3), (16, 16), (5, 1), (32, 4)])
def test_chunkwise_equals_reference(kind, shape, chunk, sub, rng):
    n, m = shape
    x = _inputs(rng, 3, n, m, 6, 4, _log_scales(rng, 3, m, kind))
    for a, b, name in zip(_scan(*x, chunk, sub), _reference(*x), NAMES):
        assert_close(a, b, rtol=1e-12, atol=1e-13, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_spread_of_300_in_one_sub_chunk_stays_finite(dtype, rng):
    """Log-scales 300 apart inside one sub-chunk: every weight is exp(ℓk_j − C_i) ≤ 1 or the
    scan's own rescaling, so nothing overflows (e³⁰⁰ is inf in float32) or underflows
    beyond what the scan does."""
    m = 16
    lk = rng.normal(0, 1, (2, m))
    lk[:, 9] += 300.0
    x = _inputs(rng, 2, m, m, 5, 3, lk, dtype)
    got = _scan(*x, 16, 16)
    for a, b in zip(got, _reference(*(y.astype(np.float64) for y in x))):
        assert np.all(np.isfinite(a))
        assert_close(a, b.astype(dtype))


@pytest.mark.parametrize("sub", [4, 16])
def test_rows_do_not_see_later_keys_bit_for_bit(sub, rng):
    """Changing key j (fk, ℓk, v) leaves rows i < j's num, den, C and dfq bit for bit, and
    changing row i (fq, dnum, dden) leaves keys j > i's dfk and dv: no shift or product
    of a sub-chunk mixes a later position into an earlier one.  A NaN stays on its side."""
    n = 16
    x = _inputs(rng, 2, n, n, 5, 3, _log_scales(rng, 2, n, "small"))
    base = _scan(*x, 16, sub)
    fq, fk, lk, v, dnum, dden = x
    for bad in (None, np.nan):
        j = 6
        fk2, lk2, v2 = fk.copy(), lk.copy(), v.copy()
        fk2[:, j] = bad if bad else fk2[:, j] * 2
        lk2[:, j] = bad if bad else lk2[:, j] + 5
        v2[:, j] = bad if bad else v2[:, j] + 1
        got = _scan(fq, fk2, lk2, v2, dnum, dden, 16, sub)
        for a, b in zip(got[:4], base[:4]):                        # num, den, C, dfq
            _same_or_finite(a[:, :j], b[:, :j], bad)
        i = 9
        fq2, dnum2, dden2 = fq.copy(), dnum.copy(), dden.copy()
        fq2[:, i] = bad if bad else fq2[:, i] * 2
        dnum2[:, i] = bad if bad else dnum2[:, i] + 1
        dden2[:, i] = bad if bad else dden2[:, i] + 1
        got = _scan(fq2, fk, lk, v, dnum2, dden2, 16, sub)
        for a, b in zip(got[4:], base[4:]):                        # dfk, dv
            _same_or_finite(a[:, i + 1:], b[:, i + 1:], bad)


def _same_or_finite(a, b, bad):
    """Bit for bit after a finite change; finite after a NaN (whose sub-chunk then runs
    the scalar step, so the bits may differ)."""
    if bad is None:
        np.testing.assert_array_equal(a, b)
    else:
        assert np.all(np.isfinite(a))


@pytest.mark.numba_threads
def test_one_and_two_threads_bit_identical(rng):
    x = _inputs(rng, 5, 40, 40, 7, 3, _log_scales(rng, 5, 40, "jumps"))
    with num_threads(1):
        one = _scan(*x, 16, 8)
    with num_threads(2):
        two = _scan(*x, 16, 8)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("sub", [1, 3, 4])
@pytest.mark.parametrize("mask_mode", ["exact", "values_only"])
def test_performer_causal_paths_match_reference(sub, mask_mode, rng, monkeypatch):
    """Through the API: sub-chunks of 1, 3 and 4 positions inside chunks of 5 (keys of
    growing norms: the running maximum moves)."""
    monkeypatch.setattr(engine, "CHUNK", 5)
    monkeypatch.setattr(engine, "SUBCHUNK", sub)
    x = random_qkv(rng, (2, 2), n=13, m=11, d=5, dv=3)
    x["k"] *= np.linspace(0.5, 2.5, 11)[:, None]
    omega = performer.draw_random_options(np.random.default_rng(0), 5, np.float64,
                                          m=11)["features"]
    opts = {"features": omega, "causal": True, "mask_mode": mask_mode,
            "key_padding_mask": rng.random((2, 2, 11)) < 0.8}
    out_r, ctx_r = performer.forward(**x, **opts, impl="ref")
    out_n, ctx_n = performer.forward(**x, **opts, impl="numba")
    assert_close(out_n, out_r)
    dout = rng.standard_normal(out_r.shape)
    assert_close(performer.backward(dout, ctx_n), performer.backward(dout, ctx_r))


def test_performer_causal_gradcheck_with_sub_chunks(rng, monkeypatch):
    monkeypatch.setattr(engine, "CHUNK", 6)
    monkeypatch.setattr(engine, "SUBCHUNK", 4)
    x = random_qkv(rng, (1, 2), n=11, d=4, dv=2)
    x["k"] *= 3
    omega = performer.draw_random_options(np.random.default_rng(1), 4, np.float64,
                                          m=6)["features"]
    check_vjp(performer.forward, performer.backward, x,
              {"features": omega, "causal": True}, rng=rng).assert_ok(GRAD_FD)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("r", [1, 7, 13])
def test_favor_rows_features_formed_with_dx_equal_given(dtype, r, rng, monkeypatch):
    """favor_dx with an empty f (the features formed task by task next to their dx, as the
    causal backward's dq does) gives the bits of favor_dx fed favor_features' f; both match
    the feature map's own forward and backward (tinyeff.ops.feature_maps).  Tasks of 4 rows
    (the last one shorter)."""
    monkeypatch.setattr(engine, "FEATURE_ROWS", 4)
    x = rng.standard_normal((r, 5)).astype(dtype)                  # (R, D)
    omega = performer.draw_random_options(np.random.default_rng(2), 5, dtype,
                                          m=9)["features"]         # (m, D)
    fmap = engine.FeatureMap(kind="favor_softmax", omega=omega, scale=0.5, kernel_eps=0.0)
    f, ell = engine._row_features(fmap, x)                         # (R, m), (R)
    f_ref, ell_ref = fmap.forward(x)
    assert_close(f, f_ref)
    assert_close(ell, ell_ref)
    df = rng.standard_normal(f.shape).astype(dtype)                # (R, m)
    given = engine._row_chain(fmap, df.copy(), f, x)               # (R, D)
    formed = engine._row_chain(fmap, df.copy(), None, x)           # (R, D)
    np.testing.assert_array_equal(formed, given)
    assert_close(given, fmap.backward(df, f_ref, x))
