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

import numbers
import os
import re
import zlib

import numpy as np
import pytest
import scipy.sparse as sp

from tinyeff.attention import VARIANTS, Case
from tinyeff.testing import assert_close

NAMES = list(VARIANTS)
LONG = os.environ.get("TINYEFF_FUZZ", "") == "long"   # the soak profile (also test_fuzz.py)
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
    # read-only and broadcast inputs reach the Numba kernels as writeable copies (the
    # wrappers' np.require(..., "CW")), so no second set of kernels is compiled here
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
    if not LONG and impls(name)[0] is not None:
        case = Case(case.name, case.args, with_impl(case.options, "ref"))  # see the skip above
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
SIZE_XFAIL: dict[tuple[str, str, str], str] = {}


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


# ------------------------------------------------------------------------------------------
# options: every option of every example case, perturbed generically by kind

def _option_perturbations(case: Case, n: int):
    """(label, option, bad value, expected) where expected is an exception class, or "ok"
    (a valid result or a ValueError is fine: e.g. a window larger than N)."""
    out = []
    for key, value in case.options.items():
        if isinstance(value, (bool, np.bool_)):
            out += [(f"{key}=1", key, 1, TypeError), (f"{key}='yes'", key, "yes", TypeError)]
        elif isinstance(value, numbers.Integral):
            out += [(f"{key}=-1", key, -1, ValueError), (f"{key}=2.5", key, 2.5, TypeError),
                    (f"{key}='2'", key, "2", TypeError), (f"{key}=True", key, True, TypeError),
                    (f"{key}=0", key, 0, "ok"), (f"{key}=N+5", key, n + 5, "ok"),
                    (f"{key}=np.int64", key, np.int64(value), "ok")]
        elif isinstance(value, numbers.Real):
            out += [(f"{key}=nan", key, float("nan"), ValueError),
                    (f"{key}=inf", key, float("inf"), ValueError),
                    (f"{key}='x'", key, "x", TypeError)]
        elif isinstance(value, str):
            out += [(f"{key}=unknown", key, "no-such-" + value, ValueError)]
        elif isinstance(value, np.ndarray):
            other = np.float32 if value.dtype == np.float64 else np.float64
            wrong_dtype = (value.astype(np.int64) if value.dtype == np.bool_
                           else value.astype(other))
            # the axis tied to the inputs: D for rotations (D, r, nb/2) (more buckets is
            # another valid choice), the last one (M, N + M − 1, D) for the others
            axis = 0 if key == "rotations" else -1
            grown = np.concatenate([value, np.take(value, [0], axis=axis)], axis=axis)
            out += [(f"{key}:dtype", key, wrong_dtype, TypeError),
                    (f"{key}:list", key, value.tolist(), TypeError),
                    (f"{key}:tied_axis+1", key, grown, ValueError)]
            if value.ndim >= 1:
                out += [(f"{key}:extra_dims", key, value[None, None, None], ValueError)]
        elif sp.issparse(value):
            r, c = value.shape
            out += [(f"{key}:shape", key, sp.csr_array((r + 1, c), dtype=bool), ValueError),
                    (f"{key}:float", key, sp.csr_array(value, dtype=np.float64), TypeError),
                    (f"{key}:dense_ndarray", key, value.toarray(), TypeError)]
        elif key == "global_indices":
            out += [(f"{key}:out_of_range", key, [0, n], ValueError),
                    (f"{key}:negative", key, [-1], ValueError),
                    (f"{key}:duplicated", key, [1, 1], ValueError),
                    (f"{key}:float", key, [0.5], TypeError),
                    (f"{key}:2d", key, [[0, 1]], ValueError)]
    return out


OPTION_CASES = []
for _name in NAMES:
    for _case in VARIANTS[_name].example_cases(seeded(_name)):
        _n = _case.args["q"].shape[-2]
        for _label, *_ in _option_perturbations(_case, _n):
            OPTION_CASES.append((_name, _case.name, _label))
OPTION_CASES = sorted(set(OPTION_CASES))


@pytest.mark.parametrize("name,case_name,label", OPTION_CASES)
def test_bad_option(name, case_name, label):
    case = {c.name: c for c in VARIANTS[name].example_cases(seeded(name))}[case_name]
    n = case.args["q"].shape[-2]
    table = {lab: (key, val, exp) for lab, key, val, exp in _option_perturbations(case, n)}
    key, value, expected = table[label]
    options = {**case.options, key: value}
    mod = VARIANTS[name]
    if expected == "ok":
        try:
            out, grads, _ = run(name, case.args, options)
        except ValueError as e:
            assert key in str(e) or "N" in str(e), f"the error does not name {key}: {e}"
            return
        assert np.all(np.isfinite(out))
        assert all(np.all(np.isfinite(g)) for g in grads.values())
        return
    with pytest.raises(expected) as info:
        mod.forward(**case.args, **options)
    assert key in str(info.value), f"the error does not name the option {key!r}: {info.value}"


