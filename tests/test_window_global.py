"""Per-sample global tokens (``global_mask``) and Longformer's global projections
(``q_global``, ``k_global``, ``v_global``) of ``window``.

Two definitions are checked independently of the module's code paths:

* ``global_mask`` equals one call per batch item with
  ``global_indices = nonzero(global_mask[b, h])``, in the forward and every gradient;
* with global projections, the output equals a plainly written dense computation: the rows
  of global tokens are softmax(q_global_i · k_globalᵀ · scale) v_global over every allowed
  key, every other row is softmax(q_i · kᵀ · scale) v over band ∪ global columns (keys k, v).
"""

from __future__ import annotations

import numpy as np
import pytest

from tinyeff.attention import window
from tinyeff.testing import GRAD_FD, assert_close, check_vjp, random_qkv

from .oracles import NaNEmptyNumPy, check_numba_threads
from .test_window import dense_allowed

PROJ = ("q_global", "k_global", "v_global")


def _projections(rng, x):
    return {name: rng.standard_normal(x[name[0]].shape) for name in PROJ}


def _global_mask(rng, b, h, n, m, p=0.3):
    """(B, h, N) with True only below min(N, M); item 0 has no global token at all."""
    g = rng.random((b, h, n)) < p
    g[..., min(n, m):] = False
    g[0] = False
    g[-1, :, 0] = True
    return g


CASES = [
    # (n, m, heads of the mask, options)
    (12, 12, 1, dict(window=2)),
    (12, 12, 3, dict(window=1, causal=True)),
    (13, 13, 1, dict(window=2, dilation=2)),
    (9, 14, 3, dict(window=3)),                                    # N < M
    (14, 9, 1, dict(window=2, dilation=2, causal=True)),           # N > M
]


def _per_item(x, gmask, opts, impl, dout):
    """One call per (b, h) with global_indices = nonzero(gmask[b, h]); gradients gathered."""
    b, h = x["q"].shape[:2]
    out = np.zeros(dout.shape)
    grads = {name: np.zeros_like(a) for name, a in x.items()}
    for i in range(b):
        for j in range(h):
            item = {name: (a[j] if name == "rel_bias" else a[i, j]) for name, a in x.items()}
            o = dict(opts)
            if "key_padding_mask" in o:
                o["key_padding_mask"] = o["key_padding_mask"][i, 0]
            gi = np.nonzero(gmask[i, min(j, gmask.shape[1] - 1)])[0]
            out[i, j], ctx = window.forward(**item, **o, global_indices=gi, impl=impl)
            g = window.backward(dout[i, j], ctx)
            for name, a in g.items():
                if name == "rel_bias":
                    grads[name][j] += a
                else:
                    grads[name][i, j] = a
    return out, grads


@pytest.mark.parametrize("impl", ["ref", "numba"])
@pytest.mark.parametrize("projections", [False, True])
@pytest.mark.parametrize("n,m,hm,opts", CASES)
def test_global_mask_equals_per_item_calls(n, m, hm, opts, projections, impl, rng):
    b, h = 3, 3
    x = random_qkv(rng, (b, h), n=n, m=m, d=4, dv=3)
    x["rel_bias"] = rng.standard_normal((h, n + m - 1))
    if projections:
        x.update(_projections(rng, x))
    kp = rng.random((b, 1, m)) < 0.8
    gmask = _global_mask(rng, b, hm, n, m)
    opts = {**opts, "key_padding_mask": kp}
    dout = rng.standard_normal((b, h, n, 3))
    out, ctx = window.forward(**x, **opts, global_mask=gmask, impl=impl)
    grads = window.backward(dout, ctx)
    out_i, grads_i = _per_item(x, gmask, opts, impl, dout)
    np.testing.assert_allclose(out, out_i, rtol=0, atol=1e-12)
    assert set(grads) == set(x)
    for name in x:
        np.testing.assert_allclose(grads[name], grads_i[name], rtol=0, atol=1e-12,
                                   err_msg=name)


