"""Linformer: reduction to full attention, exact key padding, sharing, validation, and
impl="blocked" (the FlashAttention kernels over the k projected keys) against the reference."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from tinyeff.attention import full, linformer
from tinyeff.kernels._jit import num_threads
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


@pytest.mark.parametrize("impl", ["ref", "blocked"])
@pytest.mark.parametrize("shared", [False, True])
def test_padding_removes_keys_exactly(shared, impl, rng, monkeypatch):
    """Padded keys (even NaN ones) contribute nothing: equal to deleting them and E's columns."""
    monkeypatch.setattr(linformer, "BLOCKED_TILE", 4)
    x = random_qkv(rng, (2, 2), n=5, m=9, d=3)
    E = _proj(rng, 4, 9)
    F = E if shared else _proj(rng, 2, 4, 9)
    kpm = rng.random((2, 1, 9)) < 0.6
    kpm[..., 0] = True
    kpm[1, 0, :] = False                                  # batch 1: every key padded
    k, v = x["k"].copy(), x["v"].copy()
    k[np.broadcast_to(~kpm, (2, 2, 9))] = np.nan          # padded keys may hold garbage
    v[np.broadcast_to(~kpm, (2, 2, 9))] = np.inf
    out, ctx = linformer.forward(x["q"], k, v, E=E, F=F, key_padding_mask=kpm, impl=impl)
    dout = rng.standard_normal(out.shape)
    g = linformer.backward(dout, ctx)
    assert all(np.all(np.isfinite(a)) for a in g.values())
    for b in range(2):
        keep = kpm[b, 0]
        ob, cb = linformer.forward(x["q"][b], x["k"][b][:, keep], x["v"][b][:, keep],
                                   E=E[:, keep], F=F[..., keep], impl=impl)
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


# ------------------------------------------------------------------------ impl="blocked"

def _blocked_case(rng, n, m, kk, dtype=np.float64, batch=(2, 3), masked=True):
    """Per-head E, head-shared F, and (optionally) a key padding mask with one fully padded
    batch element."""
    x = random_qkv(rng, batch, n=n, m=m, d=5, dv=3, dtype=dtype)
    E = _proj(rng, batch[-1], kk, m).astype(dtype)
    F = _proj(rng, kk, m).astype(dtype)
    kpm = None
    if masked:
        kpm = rng.random((batch[0], 1, m)) < 0.7
        kpm[0] = False                                             # batch 0: every key padded
    return x, {"E": E, "F": F, "key_padding_mask": kpm}


