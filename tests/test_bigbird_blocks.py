"""masks.bigbird_blocks: HF transformers' BigBird block-sparse layout against a brute-force
token-level definition; the constraint set of the Generator draw; HF's eval mode (repeated
block 0) reproduced by ``full`` with a log-count bias, against a softmax over the duplicated
key list."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from tinyeff import masks
from tinyeff.attention import full, sparse


def hf_key_blocks(a, nb, rand_row):
    """The key blocks HF's bigbird_block_sparse_attention concatenates for query block a
    (modeling_big_bird.py, parts 1-5), repeats kept, in HF's order."""
    if a == 0 or a == nb - 1:
        return list(range(nb))
    if a == 1:
        return [0, 1, 2, nb - 1, *rand_row]
    if a == nb - 2:
        return [0, nb - 3, nb - 2, nb - 1, *rand_row]
    return [0, a - 1, a, a + 1, *rand_row, nb - 1]


def dense_counts(n, block, rand_attn):
    """(H, n, n): how many times token j is in token i's key list, by a plain triple loop."""
    heads, nb = rand_attn.shape[0], n // block
    out = np.zeros((heads, n, n), dtype=np.int64)
    for h in range(heads):
        for i in range(n):
            a = i // block
            rand_row = list(rand_attn[h, a - 1]) if 1 <= a <= nb - 2 else []
            for c in hf_key_blocks(a, nb, rand_row):
                for j in range(c * block, c * block + block):
                    out[h, i, j] += 1
    return out


def hf_legal(a, r):
    """HF's training-mode candidates for row block a (n_b > 2r + 5: one plan segment [0, E),
    E = 2r + 5; window, block 0, block E − 1 and the row-1 / row-(E−2) exceptions barred)."""
    e = 2 * r + 5
    bad = {a - 1, a, a + 1, 0, e - 1}
    if a == 1:
        bad.add(e - 2)
    if a == e - 2:
        bad.add(1)
    return {c for c in range(e) if c not in bad}


LAYOUTS = [(24, 4, 0, 1), (24, 3, 1, 2), (50, 5, 2, 3), (36, 2, 3, 2), (120, 8, 2, 1),
           (52, 4, 3, 4)]


@pytest.mark.parametrize("n,block,r,heads", LAYOUTS)
def test_generator_layout_equals_brute_force(n, block, r, heads):
    out = masks.bigbird_blocks(n, block, r, rng=np.random.default_rng(n + r), num_heads=heads)
    nb = n // block
    assert out.rand_attn.shape == (heads, nb - 2, r) and out.rand_attn.dtype == np.int64
    want = dense_counts(n, block, out.rand_attn)
    assert len(out.masks) == heads
    for h in range(heads):
        m = out.masks[h]
        assert isinstance(m, sp.csr_array) and m.dtype == np.bool_ and m.shape == (n, n)
        np.testing.assert_array_equal(m.toarray(), want[h] > 0)
        tok = out.counts[h].repeat(block, axis=0).repeat(block, axis=1)
        np.testing.assert_array_equal(tok, want[h])
    assert want.max() == 1                  # a training-mode draw never repeats a block


@pytest.mark.parametrize("n,block,r,heads", [(16, 4, 1, 2), (12, 3, 0, 1), (20, 2, 3, 3),
                                             (35, 5, 2, 2)])
def test_explicit_rand_attn_with_repeats_equals_brute_force(n, block, r, heads):
    nb = n // block
    rand = np.random.default_rng(7).integers(0, nb, size=(heads, nb - 2, r)).astype(np.int32)
    out = masks.bigbird_blocks(n, block, r, rand_attn=rand)
    want = dense_counts(n, block, rand)
    np.testing.assert_array_equal(out.rand_attn, rand)
    for h in range(heads):
        np.testing.assert_array_equal(out.masks[h].toarray(), want[h] > 0)
        np.testing.assert_array_equal(
            out.counts[h].repeat(block, axis=0).repeat(block, axis=1), want[h])