@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_name_is_a_type_error_naming_it(name):
    case = first_case(name)
    with pytest.raises(TypeError, match="no_such_option"):
        VARIANTS[name].forward(**case.args, **case.options, no_such_option=3)


@pytest.mark.parametrize("name", NAMES)
def test_mha_unknown_option_lists_the_valid_ones(name):
    from tinyeff.nn import MultiHeadAttention
    with pytest.raises(ValueError) as info:
        MultiHeadAttention(8, 2, name, max_len=8, rng=np.random.default_rng(0),
                           no_such_option=1)
    msg = str(info.value)
    assert "no_such_option" in msg and "valid" in msg, msg
    with pytest.raises(ValueError, match=re.escape(str(sorted(VARIANTS)))):
        MultiHeadAttention(8, 2, name + "_nope", rng=np.random.default_rng(0))


def test_sparse_csr_with_unsorted_and_duplicate_indices_is_canonicalized():
    """A hand-built CSR with unsorted columns and a duplicated entry means the same pattern."""
    if "sparse" not in VARIANTS:
        pytest.skip("sparse is not registered")
    rng = seeded("csr")
    case = sized_case("sparse", rng, n=3, m=4)
    indptr = np.array([0, 3, 5, 7])
    indices = np.array([2, 0, 2, 3, 1, 0, 3])                     # row 0: 2, 0, 2 (dup)
    messy = sp.csr_array((np.ones(7, bool), indices, indptr), shape=(3, 4))
    messy.has_sorted_indices = False
    clean = sp.csr_array(np.array([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 0, 1]], dtype=bool))
    try:
        got = run("sparse", case.args, {"mask": messy})
    except ValueError as e:
        assert "mask" in str(e)
        return
    expected = run("sparse", case.args, {"mask": clean})
    assert_same_result(got, expected, exact=False)
    explicit_false = sp.csr_array((np.array([True, False]), np.array([0, 1]),
                                   np.array([0, 2, 2, 2])), shape=(3, 4))
    with pytest.raises(ValueError, match="False"):
        VARIANTS["sparse"].forward(**case.args, mask=explicit_false)


# ------------------------------------------------------------------------------------------
# values: NaN/inf propagation, large logits, fully masked rows

def _dependent_rows(name, case, arg, index):
    """Output rows (boolean over out.shape[:-1]) that change when ``case.args[arg][index]``
    (one row vector) changes by a finite amount: the rows that depend on that input."""
    forward = VARIANTS[name].forward
    base, _ = forward(**case.args, **case.options)
    x = case.args[arg].copy()
    x[index] += np.linspace(0.5, 1.5, x.shape[-1])
    out, _ = forward(**{**case.args, arg: x}, **case.options)
    return np.any(out != base, axis=-1)


NAN_CASES = [(n, c, a, bad) for n, c in CASE_IDS
             for a in ("q", "k", "v") if a in first_case(n).args
             for bad in ("nan", "inf")
             if bad == "nan" or c == first_case(n).name]     # inf: the first case only


@pytest.mark.parametrize("name,case_name,arg,bad", NAN_CASES)
def test_nonfinite_input_reaches_exactly_the_dependent_rows(name, case_name, arg, bad):
    case = {c.name: c for c in VARIANTS[name].example_cases(seeded(name, case_name))}[case_name]
    x = case.args[arg]
    index = (0,) * (x.ndim - 2) + (min(2, x.shape[-2] - 1),)      # one row vector of x
    dep = _dependent_rows(name, case, arg, index)
    poisoned = x.copy()
    poisoned[index] = np.nan if bad == "nan" else np.inf
    out, ctx = VARIANTS[name].forward(**{**case.args, arg: poisoned}, **case.options)
    nonfinite = ~np.all(np.isfinite(out), axis=-1)
    if name == "lsh" and arg == "q":
        # the shared qk also decides the hashing: a NaN position may sort anywhere, so
        # the rows it reaches are not those of a finite perturbation; it must still stay
        # inside its own batch item and reach its own row
        assert nonfinite[index[:-1]].any() or nonfinite[index].all()
        other = np.ones(out.shape[:-1], dtype=bool)
        other[index[:-1]] = False
        assert not nonfinite[other].any(), "NaN crossed into another batch item"
        return
    if arg == "k" and bad == "inf":
        # k = inf: a row whose score q_i·k_j is −inf gives key j weight 0 and stays
        # finite, so only a subset of the dependent rows is non-finite.
        assert not (nonfinite & ~dep).any(), \
            f"reached rows {np.argwhere(nonfinite & ~dep).tolist()}"
        return
    # v: exactly the rows that see key j (tinyeff/attention/_nonfinite.py); q, k: exactly
    # the rows whose output depends on them
    np.testing.assert_array_equal(
        nonfinite, dep, err_msg=f"{name}/{case_name}: non-finite {arg}{index} reached rows "
        f"{np.argwhere(nonfinite & ~dep).tolist()} that do not depend on it, or missed "
        f"{np.argwhere(dep & ~nonfinite).tolist()}")


