"""Robustness of every public entry point of every registered variant (issue 11).

Parametrized over ``tinyeff.attention.VARIANTS`` at collection time, so a variant registered
later is picked up with no change here.  Options come from each variant's ``example_cases``
(the valid calls it documents); where a test needs inputs of a chosen size, :func:`sized_case`
builds a valid call for the known variants and, for a variant it does not know, resizes the
first example case when its options do not depend on the sizes (otherwise the test skips
with a reason, so a new variant is noticed, not silently passed).

The decisions pinned here are written up in docs/robustness.md:

* q/k/v (and dout, and every array option): a Python list, a 0-d array or a NumPy scalar is
  a ``TypeError`` naming the argument; an integer, float16 or complex array is a
  ``TypeError``; a rank < 2, mismatched batch dimensions, D(q) != D(k) or M(k) != M(v) is a
  ``ValueError`` naming the argument and the shapes seen.
* Fortran-order, non-contiguous, negatively strided, broadcast (zero-stride) and read-only
  arrays give the answer of their contiguous copies, in every implementation.
* N = 0 gives an empty output; M = 0 gives zeros (every row fully masked), where the
  variant's structure allows M != N; B = 0 gives empty everything.
* Bad options: ``TypeError`` for the wrong kind, ``ValueError`` for a wrong value/shape,
  each naming the option; an unknown option name is Python's ``TypeError`` naming it (and
  ``nn.MultiHeadAttention`` lists the valid ones).
* NaN/inf in an input reaches exactly the output rows that depend on that input (the rows
  whose output changes when the input changes), and nothing else.
* ±1e4 logits are finite in every softmax-based variant; fully key-padded batch items give
  zeros with zero gradient in every variant.
"""

from __future__ import annotations

import re
import zlib

import numpy as np
import pytest
import scipy.sparse as sp

from tinyeff.attention import VARIANTS, Case
from tinyeff.testing import assert_close

NAMES = list(VARIANTS)
ERRORS = (TypeError, ValueError)


# ------------------------------------------------------------------------------------------
# helpers shared with test_fuzz.py and test_determinism.py

def seeded(*parts) -> np.random.Generator:
    """A Generator seeded by a stable hash of ``parts`` (reproducible test by test)."""
    return np.random.default_rng(zlib.crc32("/".join(map(str, parts)).encode()))


def impls(name: str) -> list[str]:
    """The concrete implementations of a variant ("auto" resolved away); [None] if it has none."""
    mod = VARIANTS[name]
    found = [i for i in getattr(mod, "IMPLS", ()) if i != "auto"]
    return found or [None]


def with_impl(options: dict, impl) -> dict:
    return options if impl is None else {**options, "impl": impl}


SAME_LENGTH = {"lsh", "hierarchical"}   # queries and keys are the same positions (M = N)


def sized_case(name: str, rng: np.random.Generator, dtype=np.float64, *, batch=(2,), n=6,
               m=None, d=4, dv=3, scale=1.0) -> Case | None:
    """A valid call of ``name`` with q (*batch, n, d), k (*batch, m, d), v (*batch, m, dv).

    Inputs are standard normal times ``scale``.  Returns None when the variant cannot take
    those sizes (M != N for the same-position variants): the caller decides what that means.
    """
    m = n if m is None else m
    if name in SAME_LENGTH and m != n:
        return None
    batch = tuple(batch)

    def draw(*shape):
        return (scale * rng.standard_normal(shape)).astype(dtype)

    args = {"q": draw(*batch, n, d), "k": draw(*batch, m, d), "v": draw(*batch, m, dv)}
    mod = VARIANTS[name]
    if name == "full":
        opts = {}
    elif name == "linear":
        opts = {}
    elif name == "performer":
        opts = mod.draw_random_options(rng, max(d, 1), dtype, m=8) if d else {}
        if not d:
            return None
    elif name == "sparse":
        opts = {"mask": sp.csr_array(rng.random((n, m)) < 0.6)}
    elif name == "window":
        opts = {"window": 2}
    elif name == "local":
        opts = {"block": 2, "look_forward": 1}
    elif name == "lsh":
        del args["k"]
        if d == 0:
            return None
        opts = {**mod.draw_random_options(rng, d, dtype, n_hashes=2, n_buckets=4),
                "chunk_len": 2 if n % 2 == 0 else 1}
    elif name == "linformer":
        args["E"] = draw(3, m) / 2
        args["F"] = draw(3, m) / 2
        opts = {}
    elif name == "hierarchical":
        opts = {"block": 2}
    else:
        first = mod.example_cases(np.random.default_rng(0), dtype)[0]
        if set(first.args) - {"q", "k", "v"} or any(
                isinstance(x, np.ndarray) or sp.issparse(x) for x in first.options.values()):
            pytest.skip(f"sized_case does not know how to resize {name}'s options; add it")
        args = {a: args[a] for a in first.args}
        opts = dict(first.options)
    return Case("sized", args, opts)


