"""Reformer LSH attention: gradients, reductions to full attention, an independent dense
reference, hashing and sorting against brute force, Numba parity and thread bit-identity."""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest

from tinyeff.attention import _lsh_hashing, full, lsh
from tinyeff.kernels._jit import num_threads
from tinyeff.ops import permute
from tinyeff.testing import GRAD_FD, assert_close, check_vjp

IMPLS = ("ref", "numba")


# ----------------------------------------------------------------------------- helpers

def draw(rng, batch=(2, 2), n=12, d=4, dv=3, n_hashes=2, n_buckets=4, dtype=np.float64):
    """qk, v, rotations with every bucket robust to a ±1e-6 perturbation (margin ≥ 1e-3)."""
    rot = lsh.draw_random_options(rng, d, dtype, n_hashes=n_hashes,
                                  n_buckets=n_buckets)["rotations"]
    for _ in range(200):
        qk = rng.standard_normal((*batch, n, d)).astype(dtype)
        if lsh.hash_margin(qk, rot) >= 1e-3:
            break
    else:
        raise RuntimeError("could not draw inputs with a robust hash")
    v = rng.standard_normal((*batch, n, dv)).astype(dtype)
    return qk, v, rot


def brute_buckets(x, rot):
    """One vector, plain Python: argmax over [xR ; −xR], the first maximum wins."""
    d, r, h = rot.shape
    out = []
    for rr in range(r):
        proj = [sum(float(x[a]) * float(rot[a, rr, k]) for a in range(d)) for k in range(h)]
        both = proj + [-p for p in proj]
        best = max(both)
        out.append(both.index(best))                               # first occurrence
    return out


def dense_lsh(qk, v, rot, chunk_len, causal=False, kpad=None, dedup=False, scale=1.0):
    """Dense definition for ONE batch element (qk (N, D), v (N, Dv), kpad (N,) or None).

    Per round r it builds the boolean sets of keys each query sees in its own chunk
    (``cur``) and in the look-back chunk (``back``), evaluates the round on the dense
    (N, N) logit matrix with those multiplicities, and combines the rounds by logsumexp.
    """
    n, d = qk.shape
    n_hashes, nb = rot.shape[1], 2 * rot.shape[2]
    bks = [brute_buckets(qk[i], rot) for i in range(n)]
    if kpad is not None:
        bks = [b if kpad[i] else [nb] * n_hashes for i, b in enumerate(bks)]
    order = [sorted(range(n), key=lambda p, r=r: (bks[p][r], p)) for r in range(n_hashes)]
    slots = [p for r in range(n_hashes) for p in order[r]]        # rounds concatenated
    n_chunks = len(slots) // chunk_len
    cur = np.zeros((n_hashes, n, n), dtype=bool)
    back = np.zeros((n_hashes, n, n), dtype=bool)
    for r in range(n_hashes):
        for s, i in enumerate(order[r]):
            t = (r * n + s) // chunk_len
            tp = (t - 1) % n_chunks
            cur[r, i, slots[t * chunk_len:(t + 1) * chunk_len]] = True
            back[r, i, slots[tp * chunk_len:(tp + 1) * chunk_len]] = True
    mult = cur.astype(int) + back.astype(int)                      # (r, N, N) 0, 1 or 2
    khat = qk / np.sqrt(np.sum(qk**2, axis=-1, keepdims=True) + d * 1e-6)
    s = scale * (qk @ khat.T)
    s[np.arange(n), np.arange(n)] = -1e5                           # self penalty (replaces)
    ok = np.ones((n, n), dtype=bool)
    if causal:
        ok &= np.tri(n, dtype=bool)
    if kpad is not None:
        ok &= kpad[None, :]
    total = mult.sum(axis=0)                                       # N_ij
    z = np.full((n_hashes, n), -np.inf)
    o = np.zeros((n_hashes, n, v.shape[-1]))
    for r in range(n_hashes):
        for i in range(n):
            js = [j for j in range(n) if mult[r, i, j] and ok[i, j]]
            if not js:
                continue
            logit = np.array([s[i, j] - (math.log(total[i, j]) if dedup else 0.0)
                              for j in js])
            wts = np.array([mult[r, i, j] for j in js], dtype=float)
            m = logit.max()
            e = wts * np.exp(logit - m)
            z[r, i] = m + math.log(e.sum())
            o[r, i] = (e / e.sum()) @ v[js]
    out = np.zeros((n, v.shape[-1]))
    for i in range(n):
        if np.all(z[:, i] == -np.inf):
            continue
        zz = np.log(np.sum(np.exp(z[:, i] - z[:, i].max()))) + z[:, i].max()
        out[i] = np.sum(np.exp(z[:, i] - zz)[:, None] * o[:, i], axis=0)
    return out, np.array(bks)


