"""The Funnel-style encoder (``tinyeff.nn.funnel``): pooling against its formulas,
up-sampling, the segment/block tie, receptive fields, padding, whole-model float64
gradchecks (every parameter), training with AdamW, checkpoints and errors.
"""

from __future__ import annotations

import numpy as np
import pytest

from tinyeff.nn import AdamW, checkpoint, clip_grad_norm, warmup_cosine
from tinyeff.nn.funnel import (
    HierarchicalEncoder,
    HierarchicalTransformer,
    SegmentPool,
    segment_padding,
    upsample,
    upsample_backward,
)
from tinyeff.testing import GRAD_FD, check_vjp

from .test_model_gradcheck import model_gradcheck

V, D, H, DFF = 7, 8, 2, 16
REF = {"impl": "ref"}             # the reference paths: the spec, and fast at these sizes


def model(**kwargs) -> HierarchicalTransformer:
    cfg = dict(vocab_size=V, d_model=D, n_heads=H, segment=3, d_ff=DFF, max_len=16,
               lower_options=REF, upper_options=REF, n_classes=3, dtype=np.float64)
    cfg.update(kwargs)
    return HierarchicalTransformer(**cfg)


def padding(b: int, n: int, n_pad: int) -> np.ndarray:
    """(B, N) True = real; the last ``n_pad`` tokens of sequence 1 are padding."""
    kp = np.ones((b, n), dtype=bool)
    kp[1, n - n_pad:] = False
    return kp


# --------------------------------------------------------------------------------------------
# pooling and up-sampling against their formulas
# --------------------------------------------------------------------------------------------


def _segments(n, k):
    return [range(s, min(s + k, n)) for s in range(0, n, k)]


