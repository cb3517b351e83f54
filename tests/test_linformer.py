"""Linformer: reduction to full attention, exact key padding, sharing, validation."""

from __future__ import annotations

import numpy as np
import pytest

from tinyeff.attention import full, linformer
from tinyeff.testing import GRAD_FD, assert_close, check_vjp, random_qkv


def _proj(rng, *shape):
    return rng.standard_normal(shape) / np.sqrt(shape[-1])


def test_identity_projections_equal_full(rng):
    """k = N and E = F = I: Linformer is exact attention, forward and every gradient."""
    x = random_qkv(rng, (2, 3), n=6, d=4, dv=5)
    eye = np.eye(6)
    out, ctx = linformer.forward(**x, E=eye, F=eye, scale=0.7)
    out_f, ctx_f = full.forward(**x, scale=0.7)
    assert_close(out, out_f)
    dout = rng.standard_normal(out.shape)
    g, g_f = linformer.backward(dout, ctx), full.backward(dout, ctx_f)
    assert_close({n: g[n] for n in "qkv"}, g_f)


def test_equals_full_over_projected_keys(rng):
    """out == full(q, E K, F V) for per-head projections (the definition, read literally)."""
    x = random_qkv(rng, (2, 3), n=5, m=8, d=4, dv=2)
    E, F = _proj(rng, 3, 4, 8), _proj(rng, 4, 8)
    out, _ = linformer.forward(**x, E=E, F=F)
    out_f, _ = full.forward(x["q"], E @ x["k"], np.broadcast_to(F @ x["v"], (2, 3, 4, 2)))
    assert_close(out, out_f)


def test_gradients_equal_the_dense_chain_rule(rng):
    """dq, dk, dv, dE, dF == full's gradients w.r.t. (q, E K, F V) pushed through E and F."""
    x = random_qkv(rng, (2, 3), n=5, m=8, d=4, dv=2)
    E, F = _proj(rng, 3, 4, 8), _proj(rng, 4, 8)
    out, ctx = linformer.forward(**x, E=E, F=F)
    dout = rng.standard_normal(out.shape)
    g = linformer.backward(dout, ctx)
    kp, vp = E @ x["k"], F @ x["v"]                                # (2, 3, 4, 4), (2, 3, 4, 2)
    _, ctx_f = full.forward(x["q"], kp, vp)
    g_f = full.backward(dout, ctx_f)
    dkp, dvp = g_f["k"], g_f["v"]
    assert_close(g["q"], g_f["q"])
    assert_close(g["k"], np.swapaxes(E, -1, -2) @ dkp)
    assert_close(g["v"], np.swapaxes(F, -1, -2) @ dvp)
    assert_close(g["E"], (dkp @ np.swapaxes(x["k"], -1, -2)).sum(axis=0))        # (3, 4, 8)
    assert_close(g["F"], (dvp @ np.swapaxes(x["v"], -1, -2)).sum(axis=(0, 1)))   # (4, 8)


@pytest.mark.parametrize("shared", [False, True])
def test_padding_removes_keys_exactly(shared, rng):
    """Padded keys (even NaN ones) contribute nothing: equal to deleting them and E's columns."""
    x = random_qkv(rng, (2, 2), n=5, m=9, d=3)
    E = _proj(rng, 4, 9)
    F = E if shared else _proj(rng, 2, 4, 9)
    kpm = rng.random((2, 1, 9)) < 0.6
    kpm[..., 0] = True
    kpm[1, 0, :] = False                                  # batch 1: every key padded
    k, v = x["k"].copy(), x["v"].copy()
    k[np.broadcast_to(~kpm, (2, 2, 9))] = np.nan          # padded keys may hold garbage
    v[np.broadcast_to(~kpm, (2, 2, 9))] = np.inf
    out, ctx = linformer.forward(x["q"], k, v, E=E, F=F, key_padding_mask=kpm)
    dout = rng.standard_normal(out.shape)
    g = linformer.backward(dout, ctx)
    assert all(np.all(np.isfinite(a)) for a in g.values())
    for b in range(2):
        keep = kpm[b, 0]
        ob, cb = linformer.forward(x["q"][b], x["k"][b][:, keep], x["v"][b][:, keep],
                                   E=E[:, keep], F=F[..., keep])
        assert_close(out[b], ob)
        gb = linformer.backward(dout[b], cb)
        assert_close(g["q"][b], gb["q"])
        assert_close(g["k"][b][:, keep], gb["k"])
        assert np.all(g["k"][b][:, ~keep] == 0) and np.all(g["v"][b][:, ~keep] == 0)
        assert np.all(g["E"][..., ~kpm[:, 0].any(0)] == 0)
    # all keys padded: output 0, zero gradients
    assert np.all(out[1] == 0) and np.all(g["q"][1] == 0)