def dense_batched(qk, v, rot, chunk_len, causal=False, kpad=None, dedup=False, scale=1.0):
    batch = qk.shape[:-2]
    kpb = None if kpad is None else np.broadcast_to(kpad, (*batch, qk.shape[-2]))
    out = np.zeros(qk.shape[:-1] + v.shape[-1:])
    bks = []
    for idx in np.ndindex(*batch):
        out[idx], b = dense_lsh(qk[idx], v[idx], rot, chunk_len, causal,
                                None if kpb is None else kpb[idx], dedup, scale)
        bks.append(b)
    return out, np.array(bks)


CONFIGS = {
    "one_round": dict(n=8, n_hashes=1, n_buckets=4, chunk_len=4),
    "four_rounds": dict(n=12, n_hashes=4, n_buckets=4, chunk_len=3),
    "causal": dict(n=12, n_hashes=2, n_buckets=6, chunk_len=4, causal=True),
    "padded": dict(n=12, n_hashes=2, n_buckets=4, chunk_len=3, pad=True),
    "dedup": dict(n=12, n_hashes=4, n_buckets=4, chunk_len=2, dedup=True),
    "all": dict(n=12, n_hashes=4, n_buckets=6, chunk_len=3, causal=True, pad=True,
                dedup=True, scale=0.7),
}


def setup(rng, cfg, dtype=np.float64):
    qk, v, rot = draw(rng, n=cfg["n"], n_hashes=cfg["n_hashes"], n_buckets=cfg["n_buckets"],
                      dtype=dtype)
    opts = {"rotations": rot, "chunk_len": cfg["chunk_len"]}
    for key in ("causal", "dedup", "scale"):
        if key in cfg:
            opts[key] = cfg[key]
    if cfg.get("pad"):
        kpad = np.ones((2, 1, cfg["n"]), dtype=bool)
        kpad[1, :, -4:] = False
        kpad[0, :, 2] = False
        opts["key_padding_mask"] = kpad
    return {"q": qk, "v": v}, opts


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_gradcheck(cfg, impl, rng):
    args, opts = setup(rng, CONFIGS[cfg])
    report = check_vjp(lambda **kw: lsh.forward(**kw, impl=impl), lsh.backward, args, opts,
                       rng=rng, n_dirs=3, invariant=lsh.gradcheck_invariant)
    report.assert_ok(GRAD_FD)


def test_gradcheck_refuses_a_bucket_change(rng):
    """The invariant really is checked: a huge ε moves buckets and the check says so."""
    args, opts = setup(rng, CONFIGS["four_rounds"])
    with pytest.raises(AssertionError, match="non-differentiable"):
        check_vjp(lsh.forward, lsh.backward, args, opts, rng=rng, eps=0.5,
                  invariant=lsh.gradcheck_invariant)


# ----------------------------------------------------------------------------- reductions