def first_case(name: str, dtype=np.float64, seed=0) -> Case:
    return VARIANTS[name].example_cases(seeded(name, seed), dtype)[0]


def run(name: str, args: dict, options: dict, dout=None):
    """forward + backward with a seeded random cotangent; returns (out, grads, ctx)."""
    mod = VARIANTS[name]
    out, ctx = mod.forward(**args, **options)
    if dout is None:
        dout = seeded("dout", out.shape).standard_normal(out.shape).astype(out.dtype)
    return out, mod.backward(dout, ctx), ctx


def assert_same_result(a, b, exact: bool, msg=""):
    """Equal outputs and gradients: bit for bit if ``exact``, else to PARITY tolerance."""
    (out_a, g_a, _), (out_b, g_b, _) = a, b
    if exact:
        np.testing.assert_array_equal(out_a, out_b, err_msg=msg)
        assert set(g_a) == set(g_b)
        for key in g_a:
            np.testing.assert_array_equal(g_a[key], g_b[key], err_msg=f"{msg} [{key}]")
    else:
        assert_close(out_a, out_b, err_msg=msg)
        assert_close(g_a, g_b, err_msg=msg)


def array_options(case: Case) -> dict:
    """The ndarray-valued options of a case (masks, biases, features, rotations)."""
    return {k: x for k, x in case.options.items() if isinstance(x, np.ndarray)}


def transform_case(case: Case, f) -> Case:
    """Apply ``f`` to every ndarray argument and ndarray option (values unchanged)."""
    return Case(case.name, {k: f(x) for k, x in case.args.items()},
                {k: (f(x) if isinstance(x, np.ndarray) else x)
                 for k, x in case.options.items()})


# ------------------------------------------------------------------------------------------
# q, k, v: kinds, dtypes, ranks, shapes

def _bad_kinds(x: np.ndarray):
    """(label, bad value, expected exception) for an array argument ``x``."""
    return [
        ("list", x.tolist(), TypeError),
        ("numpy_scalar", x.dtype.type(1.0), TypeError),
        ("0d_array", np.array(1.0, dtype=x.dtype), TypeError),
        ("python_float", 1.0, TypeError),
        ("int_array", x.astype(np.int64), TypeError),
        ("float16", x.astype(np.float16), TypeError),
        ("complex", x.astype(np.complex128), TypeError),
        ("other_float", x.astype(np.float32 if x.dtype == np.float64 else np.float64),
         TypeError),
        ("rank1", x.reshape(-1)[:x.shape[-1]].copy(), ValueError),
    ]


QKV_KIND_CASES = [(name, arg, label) for name in NAMES
                  for arg in first_case(name).args
                  for label, _, _ in _bad_kinds(np.zeros((2, 2)))]


@pytest.mark.parametrize("name,arg,label", QKV_KIND_CASES)
def test_bad_array_kind_names_the_argument(name, arg, label):
    case = first_case(name)
    bad = {lab: (val, exc) for lab, val, exc in _bad_kinds(case.args[arg])}
    value, exc = bad[label]
    with pytest.raises(exc, match=rf"\b{arg}\b"):
        VARIANTS[name].forward(**{**case.args, arg: value}, **case.options)


def _mismatches(case: Case):
    """(label, args) with one inconsistent shape, and the argument the error must name."""
    a = case.args
    q, v = a["q"], a["v"]
    k = a.get("k")
    out = [("batch_q", {**a, "q": q[:1]}, "q"),
           ("batch_v", {**a, "v": v[:1]}, "v"),
           ("extra_batch_dim_v", {**a, "v": v[None]}, "v"),
           ("keys_v", {**a, "v": np.concatenate([v, v[..., :1, :]], axis=-2)}, "v")]
    if k is not None:
        out += [("D_q", {**a, "q": np.concatenate([q, q[..., :1]], axis=-1)}, "q"),
                ("D_k", {**a, "k": k[..., :-1]}, "k"),
                ("keys_k", {**a, "k": k[..., :-1, :]}, "k")]
    return out