def test_eval_mode_counts_block_zero_one_plus_r_times():
    n, block, r, heads = 48, 4, 3, 2
    nb = n // block
    out = masks.bigbird_blocks(n, block, r, rand_attn=np.zeros((heads, nb - 2, r), np.int64))
    np.testing.assert_array_equal(out.counts[:, 1:-1, 0], 1 + r)
    np.testing.assert_array_equal(out.counts[:, [0, -1], :], 1)
    assert out.counts[:, 1:-1, 1:].max() == 1


@pytest.mark.parametrize("nb,r", [(6, 0), (8, 1), (10, 2), (12, 3), (30, 2), (14, 4)])
def test_generator_draws_hf_constraint_set(nb, r):
    """Distinct, r per row, inside HF's candidate set C(a), and every candidate is reached."""
    rng = np.random.default_rng(nb * 10 + r)
    seen = [set() for _ in range(nb - 2)]
    for _ in range(60):
        rand = masks.bigbird_blocks(nb * 2, 2, r, rng=rng, num_heads=3).rand_attn
        for h in range(3):
            for t in range(nb - 2):
                row = list(rand[h, t])
                assert len(set(row)) == len(row) == r
                legal = hf_legal(t + 1, r)
                assert set(row) <= legal, (t + 1, row, legal)
                window = {t, t + 1, t + 2}
                assert not set(row) & (window | {0, nb - 1})
                seen[t] |= set(row)
    for t in range(nb - 2):
        assert seen[t] == (hf_legal(t + 1, r) if r else set())


def test_generator_is_reproducible_and_per_head():
    a = masks.bigbird_blocks(64, 4, 2, rng=np.random.default_rng(3), num_heads=4)
    b = masks.bigbird_blocks(64, 4, 2, rng=np.random.default_rng(3), num_heads=4)
    np.testing.assert_array_equal(a.rand_attn, b.rand_attn)
    assert len({a.rand_attn[h].tobytes() for h in range(4)}) > 1


def test_bad_arguments():
    rng = np.random.default_rng(0)
    z = np.zeros((1, 4, 1), np.int64)
    with pytest.raises(ValueError, match="multiple of block"):
        masks.bigbird_blocks(25, 4, 1, rand_attn=z)
    with pytest.raises(ValueError, match=">= 4 blocks"):
        masks.bigbird_blocks(12, 4, 0, rand_attn=np.zeros((1, 1, 0), np.int64))
    with pytest.raises(ValueError, match="exactly one"):
        masks.bigbird_blocks(24, 4, 1)
    with pytest.raises(ValueError, match="exactly one"):
        masks.bigbird_blocks(24, 4, 1, rand_attn=z, rng=rng)
    with pytest.raises(TypeError, match="integer numpy.ndarray"):
        masks.bigbird_blocks(24, 4, 1, rand_attn=z.astype(float))
    with pytest.raises(TypeError, match="integer numpy.ndarray"):
        masks.bigbird_blocks(24, 4, 1, rand_attn=z.tolist())
    with pytest.raises(ValueError, match=r"\(H, 4, 1\)"):
        masks.bigbird_blocks(24, 4, 1, rand_attn=np.zeros((1, 5, 1), np.int64))
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        masks.bigbird_blocks(24, 4, 1, rand_attn=z + 6)
    with pytest.raises(ValueError, match="num_heads=2"):
        masks.bigbird_blocks(24, 4, 1, rand_attn=z, num_heads=2)
    with pytest.raises(ValueError, match="num_heads is required"):
        masks.bigbird_blocks(32, 4, 1, rng=rng)
    with pytest.raises(ValueError, match="2r \\+ 5 = 7"):
        masks.bigbird_blocks(28, 4, 1, rng=rng, num_heads=1)
    with pytest.raises(TypeError, match="Generator"):
        masks.bigbird_blocks(32, 4, 1, rng=np.random.RandomState(0), num_heads=1)
    with pytest.raises(TypeError, match="block must be an integer"):
        masks.bigbird_blocks(32, 4.0, 1, rng=rng, num_heads=1)


