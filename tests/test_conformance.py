"""The conformance harness: tinyeff passes its own golden cases; planted bugs are caught.

``port_full`` below is an independent NumPy port of ``full`` written from SEMANTICS.md (not
from tinyeff's code), with switches that plant the mistakes real ports make.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from tinyeff.attention import VARIANTS
from tinyeff.cli import check as check_cli
from tinyeff.testing import check_backend, reference_backend, write_golden
from tinyeff.testing.conformance import ERROR, FAIL, NA, OK, SIGNATURE, SKIP, check_case, compare
from tinyeff.testing.golden import make_cases
from tinyeff.testing.suite import suite_cases
from tinyeff.testing.tolerances import PARITY

ROOT = Path(__file__).resolve().parents[1]
FULL_CASES = [c.name for c in VARIANTS["full"].example_cases(np.random.default_rng(0))]
SUITE_CASES = [c.name for c in suite_cases("full", np.random.default_rng(0))]


def port_full(variant, inputs, options, dout, bug=None):
    """Exact attention, forward and backward, as a porter would write it from SEMANTICS.md."""
    assert variant == "full"
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    n, m, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = options.get("scale")
    if scale is None:
        scale = 1 / d if bug == "scale_1_over_d" else 1 / math.sqrt(d)
    allowed = np.ones(q.shape[:-2] + (n, m), dtype=bool)
    mask = options.get("mask")
    if mask is not None:
        allowed = allowed & (mask.toarray() if sp.issparse(mask) else mask)
    kpm = options.get("key_padding_mask")
    if kpm is not None:
        allowed = allowed & kpm[..., None, :]
    if options.get("causal", False):
        shift = m - n if bug == "bottom_right_causal" else 0
        tri = np.tri(n, m, k=shift, dtype=bool)
        if bug == "rows_past_64":                                  # a second-tile off-by-one
            tri[64:] = np.tri(n, m, k=1, dtype=bool)[64:]
        allowed = allowed & tri
    s = q @ k.swapaxes(-1, -2) * scale
    if "bias" in inputs:
        s = s + inputs["bias"]
    if "rel_bias" in inputs:
        i, j = np.arange(n)[:, None], np.arange(m)[None, :]
        idx = (j - i + n - 1) if bug == "rel_bias_flipped" else (i - j + m - 1)
        s = s + inputs["rel_bias"][..., idx]
    s = np.where(allowed, s, -np.inf)
    with np.errstate(invalid="ignore", over="ignore"):
        if bug == "no_max_shift":
            e = np.exp(s)
        else:
            c = s.max(-1, keepdims=True, initial=-np.inf)         # M = 0: −inf
            e = np.exp(s - np.where(np.isinf(c), 0, c))
        z = e.sum(-1, keepdims=True)
        p = e / z if bug == "nan_rows" else e / np.where(z > 0, z, 1)
    out = p @ v
    if bug == "float32_math":
        out = (p.astype(np.float32) @ v.astype(np.float32)).astype(out.dtype)
    # backward
    dv = p.swapaxes(-1, -2) @ dout
    dp = dout @ v.swapaxes(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    if bug == "nan_rows":
        ds = np.where(np.isnan(ds), 0.0, ds)                       # only the forward is wrong
    dq = ds @ k * scale
    dk = ds.swapaxes(-1, -2) @ q * (1.0 if bug == "dk_unscaled" else scale)
    grads = {"q": dq, "k": dk, "v": dv}
    if "bias" in inputs:
        shape = inputs["bias"].shape
        db = ds.sum(axis=tuple(range(ds.ndim - len(shape))))
        db = db.sum(axis=tuple(a for a, s_ in enumerate(shape) if s_ == 1), keepdims=True)
        if bug == "bias_reduced_over_heads" and ds.ndim == 4 and len(shape) == 3:
            db = ds.sum(axis=1)                                    # B and H mixed up
        grads["bias"] = ds if bug == "bias_unreduced" else db
    if "rel_bias" in inputs:
        shape = inputs["rel_bias"].shape
        dr = np.zeros(ds.shape[:-2] + (n + m - 1,), dtype=ds.dtype)
        for i in range(n):
            dr[..., i:i + m] += ds[..., i, ::-1]
        grads["rel_bias"] = dr.sum(axis=tuple(range(dr.ndim - len(shape)))).reshape(shape)
    return out, grads


def _bugged(bug):
    def fn(variant, inputs, options, dout):
        return port_full(variant, inputs, options, dout, bug=bug)
    return fn


# ----------------------------------------------------------------------------------------
# tinyeff against its own golden cases
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tinyeff_passes_its_golden_cases(variant, dtype):
    """The default implementation (Numba where it exists) against the float64 reference."""
    report = check_backend(variant, reference_backend, dtype=dtype)
    assert report.ok, report.table(failures_only=True)
    assert {r.quantity for r in report.rows} >= {"out"}


def _impl_backend(impl):
    """tinyeff with a forced ``impl`` (forward, then its own backward) as a backend."""
    def fn(variant, inputs, options, dout):
        mod = VARIANTS[variant]
        dense = [n for n in ("mask", "bias") if n in options or n in inputs]
        if variant == "full" and impl == "blocked" and dense:
            raise NotImplementedError("impl='blocked' takes no dense mask or bias")
        out, ctx = mod.forward(**inputs, **options, impl=impl)
        return out, mod.backward(dout, ctx)
    return fn


IMPL_PAIRS = [(v, i) for v, mod in VARIANTS.items()
              for i in getattr(mod, "IMPLS", ()) if i not in ("auto", "ref")]


@pytest.mark.parametrize("variant,impl", IMPL_PAIRS)
def test_every_fast_implementation_passes_the_golden_cases(variant, impl):
    """Each non-reference impl (numba, blocked) against the float64 golden values."""
    report = check_backend(variant, _impl_backend(impl))
    assert report.ok, report.table(failures_only=True)
    assert any(r.status == OK for r in report.rows)


def test_independent_port_of_full_passes():
    report = check_backend("full", _bugged(None))
    assert report.ok, report.table(failures_only=True)
    assert len(report.cases()) == len(list(make_cases("full")))
    assert all(r.status == OK for r in report.rows)


# ----------------------------------------------------------------------------------------
# Planted bugs: each is caught, where it should be
# ----------------------------------------------------------------------------------------

PLANTED = {
    # bug: (cases that must fail, arrays that must fail there)
    "scale_1_over_d": ({c for c in FULL_CASES if c != "holes_causal"}, {"out"}),
    "bottom_right_causal": ({"causal_rect", "rel_bias_kpad"}, {"out"}),
    "nan_rows": ({"holes_causal", "heads_mask_bias", "large_logits_3d"}, {"out"}),
    "dk_unscaled": (set(FULL_CASES), {"grad k"}),
    "bias_unreduced": ({"bias_head"}, {"grad bias"}),
    "rel_bias_flipped": ({"rel_bias_kpad", "long_causal_rel_bias"}, {"out"}),
    "float32_math": (set(FULL_CASES), {"out"}),
    # the bugs the small example cases alone let through
    "no_max_shift": ({"large_logits_3d"}, {"out"}),
    "rows_past_64": ({"long_causal_rel_bias", "long_causal_rel_bias_f32"}, {"out"}),
    "bias_reduced_over_heads": ({"heads_mask_bias", "heads_mask_bias_f32"}, {"grad bias"}),
}


@pytest.mark.parametrize("bug", list(PLANTED))
def test_planted_bug_is_caught(bug):
    must_fail, arrays = PLANTED[bug]
    report = check_backend("full", _bugged(bug))
    assert not report.ok
    failed = {r.case for r in report.failures()}
    assert must_fail <= failed, f"{bug}: expected failures in {must_fail}, got {failed}"
    for case in must_fail:
        bad = {r.quantity for r in report.failures() if r.case == case}
        assert arrays <= bad, f"{bug}/{case}: {bad}"
    text = report.table(failures_only=True)
    assert "FAIL" in text and ("worst at" in text or "shape" in text)


def test_square_causal_unaffected_by_alignment():
    """Bottom-right and top-left alignment agree when N == M: those cases still pass."""
    report = check_backend("full", _bugged("bottom_right_causal"),
                           cases=["causal", "holes_causal", "bias_head"])
    assert report.ok, report.table(failures_only=True)


def test_bugs_only_the_conformance_cases_catch():
    """The example cases alone pass these ports: logits of unit scale (no overflow without
    the max-subtraction), N ≤ 13 (one tile).  A batch/head mix-up is a shape error with
    B ≠ H (with batch (2, 2) only wrong numbers)."""
    for bug in ("no_max_shift", "rows_past_64"):
        assert check_backend("full", _bugged(bug), cases=FULL_CASES, dtype="float64").ok, bug
        assert not check_backend("full", _bugged(bug), cases=SUITE_CASES).ok, bug
    report = check_backend("full", _bugged("bias_reduced_over_heads"), cases="heads_mask_bias")
    assert "shape (2, 131, 100), expected (3, 131, 100)" in report.table()


# ----------------------------------------------------------------------------------------
# Reporting rules
# ----------------------------------------------------------------------------------------

def test_forward_only_backend():
    def forward_only(variant, inputs, options, dout):
        return port_full(variant, inputs, options, dout)[0]
    report = check_backend("full", forward_only, cases="plain")
    assert report.ok
    assert [r.status for r in report.rows] == [OK, NA, NA, NA]


def test_unsupported_cases_are_skipped_and_errors_reported():
    def no_bias(variant, inputs, options, dout):
        if "bias" in inputs:
            raise NotImplementedError("no bias")
        if options.get("mask") is not None:
            raise RuntimeError("boom")
        return port_full(variant, inputs, options, dout)
    report = check_backend("full", no_bias)
    status = {r.case: r.status for r in report.rows if r.quantity == "call"}
    assert status["bias_head"] == SKIP
    assert status["padmask"] == "ERROR"
    assert not report.ok
    assert "RuntimeError: boom" in report.table()


def test_in_place_modification_and_wrong_dtype_fail():
    def sloppy(variant, inputs, options, dout):
        out, grads = port_full(variant, inputs, options, dout)
        inputs["q"] *= 2
        grads["v"] = grads["v"].astype(np.float32)
        return out, grads
    report = check_backend("full", sloppy, cases="plain")
    bad = {r.quantity: r.note for r in report.failures()}
    assert "modified" in bad["inputs"] and "dtype" in bad["grad v"]


def test_missing_and_extra_gradients_fail():
    def odd(variant, inputs, options, dout):
        out, grads = port_full(variant, inputs, options, dout)
        grads.pop("k")
        grads["scale"] = np.zeros(())
        return out, grads
    report = check_backend("full", odd, cases="plain")
    notes = {r.quantity: r.note for r in report.failures()}
    assert notes["grad k"] == "missing" and "unexpected" in notes["grad scale"]


def test_compare_definitions():
    tol = PARITY[np.dtype(np.float64)]
    b = np.array([1.0, -2.0, 0.0])
    max_abs, max_rel, ratio, status, _ = compare(b + [0, 4e-10, 0], b, tol)
    assert status == FAIL and max_abs == pytest.approx(4e-10) and max_rel == pytest.approx(2e-10)
    assert ratio == pytest.approx(4e-10 / (1e-12 + 2e-10))
    assert compare(b + [1e-11, 0, 0], b, tol)[3] == OK
    assert compare(np.array([1.0, np.nan, 0.0]), b, tol)[3] == FAIL
    assert compare(b[:2], b, tol)[3] == FAIL
    assert compare(b.tolist(), b, tol)[3] == FAIL


def test_tolerance_override_and_float32_goldens():
    report = check_backend("full", _bugged("float32_math"), dtype="float64", tol=(1e-4, 1e-5))
    assert report.ok
    report = check_backend("full", _bugged("float32_math"), dtype="float32")
    assert report.ok, report.table(failures_only=True)


# ----------------------------------------------------------------------------------------
# Through files and the command line, and the demo
# ----------------------------------------------------------------------------------------

BACKEND_FILE = '''
import numpy as np
from tinyeff.attention import VARIANTS

def good(variant, inputs, options, dout):
    out, ctx = VARIANTS[variant].forward(**inputs, **options)
    return out, VARIANTS[variant].backward(dout, ctx)

def bad(variant, inputs, options, dout):
    out, grads = good(variant, inputs, options, dout)
    return out * (1 + 1e-6), grads
'''


def test_cli_check(tmp_path, capsys):
    write_golden(tmp_path / "g", ["full"])
    assert check_cli.main([str(tmp_path / "g"), "--against",
                           "tinyeff.testing.conformance:reference_backend"]) == 0
    assert "float64, float32" in capsys.readouterr().out
    backend = tmp_path / "my_backend.py"
    backend.write_text(BACKEND_FILE)
    assert check_cli.main([str(tmp_path / "g"), "--against", f"{backend}:good"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert check_cli.main([str(tmp_path / "g"), "--against", f"{backend}:bad",
                           "--failures-only"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "grad q" not in out
    assert check_cli.main([str(tmp_path / "g"), "--against", f"{backend}:bad",
                           "--rtol", "1e-5", "--dtype", "float64"]) == 0
    assert check_cli.main([str(tmp_path / "g"), "--against",
                           "tinyeff.testing.conformance:reference_backend",
                           "--cases", "plain", "full/causal"]) == 0
    capsys.readouterr()
    assert check_cli.main([str(tmp_path / "g"), "--against", f"{backend}:nothing"]) == 2
    assert check_cli.main([str(tmp_path / "missing"), "--against", f"{backend}:good"]) == 2
    (tmp_path / "g" / "full" / "plain.npz").write_bytes(b"garbage")
    assert check_cli.main([str(tmp_path / "g"), "--against", f"{backend}:good"]) == 2
    assert "SHA-256" in capsys.readouterr().err


def test_wrong_port_demo_finds_its_bugs(capsys):
    spec = importlib.util.spec_from_file_location("wrong_performer",
                                                  ROOT / "demos" / "wrong_performer.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.main([]) == 0
    out = capsys.readouterr().out
    assert "FAIL" in out and "PASS" in out


# ----------------------------------------------------------------------------------------
# The checker says what went wrong
# ----------------------------------------------------------------------------------------

def _deep_failure(x):
    raise RuntimeError(f"kernel launch failed for shape {x.shape}")


def test_the_first_exception_is_shown_with_its_traceback():
    def crashing(variant, inputs, options, dout):
        if "bias" in inputs:
            _deep_failure(inputs["bias"])
        return port_full(variant, inputs, options, dout)
    report = check_backend("full", crashing, dtype="float64")
    errors = report.errors()
    assert [r.case for r in errors] == ["bias_head", "bias_full", "heads_mask_bias"]
    text = report.table()
    assert text.count("Traceback (most recent call last)") == 1
    assert "full/bias_head: the backend raised" in text
    assert "_deep_failure" in text and "in crashing" in text and "check_case" not in text
    assert "2 more errors" in text
    assert report.table(tracebacks="all").count("Traceback") == 3
    assert "Traceback" not in report.table(tracebacks="none")
    with pytest.raises(RuntimeError, match="kernel launch failed"):
        check_backend("full", crashing, dtype="float64", raise_errors=True)


def test_a_backend_with_the_wrong_signature_is_told_the_right_one(tmp_path, capsys):
    def torch_style(q, k, v, **options):
        return q
    with pytest.raises(TypeError) as info:
        check_backend("full", torch_style, cases="plain")
    assert SIGNATURE in str(info.value) and "torch_style(q, k, v, **options)" in str(info.value)
    case = next(make_cases("full", "float64", examples_only=True))
    with pytest.raises(TypeError, match="variant, inputs, options, dout"):
        check_case(case, torch_style)
    write_golden(tmp_path / "g", ["full"], dtype="float64", examples_only=True)
    (tmp_path / "b.py").write_text("def fn(q, k, v):\n    return q\n")
    assert check_cli.main([str(tmp_path / "g"), "--against", f"{tmp_path / 'b.py'}:fn"]) == 2
    assert "variant, inputs, options, dout" in capsys.readouterr().err

    class Builtinish:                                              # signature not inspectable
        __signature__ = None

        def __call__(self, *args):
            return sum(*args)                                      # TypeError raised here
    report = check_case(case, Builtinish())
    assert report.rows[0].status == ERROR and "TypeError" in report.rows[0].note


def test_dtype_is_honoured_with_a_golden_directory(tmp_path):
    write_golden(tmp_path / "both", ["full"], examples_only=True)
    for dtype in ("float32", "float64"):
        report = check_backend("full", reference_backend, golden=tmp_path / "both",
                               dtype=dtype)
        assert report.ok and report.dtype == dtype
        assert {r.dtype for r in report.rows} == {dtype}
        assert len(report.cases()) == len(FULL_CASES)
    report = check_backend("full", reference_backend, golden=tmp_path / "both")
    assert report.dtype == "float64, float32" and len(report.cases()) == 2 * len(FULL_CASES)
    write_golden(tmp_path / "f64", ["full"], dtype="float64", examples_only=True)
    with pytest.raises(ValueError, match="no float32 cases.*float64"):
        check_backend("full", reference_backend, golden=tmp_path / "f64", dtype="float32")
    report = check_backend("full", reference_backend, dtype="float32", cases="plain_f32")
    assert report.ok and report.dtype == "float32"


def test_got_and_want_are_printed_with_the_digits_that_differ():
    tol = PARITY[np.dtype(np.float64)]
    b = np.array([1.0228, 2.0])
    note = compare(b * (1 + 1e-9), b, tol)[4]
    got, want = note.split("got ")[1].split(", want ")
    want = want.split(" ")[0]
    assert float(got) != float(want) and got != want
    assert abs(float(got) / float(want) - 1 - 1e-9) < 1e-12
    tol32 = PARITY[np.dtype(np.float32)]
    b32 = np.array([1.0228], dtype=np.float32)
    note = compare(b32 * np.float32(1.001), b32, tol32)[4]
    assert "got 1.02382" in note and "want 1.0228" in note


def test_unknown_case_names_list_the_valid_ones(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown cases \\['nope'\\].*full/plain.*full/plain_f32"):
        check_backend("full", reference_backend, cases=["plain", "nope"])
    write_golden(tmp_path, ["full"], dtype="float64", examples_only=True)
    assert check_cli.main([str(tmp_path), "--against",
                           "tinyeff.testing.conformance:reference_backend",
                           "--cases", "nope"]) == 2
    assert "full/causal_rect" in capsys.readouterr().err


def test_check_case_report_prints_its_table():
    case = next(make_cases("full", "float64", examples_only=True))
    report = check_case(case, _bugged("dk_unscaled"))
    rows = list(report)
    assert len(rows) == len(report) == 4 and not report.ok
    text = str(report)
    assert text.splitlines()[0].split()[:3] == ["variant", "case", "array"]
    assert "grad k" in text and "FAIL" in text and "worst at" in text
    assert "grad k" in str(report.failures()[0])
    with pytest.raises(AssertionError, match="(?s)full/plain .*grad k"):
        case.check(_bugged("dk_unscaled"))
    assert case.check(_bugged(None)).ok


def test_cli_prints_the_first_traceback_or_all_of_them(tmp_path, capsys):
    write_golden(tmp_path / "g", ["full"], dtype="float64", examples_only=True)
    (tmp_path / "crash.py").write_text(
        "def helper(x):\n    raise ValueError('bad shape ' + str(x.shape))\n\n"
        "def fn(variant, inputs, options, dout):\n    return helper(inputs['q'])\n")
    args = [str(tmp_path / "g"), "--against", f"{tmp_path / 'crash.py'}:fn"]
    assert check_cli.main(args) == 1
    out = capsys.readouterr().out
    assert out.count("Traceback (most recent call last)") == 1 and "in helper" in out
    assert "ValueError: bad shape (2, 2, 7, 5)" in out
    assert check_cli.main([*args, "--traceback"]) == 1
    assert capsys.readouterr().out.count("Traceback (most recent call last)") == len(FULL_CASES)