SOFTMAX_BASED = [n for n in NAMES if n not in ("linear", "performer")]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,case_name", [c for c in CASE_IDS if c[0] in SOFTMAX_BASED])
def test_logits_of_1e4_are_finite(name, case_name, dtype):
    """Scores q·k·scale of ±1e4 (scale = 1e4 on unit-norm rows) stay finite."""
    case = {c.name: c for c in VARIANTS[name].example_cases(seeded(name, case_name),
                                                              dtype)}[case_name]
    args = dict(case.args)
    for key in ("q", "k"):
        if key in args:
            x = args[key]
            args[key] = (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(dtype)
    out, grads, _ = run(name, args, {**case.options, "scale": 1e4})
    assert np.all(np.isfinite(out))
    for key, g in grads.items():
        assert np.all(np.isfinite(g)), key


@pytest.mark.parametrize("name", [n for n in NAMES if VARIANTS[n].KEY_PADDING])
def test_fully_padded_batch_item_gives_zeros(name):
    """Every key of batch item 0 padded: its rows output 0 and nothing flows back to it."""
    case = sized_case(name, seeded(name, "pad"), batch=(2,), n=6)
    kp = np.ones((2, 6), dtype=bool)
    kp[0] = False
    opts = {**case.options, VARIANTS[name].KEY_PADDING: kp}
    for impl in impls(name):
        out, grads, _ = run(name, case.args, with_impl(opts, impl))
        assert not out[0].any() and np.all(np.isfinite(out))
        for key in ("q", "k", "v"):
            if key in grads:
                assert not grads[key][0].any(), (impl, key)


@pytest.mark.parametrize("name,case_name", [c for c in CASE_IDS if c[0] == "performer"])
def test_performer_float32_inputs_of_norm_100(name, case_name):
    """The forward never overflows in float32 for |x| up to 100; the backward is finite at
    norm 10·√D (documented limit: docs/robustness.md)."""
    case = {c.name: c for c in VARIANTS[name].example_cases(seeded(name, case_name),
                                                              np.float32)}[case_name]
    args = dict(case.args)
    for key in ("q", "k"):
        x = args[key]
        args[key] = (100 * x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
    out, _ = VARIANTS[name].forward(**args, **case.options)
    assert np.all(np.isfinite(out))


# ------------------------------------------------------------------------------------------
# float32 within a documented tolerance of float64, per variant

@pytest.mark.parametrize("name", NAMES)
def test_float32_within_the_documented_normwise_tolerance(name):
    from tinyeff.testing.tolerances import F32_VS_F64_NORMWISE, F32_VS_F64_NORMWISE_DEFAULT
    bound = F32_VS_F64_NORMWISE.get(name, F32_VS_F64_NORMWISE_DEFAULT)
    c32 = sized_case(name, seeded(name, "f32"), np.float32, batch=(2, 2), n=64, d=16, dv=16)
    args64 = {k: x.astype(np.float64) for k, x in c32.args.items()}
    opts64 = {k: (x.astype(np.float64) if isinstance(x, np.ndarray) and x.dtype == np.float32
                  else x) for k, x in c32.options.items()}
    dout = seeded("f32", "dout").standard_normal((2, 2, 64, 16))
    out64, g64, _ = run(name, args64, opts64, dout)
    out32, g32, _ = run(name, c32.args, c32.options, dout.astype(np.float32))

    def err(a, b):
        return float(np.max(np.abs(a.astype(np.float64) - b)) / np.max(np.abs(b)))

    assert err(out32, out64) < bound
    for key in g64:
        assert err(g32[key], g64[key]) < bound, key


def test_nonfinite_v_reaches_exactly_the_rows_that_see_it_column_by_column():
    """full, causal, a bias with −inf entries (a structural mask) and large finite entries
    (weights that underflow but still count as seen): out[i, c] is NaN iff row i sees key j
    and v[j, c] is not finite (tinyeff/attention/_nonfinite.py)."""
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((2, 6, 4)) for _ in range(3))
    bias = np.zeros((6, 6))
    bias[4, 2] = -np.inf                                       # row 4 does not see key 2
    bias[5, 2] = -1e4                                          # row 5 sees it, weight ≈ 0
    v[0, 2, 1] = np.nan
    v[0, 2, 3] = np.inf
    out, _ = VARIANTS["full"].forward(q, k, v, causal=True, bias=bias)
    seen = np.tril(np.ones((6, 6), dtype=bool)) & (bias > -np.inf)
    expected = np.zeros(out.shape, dtype=bool)
    expected[0, :, 1] = expected[0, :, 3] = seen[:, 2]
    np.testing.assert_array_equal(~np.isfinite(out), expected)
    clean = v.copy()
    clean[0, 2, [1, 3]] = 0
    ref, _ = VARIANTS["full"].forward(q, k, clean, causal=True, bias=bias)
    np.testing.assert_array_equal(out[~expected], ref[~expected])
    assert np.isnan(v[0, 2, 1]) and v[0, 2, 3] == np.inf       # the input is untouched