def test_padding_changes_the_result_unlike_fairseq(rng):
    """Without a mask the padded tokens leak into E K (fairseq's behaviour); with it they do not."""
    x = random_qkv(rng, (1,), n=4, m=6)
    E, F = _proj(rng, 3, 6), _proj(rng, 3, 6)
    kpm = np.array([[True] * 4 + [False] * 2])
    with_mask, _ = linformer.forward(**x, E=E, F=F, key_padding_mask=kpm)
    without, _ = linformer.forward(**x, E=E, F=F)
    assert not np.allclose(with_mask, without)


def test_shared_projection_gradients_are_returned_separately(rng):
    """E is F (key-value sharing): "E" and "F" are the two partial gradients; their sum is the
    gradient of the shared parameter."""
    x = random_qkv(rng, (2, 2), n=5, m=7, d=3)
    P = _proj(rng, 3, 7)
    out, ctx = linformer.forward(**x, E=P, F=P)
    dout = rng.standard_normal(out.shape)
    g = linformer.backward(dout, ctx)
    _, ctx2 = linformer.forward(**x, E=P, F=P.copy())
    g2 = linformer.backward(dout, ctx2)
    assert_close(g["E"], g2["E"])
    assert_close(g["F"], g2["F"])

    def shared_forward(q, k, v, P):
        return linformer.forward(q, k, v, E=P, F=P)

    def shared_backward(dout, ctx):
        gr = linformer.backward(dout, ctx)
        return {"q": gr["q"], "k": gr["k"], "v": gr["v"], "P": gr["E"] + gr["F"]}

    check_vjp(shared_forward, shared_backward, {**x, "P": P}, rng=rng).assert_ok(GRAD_FD)


@pytest.mark.parametrize("eshape,fshape", [((4, 7), (4, 7)), ((2, 4, 7), (1, 4, 7)),
                                           ((3, 2, 4, 7), (1, 2, 4, 7))])
def test_gradcheck_projection_shapes(eshape, fshape, rng):
    x = random_qkv(rng, (3, 2), n=6, m=7, d=3, dv=2)
    kpm = rng.random((3, 1, 7)) < 0.7
    args = {**x, "E": _proj(rng, *eshape), "F": _proj(rng, *fshape)}
    report = check_vjp(linformer.forward, linformer.backward, args,
                       {"key_padding_mask": kpm, "scale": 0.9}, rng=rng)
    report.assert_ok(GRAD_FD)


@pytest.mark.parametrize("masked", [False, True])
def test_chunking_does_not_change_the_result(masked, rng, monkeypatch):
    """Row chunks, key blocks of dk/dv and column blocks of dE/dF: same result to rounding."""
    x = random_qkv(rng, (2, 3), n=13, m=9, d=3)
    E, F = _proj(rng, 4, 9), _proj(rng, 3, 4, 9)                   # summed / kept head axis
    kpm = None
    if masked:
        kpm = rng.random((2, 1, 9)) < 0.6
        kpm[:, :, 0] = True
    out, ctx = linformer.forward(**x, E=E, F=F, key_padding_mask=kpm)
    dout = rng.standard_normal(out.shape)
    g = linformer.backward(dout, ctx)
    monkeypatch.setattr(linformer, "_ROW_BLOCK", 24)                # 6 rows per block
    monkeypatch.setattr(linformer, "_KEY_BLOCK", 24)   # 1 (S·D = 6·3) or 4 (S·D = 2·3) keys
    out3, ctx3 = linformer.forward(**x, E=E, F=F, key_padding_mask=kpm)
    assert_close(out3, out)
    assert_close(linformer.backward(dout, ctx3), g)


