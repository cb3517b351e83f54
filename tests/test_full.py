"""Exact attention: oracle equality, causal alignment, masks, edge cases, validation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from tinyeff.attention import full
from tinyeff.testing import GRAD_FD, assert_close, check_vjp, random_qkv

from .oracles import attention_rows


def test_matches_row_by_row_oracle(rng):
    x = random_qkv(rng, (2, 3), n=6, m=9, d=4, dv=5)
    bias = rng.standard_normal((3, 6, 9))
    allowed = rng.random((6, 9)) < 0.7
    out, _ = full.forward(**x, bias=bias, mask=allowed, scale=0.3)
    assert_close(out, attention_rows(**x, allowed=allowed, bias=bias, scale=0.3))


@pytest.mark.parametrize("n,m", [(6, 6), (4, 9), (9, 4)])
def test_causal_equals_explicit_lower_triangular_mask(n, m, rng):
    x = random_qkv(rng, (2,), n=n, m=m, d=3)
    tril = np.tril(np.ones((n, m), bool))             # top-left alignment, as torch is_causal
    out_c, ctx_c = full.forward(**x, causal=True)
    out_m, ctx_m = full.forward(**x, mask=tril)
    assert_close(out_c, out_m)
    dout = rng.standard_normal(out_c.shape)
    assert_close(full.backward(dout, ctx_c), full.backward(dout, ctx_m))
    assert_close(out_c, attention_rows(**x, allowed=tril))


def test_causal_first_row_sees_only_first_key(rng):
    x = random_qkv(rng, (1,), n=5, d=3)
    out, _ = full.forward(**x, causal=True)
    assert_close(out[:, 0], x["v"][:, 0])


def test_scipy_sparse_mask_equals_dense(rng):
    x = random_qkv(rng, (2, 2), n=7, m=5)
    dense = rng.random((7, 5)) < 0.5
    for make in (sp.csr_array, sp.csr_matrix, sp.coo_array):
        out_s, _ = full.forward(**x, mask=make(dense))
        out_d, _ = full.forward(**x, mask=dense)
        assert_close(out_s, out_d)


def test_sparse_mask_with_explicit_false_is_rejected(rng):
    x = random_qkv(rng, (1,), n=3)
    m = sp.csr_array((np.array([True, False]), np.array([0, 1]), np.array([0, 2, 2, 2])),
                     shape=(3, 3))
    with pytest.raises(ValueError, match="explicit False"):
        full.forward(**x, mask=m)


def test_fully_masked_rows_give_zero_output_and_zero_gradient(rng):
    x = random_qkv(rng, (2, 2), n=5, m=6)
    mask = rng.random((5, 6)) < 0.6
    mask[[1, 3]] = False
    out, ctx = full.forward(**x, mask=mask)
    assert np.all(out[..., [1, 3], :] == 0)
    assert np.all(np.isinf(ctx.lse[..., [1, 3]])) and np.all(ctx.lse[..., [1, 3]] < 0)
    g = full.backward(rng.standard_normal(out.shape), ctx)
    assert np.all(g["q"][..., [1, 3], :] == 0)
    assert all(np.all(np.isfinite(a)) for a in g.values())
    check_vjp(full.forward, full.backward, x, {"mask": mask}, rng=rng).assert_ok(GRAD_FD)


def test_minus_inf_bias_acts_as_a_mask(rng):
    x = random_qkv(rng, (2,), n=4, m=5)
    mask = rng.random((4, 5)) < 0.5
    mask[0] = False
    bias = np.where(mask, 0.0, -np.inf)
    out_b, _ = full.forward(**x, bias=bias)
    out_m, _ = full.forward(**x, mask=mask)
    assert_close(out_b, out_m)


def test_empty_query_and_key_axes(rng):
    x = random_qkv(rng, (2,), n=0, m=4, d=3, dv=2)
    out, ctx = full.forward(**x)
    assert out.shape == (2, 0, 2)
    g = full.backward(out.copy(), ctx)
    assert g["k"].shape == (2, 4, 3) and np.all(g["k"] == 0)
    x = random_qkv(rng, (2,), n=3, m=0, d=3, dv=2)
    out, ctx = full.forward(**x)
    assert out.shape == (2, 3, 2) and np.all(out == 0)
    g = full.backward(np.ones_like(out), ctx)
    assert np.all(g["q"] == 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_logits_stay_finite(dtype, rng):
    x = random_qkv(rng, (2,), n=6, d=4, dtype=dtype)
    bias = (rng.choice([-1e4, 1e4], size=(6, 6))).astype(dtype)
    for big_q in (x["q"] * 1e4, x["q"]):
        args = {**x, "q": big_q.astype(dtype)}
        out, ctx = full.forward(**args, bias=bias, scale=1.0)
        g = full.backward(np.ones_like(out), ctx)
        assert np.all(np.isfinite(out)) and all(np.all(np.isfinite(a)) for a in g.values())


def test_extreme_logits_select_the_argmax(rng):
    x = random_qkv(rng, (1,), n=3, m=4)
    bias = np.full((3, 4), -1e4)
    bias[np.arange(3), [2, 0, 3]] = 1e4
    out, _ = full.forward(**x, bias=bias)
    assert_close(out[0], x["v"][0, [2, 0, 3]])


def test_nan_propagates_only_to_the_affected_row(rng):
    x = random_qkv(rng, (1,), n=4, m=4)
    x["q"] = x["q"].copy()
    x["q"][0, 2, 1] = np.nan
    out, _ = full.forward(**x)
    assert np.all(np.isnan(out[0, 2]))
    assert np.all(np.isfinite(np.delete(out[0], 2, axis=0)))


def test_noncontiguous_and_readonly_inputs(rng):
    x = random_qkv(rng, (2, 2), n=6, d=4)
    ref, _ = full.forward(**x)
    fortran = {k: np.asfortranarray(a) for k, a in x.items()}
    flipped = {k: a[..., ::-1, :][..., ::-1, :] for k, a in x.items()}
    ro = {k: a.copy() for k, a in x.items()}
    for a in ro.values():
        a.flags.writeable = False
    for variant in (fortran, flipped, ro):
        assert_close(full.forward(**variant)[0], ref)


def test_bias_gradient_is_reduced_to_its_shape(rng):
    x = random_qkv(rng, (2, 3), n=4, m=5)
    for shape in [(4, 5), (1, 4, 5), (3, 4, 5), (2, 1, 4, 5), (3, 1, 5), (1, 5)]:
        bias = rng.standard_normal(shape)
        out, ctx = full.forward(**x, bias=bias)
        g = full.backward(rng.standard_normal(out.shape), ctx)
        assert g["bias"].shape == shape
        check_vjp(full.forward, full.backward, {**x, "bias": bias}, rng=rng).assert_ok(GRAD_FD)


# ---------------------------------------------------------------- invalid input

def _x(rng, **kw):
    return random_qkv(rng, (2, 2), n=5, m=6, d=4, **kw)


BAD = [
    ("rank", lambda x: {**x, "q": x["q"][0, 0, 0]}, ValueError, "q"),
    ("list", lambda x: {**x, "k": x["k"].tolist()}, TypeError, "k"),
    ("int", lambda x: {**x, "v": x["v"].astype(np.int64)}, TypeError, "v"),
    ("mixed", lambda x: {**x, "v": x["v"].astype(np.float32)}, TypeError, "dtype"),
    ("batch", lambda x: {**x, "k": x["k"][:1]}, ValueError, "batch"),
    ("batch_bcast", lambda x: {**x, "q": x["q"][:, :1]}, ValueError, "batch"),
    ("D", lambda x: {**x, "k": x["k"][..., :3]}, ValueError, "last dimension"),
    ("M", lambda x: {**x, "v": x["v"][..., :5, :]}, ValueError, "number of keys"),
    ("float16", lambda x: {k: a.astype(np.float16) for k, a in x.items()}, TypeError, "float32"),
]


@pytest.mark.parametrize("name,edit,exc,match", BAD, ids=[b[0] for b in BAD])
def test_invalid_arrays(name, edit, exc, match, rng):
    with pytest.raises(exc, match=match):
        full.forward(**edit(_x(rng)))


BAD_OPTIONS = [
    ({"mask": np.ones((5, 5), bool)}, ValueError, "mask"),
    ({"mask": np.ones((3, 5, 6), bool)}, ValueError, "mask"),
    ({"mask": np.ones((5, 6))}, TypeError, "mask"),
    ({"mask": [[True] * 6] * 5}, TypeError, "mask"),
    ({"mask": sp.csr_array(np.ones((6, 5), bool))}, ValueError, "mask"),
    ({"bias": np.ones((5, 5))}, ValueError, "bias"),
    ({"bias": np.ones((1, 2, 2, 5, 6))}, ValueError, "bias"),
    ({"bias": np.ones((5, 6), np.float32)}, TypeError, "bias"),
    ({"scale": float("nan")}, ValueError, "scale"),
    ({"scale": float("inf")}, ValueError, "scale"),
    ({"scale": "0.5"}, TypeError, "scale"),
    ({"scale": True}, TypeError, "scale"),
    ({"causal": 1}, TypeError, "causal"),
    ({"impl": "cuda"}, ValueError, "impl"),
]


@pytest.mark.parametrize("opts,exc,match", BAD_OPTIONS)
def test_invalid_options(opts, exc, match, rng):
    with pytest.raises(exc, match=match):
        full.forward(**_x(rng), **opts)


def test_unknown_option_is_a_type_error(rng):
    with pytest.raises(TypeError, match="window"):
        full.forward(**_x(rng), window=3)


def test_backward_rejects_foreign_ctx(rng):
    with pytest.raises(TypeError, match="ctx"):
        full.backward(np.zeros((2, 2, 5, 4)), object())


def test_rel_bias_equals_the_dense_offset_bias(rng):
    x = random_qkv(rng, (2, 3), n=4, m=6)
    rel = rng.standard_normal((3, 4 + 6 - 1))
    dense = np.array([[rel[:, i - j + 5] for j in range(6)] for i in range(4)])  # (N, M, H)
    dense = np.moveaxis(dense, -1, 0)                                            # (H, N, M)
    out_r, ctx_r = full.forward(**x, rel_bias=rel)
    out_d, ctx_d = full.forward(**x, bias=dense)
    assert_close(out_r, out_d)
    dout = rng.standard_normal(out_r.shape)
    g_r, g_d = full.backward(dout, ctx_r), full.backward(dout, ctx_d)
    want = np.zeros_like(rel)
    for i in range(4):
        for j in range(6):
            want[:, i - j + 5] += g_d["bias"][:, i, j]
    assert_close(g_r["rel_bias"], want)


def test_key_padding_mask_equals_pair_mask(rng):
    x = random_qkv(rng, (2, 3), n=4, m=6)
    kp = rng.random((2, 1, 6)) < 0.7
    kp[1, 0, :] = False
    out_k, _ = full.forward(**x, key_padding_mask=kp, causal=True)
    out_m, _ = full.forward(**x, mask=kp[..., None, :], causal=True)
    assert_close(out_k, out_m)
    assert np.all(out_k[1] == 0)
    with pytest.raises(ValueError, match="key_padding_mask"):
        full.forward(**x, key_padding_mask=np.ones((2, 3, 4), bool))
    with pytest.raises(ValueError, match="rel_bias"):
        full.forward(**x, rel_bias=np.ones((3, 10)))