# (N, M, k) with a tile of 4: several query tiles, one or several key tiles, ragged edges
BLOCKED_SHAPES = [(9, 11, 4), (13, 6, 7), (1, 5, 3), (6, 1, 9), (8, 8, 8)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n,m,kk", BLOCKED_SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_blocked_matches_reference(n, m, kk, masked, dtype, rng, monkeypatch):
    """impl="blocked" == impl="ref" within PARITY: output, lse, every gradient, and crossed
    (blocked forward + reference backward and the reverse)."""
    monkeypatch.setattr(linformer, "BLOCKED_TILE", 4)
    x, opts = _blocked_case(rng, n, m, kk, dtype, masked=masked)
    out_r, ctx_r = linformer.forward(**x, **opts, impl="ref")
    out_b, ctx_b = linformer.forward(**x, **opts, impl="blocked")
    assert (ctx_r.impl, ctx_b.impl, ctx_b.tile) == ("ref", "blocked", 4)
    assert out_b.dtype == dtype and ctx_b.lse.dtype == dtype
    assert_close(out_b, out_r)
    assert_close(ctx_b.lse, ctx_r.lse)
    np.testing.assert_array_equal(ctx_b.kp, ctx_r.kp)              # the same projections
    dout = rng.standard_normal(out_r.shape).astype(dtype)
    g_r = linformer.backward(dout, ctx_r)
    g_b = linformer.backward(dout, ctx_b)
    assert all(g_b[name].dtype == dtype for name in g_b)
    assert_close(g_b, g_r)
    assert_close(linformer.backward(dout, ctx_b, impl="ref"), g_r)
    assert_close(linformer.backward(dout, ctx_r, impl="blocked"), g_r)


@pytest.mark.parametrize("schedule_batch", [(1,), (2, 3)])
def test_blocked_both_backward_schedules(schedule_batch, rng, monkeypatch):
    """One head (the split dq / dk-dv passes) and six (one thread per head) agree with the
    reference."""
    monkeypatch.setattr(linformer, "BLOCKED_TILE", 4)
    x, opts = _blocked_case(rng, 11, 7, 6, batch=schedule_batch, masked=False)
    opts["E"] = _proj(rng, 6, 7)
    out_r, ctx_r = linformer.forward(**x, **opts, impl="ref")
    out_b, ctx_b = linformer.forward(**x, **opts, impl="blocked")
    dout = rng.standard_normal(out_r.shape)
    for threads in (1, 2):
        with num_threads(threads):
            assert_close(linformer.backward(dout, ctx_b), linformer.backward(dout, ctx_r))


@pytest.mark.parametrize("eshape,fshape", [((4, 7), (4, 7)), ((2, 4, 7), (1, 4, 7))])
def test_blocked_gradcheck_float64(eshape, fshape, rng, monkeypatch):
    monkeypatch.setattr(linformer, "BLOCKED_TILE", 4)
    x = random_qkv(rng, (3, 2), n=9, m=7, d=3, dv=2)
    kpm = rng.random((3, 1, 7)) < 0.7
    args = {**x, "E": _proj(rng, *eshape), "F": _proj(rng, *fshape)}
    report = check_vjp(linformer.forward, linformer.backward, args,
                       {"key_padding_mask": kpm, "scale": 0.9, "impl": "blocked"}, rng=rng)
    report.assert_ok(GRAD_FD)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")
@pytest.mark.parametrize("batch", [(1,), (3,), (2, 2)])
def test_blocked_bit_identical_with_one_and_two_threads(batch, rng, monkeypatch):
    """Forward and every gradient: the same bits with 1 and 2 Numba threads, for fewer heads
    than threads, an odd number and an even number (both backward schedules)."""
    monkeypatch.setattr(linformer, "BLOCKED_TILE", 4)
    x, opts = _blocked_case(rng, 13, 10, 6, batch=batch, masked=False)
    opts["E"] = _proj(rng, batch[-1], 6, 10)
    results = []
    for threads in (1, 2):
        with num_threads(threads):
            out, ctx = linformer.forward(**x, **opts, impl="blocked")
            dout = np.linspace(-1, 1, out.size).reshape(out.shape)
            results.append((out, ctx.lse, linformer.backward(dout, ctx)))
    (out0, lse0, g0), (out1, lse1, g1) = results
    np.testing.assert_array_equal(out1, out0)
    np.testing.assert_array_equal(lse1, lse0)
    for name in g0:
        np.testing.assert_array_equal(g1[name], g0[name], err_msg=name)


def test_auto_picks_blocked_from_the_threshold(rng, monkeypatch):
    x, opts = _blocked_case(rng, 6, 5, 3, masked=False)
    _, ctx = linformer.forward(**x, **opts)
    assert ctx.impl == "ref"                                       # N·k = 18 < 2¹⁸
    monkeypatch.setattr(linformer, "AUTO_BLOCKED_MIN_NK", 18)
    _, ctx = linformer.forward(**x, **opts)
    assert ctx.impl == "blocked"


def test_bad_impl_is_a_value_error(rng):
    x, opts = _blocked_case(rng, 4, 5, 2, masked=False)
    with pytest.raises(ValueError, match="impl must be one of"):
        linformer.forward(**x, **opts, impl="numba")
    out, ctx = linformer.forward(**x, **opts)
    with pytest.raises(ValueError, match="impl must be one of"):
        linformer.backward(out, ctx, impl="auto")


@pytest.mark.parametrize("batch,n,m", [((2,), 0, 4), ((2,), 3, 0), ((0, 3), 4, 5)])
def test_blocked_empty_sizes(batch, n, m, rng):
    """N = 0, M = 0 (output 0) and an empty batch: same as the reference, zero gradients."""
    x = random_qkv(rng, batch, n=n, m=m)
    E = _proj(rng, 2, m) if m else np.zeros((2, 0))
    out_r, ctx_r = linformer.forward(**x, E=E, F=E, impl="ref")
    out_b, ctx_b = linformer.forward(**x, E=E, F=E, impl="blocked")
    np.testing.assert_array_equal(out_b, out_r)
    dout = np.ones_like(out_r)
    g_r, g_b = linformer.backward(dout, ctx_r), linformer.backward(dout, ctx_b)
    for name in g_r:
        assert g_b[name].shape == g_r[name].shape
        assert_close(g_b[name], g_r[name], err_msg=name)


@pytest.mark.parametrize("impl", ["ref", "blocked"])
def test_nan_rows(impl, rng, monkeypatch):
    """NaN in q_i: row i NaN, the others untouched; NaN in a real v_j: every row NaN."""
    monkeypatch.setattr(linformer, "BLOCKED_TILE", 4)
    x = random_qkv(rng, (2,), n=9, m=6)
    E = _proj(rng, 5, 6)
    q = x["q"].copy()
    q[1, 3, 0] = np.nan
    out, _ = linformer.forward(q, x["k"], x["v"], E=E, F=E, impl=impl)
    bad = np.isnan(out).any(axis=-1)                               # (2, N)
    expect = np.zeros_like(bad)
    expect[1, 3] = True
    np.testing.assert_array_equal(bad, expect)
    v = x["v"].copy()
    v[0, 2, 1] = np.nan
    out, _ = linformer.forward(x["q"], x["k"], v, E=E, F=E, impl=impl)
    assert np.isnan(out[0, :, 1]).all() and np.isfinite(out[1]).all()


def test_blocked_read_only_inputs_add_no_kernel_signature(rng, monkeypatch):
    """Read-only q, k, v, E, F, mask and dout reach the blocked kernels through the
    specializations compiled for writeable ones, give the same bits and stay unwritten."""
    from tinyeff.kernels import blocked

    def signatures():
        return {name: list(f.signatures) for name in dir(blocked)
                if hasattr(f := getattr(blocked, name), "signatures")}

    def run(x, opts, dout):
        out, ctx = linformer.forward(**x, **opts, impl="blocked")
        return out, linformer.backward(dout, ctx)

    monkeypatch.setattr(linformer, "BLOCKED_TILE", 4)
    x, opts = _blocked_case(rng, 9, 7, 5)
    dout = rng.standard_normal((2, 3, 9, 3))
    want_out, want = run(x, opts, dout)
    before = signatures()
    assert any(before.values())

    def readonly(a):
        a = a.copy()
        a.setflags(write=False)
        return a

    ro = {n: readonly(a) for n, a in x.items()}
    ro_opts = {n: readonly(a) for n, a in opts.items()}
    out, grads = run(ro, ro_opts, readonly(dout))
    assert signatures() == before
    np.testing.assert_array_equal(out, want_out)
    for name in want:
        np.testing.assert_array_equal(grads[name], want[name], err_msg=name)
    for name, a in ro.items():
        np.testing.assert_array_equal(a, x[name])


def test_blocked_results_identical_with_and_without_memory_reuse(rng, monkeypatch):
    """The blocked path allocates out and dq through tinyeff.memory: same bits with block
    reuse on and off, and a held result is never written by a later call."""
    from tinyeff import memory
    monkeypatch.setattr(memory, "CACHE_MIN_BYTES", 1)
    memory.clear_cache()
    previous = memory.set_cache_limit(1 << 20)
    try:
        x, opts = _blocked_case(rng, 9, 7, 5)
        dout = rng.standard_normal((2, 3, 9, 3))
        first, ctx = linformer.forward(**x, **opts, impl="blocked")
        grads = linformer.backward(dout, ctx)
        kept = [first.copy()] + [g.copy() for g in grads.values()]
        for reuse in (True, True, False):
            memory.set_cache_limit(1 << 20 if reuse else 0)
            out, ctx2 = linformer.forward(**x, **opts, impl="blocked")
            for a, b in zip([out, *linformer.backward(dout, ctx2).values()], kept):
                np.testing.assert_array_equal(a, b)
        for a, b in zip([first, *grads.values()], kept):
            np.testing.assert_array_equal(a, b)
    finally:
        memory.set_cache_limit(previous)
        memory.clear_cache()


@pytest.mark.parametrize("masked", [False, True])
def test_projection_runners_give_the_same_bits(masked, rng, monkeypatch):
    """impl="blocked" runs the projections' products as tasks on the threads, each on one
    BLAS thread; the reference runs them in order.  Same products, so the same bits: K̃, Ṽ
    and every gradient, with per-head and head-shared projections, several key blocks per
    task and a single one."""
    monkeypatch.setattr(linformer, "_KEY_BLOCK", 40)               # blocks of 1-6 keys
    x, opts = _blocked_case(rng, 7, 23, 5, masked=masked)
    _, ctx = linformer.forward(**x, **opts, impl="ref")
    dout = rng.standard_normal(ctx.out.shape)
    dq, dkp, dvp = linformer._backward_attention(dout, ctx.q, ctx.kp, ctx.vp, ctx.lse,
                                                 ctx.scale)
    kpm = opts["key_padding_mask"]
    results = []
    for run in (linformer._in_order, linformer._on_threads):
        kp, vp = linformer._project(x["k"], x["v"], opts["E"], opts["F"], kpm, run)
        results.append((kp, vp, linformer._backward_projections(ctx, dq, dkp, dvp, run)))
    (kp0, vp0, g0), (kp1, vp1, g1) = results
    np.testing.assert_array_equal(kp1, kp0)
    np.testing.assert_array_equal(vp1, vp0)
    np.testing.assert_array_equal(kp0, ctx.kp)
    for name in g0:
        np.testing.assert_array_equal(g1[name], g0[name], err_msg=name)


@pytest.mark.parametrize("m,width,expect", [
    (0, 8, []), (3, 8, [1, 1, 1]), (10, 8, [3, 3, 3, 1]), (4096, 256, [1024] * 4),
    (16384, 256, [2048] * 8), (65536, 256, [2048] * 32)])
def test_key_blocks_depend_on_the_shapes_only(m, width, expect):
    """At least four key blocks when M allows (tasks for the threads), at most _KEY_BLOCK
    entries each; never a function of the thread count."""
    assert [c.stop - c.start for c in linformer._key_blocks(m, width)] == expect