def test_causal_is_rejected_with_an_explanation(rng):
    x = random_qkv(rng, (1,), n=4)
    E = _proj(rng, 2, 4)
    with pytest.raises(ValueError, match="not defined for Linformer"):
        linformer.forward(**x, E=E, F=E, causal=True)


def test_length_mismatch_is_an_error_not_a_slice(rng):
    x = random_qkv(rng, (1,), n=4, m=5)
    with pytest.raises(ValueError, match=r"E has shape \(2, 8\).*M = 5"):
        linformer.forward(**x, E=_proj(rng, 2, 8), F=_proj(rng, 2, 5))
    with pytest.raises(ValueError, match="F has shape"):
        linformer.forward(**x, E=_proj(rng, 2, 5), F=_proj(rng, 2, 4))


@pytest.mark.parametrize("bad,err,match", [
    ({"E": np.zeros((0, 5))}, ValueError, "rank k >= 1"),
    ({"F": np.zeros((3, 5))}, ValueError, "same rank k"),
    ({"E": np.zeros((4, 2, 5))}, ValueError, "do not broadcast"),
    ({"E": np.zeros((2, 5), np.float32)}, TypeError, "no silent casting"),
    ({"E": [[0.0] * 5] * 2}, TypeError, "numpy.ndarray"),
    ({"key_padding_mask": np.ones((1, 4), bool)}, ValueError, "key_padding_mask"),
])
def test_validation(bad, err, match, rng):
    x = random_qkv(rng, (1, 3), n=4, m=5)
    opts = {"E": _proj(rng, 2, 5), "F": _proj(rng, 2, 5), **bad}
    with pytest.raises(err, match=match):
        linformer.forward(**x, **opts)


def test_init_layer_params(rng):
    p = linformer.init_layer_params(rng, 10, np.float32, k=4)
    assert set(p) == set(linformer.LAYER_PARAMS)
    assert p["E"].shape == p["F"].shape == (4, 10) and p["E"].dtype == np.float32
    assert p["E"] is not p["F"] and np.all(np.abs(p["E"]) <= 0.5)
    s = linformer.init_layer_params(np.random.default_rng(1), 10, np.float64, k=4,
                                    share_kv=True, unrelated_option=3)
    assert s["E"] is s["F"]
    again = linformer.init_layer_params(np.random.default_rng(1), 10, np.float64, k=4,
                                        share_kv=True)
    np.testing.assert_array_equal(s["E"], again["E"])


def test_empty_queries_and_all_padded(rng):
    x = random_qkv(rng, (2,), n=0, m=4)
    out, ctx = linformer.forward(**x, E=_proj(rng, 2, 4), F=_proj(rng, 2, 4))
    assert out.shape == (2, 0, 4)
    g = linformer.backward(out.copy(), ctx)
    assert np.all(g["k"] == 0) and np.all(g["E"] == 0)
    x = random_qkv(rng, (2,), n=3, m=0)
    out, ctx = linformer.forward(**x, E=np.zeros((2, 0)), F=np.zeros((2, 0)))
    assert np.all(out == 0)


@pytest.mark.parametrize("eshape", [(2, 5), (3, 2, 5), (1, 2, 5)])
def test_empty_batch_gives_zero_projection_gradients(eshape, rng):
    """B = 0: dE, dF are sums over no batch element, i.e. exactly 0 (never uninitialized)."""
    x = random_qkv(rng, (0, 3), n=4, m=5)
    E = _proj(rng, *eshape)
    out, ctx = linformer.forward(**x, E=E, F=E)
    g = linformer.backward(out.copy(), ctx)
    assert g["E"].shape == E.shape and np.all(g["E"] == 0) and np.all(g["F"] == 0)
    assert g["q"].shape == x["q"].shape and g["k"].shape == x["k"].shape
