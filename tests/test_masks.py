"""tinyeff.masks: every builder against a dense brute-force definition; canonical form;
Pattern canonicalization and its transpose plan; nnz counts at large n."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from tinyeff import masks
from tinyeff.masks import Pattern


def dense(n, m, rule):
    """The (n, m) boolean matrix with S_ij = rule(i, j), by brute force."""
    return np.array([[bool(rule(i, j)) for j in range(m)] for i in range(n)], dtype=bool)


def assert_canonical(a):
    assert isinstance(a, sp.csr_array) and a.dtype == np.bool_
    assert a.indptr.dtype == np.int64 and a.indices.dtype == np.int64
    assert np.all(a.data)
    for i in range(a.shape[0]):
        row = a.indices[a.indptr[i]:a.indptr[i + 1]]
        assert np.all(np.diff(row) > 0), f"row {i} not sorted/unique: {row}"


CASES = [
    ("causal", lambda: masks.causal(7), 7, 7, lambda i, j: j <= i),
    ("causal_rect", lambda: masks.causal(5, 9), 5, 9, lambda i, j: j <= i),
    ("causal_bottom_right", lambda: masks.causal(5, 9, offset=4), 5, 9, lambda i, j: j <= i + 4),
    ("local", lambda: masks.local(9, 2), 9, 9, lambda i, j: abs(i - j) <= 2),
    ("local_0", lambda: masks.local(5, 0), 5, 5, lambda i, j: i == j),
    ("local_wide", lambda: masks.local(4, 10), 4, 4, lambda i, j: True),
    ("local_rect", lambda: masks.local(5, 1, m=8, offset=3), 5, 8,
     lambda i, j: abs(i + 3 - j) <= 1),
    ("local_neg_offset", lambda: masks.local(6, 1, m=4, offset=-2), 6, 4,
     lambda i, j: abs(i - 2 - j) <= 1),
    ("dilated", lambda: masks.dilated(12, 2, 3), 12, 12,
     lambda i, j: (j - i) % 3 == 0 and abs(j - i) <= 6),
    ("dilated_1", lambda: masks.dilated(8, 2, 1), 8, 8, lambda i, j: abs(i - j) <= 2),
    ("dilated_rect", lambda: masks.dilated(6, 1, 2, m=9, offset=1), 6, 9,
     lambda i, j: (j - i - 1) % 2 == 0 and abs(j - i - 1) <= 2),
    ("global", lambda: masks.global_tokens(8, [1, 6]), 8, 8,
     lambda i, j: i in (1, 6) or j in (1, 6)),
    ("global_none", lambda: masks.global_tokens(4, []), 4, 4, lambda i, j: False),
    ("strided", lambda: masks.strided(13, 4), 13, 13,
     lambda i, j: j <= i and (i - j < 4 or (i - j) % 4 == 0)),
    ("strided_local", lambda: masks.strided(9, 3, part="local"), 9, 9,
     lambda i, j: j <= i and i - j < 3),
    ("strided_stride", lambda: masks.strided(9, 3, part="stride"), 9, 9,
     lambda i, j: j <= i and (i - j) % 3 == 0),
    ("fixed", lambda: masks.fixed(14, 4, 2), 14, 14,
     lambda i, j: j <= i and (j // 4 == i // 4 or j % 4 >= 2)),
    ("fixed_summary", lambda: masks.fixed(10, 3, 1, part="summary"), 10, 10,
     lambda i, j: j <= i and j % 3 == 2),
    ("block_diagonal", lambda: masks.block_diagonal(10, 4), 10, 10,
     lambda i, j: i // 4 == j // 4),
    ("block_diagonal_rect", lambda: masks.block_diagonal(7, 3, m=8, key_block=4), 7, 8,
     lambda i, j: i // 3 == j // 4),
    ("block_layout", lambda: masks.from_block_layout(
        np.array([[1, 0, 1], [0, 1, 0]], bool), 3, n=5, m=8), 5, 8,
     lambda i, j: [[1, 0, 1], [0, 1, 0]][i // 3][j // 3]),
]


@pytest.mark.parametrize("name,build,n,m,rule", CASES, ids=[c[0] for c in CASES])
def test_builder_equals_brute_force(name, build, n, m, rule):
    a = build()
    assert a.shape == (n, m)
    assert_canonical(a)
    np.testing.assert_array_equal(a.toarray(), dense(n, m, rule))


@pytest.mark.parametrize("n,m,r", [(9, 9, 3), (6, 20, 5), (5, 4, 7), (4, 4, 0)])
def test_random_rows_are_distinct_uniform_draws(n, m, r):
    a = masks.random(n, r, np.random.default_rng(1), m=m)
    assert_canonical(a)
    assert a.shape == (n, m)
    np.testing.assert_array_equal(np.diff(a.indptr), min(r, m))
    b = masks.random(n, r, np.random.default_rng(1), m=m)
    np.testing.assert_array_equal(a.toarray(), b.toarray())      # same seed, same pattern


def test_random_is_uniform_over_keys():
    a = masks.random(20000, 3, np.random.default_rng(2), m=10)
    counts = np.bincount(a.indices, minlength=10)                 # expected 6000 each
    assert np.all(np.abs(counts - 6000) < 300), counts


@pytest.mark.parametrize("n,w,g,r", [(16, 2, 2, 3), (12, 1, 0, 2), (9, 3, 1, 5), (6, 2, 1, 9)])
def test_bigbird_is_window_global_and_fresh_random_keys(n, w, g, r):
    a = masks.bigbird(n, w, g, r, np.random.default_rng(3))
    assert_canonical(a)
    d = a.toarray()
    base = dense(n, n, lambda i, j: abs(i - j) <= w or i < g or j < g)
    assert np.all(d >= base)                                      # window ∪ global kept
    extra = d & ~base                                             # the random part
    for i in range(g, n):
        avail = n - base[i].sum()
        assert extra[i].sum() == min(r, avail), (i, extra[i])
    assert not extra[:g].any()
    b = masks.bigbird(n, w, g, r, np.random.default_rng(3))
    np.testing.assert_array_equal(d, b.toarray())


def test_bigbird_random_keys_are_uniform():
    n, w, g, r = 60, 2, 1, 2
    hits = np.zeros(n)
    for seed in range(40):
        d = masks.bigbird(n, w, g, r, np.random.default_rng(seed)).toarray()
        hits += d[30]                                             # row 30's draws
    window = np.abs(np.arange(n) - 30) <= w
    free = ~window & (np.arange(n) >= g)
    # 80 draws over the 54 free keys: about 1.5 each
    assert hits[free].sum() == 80 and hits[free].max() <= 7
    assert np.all(hits[window | (np.arange(n) < g)] == 40)


def test_union_and_intersect_equal_dense_logic():
    rng = np.random.default_rng(4)
    ds = [rng.random((7, 9)) < p for p in (0.3, 0.5, 0.6)]
    ms = [sp.csr_array(d) for d in ds]
    u, x = masks.union(*ms), masks.intersect(*ms)
    assert_canonical(u)
    assert_canonical(x)
    np.testing.assert_array_equal(u.toarray(), ds[0] | ds[1] | ds[2])
    np.testing.assert_array_equal(x.toarray(), ds[0] & ds[1] & ds[2])
    np.testing.assert_array_equal(masks.union(ms[0]).toarray(), ds[0])
    with pytest.raises(ValueError, match="shape"):
        masks.union(ms[0], sp.csr_array(np.ones((9, 7), bool)))
    with pytest.raises(ValueError, match="at least one"):
        masks.intersect()


def test_builders_reject_bad_arguments():
    with pytest.raises(TypeError, match="window"):
        masks.local(5, 1.5)
    with pytest.raises(ValueError, match="window"):
        masks.local(5, -1)
    with pytest.raises(ValueError, match="dilation"):
        masks.dilated(5, 1, 0)
    with pytest.raises(ValueError, match="summary"):
        masks.fixed(8, 2, 3)
    with pytest.raises(ValueError, match="indices"):
        masks.global_tokens(4, [4])
    with pytest.raises(TypeError, match="rng"):
        masks.random(4, 2, 0)
    with pytest.raises(TypeError, match="rng"):
        masks.bigbird(8, 1, 1, 1, np.random.RandomState(0))
    with pytest.raises(ValueError, match="part"):
        masks.strided(8, 2, part="merged")


# ---------------------------------------------------------------- Pattern

def test_pattern_canonicalizes_every_format():
    rng = np.random.default_rng(5)
    d = rng.random((6, 8)) < 0.4
    d[3] = False
    rows, cols = np.nonzero(d)
    # duplicated, shuffled COO entries
    perm = rng.permutation(2 * rows.size)
    coo = sp.coo_array((np.ones(2 * rows.size, bool),
                        (np.r_[rows, rows][perm], np.r_[cols, cols][perm])), shape=(6, 8))
    for x in (sp.csr_array(d), sp.csr_matrix(d), sp.csc_array(d), sp.lil_matrix(d),
              sp.dok_array(d), sp.bsr_array(d), coo, sp.coo_matrix(d)):
        p = Pattern.from_scipy(x)
        assert p.shape == (6, 8) and p.nnz == d.sum()
        assert p.indptr.dtype == np.int64 and p.indices.dtype == np.int64
        np.testing.assert_array_equal(p.to_dense(), d)
        assert Pattern.from_scipy(p) is p


def test_pattern_sorts_unsorted_csr_and_leaves_the_input_alone():
    a = sp.csr_array((np.ones(4, bool), np.array([2, 0, 1, 1]), np.array([0, 2, 4])),
                     shape=(2, 3))
    before = a.indices.copy()
    p = Pattern.from_scipy(a)
    np.testing.assert_array_equal(p.indices, [0, 2, 1])
    np.testing.assert_array_equal(p.indptr, [0, 2, 3])
    np.testing.assert_array_equal(a.indices, before)
    assert a.indices.flags.writeable
    assert not p.indices.flags.writeable and not p.indptr.flags.writeable


def test_pattern_rejects_explicit_false_and_bad_types():
    a = sp.csr_array((np.array([True, False]), np.array([0, 1]), np.array([0, 2, 2])),
                     shape=(2, 2))
    with pytest.raises(ValueError, match="explicit False"):
        Pattern.from_scipy(a)
    with pytest.raises(ValueError, match="explicit False"):
        Pattern.from_scipy(sp.coo_array(a))
    with pytest.raises(TypeError, match="bool"):
        Pattern.from_scipy(sp.csr_array(np.eye(3)))
    with pytest.raises(TypeError, match="scipy.sparse"):
        Pattern.from_scipy(np.eye(3, dtype=bool))


def test_transpose_plan_is_the_csc_order():
    rng = np.random.default_rng(6)
    d = rng.random((7, 5)) < 0.5
    d[:, 2] = False
    p = Pattern.from_scipy(sp.csr_array(d))
    rows = p.row_ids
    assert p.t_indptr.shape == (6,)
    for j in range(5):
        t = slice(p.t_indptr[j], p.t_indptr[j + 1])
        np.testing.assert_array_equal(p.t_indices[t], np.nonzero(d[:, j])[0])
        np.testing.assert_array_equal(p.indices[p.t_perm[t]], j)
        np.testing.assert_array_equal(rows[p.t_perm[t]], p.t_indices[t])
    assert sorted(p.t_perm) == list(range(p.nnz))


def test_pattern_causal_and_block_diag():
    p = Pattern.from_scipy(masks.local(6, 2, m=7))
    np.testing.assert_array_equal(p.intersect_causal().to_dense(),
                                  masks.local(6, 2, m=7).toarray() & np.tri(6, 7, dtype=bool))
    a, b = Pattern.from_scipy(masks.causal(3, 4)), Pattern.from_scipy(masks.local(3, 0, m=4))
    s = Pattern.block_diag([a, b])
    np.testing.assert_array_equal(s.to_dense(), sp.block_diag([a.to_scipy(), b.to_scipy()])
                                  .toarray())


def test_from_csr_validates():
    p = Pattern.from_csr([0, 2, 3], [1, 1, 0], (2, 2))
    np.testing.assert_array_equal(p.to_dense(), [[False, True], [True, False]])
    with pytest.raises(ValueError, match="indptr"):
        Pattern.from_csr([0, 2], [1, 1], (2, 2))
    with pytest.raises(ValueError, match="column"):
        Pattern.from_csr([0, 1, 1], [2], (2, 2))


# ---------------------------------------------------------------- large n

def test_local_at_one_million_rows_counts_and_spot_rows():
    n, w = 1_000_000, 128
    a = masks.local(n, w)
    assert a.nnz == n * (2 * w + 1) - w * (w + 1)
    for i in (0, 1, 500_000, n - 1):
        row = a.indices[a.indptr[i]:a.indptr[i + 1]]
        np.testing.assert_array_equal(row, np.arange(max(0, i - w), min(n, i + w + 1)))


def test_large_builders_nnz_counts():
    n = 50_000
    assert masks.dilated(n, 4, 3).nnz == sum(
        min(4, i // 3) + min(4, (n - 1 - i) // 3) + 1 for i in range(n))
    assert masks.block_diagonal(n, 128).nnz == (n // 128) * 128**2 + (n % 128) ** 2
    assert masks.global_tokens(n, [0, 7]).nnz == 2 * n + 2 * n - 4
    bb = masks.bigbird(n, 120, 2, 14, np.random.default_rng(0))
    # interior rows: 241 window + 2 global + 14 random keys; global rows: all n keys
    counts = np.diff(bb.indptr)
    assert np.all(counts[1000:-1000] == 257)
    assert np.all(counts[:2] == n)
    m = 3000
    assert masks.intersect(masks.local(m, 64), masks.causal(m)).nnz == \
        sum(min(64, i) + 1 for i in range(m))