def _normalize_backward(x, dkhat, d):
    """khat = x / sqrt(‖x‖² + D·ε)  ->  dx = rn dk̂ − rn³ ⟨x, dk̂⟩ x."""
    rn = 1 / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + d * 1e-6)
    return rn * dkhat - rn**3 * np.sum(x * dkhat, axis=-1, keepdims=True) * x


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dedup", [False, True])
@pytest.mark.parametrize("causal,pad", [(False, False), (True, False), (True, True)])
def test_one_round_one_chunk_equals_full(causal, pad, dedup, impl, rng):
    """n_hashes = 1 and chunk_len = N: the window is the whole sequence (seen twice, through
    the cyclic look-back at itself), so lsh = full with k = k̂, the self entry removed
    unless it is the only admissible key."""
    n, d = 8, 5
    qk, v, rot = draw(rng, n=n, d=d, n_hashes=1, n_buckets=4)
    kpad = None
    adm = np.ones((n, n), dtype=bool)
    if causal:
        adm &= np.tri(n, dtype=bool)
    opts = {}
    if pad:
        kpad = np.ones((2, 1, n), dtype=bool)
        kpad[1, :, 5:] = False
        kpad[0, :, 0] = False                                      # query 0 sees nothing
        opts["key_padding_mask"] = kpad
    adm = adm & (np.ones((2, 1, 1, n), bool) if kpad is None else kpad[..., None, :])
    others = adm & ~np.eye(n, dtype=bool)
    only_self = ~others.any(axis=-1, keepdims=True)                # (B, 1, N, 1)
    mask = others | (adm & np.eye(n, dtype=bool) & only_self)
    khat = qk / np.sqrt(np.sum(qk**2, axis=-1, keepdims=True) + d * 1e-6)
    ref, fctx = full.forward(qk, khat, v, mask=mask, scale=0.9)
    out, ctx = lsh.forward(qk, v=v, rotations=rot, chunk_len=n, causal=causal, dedup=dedup,
                           scale=0.9, impl=impl, **opts)
    assert_close(out, ref)
    dout = rng.standard_normal(out.shape)
    g_full = full.backward(dout, fctx)
    g = lsh.backward(dout, ctx)
    assert_close(g["v"], g_full["v"])
    assert_close(g["q"], g_full["q"] + _normalize_backward(qk, g_full["k"], d))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_matches_dense_reference(cfg, impl, rng):
    """Forward equals the dense per-round construction; gradients equal its finite
    differences in random directions (buckets held fixed, asserted)."""
    args, opts = setup(rng, CONFIGS[cfg])
    dense_opts = dict(chunk_len=opts["chunk_len"], causal=opts.get("causal", False),
                      kpad=opts.get("key_padding_mask"), dedup=opts.get("dedup", False),
                      scale=opts.get("scale", 1.0))
    rot = opts["rotations"]
    out, ctx = lsh.forward(**args, **opts, impl=impl)
    ref, bks = dense_batched(args["q"], args["v"], rot, **dense_opts)
    assert_close(out, ref)
    expect = bks.reshape(*ctx.qk.shape[:-1], -1).swapaxes(-1, -2)  # (..., r, N)
    np.testing.assert_array_equal(ctx.buckets, expect)
    dout = rng.standard_normal(out.shape)
    grads = lsh.backward(dout, ctx)
    eps = 1e-6
    for name in ("q", "v"):
        for _ in range(2):
            u = rng.standard_normal(args[name].shape)
            f = {}
            for sign in (1, -1):
                moved = {**args, name: args[name] + sign * eps * u}
                f[sign], b2 = dense_batched(moved["q"], moved["v"], rot, **dense_opts)
                np.testing.assert_array_equal(b2, bks)             # no bucket moved
            lhs = np.sum(dout * (f[1] - f[-1])) / (2 * eps)
            rhs = np.sum(u * grads[name])
            assert abs(lhs - rhs) <= GRAD_FD * max(abs(lhs), abs(rhs)), (name, lhs, rhs)


def test_dedup_is_attention_over_the_union(rng):
    """With dedup every distinct key counts once: full attention over the union of windows."""
    args, opts = setup(rng, CONFIGS["dedup"])
    assert opts["dedup"]
    out, ctx = lsh.forward(**args, **opts)
    g, r, n = ctx.perm.reshape(-1, *ctx.perm.shape[-2:]).shape
    c = opts["chunk_len"]
    perm = ctx.perm.reshape(g, r, n)
    union = np.zeros((g, n, n), dtype=bool)
    slots = perm.reshape(g, r * n)
    t_total = r * n // c
    for gi in range(g):
        for t in range(t_total):
            keys = np.concatenate([slots[gi, ((t - 1) % t_total) * c:((t - 1) % t_total + 1) * c],
                                   slots[gi, t * c:(t + 1) * c]])
            for i in slots[gi, t * c:(t + 1) * c]:
                union[gi, i, keys] = True
    qk, v = args["q"], args["v"]
    union = union.reshape(*qk.shape[:-2], n, n)
    others = union & ~np.eye(n, dtype=bool)
    mask = others | (union & np.eye(n, dtype=bool) & ~others.any(-1, keepdims=True))
    khat = qk / np.sqrt(np.sum(qk**2, axis=-1, keepdims=True) + qk.shape[-1] * 1e-6)
    ref, _ = full.forward(qk, khat, v, mask=mask, scale=1.0)
    assert_close(out, ref)


# ----------------------------------------------------------------------------- hashing, sorting