@pytest.mark.parametrize("n,k", [(10, 3), (12, 4), (5, 8), (1, 1)])
def test_mean_pool_is_the_exact_mean_over_real_tokens(n, k, rng):
    x = rng.standard_normal((2, n, D))
    kp = padding(2, n, min(n, 4))
    s, _ = SegmentPool(D, H, k).forward(x, key_padding=kp)
    assert s.shape == (2, -(-n // k), D)
    for b in range(2):
        for c, seg in enumerate(_segments(n, k)):      # the last segment may be shorter
            real = [i for i in seg if kp[b, i]]
            want = x[b, real].mean(axis=0) if real else np.zeros(D)
            np.testing.assert_allclose(s[b, c], want, rtol=1e-13, atol=1e-15)


def test_learned_pool_matches_its_formula_and_starts_as_the_mean(rng):
    n, k = 10, 4
    x = rng.standard_normal((2, n, D))
    kp = padding(2, n, 3)
    pool = SegmentPool(D, H, k, pooling="learned")
    s0, _ = pool.forward(x, key_padding=kp)
    np.testing.assert_allclose(s0, SegmentPool(D, H, k).forward(x, key_padding=kp)[0],
                               rtol=1e-13, atol=1e-15)       # query = 0: uniform weights
    u = pool.params["query"]
    u[...] = 3 * rng.standard_normal(u.shape)
    s, _ = pool.forward(x, key_padding=kp)
    dh = D // H
    for b in range(2):
        for c, seg in enumerate(_segments(n, k)):
            real = [i for i in seg if kp[b, i]]
            if not real:
                continue                               # an empty segment: tested below
            xr = x[b, real]
            xhat = (xr - xr.mean(-1, keepdims=True)) / np.sqrt(xr.var(-1, keepdims=True) + 1e-5)
            for h in range(H):
                e = xhat @ u[h] / np.sqrt(D)
                a = np.exp(e - e.max()) / np.exp(e - e.max()).sum()
                np.testing.assert_allclose(s[b, c, h * dh:(h + 1) * dh],
                                           a @ xr[:, h * dh:(h + 1) * dh], rtol=1e-12)


@pytest.mark.parametrize("pooling", ["mean", "learned"])
@pytest.mark.parametrize("n,k", [(10, 3), (8, 4)])
def test_pool_gradcheck(pooling, n, k, rng):
    pool = SegmentPool(D, H, k, pooling=pooling)
    kp = padding(2, n, 4)                              # one segment of sequence 1 all padding

    def fwd(x, **params):
        for name, value in params.items():
            pool.params[name][...] = value
        return pool.forward(x, key_padding=kp)

    def bwd(ds, ctx):
        pool.zero_grad()
        dx = pool.backward(ds, ctx)
        return {"x": dx, **{name: g.copy() for name, g in pool.grads.items()}}

    args = {"x": rng.standard_normal((2, n, D))}
    if pooling == "learned":
        args["query"] = rng.standard_normal((H, D))
    check_vjp(fwd, bwd, args, rng=rng).assert_ok(GRAD_FD)


def test_empty_segment_summary_is_zero_with_zero_gradient(rng):
    x = rng.standard_normal((2, 9, D))
    kp = padding(2, 9, 3)                              # segment 2 of sequence 1 is empty
    for pooling in ("mean", "learned"):
        pool = SegmentPool(D, H, 3, pooling=pooling)
        if pooling == "learned":
            pool.params["query"][...] = rng.standard_normal((H, D))
        s, ctx = pool.forward(x, key_padding=kp)
        assert np.all(s[1, 2] == 0) and np.all(np.isfinite(s))
        dx = pool.backward(rng.standard_normal(s.shape), ctx)
        assert np.all(dx[1, 6:] == 0)
    np.testing.assert_array_equal(segment_padding(kp, 9, 3), [[1, 1, 1], [1, 1, 0]])


def test_upsample_repeats_each_summary_over_its_segment(rng):
    g = rng.standard_normal((2, 4, D))
    u = upsample(g, 10, 3)
    assert u.shape == (2, 10, D)
    for i in range(10):
        np.testing.assert_array_equal(u[:, i], g[:, i // 3])
    du = rng.standard_normal(u.shape)
    # ⟨du, upsample(g)⟩ = ⟨upsample_backward(du), g⟩
    np.testing.assert_allclose(np.sum(du * u), np.sum(upsample_backward(du, 3) * g), rtol=1e-12)


def test_encoder_without_blocks_is_residual_plus_broadcast_summary(rng):
    enc = HierarchicalEncoder(D, H, segment=4, n_lower=0, n_upper=0)
    x = rng.standard_normal((2, 10, D))
    y, _ = enc.forward(x)
    s, _ = SegmentPool(D, H, 4).forward(x)
    np.testing.assert_allclose(y, x + upsample(s, 10, 4), rtol=1e-14)


# --------------------------------------------------------------------------------------------
# the segment length is the local block; receptive fields
# --------------------------------------------------------------------------------------------


def test_segment_is_the_local_block():
    enc = HierarchicalEncoder(D, H, segment=5, n_lower=1, n_refine=1)
    for blk in enc.lower + enc.refine:
        assert blk.attn.fn.attention == "local"
        opts = blk.attn.fn.forward_options
        assert (opts["block"], opts["look_backward"], opts["look_forward"]) == (5, 1, 1)
    assert enc.upper[0].attn.fn.attention == "full"
    with pytest.raises(ValueError, match="block=4 differs from segment=5"):
        HierarchicalEncoder(D, H, segment=5, lower_options={"block": 4})
    win = HierarchicalEncoder(D, H, segment=5, lower_attention="window")
    assert win.lower[0].attn.fn.forward_options["window"] == 5


@pytest.mark.parametrize("n_upper", [0, 1])
def test_receptive_field(n_upper, rng):
    """∂y_i/∂x_j ≠ 0 exactly for |σ(i) − σ(j)| ≤ 1 without upper blocks (one local layer
    with one segment of look-around, then the pool of σ(i)), and for every j with them."""
    n, k = 12, 3
    enc = HierarchicalEncoder(D, H, segment=k, n_lower=1, n_upper=n_upper, d_ff=DFF,
                              lower_options=REF, upper_options=REF, rng=rng)
    x = rng.standard_normal((1, n, D))
    y, ctx = enc.forward(x)
    for i in range(n):
        dy = np.zeros_like(y)
        dy[0, i] = rng.standard_normal(D)
        dx = enc.backward(dy, ctx)
        seen = np.abs(dx[0]).max(axis=1) > 0
        want = np.ones(n, bool) if n_upper else np.abs(np.arange(n) // k - i // k) <= 1
        np.testing.assert_array_equal(seen, want, err_msg=f"query {i}")


# --------------------------------------------------------------------------------------------
# padding: a padded sequence gives what its unpadded prefix gives
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["classify", "token"])
@pytest.mark.parametrize("pooling", ["mean", "learned"])
def test_padding_equals_the_truncated_sequence(task, pooling, rng):
    m = model(task=task, pooling=pooling, n_refine=1)
    if pooling == "learned":
        m.encoder.pool.params["query"][...] = rng.standard_normal((H, D))
    n, real = 11, 5                                    # 5 real tokens: segments {0,1,2},{3,4}
    tokens = rng.integers(0, V, (2, n))
    kp = padding(2, n, n - real)
    out = m.logits(tokens, key_padding=kp)
    tokens2 = tokens.copy()
    tokens2[1, real:] = rng.integers(0, V, n - real)    # padded ids do not matter
    out2 = m.logits(tokens2, key_padding=kp)
    if task == "token":                                # padded positions have no meaning
        out, out2 = out[:, :real], out2[:, :real]
    np.testing.assert_allclose(out2, out, rtol=1e-12, atol=1e-12)
    alone = m.logits(tokens[1:, :real])
    got = out[1] if task == "classify" else out[1, :real]
    np.testing.assert_allclose(got, alone[0], rtol=1e-11, atol=1e-12)


# --------------------------------------------------------------------------------------------
# whole-model gradient checks (float64, every parameter)
# --------------------------------------------------------------------------------------------

GRAD_CASES = {
    "local_mean_classify": dict(),
    "local_learned_first_sinusoidal": dict(pooling="learned", readout="first",
                                           positions="sinusoidal"),
    "local_learned_token_refine": dict(pooling="learned", task="token", n_refine=1),
    "local_mean_token_deep_nopos": dict(task="token", n_lower=2, n_upper=2, positions="none"),
    "window_learned_classify": dict(pooling="learned", lower_attention="window"),
    "segment_divides_n": dict(pooling="learned", segment=5, n_refine=1),
}


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_model_gradcheck(case, rng):
    m = model(**GRAD_CASES[case])
    if "query" in m.encoder.pool.params:
        m.encoder.pool.params["query"][...] = rng.standard_normal((H, D))
    n = 10
    tokens = rng.integers(0, V, (2, n))
    kp = padding(2, n, 4)                              # whole padded segments included
    if m.task == "classify":
        targets = rng.integers(0, 3, (2,))
    else:
        targets = rng.integers(0, 3, (2, n))
        targets[~kp] = -100
    report = model_gradcheck(m, tokens, targets, rng, key_padding=kp)
    assert len(report.errors) == len(m.named_parameters())
    report.assert_ok(GRAD_FD)


def test_encoder_input_gradcheck(rng):
    enc = HierarchicalEncoder(D, H, segment=3, n_lower=1, n_upper=1, n_refine=1, d_ff=DFF,
                              pooling="learned", lower_options=REF, upper_options=REF,
                              max_len=16, summary_positions="learned", rng=rng)
    enc.pool.params["query"][...] = rng.standard_normal((H, D))
    kp = padding(2, 10, 4)

    def fwd(x):
        return enc.forward(x, key_padding=kp)

    def bwd(dy, ctx):
        return {"x": enc.backward(dy, ctx)}

    check_vjp(fwd, bwd, {"x": rng.standard_normal((2, 10, D))}, rng=rng).assert_ok(GRAD_FD)


# --------------------------------------------------------------------------------------------
# training with the Transformer's API, float32, checkpoints
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "learned"])
def test_training_with_adamw_drops_the_loss_tenfold(pooling):
    m = HierarchicalTransformer(8, 16, 2, segment=4, d_ff=32, max_len=32, pooling=pooling,
                                lower_options=REF, upper_options=REF, n_classes=4,
                                dtype=np.float64)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 8, (8, 30))
    targets = np.arange(8) % 4
    kp = np.ones((8, 30), dtype=bool)
    kp[::2, 25:] = False
    opt = AdamW(m, lr=1e-2, weight_decay=0.01)
    first = None
    for step in range(300):
        loss, grads = m.loss_and_grads(tokens, targets, key_padding=kp)
        first = loss if first is None else first
        clip_grad_norm(grads, 1.0)
        opt.step(warmup_cosine(step, base_lr=1e-2, warmup_steps=10, total_steps=300))
        if loss < first / 10:
            break
    assert loss < first / 10, (first, loss, step)
    if pooling == "learned":
        assert np.abs(m.encoder.pool.params["query"]).max() > 0   # the query was trained


def test_float32_default_implementations():
    m = HierarchicalTransformer(8, 16, 2, segment=4, d_ff=32, max_len=64, task="token",
                                n_classes=5, pooling="learned")
    assert m.dtype == np.float32
    tokens = np.random.default_rng(0).integers(0, 8, (2, 37))
    loss, grads = m.loss_and_grads(tokens, tokens % 5)
    assert np.isfinite(loss)
    for name, g in grads.items():
        assert g.dtype == np.float32 and np.all(np.isfinite(g)), name
    m64 = HierarchicalTransformer.from_config({**m.config, "dtype": "float64",
                                               "lower_options": REF, "upper_options": REF})
    np.testing.assert_allclose(m.logits(tokens), m64.logits(tokens), rtol=2e-4, atol=2e-5)


def test_checkpoint_round_trip(tmp_path, rng):
    m = model(pooling="learned", task="token")
    m.encoder.pool.params["query"][...] = rng.standard_normal((H, D))
    opt = AdamW(m, lr=1e-3)
    tokens = rng.integers(0, V, (2, 9))
    m.loss_and_grads(tokens, tokens % 3)
    opt.step()
    checkpoint.save(tmp_path / "h.npz", m, optimizer=opt, step=1)
    m2 = HierarchicalTransformer.from_config(m.config)
    opt2 = AdamW(m2, lr=1e-3)
    meta = checkpoint.load(tmp_path / "h.npz", m2, optimizer=opt2)
    assert meta["step"] == 1
    np.testing.assert_array_equal(m2.logits(tokens), m.logits(tokens))


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def test_errors():
    with pytest.raises(ValueError, match="pooling"):
        SegmentPool(D, H, 3, pooling="max")
    with pytest.raises(ValueError, match="attention must be one of"):
        HierarchicalEncoder(D, H, segment=3, lower_attention="nope")
    with pytest.raises(ValueError, match="summary_positions needs max_len"):
        HierarchicalEncoder(D, H, segment=3, summary_positions="learned")
    with pytest.raises(TypeError, match="n_classes"):
        HierarchicalTransformer(V, D, H, n_classes=None)
    m = model()
    tokens = np.zeros((2, 10), dtype=np.int64)
    with pytest.raises(ValueError, match="key_padding must be a bool array"):
        m.forward(tokens, key_padding=np.ones((2, 9), dtype=bool))
    with pytest.raises(ValueError, match="exceeds max_len"):
        m.forward(np.zeros((1, 17), dtype=np.int64))
    with pytest.raises(TypeError, match="float64"):
        m.encoder.forward(np.zeros((1, 4, D), np.float32))


def test_negative_control_a_wrong_upsampling_backward_fails(monkeypatch, rng):
    from tinyeff.nn import funnel

    def wrong(du, segment):
        return 1.001 * _right(du, segment)

    _right = funnel.upsample_backward
    monkeypatch.setattr(funnel, "upsample_backward", wrong)
    m = model()
    tokens = rng.integers(0, V, (2, 10))
    report = model_gradcheck(m, tokens, rng.integers(0, 3, (2,)), rng)
    assert not report.ok(GRAD_FD)
