"""Hierarchical attention: the H-matrix partition, exactness against full, receptive field."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tinyeff.attention import full, hierarchical
from tinyeff.testing import GRAD_FD, assert_close, check_vjp, random_qkv

# ----------------------------------------------------------------------------------------
# An independent oracle, written from the near-field definition of the module docstring
# ----------------------------------------------------------------------------------------

def _near_field(i, ell, n, block, w):
    size = block << ell
    beta = i // size
    return max(0, (beta - w) * size), min(n, (beta + w + 1) * size)


def oracle_partition(n, block, levels, w):
    """For each row i, the spans (start, stop) of P(i); asserts that they partition NF_L(i)."""
    rows = []
    for i in range(n):
        lo, hi = _near_field(i, 0, n, block, w)
        spans = [(j, j + 1) for j in range(lo, hi)]
        for ell in range(1, levels + 1):
            lo, hi = _near_field(i, ell, n, block, w)
            plo, phi = _near_field(i, ell - 1, n, block, w)
            span = 1 << ell
            for t in range(math.ceil(n / span)):
                a, b = t * span, min(n, (t + 1) * span)
                inside, outside = lo <= a and b <= hi, b <= lo or a >= hi
                in_finer, out_finer = plo <= a and b <= phi, b <= plo or a >= phi
                assert (inside or outside) and (in_finer or out_finer)   # no span is cut
                if inside and out_finer:
                    spans.append((a, b))
        covered = sorted(spans)
        lo, hi = _near_field(i, levels, n, block, w)
        assert covered[0][0] == lo and covered[-1][1] == hi
        assert all(x[1] == y[0] for x, y in zip(covered, covered[1:]))   # disjoint, no gap
        rows.append(spans)
    return rows


def oracle_forward(q, k, v, *, block, levels=None, neighbours=True, causal=False,
                   key_padding_mask=None, scale=None):
    """Row by row: one softmax over the spans of P(i), coarse logits + log(#real keys)."""
    *batch, n, d = q.shape
    w = int(neighbours)
    L = hierarchical.full_levels(n, block, neighbours) if levels is None else levels
    L = min(L, hierarchical.full_levels(n, block, neighbours))
    scale = 1 / math.sqrt(d) if scale is None else scale
    kpm = np.ones(n, bool) if key_padding_mask is None else key_padding_mask
    kpm = np.broadcast_to(kpm, (*batch, n))
    out = np.zeros((*batch, n, v.shape[-1]))
    part = oracle_partition(n, block, L, w)
    for bi in np.ndindex(*batch):
        for i in range(n):
            logits, values = [], []
            for a, b in part[i]:
                if causal and a > i:
                    continue
                assert not causal or b - 1 <= i            # no visible span straddles i
                real = [j for j in range(a, b) if kpm[bi][j]]
                if not real:
                    continue
                kbar = np.mean([k[bi][j] for j in real], axis=0)
                vbar = np.mean([v[bi][j] for j in real], axis=0)
                logits.append(float(q[bi][i] @ kbar) * scale + math.log(len(real)))
                values.append(vbar)
            if logits:
                c = max(logits)
                wts = [math.exp(x - c) for x in logits]
                out[bi][i] = sum(wj * vj for wj, vj in zip(wts, values)) / sum(wts)
    return out


OPTIONS = [
    dict(block=2),
    dict(block=2, causal=True),
    dict(block=4, neighbours=False),
    dict(block=2, neighbours=False, causal=True),
    dict(block=2, levels=1),
    dict(block=4, levels=0, causal=True),
    dict(block=6, scale=0.5),
]


@pytest.mark.parametrize("n", [1, 7, 16, 23])
@pytest.mark.parametrize("opts", OPTIONS)
def test_matches_row_by_row_oracle(n, opts, rng):
    x = random_qkv(rng, (2,), n=n, d=3, dv=2)
    kpm = rng.random((2, n)) < 0.75
    for mask in (None, kpm):
        out, _ = hierarchical.forward(**x, **opts, key_padding_mask=mask)
        assert_close(out, oracle_forward(**x, **opts, key_padding_mask=mask))


def test_segment_offsets_are_the_near_field_differences():
    """The Δ table of the docstring equals NF_ℓ \\ NF_ℓ₋₁ measured in level-(ℓ−1) blocks."""
    for w in (0, 1):
        for ell in (1, 2, 3):
            for G in range(8, 16):
                parent = G // 2
                near = set(range(2 * (parent - w), 2 * (parent + w) + 2))   # NF_ℓ in segments
                finer = set(range(G - w, G + w + 1))                        # NF_ℓ₋₁
                got = set((G + hierarchical.segment_offsets(ell, G % 2, bool(w))).tolist())
                assert got == near - finer


# ----------------------------------------------------------------------------------------
# The exactness tests
# ----------------------------------------------------------------------------------------

def _piecewise_constant(rng, batch, n, d, span):
    """Keys/values constant on the aligned spans [t·span, (t+1)·span)."""
    t = np.arange(n) // span
    return rng.standard_normal((*batch, t[-1] + 1, d))[..., t, :]           # (..., N, d)


@pytest.mark.parametrize("n,block,neighbours", [(32, 2, True), (29, 4, False), (40, 2, False),
                                                (64, 4, True)])
@pytest.mark.parametrize("causal", [False, True])
def test_constant_spans_equal_full_exactly(n, block, neighbours, causal, rng):
    """Keys and values constant within every span: hierarchical == full (forward and dq)."""
    L = hierarchical.full_levels(n, block, neighbours)
    q = rng.standard_normal((2, 2, n, 3))
    k = _piecewise_constant(rng, (2, 2), n, 3, 1 << L)
    v = _piecewise_constant(rng, (2, 2), n, 2, 1 << L)
    kpm = rng.random((2, 1, n)) < 0.7
    for mask in (None, kpm):
        out, ctx = hierarchical.forward(q, k, v, block=block, neighbours=neighbours,
                                        causal=causal, key_padding_mask=mask)
        out_f, ctx_f = full.forward(q, k, v, causal=causal, key_padding_mask=mask)
        assert_close(out, out_f)
        dout = rng.standard_normal(out.shape)
        assert_close(hierarchical.backward(dout, ctx)["q"], full.backward(dout, ctx_f)["q"])


def test_constant_spans_with_few_levels_equal_full_on_the_receptive_field(rng):
    n, block = 48, 2
    q = rng.standard_normal((1, n, 3))
    k = _piecewise_constant(rng, (1,), n, 3, 4)
    v = _piecewise_constant(rng, (1,), n, 3, 4)
    out, _ = hierarchical.forward(q, k, v, block=block, levels=2)
    rf = hierarchical.receptive_field(n, block=block, levels=2)
    out_f, _ = full.forward(q, k, v, mask=rf)
    assert_close(out, out_f)
    assert not rf.all()


@pytest.mark.parametrize("n,block", [(7, 7), (9, 16), (8, 8), (1, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_block_at_least_n_equals_full(n, block, causal, rng):
    x = random_qkv(rng, (2, 2), n=n, d=4, dv=3)
    kpm = rng.random((2, 1, n)) < 0.7
    for mask in (None, kpm):
        out, ctx = hierarchical.forward(**x, block=block, causal=causal, key_padding_mask=mask)
        out_f, ctx_f = full.forward(**x, causal=causal, key_padding_mask=mask)
        assert_close(out, out_f)
        dout = rng.standard_normal(out.shape)
        assert_close(hierarchical.backward(dout, ctx), full.backward(dout, ctx_f))


def test_zero_levels_is_block_local_attention(rng):
    x = random_qkv(rng, (2,), n=21, d=3)
    for neighbours in (False, True):
        out, ctx = hierarchical.forward(**x, block=4, levels=0, neighbours=neighbours)
        blk = np.arange(21) // 4
        mask = np.abs(blk[:, None] - blk[None, :]) <= int(neighbours)
        out_f, ctx_f = full.forward(**x, mask=mask)
        assert_close(out, out_f)
        dout = rng.standard_normal(out.shape)
        assert_close(hierarchical.backward(dout, ctx), full.backward(dout, ctx_f))


# ----------------------------------------------------------------------------------------
# Gradients and receptive field
# ----------------------------------------------------------------------------------------

GRAD_OPTIONS = [
    dict(block=2),
    dict(block=2, causal=True),
    dict(block=4, neighbours=False),
    dict(block=2, neighbours=False, causal=True, scale=1.3),
    dict(block=2, levels=1),
    dict(block=4, levels=0),
    dict(block=8),
]


@pytest.mark.parametrize("opts", GRAD_OPTIONS)
@pytest.mark.parametrize("padded", [False, True])
def test_gradcheck_over_options(opts, padded, rng):
    n = 19
    x = random_qkv(rng, (2, 2), n=n, d=3, dv=2)
    kpm = None
    if padded:
        kpm = rng.random((2, 1, n)) < 0.7
        kpm[0, 0, :] = False                          # batch 0: every key padded
    report = check_vjp(hierarchical.forward, hierarchical.backward, x,
                       {**opts, "key_padding_mask": kpm}, rng=rng)
    report.assert_ok(GRAD_FD)


@pytest.mark.parametrize("opts", [dict(block=2), dict(block=2, causal=True),
                                  dict(block=4, neighbours=False), dict(block=2, levels=1),
                                  dict(block=2, levels=2, neighbours=False, causal=True)])
def test_receptive_field_is_exactly_the_documented_set(opts, rng):
    """∂out_i/∂v_j ≠ 0 exactly on receptive_field ∩ real keys; so is ∂out_i/∂k_j, except
    that a row whose softmax has a single entry (one visible span) has ∂out_i/∂k = 0."""
    n = 37
    x = random_qkv(rng, (1,), n=n, d=3, dv=2)
    kpm = rng.random((1, n)) < 0.85
    out, ctx = hierarchical.forward(**x, **opts, key_padding_mask=kpm)
    rf = hierarchical.receptive_field(n, **opts) & kpm
    part = oracle_partition(n, opts["block"], ctx.levels, int(opts.get("neighbours", True)))
    for i in range(n):
        dout = np.zeros_like(out)
        dout[:, i] = rng.standard_normal(out.shape[-1])
        g = hierarchical.backward(dout, ctx)
        assert np.array_equal(np.any(g["v"][0] != 0, axis=-1), rf[i]), i
        entries = sum(1 for a, b in part[i]
                      if (a <= i or not opts.get("causal")) and kpm[0, a:b].any())
        if entries > 1:
            assert np.array_equal(np.any(g["k"][0] != 0, axis=-1), rf[i]), i
        else:       # p_i = 1 is constant: zero up to the rounding of p·(dp − δ)
            assert np.abs(g["k"]).max() < 1e-12, i
    if opts.get("levels") is None:     # the default levels reach every (past) real key
        assert np.array_equal(hierarchical.receptive_field(n, **opts),
                              np.tri(n, dtype=bool) if opts.get("causal") else
                              np.ones((n, n), bool))


def test_fully_padded_rows_output_zero_with_zero_gradient(rng):
    x = random_qkv(rng, (2,), n=12, d=3)
    kpm = np.ones((2, 12), bool)
    kpm[1, :6] = False
    out, ctx = hierarchical.forward(**x, block=2, causal=True, key_padding_mask=kpm)
    assert np.all(out[1, :6] == 0) and np.all(np.isinf(ctx.lse[1, :6]))
    g = hierarchical.backward(rng.standard_normal(out.shape), ctx)
    assert np.all(g["q"][1, :6] == 0) and np.all(g["k"][1, :6] == 0)
    assert all(np.all(np.isfinite(a)) for a in g.values())


def test_padded_keys_holding_nan_are_removed(rng):
    x = random_qkv(rng, (1,), n=16, d=3)
    kpm = rng.random((1, 16)) < 0.6
    out, _ = hierarchical.forward(**x, block=2, key_padding_mask=kpm)
    k, v = x["k"].copy(), x["v"].copy()
    k[~kpm], v[~kpm] = np.nan, np.inf
    out2, ctx2 = hierarchical.forward(x["q"], k, v, block=2, key_padding_mask=kpm)
    assert_close(out2, out)
    g = hierarchical.backward(rng.standard_normal(out.shape), ctx2)
    assert all(np.all(np.isfinite(a)) for a in g.values())


def test_causal_prefix_consistency(rng):
    x = random_qkv(rng, (2,), n=30, d=3)
    out, _ = hierarchical.forward(**x, block=2, causal=True)
    for t in (5, 16, 17):
        part = {n: a[:, :t] for n, a in x.items()}
        sub, _ = hierarchical.forward(**part, block=2, causal=True,
                                      levels=hierarchical.full_levels(30, 2))
        assert_close(sub, out[:, :t])


def test_row_chunking_does_not_change_the_result(rng, monkeypatch):
    x = random_qkv(rng, (2,), n=45, d=3)
    opts = dict(block=2, causal=True, key_padding_mask=rng.random((2, 45)) < 0.8)
    out, ctx = hierarchical.forward(**x, **opts)
    dout = rng.standard_normal(out.shape)
    g = hierarchical.backward(dout, ctx)
    monkeypatch.setattr(hierarchical, "_CHUNK_ELEMENTS", 1)         # one block per chunk
    out1, ctx1 = hierarchical.forward(**x, **opts)
    assert_close(out1, out)
    assert_close(hierarchical.backward(dout, ctx1), g)


def test_full_levels():
    assert hierarchical.full_levels(64, 64) == 0
    assert hierarchical.full_levels(128, 64) == 0          # own + neighbour block
    assert hierarchical.full_levels(129, 64) == 1
    assert hierarchical.full_levels(65536, 64) == 9
    assert hierarchical.full_levels(65536, 64, neighbours=False) == 10
    assert hierarchical.full_levels(0, 4) == 0


def test_empty_sequence(rng):
    x = random_qkv(rng, (2,), n=0)
    out, ctx = hierarchical.forward(**x, block=2)
    assert out.shape == (2, 0, 4)
    assert hierarchical.backward(out.copy(), ctx)["k"].shape == (2, 0, 4)


@pytest.mark.parametrize("opts,err,match", [
    (dict(block=3), ValueError, "block must be even"),
    (dict(block=0), ValueError, "block must be >= 1"),
    (dict(block=2.0), TypeError, "block must be an integer"),
    (dict(block=2, levels=-1), ValueError, "levels must be >= 0"),
    (dict(block=2, neighbours=1), TypeError, "neighbours must be a bool"),
    (dict(block=2, key_padding_mask=np.ones(5, bool)), ValueError, "key_padding_mask"),
])
def test_validation(opts, err, match, rng):
    x = random_qkv(rng, (1,), n=10)
    with pytest.raises(err, match=match):
        hierarchical.forward(**x, **opts)


def test_keys_must_be_the_query_positions(rng):
    x = random_qkv(rng, (1,), n=6, m=8)
    with pytest.raises(ValueError, match="as many keys as queries"):
        hierarchical.forward(**x, block=2)


def test_odd_block_is_fine_without_coarse_levels(rng):
    x = random_qkv(rng, (1,), n=10)
    hierarchical.forward(**x, block=3, levels=0)
    hierarchical.forward(**x, block=5)                     # 2 blocks: neighbours reach all
