"""Training: cross-entropy, AdamW, clipping, the schedule, overfitting a fixed batch with
every registered variant, and checkpoints."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from tinyeff.attention import VARIANTS
from tinyeff.nn import (
    AdamW,
    Transformer,
    checkpoint,
    clip_grad_norm,
    cross_entropy,
    cross_entropy_backward,
    warmup_cosine,
)
from tinyeff.testing import GRAD_FD, check_vjp

from .test_model_gradcheck import batch, build, model_options, task_of

# --------------------------------------------------------------------------------------------
# cross-entropy
# --------------------------------------------------------------------------------------------


def test_cross_entropy_matches_the_formula(rng):
    z = rng.standard_normal((3, 4, 5))
    y = rng.integers(0, 5, (3, 4))
    y[0, 1] = -100
    loss, _ = cross_entropy(z, y, label_smoothing=0.2)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    keep = y != -100
    t = np.full(z.shape, 0.2 / 5)
    for idx in np.ndindex(y.shape):
        if keep[idx]:
            t[idx + (y[idx],)] += 0.8
    expected = -(t * logp).sum(-1)[keep].mean()
    assert loss == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_gradient(smoothing, rng):
    y = rng.integers(0, 6, (2, 5))
    y[1, 3] = 7 - 107                                           # ignore_index = -100

    def forward(z):
        loss, ctx = cross_entropy(z, y, label_smoothing=smoothing)
        return np.array([loss]), ctx

    def backward(g, ctx):
        return {"z": cross_entropy_backward(ctx, float(g[0]))}

    check_vjp(forward, backward, {"z": 3 * rng.standard_normal((2, 5, 6))},
              rng=rng).assert_ok(GRAD_FD)


def test_cross_entropy_all_ignored_and_bad_targets(rng):
    z = rng.standard_normal((2, 3))
    loss, ctx = cross_entropy(z, np.array([-100, -100]))
    assert loss == 0.0 and np.all(cross_entropy_backward(ctx) == 0)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        cross_entropy(z, np.array([0, 3]))
    with pytest.raises(ValueError, match="shape"):
        cross_entropy(z, np.array([0, 1, 2]))
    big = np.array([[1000.0, 0.0, -1000.0]])
    assert np.isfinite(cross_entropy(big, np.array([2]))[0])


# --------------------------------------------------------------------------------------------
# optimizer and schedule
# --------------------------------------------------------------------------------------------


def test_adamw_matches_the_update_formula(rng):
    model = build("full", n_layers=1)
    opt = AdamW(model, lr=0.01, betas=(0.8, 0.9), eps=1e-8, weight_decay=0.1)
    params = model.named_parameters()
    p0 = {k: v.copy() for k, v in params.items()}
    g1 = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    g2 = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    for g in (g1, g2):
        for k, v in model.named_grads().items():
            v[...] = g[k]
        opt.step()
    for k, theta in p0.items():
        decay = 0.1 if theta.ndim >= 2 else 0.0
        m = v = 0.0
        th = theta.copy()
        for t, g in enumerate((g1[k], g2[k]), start=1):
            th = th * (1 - 0.01 * decay)
            m = 0.8 * m + 0.2 * g
            v = 0.9 * v + 0.1 * g * g
            th = th - 0.01 * (m / (1 - 0.8 ** t)) / (np.sqrt(v / (1 - 0.9 ** t)) + 1e-8)
        np.testing.assert_allclose(params[k], th, rtol=1e-12, atol=1e-15, err_msg=k)


def test_weight_decay_is_decoupled():
    model = build("full", n_layers=1)
    opt = AdamW(model, lr=0.1, weight_decay=0.5)
    w = model.head.params["W"].copy()
    b = model.head.params["b"].copy()
    model.zero_grad()
    opt.step()                                                   # zero gradients
    np.testing.assert_allclose(model.head.params["W"], w * 0.95)
    np.testing.assert_array_equal(model.head.params["b"], b)     # 1-D: no decay


def test_clip_grad_norm(rng):
    grads = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))
    assert clip_grad_norm(grads, 0.5) == pytest.approx(norm)
    after = math.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))
    assert after == pytest.approx(0.5, rel=1e-5)
    before = {k: v.copy() for k, v in grads.items()}
    clip_grad_norm(grads, 10.0)                                  # below the bound: unchanged
    for k in grads:
        np.testing.assert_array_equal(grads[k], before[k])


def test_warmup_cosine():
    kw = dict(base_lr=1.0, warmup_steps=10, total_steps=110, min_lr=0.1)
    assert warmup_cosine(0, **kw) == pytest.approx(0.1)
    assert warmup_cosine(9, **kw) == pytest.approx(1.0)
    assert warmup_cosine(10, **kw) == pytest.approx(1.0)
    assert warmup_cosine(60, **kw) == pytest.approx(0.55)
    assert warmup_cosine(110, **kw) == pytest.approx(0.1)
    assert warmup_cosine(500, **kw) == pytest.approx(0.1)


# --------------------------------------------------------------------------------------------
# a real training loop overfits a fixed batch, for every variant
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_tiny_model_overfits_a_fixed_batch(name):
    model = Transformer(8, 16, 2, 2, 32, max_len=8, attention=name,
                        attention_options=model_options(name), task=task_of(name),
                        n_classes=4, seed=0, dtype=np.float64)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 8, (4, 8))
    targets = rng.integers(0, 8, (4, 8)) if model.task == "lm" else np.arange(4)
    opt = AdamW(model, lr=1e-2, weight_decay=0.0)
    first = None
    for step in range(300):
        loss, grads = model.loss_and_grads(tokens, targets)
        first = loss if first is None else first
        clip_grad_norm(grads, 1.0)
        opt.step(warmup_cosine(step, base_lr=1e-2, warmup_steps=10, total_steps=300))
        if loss < first / 10:
            break
    assert loss < first / 10, (name, first, loss, step)


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


def _train_steps(model, opt, tokens, targets, n):
    for _ in range(n):
        model.loss_and_grads(tokens, targets)
        opt.step()


def test_checkpoint_round_trip_resumes_training_exactly(tmp_path, rng):
    name = "performer" if "performer" in VARIANTS else "full"
    model = build(name)
    tokens, targets, _ = batch(model, rng)
    opt = AdamW(model, lr=1e-2)
    _train_steps(model, opt, tokens, targets, 3)
    path = tmp_path / "ckpt.npz"
    checkpoint.save(path, model, optimizer=opt, step=3)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.npz"]          # no temp file left

    with np.load(path, allow_pickle=False) as z:                         # plain arrays only
        assert all(z[k].dtype != object for k in z.files)
        assert json.loads(str(z["meta"]))["step"] == 3

    restored = checkpoint.load_transformer(path)
    opt2 = AdamW(restored, lr=1e-2)
    checkpoint.load(path, restored, optimizer=opt2)
    for k, v in model.named_parameters().items():
        np.testing.assert_array_equal(restored.named_parameters()[k], v)
    for k, v in model.named_buffers().items():                           # random features
        np.testing.assert_array_equal(restored.named_buffers()[k], v)
    _train_steps(model, opt, tokens, targets, 2)
    _train_steps(restored, opt2, tokens, targets, 2)
    for k, v in model.named_parameters().items():
        np.testing.assert_array_equal(restored.named_parameters()[k], v, err_msg=k)


def test_checkpoint_from_another_config_names_the_parameter(tmp_path):
    path = tmp_path / "a.npz"
    checkpoint.save(path, build("full", d_ff=16))
    other = build("full", d_ff=24)
    with pytest.raises(ValueError, match="d_ff"):
        checkpoint.load(path, other)
    with pytest.raises(ValueError, match=r"blocks\.0\.ffn\.fn\.fc1\.W.*shape \(8, 16\).*"
                                         r"\(8, 24\)"):
        checkpoint.load(path, other, check_config=False)
    with pytest.raises(ValueError, match=r"has no parameter 'blocks\.2\."):
        checkpoint.load(path, build("full", n_layers=3), check_config=False)
    shared = build("full", share="all")
    with pytest.raises(ValueError, match=r"has parameter 'blocks\.1\..*that this model lacks"):
        checkpoint.load(path, shared, check_config=False)
    with pytest.raises(ValueError, match="dtype float64 in the checkpoint"):
        checkpoint.load(path, build("full", d_ff=16, dtype=np.float32), check_config=False)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.npz"
    model = build("full")
    checkpoint.save(path, model)
    before = path.read_bytes()

    def broken_savez(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, model)
    assert path.read_bytes() == before                                    # old file intact
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]                      # temp file removed


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, a=np.zeros(2))
    with pytest.raises(ValueError, match="not a tinyeff checkpoint"):
        checkpoint.load(path, build("full"))


def test_generate_is_seeded():
    model = build("full")
    a = model.generate(np.array([1, 2]), 5, rng=np.random.default_rng(0), top_k=3)
    b = model.generate(np.array([1, 2]), 5, rng=np.random.default_rng(0), top_k=3)
    assert a.shape == (7,) and np.array_equal(a, b) and a.max() < 7
    assert model.training
