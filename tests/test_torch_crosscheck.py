"""Optional cross-checks against PyTorch autograd (skipped when torch is not installed).

For each variant, ``TORCH_REFS[variant]`` is a short PyTorch transcription of the pinned
formula in SEMANTICS.md, written from the document, not from tinyeff's code.  torch's
autograd differentiates it in float64; on every golden case (the variant's example cases,
the fixed upstream gradient of the golden files) its output and gradients must agree with
tinyeff's forward and hand-written backward to PARITY[float64]: |a − b| <= 1e-12 + 1e-10·|b|
entry by entry.  Checked against the golden values (the float64 reference) and against every
explicit implementation of the variant (``impl`` = ref, numba, blocked: forward, then its own
backward); ``unsupported`` lists the (impl, case) pairs that cannot run, SEMANTICS.md §5 says
why.  ``python tests/test_torch_crosscheck.py`` prints the worst error per implementation.

``full`` is also compared with ``torch.nn.functional.scaled_dot_product_attention`` (SDPA):
causal masks are top-left in both, boolean masks mean "may attend" in both, and fully masked
rows give zeros in PyTorch >= 2.5 as in tinyeff.

To add a variant: write ``torch_<variant>(x, options) -> out`` (``x``: dict of float64
tensors that require grad; ``options``: the golden options as tinyeff received them) and
register it in ``TORCH_REFS``; then update the table in SEMANTICS.md §5.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import scipy.sparse as sp

from tinyeff.attention import VARIANTS
from tinyeff.testing.conformance import OK, compare
from tinyeff.testing.golden import make_cases
from tinyeff.testing.tolerances import PARITY

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.torch
TOL = PARITY[np.dtype(np.float64)]


def _tensor(x, grad=False):
    if sp.issparse(x):
        x = x.toarray()
    t = torch.from_numpy(np.array(x))                              # a copy: never aliases
    return t.requires_grad_(True) if grad else t


def _opt(options, name):
    value = options.get(name)
    return None if value is None else _tensor(value)


# ----------------------------------------------------------------------------------------
# Transcriptions of the pinned formulas
# ----------------------------------------------------------------------------------------

def safe_softmax(s, allowed):
    """Row softmax over the allowed entries; a row with none gives zeros (and zero grads)."""
    s = s.masked_fill(~allowed, float("-inf"))
    allowed = allowed & (s > float("-inf"))
    nonempty = allowed.any(dim=-1, keepdim=True)
    s = torch.where(nonempty, s, torch.zeros((), dtype=s.dtype))   # no NaN anywhere
    return torch.softmax(s, dim=-1) * nonempty


def full_allowed(q, k, options):
    n, m = q.shape[-2], k.shape[-2]
    allowed = torch.ones(n, m, dtype=torch.bool)
    mask = _opt(options, "mask")
    if mask is not None:
        allowed = allowed & mask
    kpm = _opt(options, "key_padding_mask")
    if kpm is not None:
        allowed = allowed & kpm[..., None, :]
    if options.get("causal", False):
        allowed = allowed & torch.ones(n, m, dtype=torch.bool).tril()   # top-left: j <= i
    return allowed


def full_bias(x, n, m):
    """bias + rel_bias as one (..., N, M) additive term (or None)."""
    total = x.get("bias")
    if "rel_bias" in x:
        offsets = torch.arange(n)[:, None] - torch.arange(m)[None, :] + (m - 1)
        rel = x["rel_bias"][..., offsets]                          # [..., i, j] = r[i − j + M − 1]
        total = rel if total is None else total + rel
    return total


def torch_full(x, options):
    """SEMANTICS.md, `full`: out = softmax_A(q kᵀ·scale + bias + rel_bias) v."""
    q, k, v = x["q"], x["k"], x["v"]
    scale = options.get("scale")
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    bias = full_bias(x, q.shape[-2], k.shape[-2])
    if bias is not None:
        s = s + bias
    return safe_softmax(s, full_allowed(q, k, options)) @ v


def kernelized(fq, fk, v, options, eps_default):
    """SEMANTICS of the `linear` engine on given features (no stabilizers: plain formula).

    out_i = Σ_j w_ij v_j / (Σ_j w_ij + eps),  w_ij = φ(q_i)·φ(k_j) [j <= i if causal];
    a padded key loses φ(k_j) ("exact") or only v_j ("values_only").
    """
    key_mask = _opt(options, "key_padding_mask")
    if key_mask is not None:
        km = key_mask[..., None].to(fk.dtype)                      # (..., M, 1)
        if options.get("mask_mode", "exact") == "exact":
            fk = fk * km
        else:
            v = v * km
    w = fq @ fk.transpose(-1, -2)                                  # (..., N, M)
    if options.get("causal", False):
        w = w * torch.ones(w.shape[-2:], dtype=torch.bool).tril()
    num = w @ v
    if not options.get("normalize", True):
        return num
    den = w.sum(-1, keepdim=True) + options.get("eps", eps_default)
    safe = torch.where(den == 0, torch.ones((), dtype=den.dtype), den)
    return torch.where(den == 0, torch.zeros((), dtype=num.dtype), num / safe)


def torch_linear(x, options):
    """`linear`: φ = elu + 1 (default) or relu + 1 on the raw q, k; eps = 1e-6."""
    if options.get("feature_map", "elu") == "elu":
        phi = lambda t: torch.nn.functional.elu(t) + 1             # noqa: E731
    else:
        phi = lambda t: torch.relu(t) + 1                          # noqa: E731
    return kernelized(phi(x["q"]), phi(x["k"]), x["v"], options, eps_default=1e-6)


def torch_performer(x, options):
    """`performer`: FAVOR+ φ(x)_f = m^(−1/2) exp(ω_f·x̂ − ‖x̂‖²/2), x̂ = √scale·x, unstabilized;
    or φ(x) = relu(ω x̂) + kernel_eps (ω = I without features); eps = 0."""
    q = x["q"]
    d = q.shape[-1]
    scale = options.get("scale")
    root = math.sqrt(1 / math.sqrt(d) if scale is None else scale)
    omega = _opt(options, "features")
    omega = torch.eye(d, dtype=q.dtype) if omega is None else omega

    def phi(t):
        u = (t * root) @ omega.T                                   # (..., L, m)
        if options.get("kernel", "softmax") == "softmax":
            sq = ((t * root) ** 2).sum(-1, keepdim=True) / 2
            return torch.exp(u - sq) / math.sqrt(omega.shape[0])
        return torch.relu(u) + options.get("kernel_eps", 1e-3)
    return kernelized(phi(q), phi(x["k"]), x["v"], options, eps_default=0.0)


def torch_linformer(x, options):
    """`linformer`: K̃ = E (m ⊙ K), Ṽ = F (m ⊙ V), then softmax(q K̃ᵀ·scale) Ṽ."""
    k, v = x["k"], x["v"]
    key_mask = _opt(options, "key_padding_mask")
    if key_mask is not None:
        k = torch.where(key_mask[..., None], k, torch.zeros((), dtype=k.dtype))
        v = torch.where(key_mask[..., None], v, torch.zeros((), dtype=v.dtype))
    kt, vt = x["E"] @ k, x["F"] @ v                                # (..., k, D), (..., k, Dv)
    scale = options.get("scale")
    scale = 1 / math.sqrt(x["q"].shape[-1]) if scale is None else scale
    p = torch.softmax(x["q"] @ kt.transpose(-1, -2) * scale, dim=-1)
    return p @ vt


def lsh_counts(qk, options):
    """N_ij: how often key j occurs in the chunk windows of query i, over all rounds.

    Hashing is not differentiable, so it runs in NumPy: h_r(x) = argmax([x R_r; −x R_r]) in
    float64 (first maximum), padded positions -> bucket nb, stable sort by bucket per
    round, rounds concatenated, chunks of c, chunk t sees chunks t − 1 (cyclic) and t.
    """
    rot = np.asarray(options["rotations"], dtype=np.float64)      # (D, r, nb/2)
    c = options["chunk_len"]
    d, r, half = rot.shape
    proj = np.einsum("...nd,drh->...rnh", qk.astype(np.float64), rot)
    buckets = np.argmax(np.concatenate([proj, -proj], axis=-1), axis=-1)   # (..., r, N)
    n = qk.shape[-2]
    kpm = options.get("key_padding_mask")
    if kpm is not None:
        buckets = np.where(np.broadcast_to(kpm[..., None, :], buckets.shape), buckets, 2 * half)
    perm = np.argsort(buckets, axis=-1, kind="stable")            # (..., r, N)
    slots = perm.reshape(perm.shape[:-2] + (r * n,))               # position at each slot
    t_count = r * n // c
    chunks = slots.reshape(slots.shape[:-1] + (t_count, c))        # (..., T, c)
    counts = np.zeros(qk.shape[:-2] + (n, n))
    for idx in np.ndindex(*qk.shape[:-2]):
        for t in range(t_count):
            window = np.concatenate([chunks[idx][(t - 1) % t_count], chunks[idx][t]])
            for i in chunks[idx][t]:
                np.add.at(counts[idx][i], window, 1)
    return counts


def torch_lsh(x, options):
    """`lsh` as ONE softmax over the multiset union of each query's windows (SEMANTICS):
    s_ij = scale·qk_i·k̂_j, k̂ = qk/√(‖qk‖² + D·1e-6), self -> −1e5 (a constant), causal j > i
    and padded keys excluded, each occurrence of j counts (once with dedup)."""
    qk, v = x["q"], x["v"]
    n, d = qk.shape[-2:]
    counts = torch.from_numpy(lsh_counts(qk.detach().numpy(), options))
    if options.get("dedup", False):
        counts = (counts > 0).to(counts.dtype)
    scale = options.get("scale")
    scale = 1.0 if scale is None else scale
    khat = qk / torch.sqrt((qk * qk).sum(-1, keepdim=True) + d * 1e-6)
    s = qk @ khat.transpose(-1, -2) * scale
    eye = torch.eye(n, dtype=torch.bool)
    s = torch.where(eye, torch.full((), -1e5, dtype=s.dtype), s)
    allowed = counts > 0
    if options.get("causal", False):
        allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    kpm = _opt(options, "key_padding_mask")
    if kpm is not None:
        allowed = allowed & kpm[..., None, :]
    # a multiset softmax: weight N_ij exp(s_ij), i.e. s_ij + log N_ij
    s = s + torch.log(torch.where(allowed, counts, torch.ones((), dtype=counts.dtype)))
    return safe_softmax(s, allowed) @ v


def torch_sparse(x, options):
    """`sparse`: `full` restricted to the stored entries of the CSR ``mask``; a list of H
    patterns is one per head (the head axis is the last batch axis)."""
    mask = options["mask"]
    if isinstance(mask, (list, tuple)):
        mask = np.stack([sp.csr_array(pat).toarray() for pat in mask])   # (H, N, M)
    return torch_full(x, {**options, "mask": mask})


def window_globals(options) -> list:
    """The global positions G of ``global_indices`` as a list of ints (empty without)."""
    glob = options.get("global_indices")
    return [] if glob is None else [int(g) for g in np.asarray(glob).ravel()]


def window_allowed(n, m, options):
    """`window`'s allowed set as a dense (N, M) boolean (before causal and key padding):
    band(i) = {i + t·d : |t| <= w, 0 <= j < M, j ∉ G};  A(i) = all if i ∈ G else band(i) ∪ G."""
    w, dil = options["window"], options.get("dilation", 1)
    glob = window_globals(options)
    allowed = np.zeros((n, m), dtype=bool)
    for i in range(n):
        for t in range(-w, w + 1):
            j = i + t * dil
            if 0 <= j < m and j not in glob:
                allowed[i, j] = True
    allowed[:, glob] = True
    allowed[glob, :] = True
    return allowed


def window_global_rows(n, m, options):
    """(allowed, rows): the allowed set, (N, M) for ``global_indices`` or (..., N, M) for a
    per-item ``global_mask`` (item b as a call with global_indices = nonzero(mask[b])), and
    the global rows as a boolean (N,) or (..., N)."""
    gm = options.get("global_mask")
    if gm is None:
        rows = np.zeros(n, dtype=bool)
        rows[window_globals(options)] = True
        return window_allowed(n, m, options), rows
    gm = np.asarray(gm, dtype=bool)
    allowed = np.zeros(gm.shape[:-1] + (n, m), dtype=bool)
    for item in np.ndindex(*gm.shape[:-1]):
        per_item = {**options, "global_indices": np.nonzero(gm[item])[0]}
        allowed[item] = window_allowed(n, m, per_item)
    return allowed, gm


def torch_window(x, options):
    """`window` (Longformer): `full` with the band ∪ global rows/columns mask; with global
    projections the global rows are `full` of (q_global, k_global, v_global) under the same
    mask and bias, every other row `full` of (q, k, v)."""
    q, k = x["q"], x["k"]
    allowed, rows = window_global_rows(q.shape[-2], k.shape[-2], options)
    rest = {key: options[key] for key in ("causal", "key_padding_mask", "scale")
            if key in options}
    out = torch_full(x, {**rest, "mask": allowed})
    if "q_global" not in x:
        return out
    out_g = torch_full({**x, "q": x["q_global"], "k": x["k_global"], "v": x["v_global"]},
                       {**rest, "mask": allowed})
    return torch.where(torch.as_tensor(rows)[..., None], out_g, out)


def torch_local(x, options):
    """`local`: `full` with the segment mask σ(i) − b ≤ σ(j) ≤ σ(i) + f, σ(p) = ⌊p / block⌋
    (queries and keys cut at the same positions; absent segments simply have no keys)."""
    n, m = x["q"].shape[-2], x["k"].shape[-2]
    blk = options["block"]
    back, fwd = options.get("look_backward", 1), options.get("look_forward", 0)
    seg_q, seg_k = np.arange(n)[:, None] // blk, np.arange(m)[None, :] // blk
    mask = (seg_k >= seg_q - back) & (seg_k <= seg_q + fwd)        # (N, M)
    rest = {key: options[key] for key in ("causal", "key_padding_mask", "scale")
            if key in options}
    return torch_full(x, {**rest, "mask": mask})


def hierarchical_entries(n, options):
    """The partition P(i) of docs/semantics/hierarchical.md, by brute force over its
    definition (near fields NF_ℓ(i), not the segment table).

    Returns ``spans``: list of (level, t, lo, hi) for every level-ℓ token (ℓ = 0 … L),
    ``member (N, T)``: token t is in P(i).  L = L_full = min{L : b·2^L·(1 + w) >= N}, or the
    given ``levels`` clipped to it."""
    b = options["block"]
    w = 1 if options.get("neighbours", True) else 0
    L = 0
    while b * 2 ** L * (1 + w) < n:
        L += 1
    if options.get("levels") is not None:
        L = min(L, options["levels"])

    def near_field(i, level):
        size = b * 2 ** level
        beta = i // size
        lo, hi = max(0, (beta - w) * size), min(n, (beta + w + 1) * size)
        return set(range(lo, hi))

    spans = [(lvl, t, t * 2 ** lvl, min(n, (t + 1) * 2 ** lvl))
             for lvl in range(L + 1) for t in range(-(-n // 2 ** lvl))]
    member = np.zeros((n, len(spans)), dtype=bool)
    for i in range(n):
        nf = [near_field(i, lvl) for lvl in range(L + 1)]
        covered = set()
        for e, (lvl, _, lo, hi) in enumerate(spans):
            span = set(range(lo, hi))
            inner = nf[lvl - 1] if lvl > 0 else set()
            if span <= nf[lvl] and not span & inner:
                member[i, e] = True
                assert not span & covered, "spans of P(i) must be disjoint"
                covered |= span
        assert covered == nf[L], "P(i) must cover NF_L(i)"
    return spans, member


def torch_hierarchical(x, options):
    """`hierarchical`: ONE softmax over P(i); coarse key/value = mean of the real keys of a
    span, logit q_i·k̄·scale + log n (n = real keys in the span); spans with n = 0 and
    (causal) spans in the future are excluded (a span is never cut by the causal line)."""
    q, k, v = x["q"], x["k"], x["v"]
    n, d = q.shape[-2], q.shape[-1]
    spans, member = hierarchical_entries(n, options)
    kpm = options.get("key_padding_mask")
    real = np.ones((1, n)) if kpm is None else np.asarray(kpm, dtype=np.float64)  # (..., N)
    weight = np.zeros(real.shape[:-1] + (len(spans), n))           # (..., T, N)
    for e, (_, _, lo, hi) in enumerate(spans):
        weight[..., e, lo:hi] = real[..., lo:hi]
    count = weight.sum(-1)                                         # (..., T): n_t
    weight = weight / np.maximum(count, 1)[..., None]
    kbar = torch.from_numpy(weight) @ k                            # (..., T, D)
    vbar = torch.from_numpy(weight) @ v                            # (..., T, Dv)
    scale = options.get("scale")
    scale = 1 / math.sqrt(d) if scale is None else scale
    log_n = torch.from_numpy(np.log(np.maximum(count, 1)))[..., None, :]   # (..., 1, T)
    s = q @ kbar.transpose(-1, -2) * scale + log_n                 # (..., N, T)
    allowed = member & (count[..., None, :] > 0)                   # (..., N, T)
    if options.get("causal", False):
        last = np.array([hi - 1 for (_, _, _, hi) in spans])
        first = np.array([lo for (_, _, lo, _) in spans])
        pos = np.arange(n)[:, None]
        assert not np.any(member & (first <= pos) & (pos < last)), "a span straddles i"
        allowed = allowed & (last[None, :] <= pos)
    return safe_softmax(s, torch.from_numpy(np.asarray(allowed))) @ vbar


TORCH_REFS = {
    "full": torch_full,
    "sparse": torch_sparse,
    "window": torch_window,
    "linear": torch_linear,
    "performer": torch_performer,
    "linformer": torch_linformer,
    "lsh": torch_lsh,
    "local": torch_local,
    "hierarchical": torch_hierarchical,
}

CASES = [(v, c.name) for v in VARIANTS
         for c in VARIANTS[v].example_cases(np.random.default_rng(0))]


@functools.cache
def _golden_cases(variant):
    return {case.name: case for case in make_cases(variant)}


def _golden(variant, case_name):
    return _golden_cases(variant)[case_name]


def impls_of(variant):
    """Every explicit implementation of a variant (``auto`` only picks one of them);
    ``(None,)`` for a variant with a single implementation."""
    return tuple(i for i in getattr(VARIANTS[variant], "IMPLS", ()) if i != "auto") or (None,)


def unsupported(variant, impl, case):
    """Why an implementation cannot run a case (documented in SEMANTICS.md §5), or None."""
    if variant == "full" and impl == "blocked":
        dense = [name for name in ("mask", "bias") if name in case.options or name in case.args]
        if dense:
            return f"full impl='blocked' takes no dense {' or '.join(dense)}"
    return None


def run_tinyeff(variant, impl, case):
    """forward with ``impl`` and its own hand-written backward (``ctx.impl``)."""
    mod = VARIANTS[variant]
    extra = {} if impl is None else {"impl": impl}
    out, ctx = mod.forward(**case.args, **case.options, **extra)
    return out, mod.backward(case.dout, ctx)


def _run_torch(fn, case):
    x = {k: _tensor(a, grad=True) for k, a in case.args.items()}
    out = fn(x, case.options)
    out.backward(_tensor(case.dout))
    return out.detach().numpy(), {k: t.grad.numpy() for k, t in x.items()}


def _assert_agree(actual, desired, label):
    _, max_rel, ratio, status, note = compare(actual, desired, TOL)
    assert status == OK, f"{label}: rel {max_rel:.2e}, ratio {ratio:.2e}; {note}"


@pytest.mark.parametrize("variant,case_name", CASES)
def test_autograd_agrees_with_tinyeff(variant, case_name):
    """torch autograd of the transcription == tinyeff's golden values (float64 reference)
    and == every implementation's forward and hand-written backward (``impl`` = ref,
    numba, blocked, ...), output and every gradient, to PARITY[float64]."""
    if variant not in TORCH_REFS:
        pytest.skip(f"no PyTorch transcription of {variant} yet (listed in SEMANTICS.md)")
    case = _golden(variant, case_name)
    out_t, grads_t = _run_torch(TORCH_REFS[variant], case)
    # the float64 reference (what the golden files hold)
    _assert_agree(out_t, case.out, "out (golden)")
    for name in case.grads:
        _assert_agree(grads_t[name], case.grads[name], f"grad {name} (golden)")
    for impl in impls_of(variant):
        if unsupported(variant, impl, case):
            continue
        out, grads = run_tinyeff(variant, impl, case)
        _assert_agree(out_t, out, f"out (impl={impl})")
        for name in case.grads:
            _assert_agree(grads_t[name], grads[name], f"grad {name} (impl={impl})")


def test_every_implementation_is_cross_checked():
    """Each explicit impl of each variant meets at least one golden case it can run."""
    for variant in TORCH_REFS:
        if variant not in VARIANTS:
            continue
        for impl in impls_of(variant):
            runnable = [c for c in _golden_cases(variant).values()
                        if unsupported(variant, impl, c) is None]
            assert runnable, f"{variant} impl={impl} is checked on no case"


def worst_errors():
    """{(variant, impl): (worst max rel, where)} over every case, output and gradient;
    impl "golden" is the stored float64 reference values.  ``python
    tests/test_torch_crosscheck.py`` prints it (the table in SEMANTICS.md §5)."""
    worst = {}

    def note(key, actual, desired, where):
        rel = compare(actual, desired, TOL)[1]
        if key not in worst or rel > worst[key][0]:
            worst[key] = (rel, where)

    for variant, case_name in CASES:
        if variant not in TORCH_REFS:
            continue
        case = _golden(variant, case_name)
        out_t, grads_t = _run_torch(TORCH_REFS[variant], case)
        runs = {"golden": (case.out, case.grads)}
        for impl in impls_of(variant):
            if not unsupported(variant, impl, case):
                runs[str(impl)] = run_tinyeff(variant, impl, case)
        for impl, (out, grads) in runs.items():
            note((variant, impl), out_t, out, f"{case_name} out")
            for name in case.grads:
                note((variant, impl), grads_t[name], grads[name], f"{case_name} grad {name}")
    return worst


# ----------------------------------------------------------------------------------------
# full against PyTorch's own scaled_dot_product_attention
# ----------------------------------------------------------------------------------------

def sdpa_full(x, options):
    """tinyeff's `full` options expressed through SDPA's arguments."""
    q, k, v = x["q"], x["k"], x["v"]
    f = torch.nn.functional.scaled_dot_product_attention
    plain_causal = set(options) <= {"causal", "scale"} and set(x) == {"q", "k", "v"}
    if plain_causal:
        return f(q, k, v, is_causal=bool(options.get("causal")), scale=options.get("scale"))
    allowed = full_allowed(q, k, options)
    bias = full_bias(x, q.shape[-2], k.shape[-2])
    if bias is None:
        mask = allowed                                             # bool: True = may attend
    else:
        mask = bias.masked_fill(~allowed, float("-inf"))           # float: added to scores
    return f(q, k, v, attn_mask=mask, scale=options.get("scale"))


@pytest.mark.parametrize("case_name", [c for v, c in CASES if v == "full"])
def test_full_matches_torch_sdpa(case_name):
    case = _golden("full", case_name)
    out_t, grads_t = _run_torch(sdpa_full, case)
    _assert_agree(out_t, case.out, "out")
    for name in case.grads:
        _assert_agree(grads_t[name], case.grads[name], f"grad {name}")


def test_sdpa_causal_is_top_left_and_masked_rows_are_zero():
    """The two conventions SEMANTICS.md relies on, checked on this torch."""
    rng = np.random.default_rng(0)
    q, k, v = (torch.from_numpy(rng.standard_normal(s)) for s in
               ((1, 1, 3, 4), (1, 1, 6, 4), (1, 1, 6, 2)))
    f = torch.nn.functional.scaled_dot_product_attention
    top_left = torch.ones(3, 6, dtype=torch.bool).tril()
    torch.testing.assert_close(f(q, k, v, is_causal=True), f(q, k, v, attn_mask=top_left))
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1] = False
    out = f(q, k, v, attn_mask=mask)
    assert torch.all(out[..., 1, :] == 0) and torch.all(torch.isfinite(out))


@pytest.mark.parametrize("variant", [v for v in TORCH_REFS if v in VARIANTS])
def test_transcription_catches_a_wrong_backward(variant):
    """Negative control: the comparison fails on a gradient scaled by 1.001."""
    case = next(make_cases(variant))
    _, grads_t = _run_torch(TORCH_REFS[variant], case)
    for name in case.grads:
        with pytest.raises(AssertionError):
            _assert_agree(grads_t[name] * 1.001, case.grads[name], f"grad {name}")


if __name__ == "__main__":
    for (variant, impl), (rel, where) in sorted(worst_errors().items()):
        print(f"{variant:<13} {impl:<8} {rel:.1e}  ({where})")
