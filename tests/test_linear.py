"""Linear attention: quadratic oracle, kernel parity, decode form, padding, edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from tinyeff.attention import _linear_engine as engine
from tinyeff.attention import linear
from tinyeff.kernels._jit import num_threads
from tinyeff.ops import feature_maps as fm
from tinyeff.testing import GRAD_FD, assert_close, check_vjp, random_qkv

PHI = {"elu": fm.elu_plus_one, "relu": fm.relu_plus_one}


def quadratic(q, k, v, feature_map="elu", allowed=None, eps=1e-6, normalize=True):
    """The O(N²) form: A_ij = φ(q_i)·φ(k_j) on the allowed pairs, out = A v / (A 1 + eps)."""
    phi = PHI[feature_map]
    a = phi(q) @ phi(k).swapaxes(-1, -2)                           # (..., N, M)
    if allowed is not None:
        a = np.where(allowed, a, 0)
    if not normalize:
        return a @ v
    return (a @ v) / (a.sum(-1, keepdims=True) + eps)


@pytest.mark.parametrize("feature_map", ["elu", "relu"])
@pytest.mark.parametrize("n,m", [(7, 7), (4, 9), (9, 4), (1, 1)])
@pytest.mark.parametrize("impl", ["ref", "numba"])
def test_causal_equals_quadratic_lower_triangular(feature_map, n, m, impl, rng):
    x = random_qkv(rng, (2, 3), n=n, m=m, d=4, dv=5)
    tril = np.tri(n, m, dtype=bool)                                # top-left, as full
    out, _ = linear.forward(**x, causal=True, feature_map=feature_map, impl=impl)
    assert_close(out, quadratic(**x, feature_map=feature_map, allowed=tril))


@pytest.mark.parametrize("impl", ["ref", "numba"])
def test_noncausal_equals_quadratic_with_padding(impl, rng):
    x = random_qkv(rng, (2, 2), n=6, m=8, d=3, dv=2)
    pad = rng.random((2, 1, 8)) < 0.7
    pad[0, 0, 0] = True
    out, _ = linear.forward(**x, key_padding_mask=pad, impl=impl)
    assert_close(out, quadratic(**x, allowed=pad[..., None, :]))
    out, _ = linear.forward(**x, key_padding_mask=pad, causal=True, impl=impl)
    assert_close(out, quadratic(**x, allowed=pad[..., None, :] & np.tri(6, 8, dtype=bool)))


def test_eps_and_unnormalized_forms(rng):
    x = random_qkv(rng, (2,), n=5, d=3)
    out, _ = linear.forward(**x, eps=0.25)
    assert_close(out, quadratic(**x, eps=0.25))
    out, _ = linear.forward(**x, normalize=False, causal=True)
    assert_close(out, quadratic(**x, allowed=np.tri(5, dtype=bool), normalize=False))
    phi_q, phi_k = fm.elu_plus_one(x["q"]), fm.elu_plus_one(x["k"])
    out, _ = linear.forward(**x, normalize=False)
    assert_close(out, phi_q @ (phi_k.swapaxes(-1, -2) @ x["v"]))


def test_decode_form_equals_causal_rows(rng):
    """Recurrent form: S += φ(k)vᵀ, z += φ(k), out = φ(q)S/(φ(q)·z + eps), token by token."""
    x = random_qkv(rng, (2,), n=9, d=4, dv=3)
    out, _ = linear.forward(**x, causal=True)
    s = np.zeros((2, 4, 3))
    z = np.zeros((2, 4))
    for i in range(9):
        phi_k = fm.elu_plus_one(x["k"][:, i])                      # (2, D)
        s += phi_k[:, :, None] * x["v"][:, i, None, :]
        z += phi_k
        phi_q = fm.elu_plus_one(x["q"][:, i])
        row = np.einsum("bf,bfe->be", phi_q, s) / (np.sum(phi_q * z, -1, keepdims=True) + 1e-6)
        assert_close(out[:, i], row)


@pytest.mark.parametrize("impl", ["ref", "numba"])
def test_causal_prefix_consistency(impl, rng):
    x = random_qkv(rng, (2, 2), n=10, d=3)
    out, _ = linear.forward(**x, causal=True, impl=impl)
    for t in (1, 4, 9):
        part, _ = linear.forward(**{a: b[..., :t, :] for a, b in x.items()}, causal=True,
                                 impl=impl)
        np.testing.assert_array_equal(part, out[..., :t, :])


def test_padding_invariance_exact_but_not_values_only(rng):
    x = random_qkv(rng, (2,), n=5, d=3)
    extra = random_qkv(rng, (2,), n=4, d=3)
    padded = {"q": x["q"], "k": np.concatenate([x["k"], 3 * extra["k"]], axis=1),
              "v": np.concatenate([x["v"], extra["v"]], axis=1)}
    mask = (np.arange(9) < 5)[None, :]                             # (1, M) broadcast to batch
    ref, _ = linear.forward(**x)
    out, _ = linear.forward(**padded, key_padding_mask=mask)
    assert_close(out, ref)
    vo, _ = linear.forward(**padded, key_padding_mask=mask, mask_mode="values_only")
    assert not np.allclose(vo, ref)                                # padded keys still count
    den = fm.elu_plus_one(x["q"]) @ fm.elu_plus_one(padded["k"]).sum(1)[:, :, None]
    num = quadratic(**x, normalize=False)
    assert_close(vo, num / (den + 1e-6))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", ["ref", "numba"])
def test_fully_padded_rows_give_zero_and_zero_gradient(causal, impl, rng):
    x = random_qkv(rng, (2, 2), n=6, d=3)
    mask = np.ones((2, 1, 6), bool)
    mask[1] = False                                                # batch 1: nothing real
    mask[0, 0, :2] = False                                         # batch 0: rows 0, 1 empty
    out, ctx = linear.forward(**x, key_padding_mask=mask, causal=causal, impl=impl)
    assert np.all(out[1] == 0)
    g = linear.backward(rng.standard_normal(out.shape), ctx)
    assert np.all(g["q"][1] == 0) and np.all(g["k"][1] == 0) and np.all(g["v"][1] == 0)
    assert np.all(g["k"][0, :, :2] == 0) and np.all(g["v"][0, :, :2] == 0)
    if causal:
        assert np.all(out[0, :, :2] == 0) and np.all(g["q"][0, :, :2] == 0)
    opts = {"key_padding_mask": mask, "causal": causal, "impl": impl}
    check_vjp(linear.forward, linear.backward, x, opts, rng=rng).assert_ok(GRAD_FD)


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("shape", [((3,), 1, 1, 2, 2), ((2, 2), 11, 11, 3, 5),
                                   ((1,), 6, 13, 4, 1), ((2,), 13, 6, 2, 3)])
@pytest.mark.parametrize("causal,fused", [(False, False), (True, False), (False, True),
                                          (True, True)])
def test_numba_matches_reference_and_crosswires(chunk, shape, causal, fused, rng,
                                                monkeypatch):
    """The chunked kernels (Performer's engine) and, for elu/relu, the fused ones (the
    non-causal ones with sums split over several ranges of chunks)."""
    monkeypatch.setattr(engine, "CHUNK", chunk)
    monkeypatch.setattr(engine, "CHUNK_FUSED", chunk)
    if not fused:
        monkeypatch.setattr(engine, "_FUSED", ())
    batch, n, m, d, dv = shape
    x = random_qkv(rng, batch, n=n, m=m, d=d, dv=dv)
    mask = rng.random((*batch, m)) < 0.8
    opts = {"causal": causal, "key_padding_mask": mask, "feature_map": "relu" if n % 2 else "elu",
            "mask_mode": "values_only" if chunk == 3 else "exact",
            "normalize": chunk != 1}
    out_r, ctx_r = linear.forward(**x, **opts, impl="ref")
    out_n, ctx_n = linear.forward(**x, **opts, impl="numba")
    assert_close(out_n, out_r)
    assert_close(ctx_n.key_scale, ctx_r.key_scale)
    dout = rng.standard_normal(out_r.shape)
    ref = linear._backward_ref
    g_ref = engine.attend_backward(dout, ctx_r, "ref", backward_ref=ref)
    assert_close(engine.attend_backward(dout, ctx_r, "numba", backward_ref=ref), g_ref)
    assert_close(engine.attend_backward(dout, ctx_n, "ref", backward_ref=ref), g_ref)
    assert_close(linear.backward(dout, ctx_n), g_ref)


@pytest.mark.numba_threads
@pytest.mark.parametrize("causal", [False, True])
def test_one_and_two_threads_bit_identical(causal, rng, monkeypatch):
    monkeypatch.setattr(engine, "CHUNK", 5)
    monkeypatch.setattr(engine, "CHUNK_FUSED", 2)                  # 6 chunks, 6 ranges
    x = random_qkv(rng, (2, 3), n=12, d=4, dv=3)
    dout = rng.standard_normal((2, 3, 12, 3))
    res = []
    for threads in (1, 2):
        with num_threads(threads):
            out, ctx = linear.forward(**x, causal=causal)
            res.append((out, linear.backward(dout, ctx)))
    np.testing.assert_array_equal(res[0][0], res[1][0])
    for name in "qkv":
        np.testing.assert_array_equal(res[0][1][name], res[1][1][name])


def test_float32_stays_float32(rng):
    x = random_qkv(rng, (2,), n=6, d=3, dtype=np.float32)
    for causal in (False, True):
        out, ctx = linear.forward(**x, causal=causal)
        assert out.dtype == np.float32
        g = linear.backward(np.ones_like(out), ctx)
        assert all(a.dtype == np.float32 for a in g.values())


def test_empty_sequences(rng):
    x = random_qkv(rng, (2,), n=0, m=3, d=3)
    for causal in (False, True):
        out, ctx = linear.forward(**x, causal=causal)
        assert out.shape == (2, 0, 3)
        g = linear.backward(out, ctx)
        assert np.all(g["k"] == 0)
    x = random_qkv(rng, (2,), n=4, m=0, d=3)
    for causal in (False, True):
        out, ctx = linear.forward(**x, causal=causal)
        assert out.shape == (2, 4, 3) and np.all(out == 0)
        assert np.all(linear.backward(np.ones_like(out), ctx)["q"] == 0)


def test_nan_in_query_row_stays_in_that_row(rng):
    x = random_qkv(rng, (1,), n=5, d=3)
    x["q"][0, 2, 1] = np.nan
    for causal in (False, True):
        out, _ = linear.forward(**x, causal=causal)
        assert np.all(np.isnan(out[0, 2])) and np.all(np.isfinite(np.delete(out[0], 2, 0)))


def test_invalid_input(rng):
    x = random_qkv(rng, (2,), n=4, d=3)
    with pytest.raises(ValueError, match="feature_map"):
        linear.forward(**x, feature_map="softmax")
    with pytest.raises(ValueError, match="mask"):
        linear.forward(**x, key_padding_mask=np.ones((2, 5), bool))
    with pytest.raises(TypeError, match="mask"):
        linear.forward(**x, key_padding_mask=np.ones((2, 4)))
    with pytest.raises(ValueError, match="mask_mode"):
        linear.forward(**x, mask_mode="values")
    with pytest.raises(ValueError, match="eps"):
        linear.forward(**x, eps=-1.0)
    with pytest.raises(ValueError, match="impl"):
        linear.forward(**x, impl="cuda")
    with pytest.raises(TypeError, match="causal"):
        linear.forward(**x, causal=1)
    with pytest.raises(TypeError, match="dtype"):
        linear.forward(x["q"].astype(np.float32), x["k"], x["v"])
    with pytest.raises(TypeError, match="ctx"):
        linear.backward(np.zeros((2, 4, 3)), object())


@pytest.mark.parametrize("fused,causal", [(True, True), (True, False), (False, True)])
def test_read_only_inputs_add_no_kernel_signature(fused, causal, rng, monkeypatch):
    """Read-only q, k, v, mask and dout reach the kernels as writeable copies, so they reuse
    the specializations compiled for writeable inputs (tests/test_readonly_inputs.py)."""
    from tinyeff.kernels import linear as causal_kernels
    from tinyeff.kernels import linear_noncausal
    kernels = causal_kernels if causal else linear_noncausal
    if not fused:
        monkeypatch.setattr(engine, "_FUSED", ())
    x = random_qkv(rng, (2,), n=5, d=3, dv=2)
    mask = rng.random((2, 5)) < 0.8
    dout = rng.standard_normal((2, 5, 2))

    def run(args, m, g):
        out, ctx = linear.forward(**args, causal=causal, key_padding_mask=m,
                                  feature_map="relu")
        return out, linear.backward(g, ctx)

    want = run(x, mask, dout)
    before = {n: list(f.signatures) for n, f in vars(kernels).items()
              if hasattr(f, "signatures")}

    def ro(a):
        a = a.copy()
        a.setflags(write=False)
        return a

    got = run({k: ro(a) for k, a in x.items()}, ro(mask), ro(dout))
    after = {n: list(f.signatures) for n, f in vars(kernels).items()
             if hasattr(f, "signatures")}
    assert after == before
    np.testing.assert_array_equal(got[0], want[0])
    for name in "qkv":
        np.testing.assert_array_equal(got[1][name], want[1][name])
