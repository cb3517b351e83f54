"""The conformance harness: run another backend over the golden cases and say where it differs.

A *backend function* is what you write around your port (CUDA, PyTorch, JAX, C, ...)::

    def my_backend(variant: str, inputs: dict, options: dict, dout: np.ndarray):
        ...
        return out, grads          # grads: {name: ndarray} for every input, or None

* ``variant``: the tinyeff variant name (``"full"``, ``"performer"``, ...).
* ``inputs``: the differentiable arrays by name (``q``, ``k``, ``v``, ``bias``, ...), NumPy
  arrays of the golden dtype (fresh copies: modifying them is reported, not harmful).
* ``options``: every other argument of tinyeff's ``forward``, exactly as tinyeff was called:
  Python scalars, strings, None, NumPy arrays (boolean masks, random features, rotations) and
  ``scipy.sparse`` CSR matrices (``.toarray()`` gives the dense boolean mask).
* ``dout``: the upstream gradient of the output, same shape and dtype as ``out``.
* Return ``(out, grads)``: ``out`` a NumPy array, ``grads`` a dict with the gradient of
  every key of ``inputs`` (same shapes and dtypes), or ``None`` for a forward-only backend.
  Returning a bare array means forward only too.  Raise ``NotImplementedError`` for a case
  your backend does not support: it is reported as skipped, not failed.

:func:`check_backend` compares ``out`` and every gradient with the golden values.  For each
array it reports

* ``max abs``: max_i |a_i − b_i|;
* ``max rel``: max_i |a_i − b_i| / max_i |b_i| (the error relative to the array's scale);
* ``ratio``: max_i |a_i − b_i| / (atol + rtol·|b_i|).  An array passes when ratio ≤ 1, i.e.
  ``numpy.allclose(a, b, rtol, atol)`` entry by entry, with (rtol, atol) from
  :data:`tinyeff.testing.tolerances.PARITY` for the case's dtype (float64: 1e-10 / 1e-12;
  float32: 1e-4 / 1e-5).  A wrong shape or dtype, a NaN where the golden value is finite, a
  missing or extra gradient all fail.

The result is a :class:`ConformanceReport`: ``report.ok``, ``report.rows`` (one
:class:`Row` per compared array; iterating over the report gives them), ``str(report)``
(the table, followed by the traceback of the first exception the backend raised) and
``report.failures()``.  :func:`check_case` does the same for one case (what a pytest
parametrization over cases calls).  A backend that cannot take the four arguments above is
a ``TypeError`` naming :data:`SIGNATURE`; ``raise_errors=True`` re-raises the backend's
first exception instead of reporting it.  ``python -m tinyeff check DIR --against
module:function`` does the same from a shell.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import traceback as _traceback
from collections.abc import Callable, Iterable

import numpy as np
import scipy.sparse as sp

from .golden import Golden, GoldenCase, load_golden, make_cases
from .tolerances import PARITY, Tol

OK, FAIL, ERROR, SKIP, NA = "ok", "FAIL", "ERROR", "skip", "n/a"

#: how a backend is called (quoted by the errors about a backend's signature)
SIGNATURE = "fn(variant, inputs, options, dout) -> (out, grads or None)"


@dataclasses.dataclass
class Row:
    """One compared array (or one case that could not be compared)."""

    variant: str
    case: str
    quantity: str                 # "out", "grad q", ..., or "call" / "inputs"
    shape: tuple | None
    max_abs: float
    max_rel: float
    ratio: float                  # max |a − b| / (atol + rtol |b|); passes when <= 1
    rtol: float
    atol: float
    status: str                   # ok | FAIL | ERROR | skip | n/a
    note: str = ""
    dtype: str = ""               # the golden case's dtype
    traceback: str = ""           # ERROR rows: where the backend raised

    @property
    def failed(self) -> bool:
        return self.status in (FAIL, ERROR)

    def __str__(self) -> str:
        return ConformanceReport([self], self.dtype).table(summary=False)


@dataclasses.dataclass
class ConformanceReport:
    """Per-array comparison rows of :func:`check_backend` or :func:`check_case`.

    ``str(report)`` is the table (with the traceback of the first backend error); iterating
    over a report gives its rows.
    """

    rows: list[Row]
    dtype: str                    # the dtypes of the compared cases, e.g. "float64, float32"

    @property
    def ok(self) -> bool:
        return not any(r.failed for r in self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def failures(self) -> list[Row]:
        return [r for r in self.rows if r.failed]

    def errors(self) -> list[Row]:
        return [r for r in self.rows if r.status == ERROR]

    def cases(self) -> list[str]:
        return list(dict.fromkeys(f"{r.variant}/{r.case}" for r in self.rows))

    def failed_cases(self) -> list[str]:
        return list(dict.fromkeys(f"{r.variant}/{r.case}" for r in self.rows if r.failed))

    def summary(self) -> str:
        count = {s: sum(r.status == s for r in self.rows) for s in (OK, FAIL, ERROR, SKIP, NA)}
        verdict = "PASS" if self.ok else "FAIL"
        return (f"{verdict}: {len(self.cases())} cases, {count[OK]} arrays ok, {count[FAIL]} "
                f"failed, {count[ERROR]} errors, {count[SKIP]} skipped, {count[NA]} not "
                f"returned ({self.dtype}; pass when |a−b| ≤ atol + rtol·|b| everywhere)")

    def table(self, failures_only: bool = False, tracebacks: str = "first",
              summary: bool = True) -> str:
        """The table; ``tracebacks``: "first" (of the first backend error), "all", "none"."""
        if tracebacks not in ("first", "all", "none"):
            raise ValueError(f"tracebacks must be 'first', 'all' or 'none', got {tracebacks!r}")
        rows = self.failures() if failures_only else self.rows
        cells = [[r.variant, r.case, r.quantity,
                  "" if r.shape is None else str(tuple(r.shape)).replace(" ", ""),
                  _fmt(r.max_abs), _fmt(r.max_rel), _fmt(r.ratio), r.status, r.note]
                 for r in rows]
        head = ["variant", "case", "array", "shape", "max abs", "max rel", "ratio", "status",
                "note"]
        width = [max(len(str(c)) for c in col) for col in zip(head, *cells)]
        right = (4, 5, 6)                                          # numbers align right

        def line(c):
            return "  ".join(str(x).rjust(w) if i in right else str(x).ljust(w)
                             for i, (x, w) in enumerate(zip(c, width))).rstrip()

        lines = [line(head), "-" * len(line(head))] + [line(c) for c in cells]
        if summary:
            lines.append(self.summary())
        errors = [r for r in self.errors() if r.traceback]
        if tracebacks == "first":
            errors = errors[:1]
        elif tracebacks == "none":
            errors = []
        for r in errors:
            lines += ["", f"{r.variant}/{r.case}: the backend raised", r.traceback.rstrip()]
        if tracebacks == "first" and len(self.errors()) > 1:
            lines.append(f"({len(self.errors()) - 1} more errors: table(tracebacks='all') or "
                         "`python -m tinyeff check --traceback` shows every traceback)")
        return "\n".join(lines)

    format = table

    def __str__(self) -> str:
        return self.table()


def _fmt(x: float) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1e}"


def _digits(got: float, want: float, dtype) -> tuple[str, str]:
    """``got`` and ``want`` with as many significant digits as it takes to tell them apart
    (at least 6, at most what the golden dtype holds: 17 for float64, 9 for float32)."""
    most = 9 if np.dtype(dtype) == np.float32 else 17
    for p in range(6, most + 1):
        g, w = f"{got:.{p}g}", f"{want:.{p}g}"
        if g != w:
            return g, w
    return f"{got:.{most}g}", f"{want:.{most}g}"


def compare(actual, desired: np.ndarray, tol: Tol) -> tuple[float, float, float, str, str]:
    """``(max_abs, max_rel, ratio, status, note)`` of ``actual`` against ``desired``."""
    nan = float("nan")
    if not isinstance(actual, np.ndarray):
        return nan, nan, nan, FAIL, f"returned {type(actual).__name__}, expected numpy.ndarray"
    if actual.shape != desired.shape:
        return nan, nan, nan, FAIL, f"shape {actual.shape}, expected {desired.shape}"
    notes = []
    if actual.dtype != desired.dtype:
        notes.append(f"dtype {actual.dtype}, expected {desired.dtype}")
        if actual.dtype.kind not in "fiub":
            return nan, nan, nan, FAIL, notes[0]
    if desired.size == 0:
        return 0.0, 0.0, 0.0, (FAIL if notes else OK), "; ".join(notes)
    a = actual.astype(np.float64)
    b = desired.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(a - b)                                       # (shape of the array)
        same_nonfinite = (a == b) | (np.isnan(a) & np.isnan(b))    # inf == inf, nan vs nan
        diff = np.where(same_nonfinite, 0.0, diff)
        diff = np.where(np.isnan(diff), np.inf, diff)              # a NaN where b is not
        bound = tol.atol + tol.rtol * np.abs(np.where(np.isfinite(b), b, 0.0))
        excess = diff / bound
    max_abs = float(diff.max())
    scale = float(np.max(np.abs(b[np.isfinite(b)]), initial=0.0))
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    ratio = float(excess.max())
    n_nan = int(np.count_nonzero(np.isnan(a) & ~np.isnan(b)))
    if n_nan:
        notes.append(f"{n_nan} NaN where the golden value is a number")
    status = OK if ratio <= 1 and not notes else FAIL
    if ratio > 1:
        bad = int(np.count_nonzero(excess > 1))
        idx = np.unravel_index(int(np.argmax(excess)), desired.shape)
        idx = tuple(int(i) for i in idx)
        got, want = _digits(a[idx], b[idx], desired.dtype)
        notes.append(f"{bad}/{desired.size} entries off; worst at {idx}: got {got}, "
                     f"want {want} (diff {a[idx] - b[idx]:.2e})")
    return max_abs, max_rel, ratio, status, "; ".join(notes)


def _tol_for(tol, dtype: str) -> Tol:
    if tol is None:
        return PARITY[np.dtype(dtype)]
    if isinstance(tol, Tol):
        return tol
    if isinstance(tol, dict):
        return tol[np.dtype(dtype)]
    rtol, atol = tol
    return Tol(float(rtol), float(atol))


def _copy_option(x):
    if isinstance(x, np.ndarray) or sp.issparse(x):
        return x.copy()
    return copy.deepcopy(x)


def _select(case_list: list[GoldenCase], names) -> list[GoldenCase]:
    if names is None:
        return case_list
    names = [names] if isinstance(names, str) else list(names)
    valid = {c.name for c in case_list} | {c.key for c in case_list}
    unknown = [n for n in names if n not in valid]
    if unknown:
        listing = ", ".join(dict.fromkeys(c.key for c in case_list))
        raise ValueError(f"unknown cases {unknown}; valid names (NAME or VARIANT/NAME): "
                         f"{listing}")
    return [c for c in case_list if c.name in names or c.key in names]


def _check_signature(fn: Callable) -> None:
    """A ``TypeError`` naming :data:`SIGNATURE` when ``fn`` cannot take four positional
    arguments (checked before any case runs, when Python can tell)."""
    if not callable(fn):
        raise TypeError(f"the backend must be a callable {SIGNATURE}, got "
                        f"{type(fn).__name__}")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):                                # builtins, C callables
        return
    try:
        sig.bind("variant", {}, {}, None)
    except TypeError as e:
        name = getattr(fn, "__qualname__", type(fn).__name__)
        raise TypeError(f"backend {name}{sig} cannot be called as {SIGNATURE}: {e}. "
                        "Wrap a framework function fn(q, k, v, **options) in a function of "
                        "that signature (see tinyeff.testing.conformance:reference_backend)"
                        ) from None


def _backend_traceback(e: BaseException) -> str:
    """The traceback of ``e`` from the backend's frame on (the harness frame dropped)."""
    tb = e.__traceback__
    if tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return "".join(_traceback.format_exception(type(e), e, tb))