@pytest.mark.parametrize("impl", IMPLS)
def test_hashing_matches_brute_force(impl, rng):
    qk, v, rot = draw(rng, batch=(3,), n=16, d=5, n_hashes=3, n_buckets=8)
    _, ctx = lsh.forward(qk, v=v, rotations=rot, chunk_len=4, impl=impl)
    for b in range(3):
        for i in range(16):
            assert list(ctx.buckets[b, :, i]) == brute_buckets(qk[b, i], rot)


@pytest.mark.parametrize("impl", IMPLS)
def test_hash_ties_go_to_the_first_index(impl):
    """Ties resolve to the lowest index of [xR ; −xR] (numpy/torch/jax argmax)."""
    d = 3
    rot = np.zeros((d, 1, 3))
    rot[:, 0, 0] = [1.0, 0.0, 0.0]
    rot[:, 0, 1] = [-1.0, 0.0, 0.0]                                # proj1 = −proj0
    rot[:, 0, 2] = [1.0, 0.0, 0.0]                                 # proj2 = proj0
    qk = np.array([[[0.0, 0.0, 0.0],                               # all tie at 0 -> 0
                    [2.0, 1.0, 0.0],                               # +0, +2, −1 tie -> 0
                    [-2.0, 1.0, 0.0],                              # +1, −0, −2 tie -> 1
                    [0.0, 1.0, 0.0]]])                             # all 0 -> 0
    v = np.ones((1, 4, 2))
    _, ctx = lsh.forward(qk, v=v, rotations=rot, chunk_len=2, impl=impl)
    assert ctx.buckets[0, 0].tolist() == [0, 0, 1, 0]
    assert ctx.buckets[0, 0].tolist() == [brute_buckets(x, rot)[0] for x in qk[0]]


