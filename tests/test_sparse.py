"""Sparse attention: equality with ``full`` under the equivalent dense mask (the definition),
gradchecks over the options, kernel/reference parity (crossed too), thread-count bit
identity, edge cases and validation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from tinyeff import masks
from tinyeff.attention import full, sparse
from tinyeff.kernels import sparse_plan
from tinyeff.kernels._jit import num_threads
from tinyeff.masks import Pattern
from tinyeff.testing import GRAD_FD, assert_close, check_vjp, random_qkv

from .oracles import attention_rows


def _holes(n, m, seed):
    d = np.random.default_rng(seed).random((n, m)) < 0.4
    d[1] = False                                                  # one empty row
    return sp.csr_array(d)


# (name, N, M, mask builder, options); per-head masks are lists (H = 2)
PATTERNS = [
    ("local", 9, 9, lambda: masks.local(9, 2), {}),
    ("local_causal", 9, 9, lambda: masks.local(9, 2), {"causal": True}),
    ("dilated", 10, 10, lambda: masks.dilated(10, 2, 2), {}),
    ("bigbird", 12, 12, lambda: masks.bigbird(12, 1, 1, 2, np.random.default_rng(0)), {}),
    ("strided", 10, 10, lambda: masks.strided(10, 3), {}),
    ("fixed_causal", 10, 10, lambda: masks.fixed(10, 4, 1), {"causal": True}),
    ("random_rect", 6, 11, lambda: masks.random(6, 4, np.random.default_rng(1), m=11),
     {"scale": 0.6}),
    ("causal_rect", 7, 5, lambda: masks.causal(7, 5), {}),
    ("holes_kpad", 8, 8, lambda: _holes(8, 8, 2), {"kpad": True}),
    ("rel_bias", 7, 9, lambda: masks.local(7, 3, m=9, offset=1), {"rel": True, "causal": True}),
    ("per_head", 8, 8, lambda: [masks.local(8, 1), masks.random(8, 3, np.random.default_rng(3))],
     {"rel": True, "kpad": True}),
]


def _setup(rng, n, m, build, opts, dtype=np.float64):
    x = random_qkv(rng, (2, 2), n=n, m=m, d=5, dv=3, dtype=dtype)
    mask = build()
    options = {k: v for k, v in opts.items() if k in ("causal", "scale")}
    if opts.get("kpad"):
        kp = rng.random((2, 1, m)) < 0.7
        kp[0, 0, :] = True
        options["key_padding_mask"] = kp
    if opts.get("rel"):
        x["rel_bias"] = rng.standard_normal((2, n + m - 1)).astype(dtype)
    return x, mask, options


def _dense(mask):
    if isinstance(mask, list):                                    # per head: (H, N, M)
        return np.stack([m.toarray() for m in mask])
    return mask.toarray()


@pytest.mark.parametrize("impl", ["ref", "numba"])
@pytest.mark.parametrize("name,n,m,build,opts", PATTERNS, ids=[p[0] for p in PATTERNS])
def test_equals_full_with_the_dense_mask(name, n, m, build, opts, impl, rng):
    """The definition: sparse == full(mask = dense S), forward and every gradient."""
    x, mask, options = _setup(rng, n, m, build, opts)
    out_s, ctx_s = sparse.forward(**x, mask=mask, impl=impl, **options)
    out_f, ctx_f = full.forward(**x, mask=_dense(mask), **options)
    assert_close(out_s, out_f)
    dout = rng.standard_normal(out_f.shape)
    assert_close(sparse.backward(dout, ctx_s), full.backward(dout, ctx_f))
    assert_close(ctx_s.lse, ctx_f.lse)


@pytest.mark.parametrize("impl", ["ref", "numba"])
@pytest.mark.parametrize("name,n,m,build,opts", PATTERNS[::2], ids=[p[0] for p in PATTERNS[::2]])
def test_gradcheck(name, n, m, build, opts, impl, rng):
    x, mask, options = _setup(rng, n, m, build, opts)
    check_vjp(sparse.forward, sparse.backward, x, {"mask": mask, "impl": impl, **options},
              rng=rng).assert_ok(GRAD_FD)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,n,m,build,opts", PATTERNS[1::2], ids=[p[0] for p in PATTERNS[1::2]])
def test_numba_equals_reference_also_crossed(name, n, m, build, opts, dtype, rng):
    x, mask, options = _setup(rng, n, m, build, opts, dtype)
    out_r, ctx_r = sparse.forward(**x, mask=mask, impl="ref", **options)
    out_n, ctx_n = sparse.forward(**x, mask=mask, impl="numba", **options)
    assert_close(out_n, out_r)
    assert_close(ctx_n.p, ctx_r.p)
    assert_close(ctx_n.lse, ctx_r.lse)
    dout = rng.standard_normal(out_r.shape).astype(dtype)
    g_rr = sparse.backward(dout, ctx_r, impl="ref")
    assert_close(sparse.backward(dout, ctx_r, impl="numba"), g_rr)   # ref fwd, numba bwd
    assert_close(sparse.backward(dout, ctx_n, impl="ref"), g_rr)     # numba fwd, ref bwd
    assert_close(sparse.backward(dout, ctx_n), g_rr)


def test_one_and_two_threads_give_the_same_bits(rng):
    x, mask, options = _setup(rng, 40, 40, lambda: masks.bigbird(
        40, 4, 2, 3, np.random.default_rng(4)), {"rel": True, "kpad": True})
    dout = rng.standard_normal((2, 2, 40, 3))
    res = []
    for t in (1, 2):
        with num_threads(t):
            out, ctx = sparse.forward(**x, mask=mask, **options)
            res.append((out, sparse.backward(dout, ctx)))
    np.testing.assert_array_equal(res[0][0], res[1][0])
    for key in res[0][1]:
        np.testing.assert_array_equal(res[0][1][key], res[1][1][key], err_msg=key)


def test_matches_row_by_row_oracle(rng):
    x = random_qkv(rng, (3,), n=6, m=8, d=4, dv=2)
    mask = masks.random(6, 3, np.random.default_rng(5), m=8)
    out, _ = sparse.forward(**x, mask=mask, scale=0.3)
    assert_close(out, attention_rows(**x, allowed=mask.toarray(), scale=0.3))


@pytest.mark.parametrize("impl", ["ref", "numba"])
def test_empty_rows_and_padded_rows_give_zero(impl, rng):
    x = random_qkv(rng, (2, 2), n=6, m=6)
    mask = _holes(6, 6, 7)                                        # row 1 empty
    kp = np.ones((2, 1, 6), bool)
    kp[1] = False                                                 # batch 1: every key padded
    out, ctx = sparse.forward(**x, mask=mask, key_padding_mask=kp, impl=impl)
    assert np.all(out[:, :, 1] == 0) and np.all(out[1] == 0)
    assert np.all(ctx.lse[:, :, 1] == -np.inf) and np.all(ctx.lse[1] == -np.inf)
    g = sparse.backward(rng.standard_normal(out.shape), ctx)
    assert np.all(g["q"][:, :, 1] == 0) and np.all(g["q"][1] == 0)
    assert np.all(g["k"][1] == 0) and np.all(g["v"][1] == 0)
    assert all(np.all(np.isfinite(a)) for a in g.values())


@pytest.mark.parametrize("impl", ["ref", "numba"])
@pytest.mark.parametrize("n,m", [(0, 4), (4, 0), (3, 3)])
def test_degenerate_sizes_and_empty_pattern(n, m, impl, rng):
    x = random_qkv(rng, (2,), n=n, m=m, d=3, dv=2)
    mask = sp.csr_array((n, m), dtype=bool)                       # nnz = 0
    out, ctx = sparse.forward(**x, mask=mask, impl=impl)
    assert out.shape == (2, n, 2) and np.all(out == 0)
    g = sparse.backward(np.ones_like(out), ctx)
    assert all(np.all(a == 0) for a in g.values())


def test_pattern_and_scipy_inputs_agree_and_p_is_sparse(rng):
    x = random_qkv(rng, (2, 2), n=9, m=9)
    mask = masks.bigbird(9, 1, 1, 2, np.random.default_rng(6))
    pat = Pattern.from_scipy(mask)
    out_p, ctx = sparse.forward(**x, mask=pat)
    assert ctx.p.shape == (4, pat.nnz)                            # O(nnz), not O(N·M)
    for other in (mask, sp.csr_matrix(mask), sp.coo_array(mask), sp.csc_matrix(mask)):
        assert_close(sparse.forward(**x, mask=other)[0], out_p)


def test_per_head_masks_equal_separate_calls(rng):
    x = random_qkv(rng, (2, 2), n=7, m=7)
    ms = [masks.local(7, 1), masks.causal(7)]
    out, _ = sparse.forward(**x, mask=ms)
    for h in range(2):
        xh = {k: a[:, h] for k, a in x.items()}
        assert_close(out[:, h], sparse.forward(**xh, mask=ms[h])[0])


def test_nan_in_a_key_reaches_only_the_rows_that_store_it(rng):
    x = random_qkv(rng, (1,), n=8, m=8)
    x["k"] = x["k"].copy()
    x["k"][0, 6, 0] = np.nan
    mask = masks.local(8, 1)
    for impl in ("ref", "numba"):
        out, _ = sparse.forward(**x, mask=mask, impl=impl)
        bad = np.isnan(out[0]).any(axis=-1)
        np.testing.assert_array_equal(bad, mask.toarray()[:, 6])


def test_noncontiguous_and_readonly_inputs(rng):
    x = random_qkv(rng, (2, 2), n=6, d=4)
    mask = masks.local(6, 2)
    ref, _ = sparse.forward(**x, mask=mask)
    fortran = {k: np.asfortranarray(a) for k, a in x.items()}
    ro = {k: a.copy() for k, a in x.items()}
    for a in ro.values():
        a.flags.writeable = False
    for variant in (fortran, ro):
        assert_close(sparse.forward(**variant, mask=mask)[0], ref)


def test_rel_bias_gradient_is_reduced_to_its_shape(rng):
    x = random_qkv(rng, (2, 3), n=4, m=5)
    mask = masks.local(4, 1, m=5)
    for shape in [(8,), (1, 8), (3, 8), (2, 1, 8), (2, 3, 8)]:
        rel = rng.standard_normal(shape)
        out, ctx = sparse.forward(**x, mask=mask, rel_bias=rel)
        g = sparse.backward(rng.standard_normal(out.shape), ctx)
        assert g["rel_bias"].shape == shape
        check_vjp(sparse.forward, sparse.backward, {**x, "rel_bias": rel}, {"mask": mask},
                  rng=rng).assert_ok(GRAD_FD)


# ---------------------------------------------------------------- kernel schedule paths
# At test sizes the default schedule sends almost every entry down the per-entry path; the
# small knobs below make the same small patterns use dense tiles (several per group, several
# phases), heavy keys and several row/key blocks of the scattered walks.

SMALL_KNOBS = {"TILE": 3, "MIN_RUN": 2, "MIN_EFF": 0.5, "HEAVY_FRAC": 0.2, "HEAVY_MAX": 3,
               "ROW_CHUNK": 5, "KEY_BLOCK": 4, "KEY_CHUNK": 6, "ROW_BLOCK": 3}


@pytest.fixture
def small_knobs(monkeypatch):
    monkeypatch.setattr(sparse, "KNOBS", sparse_plan.Knobs()._replace(**SMALL_KNOBS))


SCHEDULE_PATTERNS = [
    ("bigbird", 24, 24, lambda: masks.bigbird(24, 2, 2, 3, np.random.default_rng(8)), {}),
    ("longformer_kpad", 20, 20, lambda: masks.union(masks.local(20, 3), masks.global_tokens(
        20, [0, 7])), {"kpad": True, "rel": True}),
    ("causal_rect", 13, 17, lambda: masks.causal(13, 17, offset=4), {"scale": 0.7}),
    ("holes", 15, 15, lambda: _holes(15, 15, 9), {"kpad": True}),
    ("per_head", 16, 16, lambda: [masks.bigbird(16, 2, 1, 2, np.random.default_rng(10)),
                                  masks.local(16, 3)], {"rel": True}),
]


def test_small_knobs_plan_uses_every_path(small_knobs):
    pat = Pattern.from_scipy(masks.bigbird(24, 2, 2, 3, np.random.default_rng(8)))
    pl = sparse._plan(pat, 1)
    dense = int((pl.row_eb - pl.row_ea).sum())
    heavy = int(np.count_nonzero(pl.hmap[pat.indices] >= 0)) - int(np.count_nonzero(
        (pl.hmap[pat.indices] >= 0) & (np.arange(pat.nnz) >= pl.row_ea[pat.row_ids])
        & (np.arange(pat.nnz) < pl.row_eb[pat.row_ids])))
    assert dense > 0 and heavy > 0 and pl.n_scattered > 0
    assert dense + heavy + pl.n_scattered == pat.nnz                 # a partition
    assert pl.phases()[0].shape[0] - 1 > 1                            # several phases
    assert pl.r_split[1] > 1 and pl.c_split[1] > 1                    # several blocks
    # both blocked orders hold each scattered entry once
    np.testing.assert_array_equal(np.sort(pl.r_pos), np.arange(pl.n_scattered))
    np.testing.assert_array_equal(pl.c_row[pl.r_pos], pl.r_row)
    np.testing.assert_array_equal(pl.c_col[pl.r_pos], pl.r_col)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,n,m,build,opts", SCHEDULE_PATTERNS,
                         ids=[p[0] for p in SCHEDULE_PATTERNS])
def test_tiled_kernels_equal_reference(name, n, m, build, opts, dtype, rng, small_knobs):
    x, mask, options = _setup(rng, n, m, build, opts, dtype)
    out_r, ctx_r = sparse.forward(**x, mask=mask, impl="ref", **options)
    out_n, ctx_n = sparse.forward(**x, mask=mask, impl="numba", **options)
    assert_close(out_n, out_r)
    assert_close(ctx_n.p, ctx_r.p)
    assert_close(ctx_n.lse, ctx_r.lse)
    dout = rng.standard_normal(out_r.shape).astype(dtype)
    g_rr = sparse.backward(dout, ctx_r, impl="ref")
    assert_close(sparse.backward(dout, ctx_n), g_rr)
    assert_close(sparse.backward(dout, ctx_r, impl="numba"), g_rr)    # crossed


def test_tiled_kernels_gradcheck(rng, small_knobs):
    x, mask, options = _setup(rng, 16, 16, SCHEDULE_PATTERNS[4][3], {"rel": True, "kpad": True})
    check_vjp(sparse.forward, sparse.backward, x, {"mask": mask, "impl": "numba", **options},
              rng=rng).assert_ok(GRAD_FD)


@pytest.mark.parametrize("batch", [(2, 2), (1, 2)])
def test_tiled_kernels_one_and_two_threads_same_bits(batch, rng, small_knobs):
    """(1, 2): the backward's per-batch-item schedule (1 thread) against the phase schedule
    (2 threads); (2, 2): the per-batch-item schedule with 1 and 2 threads."""
    n = 24
    x = random_qkv(rng, batch, n=n, d=5, dv=3)
    x["rel_bias"] = rng.standard_normal((2, 2 * n - 1))[:batch[1]]
    mask = masks.bigbird(n, 2, 2, 3, np.random.default_rng(11))
    dout = rng.standard_normal((*batch, n, 3))
    res = []
    for t in (1, 2):
        with num_threads(t):
            out, ctx = sparse.forward(**x, mask=mask)
            res.append((out, sparse.backward(dout, ctx)))
    np.testing.assert_array_equal(res[0][0], res[1][0])
    for key in res[0][1]:
        np.testing.assert_array_equal(res[0][1][key], res[1][1][key], err_msg=key)


@pytest.mark.parametrize("name,n,m,build,opts", SCHEDULE_PATTERNS,
                         ids=[p[0] for p in SCHEDULE_PATTERNS])
def test_finite_and_checking_kernels_give_the_same_bits(name, n, m, build, opts, rng,
                                                        small_knobs, monkeypatch):
    """On finite inputs the kernels compiled for finite inputs (no per-tile checks, no
    fallbacks) and the checking kernels give the same bits."""
    x, mask, options = _setup(rng, n, m, build, opts, np.float32)
    dout = rng.standard_normal(x["q"].shape[:-1] + x["v"].shape[-1:]).astype(np.float32)
    res = []
    for finite in (True, False):
        monkeypatch.setattr(sparse, "_all_finite", lambda *arrays, f=finite: f)
        out, ctx = sparse.forward(**x, mask=mask, impl="numba", **options)
        res.append({"out": out, **sparse.backward(dout, ctx)})
    for key in res[0]:
        np.testing.assert_array_equal(res[0][key], res[1][key], err_msg=key)


@pytest.mark.parametrize("where", ["q", "k", "v", "dout"])
def test_tiled_kernels_non_finite_reach_what_the_reference_reaches(where, rng, small_knobs):
    """A dense product must not spread a NaN (0 · NaN) to rows or keys that do not store
    the entry: the tiles fall back to entry by entry, so the NaN pattern equals the
    reference's."""
    n = 24
    x = random_qkv(rng, (1, 2), n=n, d=5, dv=3)
    mask = masks.bigbird(n, 2, 2, 3, np.random.default_rng(12))
    dout = rng.standard_normal((1, 2, n, 3))
    for row in (1, 13):                                           # a heavy key, a window key
        arrays = {**x, "dout": dout}
        arrays[where] = arrays[where].copy()
        arrays[where][0, 1, row, 0] = np.nan
        outs = {}
        for impl in ("ref", "numba"):
            out, ctx = sparse.forward(arrays["q"], arrays["k"], arrays["v"], mask=mask,
                                      impl=impl)
            outs[impl] = {"out": out, **sparse.backward(arrays["dout"], ctx)}
        for key in outs["ref"]:
            nan_r, nan_n = np.isnan(outs["ref"][key]), np.isnan(outs["numba"][key])
            np.testing.assert_array_equal(nan_n, nan_r, err_msg=f"{where} {row} {key}")
            assert_close(np.where(nan_n, 0, outs["numba"][key]),
                         np.where(nan_r, 0, outs["ref"][key]))


