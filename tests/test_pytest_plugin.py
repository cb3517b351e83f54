"""tinyeff.testing.pytest_plugin, run through pytest's own ``pytester``.

The inner runs enable the plugin with ``-p`` (the ``pytest11`` entry point does the same for
an installed tinyeff) and use the independent dense ports of tinyeff.testing.ports as the
backend under test, correct and with a planted bug.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tinyeff.testing.golden import make_cases, write_golden
from tinyeff.testing.pytest_plugin import GoldenCheck, golden_params

pytest_plugins = ["pytester"]

PLUGIN = ["-p", "tinyeff.testing.pytest_plugin"]

HEADER = """
import functools
import pytest
from tinyeff.testing.ports import backend, port_backend
buggy = functools.partial(port_backend, bug="ef_swapped")
"""


def test_one_test_per_case_with_the_case_as_id(pytester):
    pytester.makepyfile(HEADER + """
@pytest.mark.golden(variants="linformer")
def test_port(golden_case):
    golden_case.check(backend)
""")
    result = pytester.runpytest(*PLUGIN, "-v")
    names = [c.name for dtype in ("float64", "float32") for c in make_cases("linformer", dtype)]
    result.assert_outcomes(passed=len(names))
    result.stdout.fnmatch_lines(["*test_port?linformer/plain? PASSED*",
                                 "*test_port?linformer/plain[-_]f*32? PASSED*"])


def test_failure_message_is_the_report_table(pytester):
    pytester.makepyfile(HEADER + """
@pytest.mark.golden("linformer", dtypes="float64", cases="plain")
def test_port(golden_case):
    golden_case.check(buggy)
""")
    result = pytester.runpytest(*PLUGIN)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*linformer/plain: the backend differs from the golden values*",
        "*variant*case*array*shape*max abs*max rel*ratio*status*",
        "*linformer*plain*out*FAIL*",
        "*FAIL: 1 cases*",
    ])
    assert "Traceback" not in result.stdout.str()


def test_command_line_selects_variants_dtype_and_directory(pytester, tmp_path):
    pytester.makepyfile(HEADER + """
def test_port(golden_case):
    golden_case.check(backend)
""")
    n_lsh = len(list(make_cases("lsh", "float32")))
    result = pytester.runpytest(*PLUGIN, "--golden-variants", "lsh",
                                "--golden-dtype", "float32")
    result.assert_outcomes(passed=n_lsh)
    write_golden(tmp_path / "g", ["local"], dtype="float32")
    n_local = len(list(make_cases("local", "float32")))
    result = pytester.runpytest(*PLUGIN, "--golden-dir", str(tmp_path / "g"), "-v")
    result.assert_outcomes(passed=n_local)
    result.stdout.fnmatch_lines(["*test_port?local/plain*? PASSED*"])


def test_command_line_variants_intersect_the_marker(pytester):
    pytester.makepyfile(HEADER + """
@pytest.mark.golden(variants="linformer")
def test_port(golden_case):
    golden_case.check(backend)
""")
    result = pytester.runpytest(*PLUGIN, "--golden-variants", "full")
    result.assert_outcomes(skipped=1)                              # empty parameter set


def test_not_implemented_is_a_skip(pytester):
    pytester.makepyfile(HEADER + """
def forward_only_full(variant, inputs, options, dout):
    raise NotImplementedError("only window here")

@pytest.mark.golden(variants="full", dtypes="float64", cases=["plain", "causal"])
def test_port(golden_case):
    golden_case.check(forward_only_full)
""")
    result = pytester.runpytest(*PLUGIN, "-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["*full/plain: NotImplementedError: only window here*"])


def test_parametrize_helper_without_the_fixture(pytester):
    pytester.makepyfile(HEADER + """
from tinyeff.testing.pytest_plugin import golden_params

@pytest.mark.parametrize("case", golden_params("linformer", dtypes="float64"))
def test_port(case):
    case.check(backend)

@pytest.mark.parametrize("case", golden_params("linformer", dtypes="float64",
                                               cases="plain,kpad"))
def test_buggy(case):
    case.check(buggy)
""")
    n = len(list(make_cases("linformer", "float64")))
    result = pytester.runpytest(*PLUGIN)
    result.assert_outcomes(passed=n, failed=2)


def test_golden_params_objects():
    params = golden_params("window")
    ids = [p.id for p in params]
    assert len(set(ids)) == len(ids) and all(i.startswith("window/") for i in ids)
    assert {p.values[0].dtype for p in params} == {"float64", "float32"}
    (plain,) = golden_params("window", dtypes="float64", cases="plain")
    check = plain.values[0]
    assert isinstance(check, GoldenCheck) and check.id == plain.id == "window/plain"
    assert check.case.variant == "window" and check.dtype == "float64"
    assert golden_params("window", cases="nope") == []


def test_importing_the_plugin_does_not_import_numba():
    """The plugin loads in every pytest run of an installed tinyeff; Numba must stay out
    (tests/conftest.py configures Numba through environment variables before its import)."""
    code = ("import sys, tinyeff.testing.pytest_plugin; "
            "bad = [m for m in ('numba', 'tinyeff.attention') if m in sys.modules]; "
            "sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("case", golden_params("sparse", dtypes="float64", cases="local"))
def test_helper_works_in_this_suite(case):
    from tinyeff.testing.ports import backend

    report = case.check(backend)
    assert report.ok