def _dense_oracle(x, gi, opts, kp):
    """Plain dense computation for (N, D) inputs with global positions gi."""
    q, k, v = x["q"], x["k"], x["v"]
    n, m = q.shape[0], k.shape[0]
    scale = 1 / np.sqrt(q.shape[-1])
    allowed = dense_allowed(n, m, opts["window"], opts.get("dilation", 1), gi,
                            opts.get("causal", False)) & kp[None, :]
    bias = x["rel_bias"][np.arange(n)[:, None] - np.arange(m)[None, :] + m - 1]
    out = np.zeros((n, v.shape[-1]))
    for i in range(n):
        if i in set(gi):
            qi, kk, vv = x["q_global"][i], x["k_global"], x["v_global"]
        else:
            qi, kk, vv = q[i], k, v
        s = kk @ qi * scale + bias[i]
        keys = np.nonzero(allowed[i])[0]
        if keys.size:
            e = np.exp(s[keys] - s[keys].max())
            out[i] = (e / e.sum()) @ vv[keys]
    return out


@pytest.mark.parametrize("impl", ["ref", "numba"])
@pytest.mark.parametrize("n,m,hm,opts", CASES)
def test_projections_equal_a_dense_oracle(n, m, hm, opts, impl, rng):
    b, h = 2, 3
    x = random_qkv(rng, (b, h), n=n, m=m, d=4, dv=3)
    x["rel_bias"] = rng.standard_normal((h, n + m - 1))
    x.update(_projections(rng, x))
    kp = rng.random((b, 1, m)) < 0.8
    gmask = _global_mask(rng, b, hm, n, m)
    out, _ = window.forward(**x, **opts, key_padding_mask=kp, global_mask=gmask, impl=impl)
    for i in range(b):
        for j in range(h):
            item = {name: (a[j] if name == "rel_bias" else a[i, j]) for name, a in x.items()}
            gi = np.nonzero(gmask[i, min(j, hm - 1)])[0]
            np.testing.assert_allclose(out[i, j], _dense_oracle(item, gi, opts, kp[i, 0]),
                                       rtol=0, atol=1e-12)


def test_projections_equal_to_q_k_v_change_nothing(rng):
    """q_global = q, k_global = k, v_global = v gives the output of the plain call, and the
    gradients of the pair add up to the plain call's gradients."""
    x = random_qkv(rng, (2, 2), n=20, d=4, dv=3)
    opts = dict(window=2, global_indices=[0, 11], causal=True)
    dout = rng.standard_normal((2, 2, 20, 3))
    for impl in ("ref", "numba"):
        out, ctx = window.forward(**x, **opts, impl=impl)
        g = window.backward(dout, ctx)
        out_p, ctx_p = window.forward(**x, **opts, q_global=x["q"], k_global=x["k"],
                                      v_global=x["v"], impl=impl)
        g_p = window.backward(dout, ctx_p)
        assert_close(out_p, out)
        for name in "qkv":
            assert_close(g_p[name] + g_p[name + "_global"], g[name])


def test_rows_of_non_global_tokens_ignore_the_projections(rng):
    x = random_qkv(rng, (1, 2), n=16, d=4, dv=3)
    gmask = np.zeros((1, 1, 16), dtype=bool)
    gmask[0, 0, [2, 9]] = True
    proj = _projections(rng, x)
    out, ctx = window.forward(**x, window=1, global_mask=gmask, **proj)
    g = window.backward(rng.standard_normal(out.shape), ctx)
    rest = ~gmask[0, 0]
    out_plain, _ = window.forward(**x, window=1, global_mask=gmask)
    assert_close(out[..., rest, :], out_plain[..., rest, :])
    assert np.all(g["q_global"][..., rest, :] == 0)                # only global query rows
    assert np.all(g["q"][..., ~rest, :] == 0)                      # q of global rows unused


GRAD_CASES = [dict(window=2), dict(window=1, dilation=2, causal=True)]


@pytest.mark.parametrize("impl", ["ref", "numba"])
@pytest.mark.parametrize("opts", GRAD_CASES)
@pytest.mark.parametrize("kind", ["mask", "mask+projections", "indices+projections"])
def test_gradcheck(kind, opts, impl, rng):
    n = 12
    x = random_qkv(rng, (2, 2), n=n, d=4, dv=3)
    x["rel_bias"] = rng.standard_normal((2, 2 * n - 1))
    if "projections" in kind:
        x.update(_projections(rng, x))
    kp = rng.random((2, 1, n)) < 0.8
    extra = {"global_indices": [1, 6]}
    if "mask" in kind:
        extra = {"global_mask": _global_mask(rng, 2, 2, n, n, p=0.25)}
    report = check_vjp(window.forward, window.backward, x,
                       {**opts, **extra, "key_padding_mask": kp, "impl": impl}, rng=rng)
    report.assert_ok(GRAD_FD)