def check_case(case: GoldenCase, fn: Callable, *, tol=None, backward: bool = True,
               raise_errors: bool = False) -> ConformanceReport:
    """Run ``fn`` on one golden case and compare.

    Returns a :class:`ConformanceReport` of this case's rows (``report.ok``; ``str(report)``
    is the table).  An exception of the backend is an ``ERROR`` row with its traceback, or
    is re-raised with ``raise_errors=True``; ``NotImplementedError`` is a ``skip`` row.
    A backend that cannot take ``(variant, inputs, options, dout)`` is a ``TypeError``
    naming that signature.
    """
    _check_signature(fn)
    t = _tol_for(tol, case.dtype)

    def row(quantity, shape, vals=(math.nan, math.nan, math.nan), status=OK, note="",
            tb=""):
        return Row(case.variant, case.name, quantity, shape, *vals, t.rtol, t.atol, status,
                   note, case.dtype, tb)

    def report(rows):
        return ConformanceReport(rows=rows, dtype=case.dtype)

    inputs = {k: x.copy() for k, x in case.args.items()}
    options = {k: _copy_option(x) for k, x in case.options.items()}
    dout = case.dout.copy()
    try:
        result = fn(case.variant, inputs, options, dout)
    except NotImplementedError as e:
        if raise_errors:
            raise
        return report([row("call", None, status=SKIP, note=f"NotImplementedError: {e}")])
    except Exception as e:  # noqa: BLE001 - a backend's failure is a result to report
        if raise_errors:
            raise
        note = f"{type(e).__name__}: {e}"
        if isinstance(e, TypeError) and (e.__traceback__ is None
                                         or e.__traceback__.tb_next is None):
            note += f" (the backend is called as {SIGNATURE})"    # raised by the call itself
        return report([row("call", None, status=ERROR, note=note, tb=_backend_traceback(e))])
    if isinstance(result, np.ndarray):
        out, grads = result, None
    elif isinstance(result, (tuple, list)) and len(result) == 2:
        out, grads = result
    else:
        return report([row("call", None, status=ERROR,
                           note=f"returned {type(result).__name__}; expected (out, grads or "
                                f"None): the backend is called as {SIGNATURE}")])
    rows = []
    max_abs, max_rel, ratio, status, note = compare(out, case.out, t)
    rows.append(row("out", case.out.shape, (max_abs, max_rel, ratio), status, note))
    if backward:
        if grads is None:
            rows += [row(f"grad {n}", case.grads[n].shape, status=NA, note="not returned")
                     for n in case.grads]
        elif not isinstance(grads, dict):
            rows.append(row("grads", None, status=FAIL,
                            note=f"grads is a {type(grads).__name__}, expected a dict"))
        else:
            for n, want in case.grads.items():
                if n not in grads:
                    rows.append(row(f"grad {n}", want.shape, status=FAIL, note="missing"))
                    continue
                max_abs, max_rel, ratio, status, note = compare(grads[n], want, t)
                rows.append(row(f"grad {n}", want.shape, (max_abs, max_rel, ratio), status,
                                note))
            for n in sorted(set(grads) - set(case.grads)):
                rows.append(row(f"grad {n}", None, status=FAIL,
                                note=f"unexpected gradient (inputs are {list(case.grads)})"))
    changed = [k for k, x in inputs.items() if not np.array_equal(x, case.args[k],
                                                                 equal_nan=True)]
    if not np.array_equal(dout, case.dout):
        changed.append("dout")
    if changed:
        rows.append(row("inputs", None, status=FAIL,
                        note=f"the backend modified {changed} in place"))
    return report(rows)


