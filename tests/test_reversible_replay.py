"""Reversible blocks reuse a variant's discrete choices (REPLAY) when they recompute a forward.

Issue 5: LSH buckets are saved in the context so that a backward, or a reversible block's
recomputation, reuses them instead of hashing the reconstructed (round-off-perturbed) inputs
again.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from tinyeff.attention import VARIANTS, lsh

from .test_model_gradcheck import batch, build

REPLAYING = [name for name, mod in VARIANTS.items() if getattr(mod, "REPLAY", None)]


def test_lsh_declares_its_buckets_as_replayable():
    assert lsh.REPLAY == {"buckets": "buckets"}
    assert "lsh" in REPLAYING


@pytest.mark.parametrize("share", [None, "attention"])
@pytest.mark.parametrize("name", REPLAYING)
def test_recomputation_reuses_the_forward_choices(name, share, monkeypatch):
    mod = VARIANTS[name]
    calls = []
    original = mod.forward

    @functools.wraps(original)      # the layer reads forward's signature
    def spy(*args, **kwargs):
        out, ctx = original(*args, **kwargs)
        calls.append(({k: kwargs.get(k) for k in mod.REPLAY},
                      {k: getattr(ctx, f) for k, f in mod.REPLAY.items()}))
        return out, ctx

    monkeypatch.setattr(mod, "forward", spy)
    model = build(name, n_layers=3, reversible=True, share=share, seed=2)
    tokens, targets, _ = batch(model, np.random.default_rng(3))
    model.loss_and_grads(tokens, targets)
    # 3 forwards without replay, then 3 recomputations (last block first) with replay
    assert len(calls) == 6
    fwd, rec = calls[:3], calls[3:]
    assert all(v is None for passed, _ in fwd for v in passed.values())
    for (_, made), (passed, _) in zip(reversed(fwd), rec):
        for opt in mod.REPLAY:
            np.testing.assert_array_equal(passed[opt], made[opt])


@pytest.mark.parametrize("name", REPLAYING)
def test_reversible_gradients_equal_stored_activation_backprop(name):
    grads = {}
    for recompute in (True, False):
        model = build(name, n_layers=4, reversible=True, seed=1)
        model.recompute = recompute
        tokens, targets, _ = batch(model, np.random.default_rng(5))
        loss, g = model.loss_and_grads(tokens, targets)
        grads[recompute] = (loss, {k: v.copy() for k, v in g.items()})
    assert grads[True][0] == grads[False][0]
    top = max(np.abs(v).max() for v in grads[False][1].values())
    for k, v in grads[False][1].items():
        err = np.abs(grads[True][1][k] - v).max() / max(np.abs(v).max(), 1e-6 * top)
        assert err < 1e-8, (k, err)
