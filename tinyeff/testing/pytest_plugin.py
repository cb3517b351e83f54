"""pytest plugin: one test per golden case for a port, with the report table on failure.

Registered as the ``pytest11`` entry point ``tinyeff`` (setup.cfg), so it is active in every
pytest run where tinyeff is installed; without installing, enable it with
``-p tinyeff.testing.pytest_plugin`` or ``pytest_plugins = ["tinyeff.testing.pytest_plugin"]``
in a conftest.py.  Importing it imports neither Numba nor the attention variants; the cases
are computed only for tests that ask for them.

A test that takes the ``golden_case`` fixture is parametrized over the golden cases, one
test per case, the case as the test id (``window/plain``; a float32 case whose name is also
a float64 case's gets ``-float32`` appended)::

    @pytest.mark.golden(variants="window")            # optional: which cases
    def test_port(golden_case):
        golden_case.check(my_backend)                 # fails with the report table

Which cases (command-line options override the marker):

* ``@pytest.mark.golden(variants=..., golden=DIR, dtypes=..., cases=...)``: variants (a name,
  a comma-separated string or a list), a golden directory written by ``python -m tinyeff
  golden`` (default: the default suite computed in memory), dtypes (default: float64 and
  float32), case names;
* ``--golden-variants a,b`` (intersected with the marker's variants), ``--golden-dir DIR``,
  ``--golden-dtype float64|float32``.

Without the fixture, :func:`golden_params` gives the same cases to ``pytest.mark.parametrize``::

    from tinyeff.testing.pytest_plugin import golden_params

    @pytest.mark.parametrize("case", golden_params("window"))
    def test_port(case):
        case.check(my_backend)
"""

from __future__ import annotations

import functools

import pytest

DTYPES = ("float64", "float32")


class GoldenCheck:
    """One golden case (``.case``, a :class:`~tinyeff.testing.golden.GoldenCase`) and
    :meth:`check`, which runs a backend on it inside a test."""

    def __init__(self, case, id: str | None = None):
        self.case = case
        self.id = id or case.key

    variant = property(lambda self: self.case.variant)
    name = property(lambda self: self.case.name)
    dtype = property(lambda self: self.case.dtype)

    def check(self, backend, *, backward: bool = True, tol=None):
        """Run ``backend(variant, inputs, options, dout)`` on the case and compare.

        Fails the test with the report table (every compared array, its errors and what is
        wrong) when anything differs; skips it when the backend raises
        ``NotImplementedError``.  Returns the :class:`ConformanceReport` when it passes.
        """
        from .conformance import SKIP, ConformanceReport, check_case

        rows = list(check_case(self.case, backend, tol=tol, backward=backward))
        report = ConformanceReport(rows=rows, dtype=self.case.dtype)
        if not report.ok:
            pytest.fail(f"{self.id}: the backend differs from the golden values\n"
                        f"{report.table()}", pytrace=False)
        if rows and all(r.status == SKIP for r in rows):
            pytest.skip(f"{self.id}: {rows[0].note}")
        return report

    def __repr__(self) -> str:
        return f"GoldenCheck({self.id})"


def _names(value) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    return tuple(n for v in value for n in str(v).split(",") if n)


@functools.cache
def _cases(variants, golden, dtypes, cases):
    from .golden import load_golden, make_cases

    if golden is not None:
        found = load_golden(golden).select(list(variants) if variants else None)
        found = [c for c in found if dtypes is None or c.dtype in dtypes]
    else:
        found = [c for dtype in (dtypes or DTYPES)
                 for c in make_cases(list(variants) if variants else None, dtype)]
    if cases:
        found = [c for c in found if c.name in cases or c.key in cases]
    return tuple(found)


def golden_params(variants=None, *, golden=None, dtypes=None, cases=None) -> list:
    """``pytest.param(GoldenCheck, id="variant/case")`` for every selected golden case
    (``-float32`` appended to a float32 case named like a float64 one).

    variants : name(s) or None (all); golden : a golden directory or None (the default suite
    in memory); dtypes : ``"float64"``, ``"float32"``, a list, or None (both; a golden
    directory holds one dtype); cases : case names (``"plain"`` or ``"window/plain"``).
    """
    golden = None if golden is None else str(golden)
    found = _cases(_names(variants), golden, _names(dtypes), _names(cases))
    keys = [c.key for c in found]
    params = []
    for case in found:
        ident = case.key                                           # "window/plain"
        if keys.count(ident) > 1 and case.dtype != "float64":
            ident = f"{ident}-{case.dtype}"                        # same name in two dtypes
        params.append(pytest.param(GoldenCheck(case, ident), id=ident))
    return params


def pytest_addoption(parser):
    group = parser.getgroup("tinyeff", "tinyeff golden cases (the golden_case fixture)")
    group.addoption("--golden-dir", metavar="DIR", default=None,
                    help="golden directory for golden_case (default: the default suite, "
                         "computed in memory)")
    group.addoption("--golden-variants", metavar="NAMES", default=None,
                    help="only these variants (comma-separated) for golden_case")
    group.addoption("--golden-dtype", choices=DTYPES, default=None,
                    help="only this dtype for golden_case (default: both)")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "golden(variants=None, golden=None, dtypes=None, cases=None): the golden "
        "cases a test taking the golden_case fixture runs (tinyeff.testing.pytest_plugin)")


def pytest_generate_tests(metafunc):
    if "golden_case" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("golden")
    kwargs = dict(marker.kwargs) if marker is not None else {}
    if marker is not None and marker.args:
        kwargs.setdefault("variants", marker.args[0])
    variants = _names(kwargs.get("variants"))
    cli = _names(metafunc.config.getoption("--golden-variants"))
    if cli:
        variants = cli if variants is None else tuple(v for v in variants if v in cli)
        if not variants:
            metafunc.parametrize("golden_case", [], indirect=True)
            return
    golden = metafunc.config.getoption("--golden-dir") or kwargs.get("golden")
    dtypes = metafunc.config.getoption("--golden-dtype") or kwargs.get("dtypes")
    metafunc.parametrize("golden_case", golden_params(variants, golden=golden, dtypes=dtypes,
                                                      cases=kwargs.get("cases")),
                         indirect=True)


@pytest.fixture
def golden_case(request):
    """One golden case (a :class:`GoldenCheck`): ``golden_case.check(backend)``."""
    if not hasattr(request, "param"):
        pytest.skip("golden_case is parametrized by tinyeff.testing.pytest_plugin")
    return request.param