@pytest.mark.parametrize("projections", [False, True])
def test_one_and_two_threads_give_the_same_bits(projections, rng):
    n = 300
    x = random_qkv(rng, (2, 3), n=n, d=8, dv=8)
    x["rel_bias"] = rng.standard_normal((3, 2 * n - 1))
    if projections:
        x.update(_projections(rng, x))
    gmask = _global_mask(rng, 2, 3, n, n, p=0.02)
    opts = dict(window=9, dilation=2, causal=True, global_mask=gmask)
    dout = rng.standard_normal((2, 3, n, 8))
    check_numba_threads(window, x, opts, dout, reference=True)


def test_numba_writes_every_entry_and_an_empty_mask_is_no_global(rng, monkeypatch):
    """np.empty outputs are fully written with per-sample tokens and projections; a
    global_mask without any True gives the bits of the call without global tokens."""
    n = 150
    x = random_qkv(rng, (2, 2), n=n, d=4, dv=3)
    dout = rng.standard_normal((2, 2, n, 3))
    plain = window.forward(**x, window=5, impl="numba")
    empty = window.forward(**x, window=5, global_mask=np.zeros((2, 1, n), bool), impl="numba")
    np.testing.assert_array_equal(empty[0], plain[0])
    g0, g1 = window.backward(dout, plain[1]), window.backward(dout, empty[1])
    for name in g0:
        np.testing.assert_array_equal(g1[name], g0[name], err_msg=name)
    monkeypatch.setattr(window, "np", NaNEmptyNumPy())
    x.update(_projections(rng, x))
    opts = dict(window=5, dilation=2, global_mask=_global_mask(rng, 2, 2, n, n, p=0.05))
    out_r, ctx_r = window.forward(**x, **opts, impl="ref")
    out_n, ctx_n = window.forward(**x, **opts, impl="numba")
    assert_close(out_n, out_r)
    assert_close(window.backward(dout, ctx_n), window.backward(dout, ctx_r))


def test_non_finite_v_with_projections_reaches_only_rows_that_see_it(rng):
    """The global rows read v_global, so a NaN in v reaches only the non-global rows whose
    band or global columns contain it."""
    x = random_qkv(rng, (1, 1), n=12, d=4, dv=3)
    x["v"][0, 0, 8, 1] = np.nan
    gi = [0]
    out, _ = window.forward(**x, window=1, global_indices=gi, **_projections(rng, x))
    hit = np.isnan(out[0, 0, :, 1])
    assert np.array_equal(np.nonzero(hit)[0], [7, 8, 9])
    assert not np.isnan(out[0, 0, :, [0, 2]]).any()


def test_invalid_global_options_raise_clear_errors(rng):
    x = random_qkv(rng, (2, 2), n=6, d=3)
    gm = np.zeros((2, 1, 6), dtype=bool)
    gm[:, :, 0] = True
    with pytest.raises(ValueError, match="global_indices .* or global_mask"):
        window.forward(**x, window=1, global_indices=[0], global_mask=gm)
    with pytest.raises(ValueError, match=r"global_mask\[:, None, :\]"):
        window.forward(**x, window=1, global_mask=gm[:, 0])        # (B, N): too short
    with pytest.raises(ValueError, match="global_mask"):
        window.forward(**x, window=1, global_mask=np.zeros((2, 1, 5), dtype=bool))
    with pytest.raises(TypeError, match="global_mask"):
        window.forward(**x, window=1, global_mask=gm.astype(np.int64))
    y = random_qkv(rng, (2, 2), n=6, m=4, d=3)
    gm[1, 0, 5] = True
    with pytest.raises(ValueError, match=r"min\(N, M\) = 4"):
        window.forward(**y, window=1, global_mask=gm)              # N > M: position 5
    p = _projections(rng, x)
    with pytest.raises(ValueError, match="all three or none"):
        window.forward(**x, window=1, q_global=p["q_global"], k_global=p["k_global"])
    with pytest.raises(ValueError, match="k_global"):
        window.forward(**x, window=1, **{**p, "k_global": p["k_global"][:, :, :5]})
    with pytest.raises(TypeError, match="v_global"):
        window.forward(**x, window=1, **{**p, "v_global": p["v_global"].astype(np.float32)})