MISMATCH_CASES = [(name, label) for name in NAMES
                  for label, _, _ in _mismatches(first_case(name))]


@pytest.mark.parametrize("name,label", MISMATCH_CASES)
def test_shape_mismatch_names_argument_and_shapes(name, label):
    case = first_case(name)
    args, arg = {lab: (a, n) for lab, a, n in _mismatches(case)}[label]
    with pytest.raises(ValueError) as info:
        VARIANTS[name].forward(**args, **case.options)
    msg = str(info.value)
    assert re.search(rf"\b{arg}\b", msg), msg
    assert str(args[arg].shape) in msg, f"the shape seen {args[arg].shape} is not in: {msg}"


@pytest.mark.parametrize("name", NAMES)
def test_bad_dout_kinds(name):
    case = first_case(name)
    mod = VARIANTS[name]
    out, ctx = mod.forward(**case.args, **case.options)
    for _label, value, exc in _bad_kinds(out):
        with pytest.raises(exc, match="dout"):
            mod.backward(value, ctx)
    with pytest.raises(ValueError, match="dout"):
        mod.backward(out[:1], ctx)
    with pytest.raises(TypeError, match="ctx"):
        mod.backward(out, object())


# ------------------------------------------------------------------------------------------
# memory layouts: the answer of the contiguous copy, in every implementation

def _negative(x):
    return np.flip(np.ascontiguousarray(np.flip(x, -1)), -1)       # same values, stride < 0


def _strided(x):
    return np.repeat(x, 2, axis=-1)[..., ::2] if x.ndim else x      # non-contiguous view


def _readonly(x):
    y = x.copy()
    y.setflags(write=False)
    return y


def _broadcast(x):
    """Zero-stride broadcast view (read-only), when x is constant along axis 0."""
    return np.broadcast_to(x[:1], x.shape) if x.ndim and x.shape[0] else x


def _combined(x):
    """Every oddity at once: Fortran order of a negatively strided view, read-only."""
    y = np.asfortranarray(_negative(x)) if x.ndim >= 2 else _negative(x)
    y = _strided(y)
    y.setflags(write=False)
    return y


LAYOUTS = {"fortran": np.asfortranarray, "negative": _negative, "strided": _strided,
           "readonly": _readonly, "broadcast": _broadcast}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name,impl", [(n, i) for n in NAMES for i in impls(n)])
def test_layouts_give_the_contiguous_answer(name, impl, layout):
    case = first_case(name)
    if layout == "broadcast":                      # make every array constant along axis 0
        case = transform_case(case, lambda x: np.ascontiguousarray(
            np.broadcast_to(x[:1], x.shape)) if x.ndim and x.shape[0] else x)
    opts = with_impl(case.options, impl)
    expected = run(name, case.args, opts)
    odd = transform_case(Case(case.name, case.args, opts), LAYOUTS[layout])
    got = run(name, odd.args, odd.options)
    # BLAS may pick another kernel for another layout, so only the float tolerance is
    # promised; every layout except Fortran order is in fact bit-identical today.
    assert_same_result(got, expected, exact=False, msg=f"{name}/{impl}/{layout}")


CASE_IDS = [(n, c.name) for n in NAMES for c in VARIANTS[n].example_cases(seeded(n))]


@pytest.mark.parametrize("name,case_name", CASE_IDS)
def test_every_case_with_every_layout_oddity(name, case_name):
    cases = {c.name: c for c in VARIANTS[name].example_cases(seeded(name, case_name))}
    case = cases[case_name]
    expected = run(name, case.args, case.options)
    got = run(name, *transform_case(case, _combined)[1:])
    assert_same_result(got, expected, exact=False, msg=f"{name}/{case_name}")


# ------------------------------------------------------------------------------------------
# sizes: N = 0, M = 0, B = 0, N = 1, M != N, D != Dv, no batch dimension