def duplicated_key_softmax(q, k, v, block, rand_attn, scale, real=None):
    """HF's computation written out: per row, a softmax over the concatenated key list
    (repeats kept), −10000 added to padded keys, padded query rows multiplied by 0; one
    entry at a time.  q, k, v (H, n, ·); real (n,) bool or None."""
    heads, n, _ = q.shape
    nb = n // block
    real = np.ones(n, bool) if real is None else real
    out = np.zeros((heads, n, v.shape[-1]))
    for h in range(heads):
        for i in range(n):
            a = i // block
            rand_row = list(rand_attn[h, a - 1]) if 1 <= a <= nb - 2 else []
            js = [j for c in hf_key_blocks(a, nb, rand_row)
                  for j in range(c * block, c * block + block)]
            s = [float(q[h, i] @ k[h, j]) * scale + (0.0 if real[j] else -10000.0)
                 for j in js]
            mx = max(s)
            w = [math.exp(x - mx) for x in s]
            z = sum(w)
            out[h, i] = sum(wj / z * v[h, j] for wj, j in zip(w, js)) * real[i]
    return out


def hf_bigbird_call(q, k, v, kpm, L, b, r, rand_attn):
    """The worked call of docs/semantics/sparse.md (HF BigBird), verbatim."""
    lay = masks.bigbird_blocks(L, b, r, rand_attn=np.stack(rand_attn))
    if lay.counts.max() == 1:                         # training-mode draw: each key at most once
        out, ctx = sparse.forward(q, k, v, mask=lay.masks, key_padding_mask=kpm)
    else:                                             # eval mode: block 0 counted 1 + r times
        c = lay.counts.repeat(b, axis=1).repeat(b, axis=2).astype(q.dtype)   # (H, L, L)
        bias = np.log(c, out=np.full(c.shape, -np.inf, q.dtype), where=c > 0)
        out, ctx = full.forward(q, k, v, bias=bias, key_padding_mask=kpm)
    out = out * kpm[..., :, None]                     # HF zeroes padded query rows
    return out


def padded(batch, n, rng):
    kpm = np.ones((batch, 1, n), bool)
    kpm[1:, 0, n - 1 - int(rng.integers(1, n // 3)):] = False
    return kpm


def test_eval_mode_doc_call_equals_duplicated_key_softmax():
    """HF eval mode: rand_attn = 0, block 0 counted 1 + r times per middle row."""
    n, block, r, heads, d, batch = 40, 4, 2, 2, 5, 2
    nb = n // block
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal((batch, heads, n, d)) for _ in range(3))
    kpm = padded(batch, n, rng)
    rand = [np.zeros((nb - 2, r), np.int32) for _ in range(heads)]     # HF's list, eval mode
    out = hf_bigbird_call(q, k, v, kpm, n, block, r, rand)
    for b in range(batch):
        want = duplicated_key_softmax(q[b], k[b], v[b], block, np.stack(rand),
                                      1 / math.sqrt(d), kpm[b, 0])
        np.testing.assert_allclose(out[b], want, rtol=0, atol=1e-13)
    # the plain pattern (each key once) is a different function here
    lay = masks.bigbird_blocks(n, block, r, rand_attn=np.stack(rand))
    plain, _ = sparse.forward(q, k, v, mask=lay.masks)
    assert np.abs(plain[0] - duplicated_key_softmax(q[0], k[0], v[0], block, lay.rand_attn,
                                                    1 / math.sqrt(d))).max() > 1e-3


def test_training_mode_doc_call_equals_duplicated_key_softmax():
    n, block, r, heads, d, batch = 48, 4, 2, 3, 4, 2
    rng = np.random.default_rng(12)
    q, k, v = (rng.standard_normal((batch, heads, n, d)) for _ in range(3))
    kpm = padded(batch, n, rng)
    lay = masks.bigbird_blocks(n, block, r, rng=rng, num_heads=heads)
    out = hf_bigbird_call(q, k, v, kpm, n, block, r, list(lay.rand_attn))
    for impl in ("ref", "numba"):
        out2, _ = sparse.forward(q, k, v, mask=lay.masks, key_padding_mask=kpm, impl=impl)
        np.testing.assert_allclose(out2 * kpm[..., :, None], out, rtol=0, atol=1e-13)
    for b in range(batch):
        want = duplicated_key_softmax(q[b], k[b], v[b], block, lay.rand_attn,
                                      1 / math.sqrt(d), kpm[b, 0])
        np.testing.assert_allclose(out[b], want, rtol=0, atol=1e-13)