def inorder_buckets(x, rot):
    """(G, N, D), (D, r, H) -> (G, r, N): e_h = Σ_d x_d R_dh in float64 in the order d = 0, 1, …
    (elementwise numpy: the same IEEE operations), then the first maximum of [e ; −e],
    scanned as the definition states (strict '>' from index 0, so NaN rows give 0)."""
    g, n, d = x.shape
    r_, h_ = rot.shape[1:]
    x64, r64 = x.astype(np.float64), rot.astype(np.float64)
    out = np.empty((g, r_, n), dtype=np.int64)
    with np.errstate(all="ignore"):
        for r in range(r_):
            e = np.zeros((g, n, h_))
            for a in range(d):
                e += x64[:, :, a, None] * r64[a, r]
            for gi, i in np.ndindex(g, n):
                both = list(e[gi, i]) + list(-e[gi, i])
                best = 0
                for k in range(1, 2 * h_):
                    if both[k] > both[best]:
                        best = k
                out[gi, r, i] = best
    return out


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_numba_hash_filter_is_exact(dtype, rng):
    """The kernel's float32 filter never changes a bucket: equal to the in-order float64
    definition on exact ties (duplicated and negated rotation columns), ties closer than
    float32 resolves (columns equal to 1e-9), values near float32's
    under/overflow, D and N not multiples of 4, zero rows, and inf/NaN rows."""
    for trial in range(12):
        g, n, d, h, r = 2, int(rng.integers(1, 11)), int(rng.integers(1, 11)), \
            int(rng.integers(1, 40)), int(rng.integers(1, 4))
        x = rng.standard_normal((g, n, d)) * 10.0 ** rng.uniform(-40, 40)
        rot = rng.standard_normal((d, r, h)) * 10.0 ** rng.uniform(-3, 3)
        if trial % 2 == 0:                                         # exact ties
            rot[:, :, h // 2:] = rot[:, :, :h - h // 2][:, :, ::-1] * rng.choice([-1.0, 1.0])
        elif h > 1:                                                # ties below float32's ulp
            rot[:, :, 1::2] = rot[:, :, :h // 2 * 2:2] * (1 + 1e-9 * rng.standard_normal(
                (d, r, h // 2)))
        x, rot = x.astype(dtype), rot.astype(dtype)
        x[0, 0] = 0.0
        if trial % 3 == 0:
            x[1, 0, 0] = [np.inf, -np.inf, np.nan][trial % 9 // 3]
        with np.errstate(all="ignore"):
            got = _lsh_hashing.hash_numba(x, rot, r)
        np.testing.assert_array_equal(got, inorder_buckets(x, rot), err_msg=f"trial {trial}")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_numba_hash_filter_is_exact_across_blocks(dtype, rng):
    """Several filter blocks (HASH_BLOCK positions each, the last one partial) and rows of
    hundreds of products (trax's rule at N = 8192, c = 64: nb/2 = 128 and more), with exact
    ties, against the in-order definition; the same with 1 and 2 threads."""
    from tinyeff.kernels.lsh_hash import HASH_BLOCK
    g, n, d, h, r = 2, 3 * HASH_BLOCK + 5, 7, 300, 2
    x = rng.standard_normal((g, n, d))
    rot = rng.standard_normal((d, r, h))
    rot[:, :, 150:] = rot[:, :, :150][:, :, ::-1]                  # exact ties
    x, rot = x.astype(dtype), rot.astype(dtype)
    want = inorder_buckets(x, rot)
    for threads in (1, 2):
        with num_threads(min(threads, numba.config.NUMBA_NUM_THREADS)):
            np.testing.assert_array_equal(_lsh_hashing.hash_numba(x, rot, r), want)


def test_numba_hash_filter_rechecks_near_ties(rng):
    """Columns a and b = a + w + ε·x̂ with w ⊥ x: x·b exceeds x·a by ~1e-10 while their float32
    products differ by ~1e-7 either way, so a filter without its error bound picks a or b
    at random; the kernel must pick b (index 1) every time."""
    d, trials = 16, 40
    x = rng.standard_normal((1, trials, d))                        # (1, N, D)
    got = []
    for i in range(trials):
        xi = x[0, i]
        a = 3.0 * xi / np.linalg.norm(xi) + 0.1 * rng.standard_normal(d)
        w = rng.standard_normal(d)
        w -= (w @ xi) / (xi @ xi) * xi                             # w ⊥ x
        b = a + w + 1e-10 * xi / np.linalg.norm(xi)
        rot = np.stack([a, b], axis=-1)[:, None, :]                # (D, 1, 2)
        assert inorder_buckets(x[:, i:i + 1], rot)[0, 0, 0] == 1
        got.append(_lsh_hashing.hash_numba(x[:, i:i + 1], rot, 1)[0, 0, 0])
    assert got == [1] * trials


@pytest.mark.parametrize("impl", IMPLS)
def test_sort_is_stable_by_bucket_then_position(impl, rng):
    qk, v, rot = draw(rng, batch=(2,), n=24, d=4, n_hashes=3, n_buckets=4)
    kpad = np.ones((2, 24), dtype=bool)
    kpad[0, [3, 10, 23]] = False
    _, ctx = lsh.forward(qk, v=v, rotations=rot, chunk_len=6, key_padding_mask=kpad,
                         impl=impl)
    for b in range(2):
        for r in range(3):
            bk = ctx.buckets[b, r]
            assert np.all(bk[~kpad[b]] == 4)                       # padding bucket nb
            expect = sorted(range(24), key=lambda p, bk=bk: (bk[p], p))
            assert ctx.perm[b, r].tolist() == expect
            np.testing.assert_array_equal(ctx.perm[b, r][ctx.inv_perm[b, r]], np.arange(24))


# ----------------------------------------------------------------------------- Numba parity

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_numba_matches_reference(cfg, dtype, rng):
    args, opts = setup(rng, CONFIGS[cfg], dtype)
    out_r, ctx_r = lsh.forward(**args, **opts, impl="ref")
    out_n, ctx_n = lsh.forward(**args, **opts, impl="numba")
    assert_close(out_n, out_r)
    for field in ("buckets", "perm", "inv_perm"):
        np.testing.assert_array_equal(getattr(ctx_n, field), getattr(ctx_r, field))
    tol = {"rtol": 1e-10, "atol": 1e-9} if dtype == np.float64 else {"rtol": 1e-4, "atol": 1e-5}
    assert_close(ctx_n.lse, ctx_r.lse, **tol)                       # float64 both (|Z| ≤ 1e5)
    assert_close(ctx_n.z, ctx_r.z, **tol)
    dout = rng.standard_normal(out_r.shape).astype(dtype)
    g_r = lsh.backward(dout, ctx_r)
    assert_close(lsh.backward(dout, ctx_n), g_r)
    # crossed: one half's context through the other half's backward
    assert_close(lsh.backward(dout, ctx_r, impl="numba"), g_r)
    assert_close(lsh.backward(dout, ctx_n, impl="ref"), g_r)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")
@pytest.mark.parametrize("cfg", ["all", "four_rounds"])
def test_bit_identical_with_1_and_2_threads(cfg, rng):
    args, opts = setup(rng, CONFIGS[cfg])
    qk, v, rot = draw(rng, batch=(2, 3), n=48, d=8, dv=5, n_hashes=3, n_buckets=6)
    args = {"q": qk, "v": v}
    opts = {**opts, "rotations": rot, "chunk_len": 4}
    opts.pop("key_padding_mask", None)
    dout = rng.standard_normal(qk.shape[:-1] + (5,))
    results = []
    for threads in (1, 2):
        with num_threads(threads):
            out, ctx = lsh.forward(**args, **opts, impl="numba")
            results.append((out, ctx.lse, ctx.buckets, lsh.backward(dout, ctx)))
    (o1, z1, b1, g1), (o2, z2, b2, g2) = results
    np.testing.assert_array_equal(o1, o2)
    np.testing.assert_array_equal(z1, z2)
    np.testing.assert_array_equal(b1, b2)
    for name in g1:
        np.testing.assert_array_equal(g1[name], g2[name])


#: chunk layouts of the kernels' schedule: an even and an odd number of chunks per round
#: (the backward's even/odd phases), one chunk per round (every look-back is another
#: round's chunk), one chunk in all (the window is the chunk twice), a single batch·head
LAYOUTS = {
    "even_chunks": dict(batch=(2,), n=40, chunk_len=4, n_hashes=3, n_buckets=6),
    "odd_chunks": dict(batch=(1, 2), n=36, chunk_len=4, n_hashes=2, n_buckets=8),
    "one_chunk_per_round": dict(batch=(2,), n=8, chunk_len=8, n_hashes=3, n_buckets=4),
    "one_chunk": dict(batch=(2,), n=8, chunk_len=8, n_hashes=1, n_buckets=4),
    "one_head": dict(batch=(1,), n=96, chunk_len=16, n_hashes=2, n_buckets=8),
}


def layout_case(rng, layout, dtype, options):
    cfg = LAYOUTS[layout]
    qk, v, rot = draw(rng, batch=cfg["batch"], n=cfg["n"], d=6, dv=5,
                      n_hashes=cfg["n_hashes"], n_buckets=cfg["n_buckets"], dtype=dtype)
    opts = {"rotations": rot, "chunk_len": cfg["chunk_len"]}
    if options == "all":
        kpad = np.ones(cfg["batch"] + (cfg["n"],), dtype=bool)
        kpad[..., 1] = False
        kpad[..., -3:] = False
        opts.update(causal=True, dedup=True, scale=0.7, key_padding_mask=kpad)
    return {"q": qk, "v": v}, opts


@pytest.mark.parametrize("options", ["plain", "all"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_numba_matches_reference_on_every_chunk_layout(layout, dtype, options, rng):
    """The kernels' schedule (rounds in order, even then odd chunks in the backward, chunk
    0's look-back half added after its round) against the reference, both contexts."""
    args, opts = layout_case(rng, layout, dtype, options)
    out_r, ctx_r = lsh.forward(**args, **opts, impl="ref")
    out_n, ctx_n = lsh.forward(**args, **opts, impl="numba")
    assert_close(out_n, out_r)
    tol = {"rtol": 1e-10, "atol": 1e-9} if dtype == np.float64 else {"rtol": 1e-4, "atol": 1e-5}
    assert_close(ctx_n.lse, ctx_r.lse, **tol)
    assert_close(ctx_n.z, ctx_r.z, **tol)
    dout = rng.standard_normal(out_r.shape).astype(dtype)
    g_r = lsh.backward(dout, ctx_r)
    assert_close(lsh.backward(dout, ctx_n), g_r)
    assert_close(lsh.backward(dout, ctx_r, impl="numba"), g_r)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("layout", ["even_chunks", "odd_chunks", "one_chunk_per_round"])
def test_bit_identical_with_1_and_2_threads_on_chunk_layouts(layout, dtype, rng):
    args, opts = layout_case(rng, layout, dtype, "all" if layout == "odd_chunks" else "plain")
    dout = rng.standard_normal(args["v"].shape).astype(dtype)
    results = []
    for threads in (1, 2):
        with num_threads(threads):
            out, ctx = lsh.forward(**args, **opts, impl="numba")
            results.append((out, ctx.lse, ctx.z, ctx.buckets, lsh.backward(dout, ctx)))
    for a, b in zip(results[0][:4], results[1][:4]):
        np.testing.assert_array_equal(a, b)
    for name in results[0][4]:
        np.testing.assert_array_equal(results[0][4][name], results[1][4][name])


# ----------------------------------------------------------------------------- edge cases

@pytest.mark.parametrize("impl", IMPLS)
def test_self_only_rows_and_fully_masked_rows(impl, rng):
    qk, v, rot = draw(rng, batch=(2,), n=8, d=4, n_hashes=3, n_buckets=4)
    kpad = np.ones((2, 8), dtype=bool)
    kpad[1] = False                                                # batch 1: no real key
    out, ctx = lsh.forward(qk, v=v, rotations=rot, chunk_len=4, causal=True,
                           key_padding_mask=kpad, impl=impl)
    # causal position 0 only ever sees itself: it attends to itself in every round
    assert_close(out[0, 0], v[0, 0])
    # (z = −1e5, or −1e5 + log 2 when the cross-round look-back shows it twice)
    excess = ctx.z[0, :, 0] - lsh.SELF_PENALTY
    assert np.all(np.isclose(excess, 0, atol=1e-9) | np.isclose(excess, np.log(2), atol=1e-9))
    # a batch with every key padded: zeros and zero gradients
    np.testing.assert_array_equal(out[1], 0)
    g = lsh.backward(rng.standard_normal(out.shape), ctx)
    np.testing.assert_array_equal(g["q"][1], 0)
    np.testing.assert_array_equal(g["v"][1], 0)
    assert np.all(np.isfinite(g["q"])) and np.all(np.isfinite(g["v"]))


@pytest.mark.parametrize("impl", IMPLS)
def test_self_only_in_every_round_is_v_up_to_the_self_logit_rounding(impl, rng):
    """Causal position 0 sees only itself: out_0 = v_0 exactly with one round; with several
    rounds the −1e5 logits go through the rounds' log-sum-exp (ulp(1e5) ≈ 1.5e-11), so
    out_0 = v_0 only to about 1e-11 relative (docs/semantics/lsh.md)."""
    worst = {}
    for n_hashes in (1, 2, 4, 8):
        qk, v, rot = draw(rng, batch=(3,), n=16, d=4, n_hashes=n_hashes, n_buckets=4)
        out, _ = lsh.forward(qk, v=v, rotations=rot, chunk_len=4, causal=True, impl=impl)
        worst[n_hashes] = np.max(np.abs(out[:, 0] - v[:, 0]) / np.abs(v[:, 0]).max(axis=-1,
                                                                                 keepdims=True))
    assert worst[1] == 0
    assert max(worst.values()) < 1e-10, worst


@pytest.mark.parametrize("impl", IMPLS)
def test_shared_k_spellings_and_bucket_reuse(impl, rng):
    qk, v, rot = draw(rng, n=12, n_hashes=2, n_buckets=4)
    out, ctx = lsh.forward(qk, v=v, rotations=rot, chunk_len=4, impl=impl)
    np.testing.assert_array_equal(lsh.forward(qk, qk, v, rotations=rot, chunk_len=4,
                                              impl=impl)[0], out)
    np.testing.assert_array_equal(lsh.forward(qk, qk.copy(), v, rotations=rot, chunk_len=4,
                                              impl=impl)[0], out)
    # a reversible recomputation reuses the forward's buckets (no rotations needed)
    out2, ctx2 = lsh.forward(qk, v=v, rotations=None, buckets=ctx.buckets, n_buckets=4,
                             chunk_len=4, impl=impl)
    np.testing.assert_array_equal(out2, out)
    np.testing.assert_array_equal(ctx2.perm, ctx.perm)
    assert set(lsh.backward(np.ones_like(out), ctx)) == {"q", "v"}


def test_default_scale_is_one_and_lucidrains_scale(rng):
    qk, v, rot = draw(rng, n=8, d=4, n_hashes=1, n_buckets=4)
    a = lsh.forward(qk, v=v, rotations=rot, chunk_len=4)[0]
    b = lsh.forward(qk, v=v, rotations=rot, chunk_len=4, scale=1.0)[0]
    c = lsh.forward(qk, v=v, rotations=rot, chunk_len=4, scale=0.5)[0]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_empty_sequence(rng):
    qk = np.zeros((2, 0, 4))
    v = np.zeros((2, 0, 3))
    rot = rng.standard_normal((4, 2, 2))
    out, ctx = lsh.forward(qk, v=v, rotations=rot, chunk_len=4)
    assert out.shape == (2, 0, 3)
    g = lsh.backward(out, ctx)
    assert g["q"].shape == qk.shape and g["v"].shape == v.shape


def test_bad_inputs(rng):
    qk, v, rot = draw(rng, n=12, n_hashes=2, n_buckets=4)
    with pytest.raises(ValueError, match="multiple of chunk_len"):
        lsh.forward(qk, v=v, rotations=rot, chunk_len=5)
    with pytest.raises(ValueError, match="k must be None or equal to q"):
        lsh.forward(qk, qk + 1, v, rotations=rot, chunk_len=4)
    with pytest.raises(ValueError, match="rotations"):
        lsh.forward(qk, v=v, rotations=rot[:3], chunk_len=4)
    with pytest.raises(ValueError, match="n_buckets"):
        lsh.forward(qk, v=v, rotations=rot, chunk_len=4, n_buckets=6)
    with pytest.raises(TypeError, match="rotations"):
        lsh.forward(qk, v=v, rotations=rot.astype(np.float32), chunk_len=4)
    with pytest.raises(TypeError, match="rotations is required"):
        lsh.forward(qk, v=v, rotations=None, chunk_len=4)
    with pytest.raises(TypeError, match="v is required"):
        lsh.forward(qk, rotations=rot, chunk_len=4)
    with pytest.raises(ValueError, match="v"):
        lsh.forward(qk, v=v[..., :6, :], rotations=rot, chunk_len=4)
    with pytest.raises(ValueError, match="key_padding_mask"):
        lsh.forward(qk, v=v, rotations=rot, chunk_len=4,
                    key_padding_mask=np.ones((2, 2, 11), dtype=bool))
    with pytest.raises(ValueError, match="buckets"):
        lsh.forward(qk, v=v, rotations=rot, chunk_len=4,
                    buckets=np.full((2, 2, 2, 12), 7, dtype=np.int64))
    with pytest.raises(ValueError, match="even"):
        lsh.draw_random_options(rng, 4, n_hashes=1, n_buckets=5)


# ----------------------------------------------------------------------------- ops.permute

def test_permute_backward_is_the_inverse_gather(rng):
    x = rng.standard_normal((2, 1, 7, 3))
    perm = np.stack([rng.permutation(7) for _ in range(2 * 4)]).reshape(2, 4, 7)
    inv = permute.inverse(perm)
    np.testing.assert_array_equal(np.take_along_axis(perm, inv, axis=-1),
                                  np.broadcast_to(np.arange(7), perm.shape))
    y = permute.forward(x, perm)                                   # (2, 4, 7, 3)
    assert y.shape == (2, 4, 7, 3)
    dy = rng.standard_normal(y.shape)
    dx = permute.backward(dy, inv)                                 # (2, 4, 7, 3) per round
    # adjoint identity ⟨y, dy⟩ = ⟨x, Σ_r dx_r⟩
    assert np.isclose(np.sum(y * dy), np.sum(x * dx.sum(axis=1, keepdims=True)))
    np.testing.assert_array_equal(permute.forward(y, inv), np.broadcast_to(x, y.shape))


def test_read_only_inputs_add_no_kernel_signature(rng):
    """Read-only qk, v, rotations, mask and dout reach the kernels as writeable copies, so
    they reuse the specializations compiled for writeable inputs (issue 11)."""
    from tinyeff.kernels import lsh as kernels
    qk, v, rot = draw(rng)
    kp = np.ones(qk.shape[:-1], dtype=bool)
    kp[0, 0, -1] = False
    dout = rng.standard_normal(v.shape)
    opts = {"chunk_len": 4, "causal": True}

    def run(qk_, v_, rot_, kp_, dout_):
        out, ctx = lsh.forward(qk_, v=v_, rotations=rot_, key_padding_mask=kp_, **opts)
        return out, lsh.backward(dout_, ctx)

    def signatures():
        return {n: list(f.signatures) for n, f in vars(kernels).items()
                if hasattr(f, "signatures")}

    want = run(qk, v, rot, kp, dout)
    before = signatures()

    def ro(a):
        a = a.copy()
        a.setflags(write=False)
        return a

    got = run(ro(qk), ro(v), ro(rot), ro(kp), ro(dout))
    assert signatures() == before
    np.testing.assert_array_equal(got[0], want[0])
    for name in want[1]:
        np.testing.assert_array_equal(got[1][name], want[1][name])
