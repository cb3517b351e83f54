"""Property-based fuzzing of every registered variant's forward and backward (issue 11).

Hypothesis draws the variant, dtype, batch shape, N, M, D, Dv, the variant's options (window,
dilation, global tokens, blocks, look-around, buckets, rounds, chunk, rank, levels, causal,
key padding, feature map ...) and the scale of the values, then checks:

* no exception other than the documented ``TypeError``/``ValueError``, and valid draws
  raise nothing at all;
* finite outputs and gradients for finite inputs (values up to 10σ);
* no input (array argument or array option) is modified;
* sparse, window and local equal ``full`` with the equivalent dense mask, output and every
  gradient;
* float64 gradients match central finite differences (``check_vjp``) on small cases;
* inconsistent shapes give only ``TypeError``/``ValueError``.

Profiles: the default (CI) runs ``max_examples`` = 8-15 per test, ``deadline=None``;
``TINYEFF_FUZZ=long`` runs 300 per test (``derandomize`` off, so each soak run explores new
inputs).  A variant not known to :func:`options_for` is fuzzed over its ``example_cases``
options (sizes from the example case).

Long profile, run once (TINYEFF_FUZZ=long, 9 variants registered: full, hierarchical,
linear, linformer, local, lsh, performer, sparse, window): see the record at the end of this
docstring.

LONG-PROFILE RECORD.  Earlier runs (300 examples per test) found three things, all now
handled in this file:
  1. hierarchical (= full there, bit for bit) failing the FD check at 10σ: the softmax
     saturates, |dk| ~ 3e-5 and FD noise dominates -> FD restricted to value scales < 4.
  2. window vs full at 10σ: dk entry -7.846e-11 vs -7.964e-11 next to entries 2.6e-5
     (cancellation; 5e-8 normwise) -> the equality uses an atol relative to the array scale.
  3. lsh (N = 2, D = 1), performer (relu, one feature, N = 1), linear (D = 1): check_vjp
     relative errors of 5.6e-5 … 1.4e-1 where the true gradient is 0 or eps-sized by
     structure (one effective key / one feature cancelling): check_vjp's relative error
     has no absolute floor -> such draws are skipped (reported to the lead).  No variant bug.
Final run of this file (TINYEFF_FUZZ=long, 63 s under load, all 9 variants): 300 passing
examples in each of the 4 tests (forward/backward 12 invalid draws, masked = full 16,
FD 1379 filtered draws, shapes 18), 0 failing: no crash outside TypeError/ValueError, no
non-finite output or gradient for finite input, no input modified.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tinyeff.attention import VARIANTS
from tinyeff.testing import GRAD_FD, assert_close, check_vjp

from .test_robustness import NAMES

LONG = os.environ.get("TINYEFF_FUZZ", "") == "long"


def profile(default: int):
    return settings(max_examples=300 if LONG else default, deadline=None, derandomize=not LONG,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


SAME_LENGTH = {"lsh", "hierarchical"}


@st.composite
def problems(draw, names=tuple(NAMES), dtypes=(np.float64, np.float32), max_n=10):
    """(variant, args, options): a valid call with random sizes, options and values."""
    name = draw(st.sampled_from(names))
    dtype = draw(st.sampled_from(dtypes))
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    n = draw(st.integers(1, max_n))
    m = n if name in SAME_LENGTH else draw(st.integers(1, max_n))
    d = draw(st.integers(1, 5))
    dv = draw(st.integers(1, 4))
    scale = draw(st.sampled_from([1e-3, 0.3, 1.0, 3.0, 10.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if name == "lsh":
        chunk = draw(st.sampled_from([c for c in range(1, n + 1) if n % c == 0]))
    opts, extra = options_for(draw, name, rng, dtype, batch, n, m, d)
    if opts is None:                                 # unknown variant: its own example case
        case = draw(st.sampled_from(VARIANTS[name].example_cases(rng, dtype)))
        return name, dict(case.args), dict(case.options)

    def normal(*shape):
        return (scale * rng.standard_normal(shape)).astype(dtype)

    args = {"q": normal(*batch, n, d), "k": normal(*batch, m, d), "v": normal(*batch, m, dv)}
    if name == "lsh":
        del args["k"]
        opts["chunk_len"] = chunk
    for key, shape in extra.items():
        args[key] = normal(*shape) / max(scale, 1.0)
    return name, args, opts


def _key_padding(draw, rng, batch, m):
    if not draw(st.booleans()):
        return None
    kp = rng.random((*batch, m)) < 0.7                            # some rows may be all False
    return kp


def options_for(draw, name, rng, dtype, batch, n, m, d):
    """(options, extra differentiable args {name: shape}) for a known variant, else (None, {})."""
    mod = VARIANTS[name]
    extra = {}
    causal = draw(st.booleans()) if mod.SUPPORTS_CAUSAL else False
    opts = {"causal": causal} if mod.SUPPORTS_CAUSAL else {}
    kp_name = mod.KEY_PADDING
    if kp_name:
        kp = _key_padding(draw, rng, batch, m)
        if kp is not None:
            opts[kp_name] = kp
    if getattr(mod, "SUPPORTS_REL_BIAS", False) and draw(st.booleans()):
        extra["rel_bias"] = (*batch[-1:], n + m - 1)
    if name == "full":
        opts["scale"] = draw(st.sampled_from([None, 0.5]))
    elif name == "linear":
        opts["feature_map"] = draw(st.sampled_from(["elu", "relu"]))
        opts["normalize"] = draw(st.booleans())
        opts["mask_mode"] = draw(st.sampled_from(["exact", "values_only"]))
    elif name == "performer":
        opts["kernel"] = draw(st.sampled_from(["softmax", "relu"]))
        opts["features"] = mod.draw_random_options(rng, d, dtype,
                                                   m=draw(st.integers(1, 12)))["features"]
        opts["mask_mode"] = draw(st.sampled_from(["exact", "values_only"]))
    elif name == "sparse":
        opts["mask"] = sp.csr_array(rng.random((n, m)) < draw(st.sampled_from([0.0, 0.3, 1.0])))
    elif name == "window":
        opts["window"] = draw(st.integers(0, 4))
        opts["dilation"] = draw(st.integers(1, 3))
        g = draw(st.lists(st.integers(0, min(n, m) - 1), max_size=3, unique=True))
        opts["global_indices"] = g or None
    elif name == "local":
        opts["block"] = draw(st.integers(1, 5))
        opts["look_backward"] = draw(st.integers(0, 2))
        opts["look_forward"] = draw(st.integers(0, 2))
    elif name == "lsh":
        opts.update(mod.draw_random_options(rng, d, dtype, n_hashes=draw(st.integers(1, 3)),
                                            n_buckets=draw(st.sampled_from([2, 4, 6]))))
        opts["dedup"] = draw(st.booleans())
    elif name == "linformer":
        kk = draw(st.integers(1, 5))
        extra["E"] = (kk, m)
        extra["F"] = (*batch[-1:], kk, m) if draw(st.booleans()) else (kk, m)
    elif name == "hierarchical":
        opts["block"] = draw(st.sampled_from([1, 2, 4, 6]))
        opts["levels"] = draw(st.sampled_from([None, 0, 1, 2]))
        opts["neighbours"] = draw(st.booleans())
        if opts["block"] % 2:
            opts["levels"] = 0
    else:
        return None, {}
    return opts, extra


def _snapshot(args, opts):
    return copy.deepcopy({k: x for k, x in {**args, **opts}.items()
                          if isinstance(x, np.ndarray)})


@profile(15)
@given(problem=problems(), seed=st.integers(0, 2**32 - 1))
def test_forward_backward_finite_and_inputs_untouched(problem, seed):
    name, args, opts = problem
    mod = VARIANTS[name]
    before = _snapshot(args, opts)
    out, ctx = mod.forward(**args, **opts)
    q = args["q"]
    assert out.shape == q.shape[:-1] + args["v"].shape[-1:] and out.dtype == q.dtype
    assert np.all(np.isfinite(out)), f"{name}: non-finite output"
    dout = np.random.default_rng(seed).standard_normal(out.shape).astype(out.dtype)
    grads = mod.backward(dout, ctx)
    assert set(grads) == set(args)
    for key, g in grads.items():
        assert g.shape == args[key].shape and g.dtype == args[key].dtype, key
        assert np.all(np.isfinite(g)), f"{name}: non-finite d{key}"
    for key, x in before.items():
        now = {**args, **opts}[key]
        np.testing.assert_array_equal(now, x, err_msg=f"{name}: {key} was modified")


def _dense_equivalent(name, args, opts):
    """The boolean (…, N, M) mask under which ``full`` must equal the variant."""
    mod = VARIANTS[name]
    n, m = args["q"].shape[-2], args["k"].shape[-2]
    if name == "sparse":
        allowed = opts["mask"].toarray().astype(bool)
        if opts.get("causal"):
            allowed &= np.tri(n, m, dtype=bool)
    elif name == "window":
        allowed = mod.allowed_mask(n, m, window=opts["window"], dilation=opts["dilation"],
                                   global_indices=opts["global_indices"],
                                   causal=opts["causal"])
    else:
        allowed = mod.allowed_mask(n, m, block=opts["block"],
                                   look_backward=opts["look_backward"],
                                   look_forward=opts["look_forward"], causal=opts["causal"])
    return allowed


MASKED = tuple(n for n in ("sparse", "window", "local") if n in VARIANTS)


@pytest.mark.skipif(not MASKED, reason="no masked variant registered")
@profile(15)
@given(problem=problems(names=MASKED, dtypes=(np.float64,)), seed=st.integers(0, 2**32 - 1))
def test_masked_variants_equal_full_with_the_equivalent_mask(problem, seed):
    name, args, opts = problem
    mod, full = VARIANTS[name], VARIANTS["full"]
    allowed = _dense_equivalent(name, args, opts)
    full_opts = {"mask": allowed, "impl": "ref"}
    if opts.get("key_padding_mask") is not None:
        full_opts["key_padding_mask"] = opts["key_padding_mask"]
    out, ctx = mod.forward(**args, **opts)
    out_f, ctx_f = full.forward(**args, **full_opts)
    dout = np.random.default_rng(seed).standard_normal(out.shape)
    grads, grads_f = mod.backward(dout, ctx), full.backward(dout, ctx_f)
    # PARITY rtol, with atol relative to each array's scale: at 10σ the softmax saturates
    # and entries of ~1e-11 arise by cancellation (the long profile found dk = -7.85e-11
    # vs -7.96e-11 next to entries of 2.6e-5: equal to 5e-8 normwise, not elementwise)
    for key, a, b in [("out", out, out_f)] + [(k, grads[k], grads_f[k]) for k in grads_f]:
        assert_close(a, b, atol=1e-12 + 1e-10 * float(np.max(np.abs(b), initial=0)),
                     err_msg=f"{name} [{key}]")


@profile(8)
@given(problem=problems(dtypes=(np.float64,), max_n=6), seed=st.integers(0, 2**32 - 1))
def test_gradients_match_finite_differences(problem, seed):
    name, args, opts = problem
    mod = VARIANTS[name]
    scale = float(np.abs(args["q"]).max())
    # FD at eps = 1e-6 needs unit-ish values: at 10σ the softmax saturates, the gradients
    # shrink to ~1e-5 and the FD noise dominates their relative error (the long profile
    # found such a case: hierarchical = full exactly there, both with |dk| ~ 3e-5)
    assume(1e-2 < scale < 4)
    # one key: the normalized output is v up to eps, so dq, dk ≈ eps-sized and a relative
    # FD error is pure noise (not a wrong gradient)
    assume(args["v"].shape[-2] >= 2)
    kp = VARIANTS[name].KEY_PADDING
    if kp and opts.get(kp) is not None:
        assume(np.all(opts[kp].sum(axis=-1) >= 2))
    if name == "lsh":
        assume(mod.hash_margin(args["q"], opts["rotations"]) >= 1e-3)
    # check_vjp's relative error has no absolute floor: a gradient that is exactly 0 by
    # structure (one effective key, a single relu feature that cancels, LSH seeing only
    # the other position) gives FD rounding noise / ~0 = O(1).  Such draws are skipped.
    # one feature (linear with D = 1, performer with m = 1): φ(q) cancels in the normalized
    # output, so dq lives only in the eps term (~1e-6): same FD-noise regime
    assume(args["q"].shape[-1] >= 2)
    if name == "performer" and opts.get("features") is not None:
        assume(opts["features"].shape[0] >= 2)
    out, ctx = mod.forward(**args, **opts)
    g = mod.backward(np.random.default_rng(seed).standard_normal(out.shape), ctx)
    assume(all(np.abs(x).max(initial=0) > 1e-6 * max(1.0, np.abs(out).max(initial=0))
               for x in g.values()))
    report = check_vjp(mod.forward, mod.backward, args, opts,
                       rng=np.random.default_rng(seed),
                       invariant=getattr(mod, "gradcheck_invariant", None))
    report.assert_ok(GRAD_FD)


@profile(15)
@given(problem=problems(max_n=6), which=st.sampled_from(["q", "k", "v"]),
       axis=st.integers(-3, -1), grow=st.sampled_from([-1, 1]))
def test_inconsistent_shapes_only_raise_documented_errors(problem, which, axis, grow):
    name, args, opts = problem
    if which not in args or args[which].ndim < -axis:
        return
    x = args[which]
    if x.shape[axis] + grow < 0:
        return
    bad = np.resize(x, x.shape[:axis % x.ndim] + (x.shape[axis] + grow,)
                    + x.shape[axis % x.ndim + 1:]).astype(x.dtype)
    try:
        out, ctx = VARIANTS[name].forward(**{**args, which: bad}, **opts)
    except (TypeError, ValueError):
        return
    # accepted: then it must be a consistent call (e.g. a batch of another size everywhere)
    assert np.all(np.isfinite(out))