# --------------------------------------------------------------------------------------------
# nn.MultiHeadAttention(global_projections=True) and per-sequence global tokens


def _tokens(b, n, rng):
    gt = rng.random((b, n)) < 0.3
    gt[0, 1] = True
    return gt


@pytest.mark.parametrize("config", [
    dict(positions="rope", shared_kv=True),
    dict(pad_to_multiple=4),
    dict(rank=2),
])
def test_layer_gradcheck_with_global_projections(config, rng):
    from tinyeff.nn import MultiHeadAttention, RoPE

    from .test_nn import layer_check
    config = dict(config)
    if config.pop("positions", None) == "rope":
        config["positions"] = RoPE(4)
    b, n, d = 2, 6, 8
    layer = MultiHeadAttention(d, 2, "window", window=1, global_projections=True, rng=rng,
                               impl="ref", **config)
    kp = np.ones((b, n), dtype=bool)
    kp[1, -1] = False
    gt = _tokens(b, n, rng)

    def call(lay, x):
        return lay.forward(x, key_padding=kp, global_tokens=gt)

    report = layer_check(layer, {"x": rng.standard_normal((b, n, d))}, rng, call=call)
    assert any(name.startswith("qg_proj") for name in report.errors)
    report.assert_ok(GRAD_FD)


def test_layer_with_global_projections_equal_to_the_main_ones_is_the_plain_layer(rng):
    from tinyeff.nn import MultiHeadAttention
    b, n, d = 2, 10, 8
    plain = MultiHeadAttention(d, 2, "window", window=2, rng=np.random.default_rng(4))
    proj = MultiHeadAttention(d, 2, "window", window=2, global_projections=True,
                              rng=np.random.default_rng(4))
    for main, glob in (("q_proj", "qg_proj"), ("k_proj", "kg_proj"), ("v_proj", "vg_proj")):
        for name, p in getattr(proj, main).params.items():
            np.testing.assert_array_equal(p, getattr(plain, main).params[name])
            getattr(proj, glob).params[name][...] = p
    x = rng.standard_normal((b, n, d))
    gt = _tokens(b, n, rng)
    y, _ = plain.forward(x, global_tokens=gt)
    y_p, _ = proj.forward(x, global_tokens=gt)
    assert_close(y_p, y)
    # per-sequence tokens are those of per-item global_indices calls
    for i in range(b):
        single = MultiHeadAttention(d, 2, "window", window=2, global_projections=True,
                                    global_indices=np.nonzero(gt[i])[0],
                                    rng=np.random.default_rng(4))
        for name, p in proj.named_parameters().items():
            single.named_parameters()[name][...] = p
        assert_close(single.forward(x[i:i + 1])[0], y_p[i:i + 1])


def test_model_gradcheck_with_global_projections(rng):
    from .test_model_gradcheck import batch, build, model_gradcheck
    model = build("window", attention_options=dict(window=1, global_indices=[0, 5],
                                                   global_projections=True, impl="ref"))
    tokens, targets, kp = batch(model, rng, padded=True)
    model_gradcheck(model, tokens, targets, rng, key_padding=kp).assert_ok(GRAD_FD)


def test_layer_rejects_global_options_it_cannot_honour(rng):
    from tinyeff.nn import MultiHeadAttention
    with pytest.raises(ValueError, match="SUPPORTS_GLOBAL_PROJECTIONS"):
        MultiHeadAttention(8, 2, "full", global_projections=True)
    with pytest.raises(ValueError, match="q_global"):
        MultiHeadAttention(8, 2, "window", window=1, q_global=np.zeros(3))
    x = rng.standard_normal((2, 6, 8))
    with pytest.raises(ValueError, match="GLOBAL_MASK"):
        MultiHeadAttention(8, 2, "full").forward(x, global_tokens=np.ones((2, 6), bool))
    layer = MultiHeadAttention(8, 2, "window", window=1)
    with pytest.raises(ValueError, match="global_tokens"):
        layer.forward(x, global_tokens=np.ones((2, 1, 6), bool))