def check_backend(variant, fn: Callable, *, golden=None, dtype=None, seed: int = 0,
                  cases: Iterable[str] | str | None = None, backward: bool = True, tol=None,
                  print_table: bool = False, raise_errors: bool = False,
                  size: int = 1) -> ConformanceReport:
    """Run another backend's ``fn`` over the golden cases of ``variant`` and compare.

    Parameters
    ----------
    variant : a variant name, a list of names, or None (every variant in ``golden``).
    fn : ``fn(variant, inputs, options, dout) -> (out, grads or None)`` (module docstring);
        a callable that cannot take those four arguments is a ``TypeError`` naming them.
    golden : a directory written by ``python -m tinyeff golden`` (verified on load), a loaded
        :class:`~tinyeff.testing.golden.Golden`, a list of cases, or None: compute the cases
        in memory exactly as ``golden`` would write them, for ``dtype``, ``seed``, ``size``.
    dtype : "float64", "float32", or None: every dtype (the default suite has both).  With
        a directory, only its cases of that dtype; a ``ValueError`` if it holds none.
    cases : only these case names (``"plain"``, ``"plain_f32"`` or ``"full/plain"``); an
        unknown name is a ``ValueError`` listing the valid ones.
    backward : compare gradients too (a forward-only backend's are reported as not returned).
    tol : None (PARITY for each case's dtype), a :class:`Tol`, ``(rtol, atol)`` or
        {dtype: Tol}.
    print_table : print the table before returning.
    raise_errors : re-raise the first exception of the backend instead of reporting it.
    """
    _check_signature(fn)
    if golden is None:
        case_list = list(make_cases(variant, dtype, seed, size=size))
    else:
        if isinstance(golden, (list, tuple)):
            case_list = list(golden)
            if dtype is not None:
                case_list = [c for c in case_list if c.dtype == np.dtype(dtype).name]
        else:
            if not isinstance(golden, Golden):
                golden = load_golden(golden)
            case_list = golden.select(variant, dtype)
        if variant is not None:
            wanted = [variant] if isinstance(variant, str) else list(variant)
            case_list = [c for c in case_list if c.variant in wanted]
    case_list = _select(case_list, cases)
    if not case_list:
        raise ValueError(f"no golden cases selected (variant={variant!r}, dtype={dtype!r}, "
                         f"cases={cases!r})")
    rows = []
    for case in case_list:
        rows += check_case(case, fn, tol=tol, backward=backward, raise_errors=raise_errors)
    dtypes = ", ".join(dict.fromkeys(c.dtype for c in case_list))
    report = ConformanceReport(rows=rows, dtype=dtypes)
    if print_table:
        print(report.table())
    return report


def reference_backend(variant: str, inputs: dict, options: dict, dout: np.ndarray):
    """tinyeff itself as a backend (its default ``impl``: Numba kernels where they exist).

    ``python -m tinyeff check DIR --against tinyeff.testing.conformance:reference_backend``
    checks this installation against a golden directory; it is also the template of a
    backend function.
    """
    from ..attention import VARIANTS

    mod = VARIANTS[variant]
    out, ctx = mod.forward(**inputs, **options)
    return out, mod.backward(dout, ctx)
