"""Task generators: ListOps against hand-evaluated expressions, seeding, corpora."""

from __future__ import annotations

import numpy as np
import pytest

from tinyeff import tasks


@pytest.mark.parametrize("expr,value", [
    ("[MAX 2 9 ] ", 9),
    ("[MIN 4 [MAX 1 3 ] 7 ]", 3),
    ("[MED 1 2 3 4 ]", 2),                 # even count: (2 + 3) / 2 truncated
    ("[MED 9 1 5 ]", 5),
    ("[MED 3 8 ]", 5),
    ("[SM 9 8 7 ]", 4),                    # 24 mod 10
    ("[SM [MAX 9 9 ] [MIN 5 6 ] 1 ]", 5),  # (9 + 5 + 1) mod 10
    ("[MAX [MED 0 0 9 ] [SM 5 5 ] [MIN 2 [MAX 0 1 ] ] ]", 1),
    ("7", 7),
])
def test_listops_eval_by_hand(expr, value):
    assert tasks.listops_eval(expr.split()) == value


@pytest.mark.parametrize("bad", ["[MAX 1", "1 ]", "[MAX ]", "[FOO 1 ]", "[MAX 12 ]"])
def test_listops_eval_rejects_malformed(bad):
    with pytest.raises(ValueError):
        tasks.listops_eval(bad.split())


def test_listops_generator_is_seeded_and_consistent():
    a = tasks.listops(np.random.default_rng(5), 30, min_len=20, max_len=128)
    b = tasks.listops(np.random.default_rng(5), 30, min_len=20, max_len=128)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.tokens.shape == (30, 128)
    assert np.all((a.lengths >= 21) & (a.lengths <= 128))
    assert len({row.tobytes() for row in a.tokens}) == 30           # distinct
    for row, n, label in zip(a.tokens, a.lengths, a.labels):
        assert row[0] == tasks.LISTOPS_INDEX["<cls>"] and np.all(row[n:] == 0)
        toks = [tasks.LISTOPS_VOCAB[i] for i in row[1:n]]
        assert tasks.listops_eval(toks) == label


def test_associative_recall_labels():
    d = tasks.associative_recall(np.random.default_rng(1), 20, seq_len=31, n_keys=20)
    assert d.tokens.shape == (20, 31)
    for row, label in zip(d.tokens, d.labels):
        query = row[-1]
        pos = np.nonzero(row[1:-2:2] == query)[0]
        assert len(pos) == 1
        assert row[2 + 2 * pos[0]] - 3 - 20 == label


def test_stdlib_corpus_is_deterministic():
    a = tasks.stdlib_corpus(max_bytes=200_000)
    b = tasks.stdlib_corpus(max_bytes=200_000)
    assert len(a.train) + len(a.valid) == 200_000
    np.testing.assert_array_equal(a.train, b.train)
    assert b"def " in a.train.tobytes()
    x, y = tasks.lm_batch(a.train, 4, 16, np.random.default_rng(0))
    assert x.shape == y.shape == (4, 16)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])


def test_text_file_corpus(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("hello world " * 50)
    c = tasks.text_file_corpus(p)
    assert c.train.dtype == np.uint8 and len(c.valid) == 60
    p.write_text("short")
    with pytest.raises(ValueError, match="100 bytes"):
        tasks.text_file_corpus(p)


def test_mqar_layout_and_targets():
    """Zoology's MQAR: P pairs first, each key queried once later at an even offset, the
    target at the query is the key's value, everything else IGNORE."""
    P, N, V = 4, 32, 40
    a = tasks.mqar(np.random.default_rng(3), 30, seq_len=N, num_kv_pairs=P, vocab_size=V)
    b = tasks.mqar(np.random.default_rng(3), 30, seq_len=N, num_kv_pairs=P, vocab_size=V)
    np.testing.assert_array_equal(a.tokens, b.tokens)                 # seeded
    np.testing.assert_array_equal(a.targets, b.targets)
    assert a.tokens.shape == a.targets.shape == (30, N)
    for row, target in zip(a.tokens, a.targets):
        keys, values = row[0:2 * P:2], row[1:2 * P:2]
        assert len(set(keys)) == P and len(set(values)) == P
        assert np.all((keys >= 1) & (keys < V // 2)) and np.all(values >= V // 2)
        assert np.all(target[:2 * P] == tasks.IGNORE)
        q = np.nonzero(target != tasks.IGNORE)[0]
        assert len(q) == P and np.all((q - 2 * P) % 2 == 0)
        assert sorted(row[q]) == sorted(keys)                          # every key once
        for pos in q:
            assert target[pos] == values[list(keys).index(row[pos])]
        filler = np.setdiff1d(np.arange(2 * P, N), q)
        assert not np.isin(row[filler], keys).any()                    # no false key
    c = tasks.mqar(np.random.default_rng(3), 5, seq_len=N, num_kv_pairs=P, vocab_size=V,
                   random_non_queries=False)
    rest = c.tokens[:, 2 * P:][c.targets[:, 2 * P:] == tasks.IGNORE]
    assert np.all(rest == 0)


def test_mqar_gaps_follow_the_power_law():
    """power_a = 0.01 puts most queries right after the pairs; power_a = 1 is uniform."""
    P, N = 8, 256
    near = tasks.mqar(np.random.default_rng(0), 200, seq_len=N, num_kv_pairs=P, power_a=0.01)
    flat = tasks.mqar(np.random.default_rng(0), 200, seq_len=N, num_kv_pairs=P, power_a=1.0)
    mean_pos = [np.mean(np.nonzero(d.targets != tasks.IGNORE)[1]) for d in (near, flat)]
    assert mean_pos[0] < 0.8 * mean_pos[1]