def test_zero_value_dim_uses_the_reference(rng):
    x = random_qkv(rng, (2,), n=5, d=3, dv=0)
    mask = masks.local(5, 1)
    out, ctx = sparse.forward(**x, mask=mask)
    assert out.shape == (2, 5, 0)
    g = sparse.backward(np.ones_like(out), ctx)
    assert_close(g, sparse.backward(np.ones_like(out), ctx, impl="ref"))
    assert np.all(g["q"] == 0) and np.all(g["k"] == 0)


# ---------------------------------------------------------------- invalid input

def _x(rng):
    return random_qkv(rng, (2, 2), n=5, m=6, d=4)


BAD_OPTIONS = [
    ({"mask": np.ones((5, 6), bool)}, TypeError, "mask"),
    ({"mask": sp.csr_array(np.ones((6, 5), bool))}, ValueError, "mask"),
    ({"mask": sp.csr_array(np.ones((5, 6)))}, TypeError, "bool"),
    ({"mask": [masks.local(5, 1, m=6)] * 3}, ValueError, "per-head"),
    ({"mask": [masks.local(5, 1, m=6), masks.local(6, 1)]}, ValueError, r"mask\[1\]"),
    ({"mask": masks.local(5, 1, m=6), "causal": 1}, TypeError, "causal"),
    ({"mask": masks.local(5, 1, m=6), "impl": "cuda"}, ValueError, "impl"),
    ({"mask": masks.local(5, 1, m=6), "rel_bias": np.ones(9)}, ValueError, "rel_bias"),
    ({"mask": masks.local(5, 1, m=6), "key_padding_mask": np.ones(5, bool)}, ValueError,
     "key_padding_mask"),
    ({"mask": masks.local(5, 1, m=6), "scale": float("nan")}, ValueError, "scale"),
]


@pytest.mark.parametrize("opts,exc,match", BAD_OPTIONS)
def test_invalid_options(opts, exc, match, rng):
    with pytest.raises(exc, match=match):
        sparse.forward(**_x(rng), **opts)


def test_explicit_false_and_missing_mask(rng):
    bad = sp.csr_array((np.array([True, False]), np.array([0, 1]), np.array([0, 2, 2, 2, 2, 2])),
                       shape=(5, 6))
    with pytest.raises(ValueError, match="explicit False"):
        sparse.forward(**_x(rng), mask=bad)
    with pytest.raises(TypeError, match="mask"):
        sparse.forward(**_x(rng))


def test_backward_rejects_foreign_ctx(rng):
    with pytest.raises(TypeError, match="ctx"):
        sparse.backward(np.zeros((2, 2, 5, 4)), object())