SIZES = {
    "N=1": dict(n=1), "N=1,M=1": dict(n=1, m=1), "N=0": dict(n=0, m=5), "M=0": dict(n=5, m=0),
    "N=M=0": dict(n=0, m=0), "B=0": dict(batch=(0, 2)), "no_batch": dict(batch=()),
    "M>N": dict(n=4, m=9), "M<N": dict(n=9, m=3), "Dv>D": dict(d=2, dv=5),
    "D=0": dict(d=0), "Dv=0": dict(dv=0), "long_batch": dict(batch=(2, 1, 3)),
}

# Known failures, keyed by (variant, impl, size label), each in the report with a
# reproduction; xfail(strict=True) so that the test fails (remove the entry) once fixed.
SIZE_XFAIL: dict[tuple[str, str, str], str] = {
    ("sparse", "ref", "N=M=0"): "sparse._backward_ref allocates drel with N + M − 1 = −1 "
                                "columns: 'negative dimensions are not allowed'",
}


def _size_params():
    for name in NAMES:
        for impl in impls(name):
            for label in SIZES:
                marks = ()
                if (name, impl, label) in SIZE_XFAIL:
                    marks = pytest.mark.xfail(strict=True,
                                              reason=SIZE_XFAIL[name, impl, label])
                yield pytest.param(name, impl, label, marks=marks, id=f"{name}-{impl}-{label}")


@pytest.mark.parametrize("name,impl,label", list(_size_params()))
def test_sizes(name, impl, label):
    """Every size either gives the right answer or a clear ValueError naming the shapes."""
    kw = SIZES[label]
    if label == "D=0":                        # decided: D = 0 is a ValueError everywhere
        case = sized_case(name, seeded(name, label), d=4)
        bad = {**case.args, "q": case.args["q"][..., :0]}
        if "k" in bad:
            bad["k"] = bad["k"][..., :0]
        with pytest.raises(ValueError, match=r"\bq\b"):
            VARIANTS[name].forward(**bad, **with_impl(case.options, impl))
        return
    case = sized_case(name, seeded(name, label), **kw)
    if case is None:                          # M != N for a same-position variant
        n, m = kw.get("n", 6), kw.get("m")
        args = sized_case(name, seeded(name, label), n=n, d=kw.get("d", 4))
        if args is None:
            pytest.skip("no such call")
        bad = dict(args.args)
        bad["v"] = np.zeros(bad["v"].shape[:-2] + (m,) + bad["v"].shape[-1:])
        if "k" in bad:
            bad["k"] = np.zeros(bad["k"].shape[:-2] + (m,) + bad["k"].shape[-1:])
        with pytest.raises(ValueError, match=re.escape(str(bad["v"].shape[:-1])[:-1])):
            VARIANTS[name].forward(**bad, **with_impl(args.options, impl))
        return
    out, grads, _ = run(name, case.args, with_impl(case.options, impl))
    q, v = case.args["q"], case.args["v"]
    assert out.shape == q.shape[:-1] + v.shape[-1:] and out.dtype == q.dtype
    assert np.all(np.isfinite(out))
    for key, x in case.args.items():
        assert grads[key].shape == x.shape and grads[key].dtype == x.dtype, key
        assert np.all(np.isfinite(grads[key])), key
    if v.shape[-2] == 0:                      # M = 0: every row sees nothing -> zeros
        assert not out.any() and not grads["q"].any()
    if q.shape[-2] == 0:                      # N = 0: nothing reaches the keys
        for key in ("k", "v"):
            if key in grads:
                assert not grads[key].any(), key
    if label in ("N=1", "N=1,M=1", "M>N", "M<N", "Dv>D", "no_batch", "long_batch") \
            and impl is not None and len(impls(name)) > 1:
        # the implementations agree on the odd sizes too
        other = [i for i in impls(name) if i != impl][0]
        assert_same_result(run(name, case.args, with_impl(case.options, other)),
                           (out, grads, None), exact=False, msg=f"{impl} vs {other}")


@pytest.mark.parametrize("name", NAMES)
def test_n1_and_no_batch_equal_the_batched_call(name):
    """Slicing one batch item / one row (where the variant allows N = 1) is the same call."""
    case = sized_case(name, seeded(name, "slice"), batch=(3,), n=4)
    out, _, _ = run(name, case.args, case.options)
    one = {k: (x[1] if x.ndim >= 3 and k in ("q", "k", "v") else x)
           for k, x in case.args.items()}
    out1, _, _ = run(name, one, case.options)
    assert_close(out1, out[1])
