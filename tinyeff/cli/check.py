"""``python -m tinyeff check DIR --against module:function``: test another backend.

Loads the golden directory DIR (written by ``python -m tinyeff golden``; every file is
verified against the manifest's SHA-256), calls your backend function on every case and
prints, per case, the max absolute and relative error of the output and of each gradient
against the tolerance of the case's dtype, the worst entry (got/want with enough digits to
tell them apart) and the traceback of the first exception your backend raised (``--traceback``:
of every one).  Exit status 0 when everything agrees, 1 when something differs, 2 when the
files or the arguments are wrong (a backend that cannot be called as
``fn(variant, inputs, options, dout)``, an unknown case name: the valid ones are listed).

The backend function (see :mod:`tinyeff.testing.conformance`)::

    def my_backend(variant, inputs, options, dout):
        return out, grads          # grads: {name: array} or None (forward only)

``--against`` takes ``package.module:function`` (importable; the current directory is on
the path) or ``path/to/file.py:function``.

``python -m tinyeff check --mutation-score [--variants a,b] [--golden DIR] [-v]`` instead
prints how many planted porting bugs the golden suite catches per variant
(:mod:`tinyeff.testing.mutation`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

from ..testing.conformance import check_backend
from ..testing.golden import DTYPES, GoldenError, load_golden
from ..testing.tolerances import PARITY, Tol
from .report import add_variants_argument


def load_function(spec: str):
    """``"pkg.mod:fn"`` or ``"path/file.py:fn"`` -> the callable."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--against must look like module:function, got {spec!r}")
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise ValueError(f"--against: no file {path}")
        mspec = importlib.util.spec_from_file_location(f"_tinyeff_backend_{path.stem}", path)
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        module = importlib.import_module(module_name)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"--against: {module_name} has no function {attr!r}")
    return fn


def _names(values: list[str] | None) -> list[str] | None:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]``."""
    if values is None:
        return None
    return [name for value in values for name in value.split(",") if name]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--mutation-score" in argv:
        from ..testing.mutation import main as mutation_main

        return mutation_main([a for a in argv if a != "--mutation-score"])
    parser = argparse.ArgumentParser(prog="python -m tinyeff check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mutation-score", action="store_true",
                        help="score the golden suite with planted porting bugs instead "
                             "(takes --variants, --golden DIR, -v; no DIR or --against)")
    parser.add_argument("dir", help="golden directory (python -m tinyeff golden --out DIR)")
    parser.add_argument("--against", required=True, metavar="MODULE:FUNCTION",
                        help="the backend function to test")
    add_variants_argument(parser, "every variant in DIR")
    parser.add_argument("--cases", nargs="+", metavar="NAME",
                        help="only these cases (name, or variant/name; space- or "
                             "comma-separated)")
    parser.add_argument("--dtype", choices=DTYPES,
                        help="only the cases of this dtype (default: every case in DIR)")
    parser.add_argument("--forward-only", action="store_true",
                        help="compare outputs only, not gradients")
    parser.add_argument("--rtol", type=float, help="override the dtype's relative tolerance")
    parser.add_argument("--atol", type=float, help="override the dtype's absolute tolerance")
    parser.add_argument("--failures-only", action="store_true",
                        help="print only the rows that fail")
    parser.add_argument("--traceback", action="store_true",
                        help="print the traceback of every exception of the backend (default: "
                             "of the first one)")
    args = parser.parse_args(argv)
    try:
        golden = load_golden(args.dir)
    except GoldenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        fn = load_function(args.against)
    except (ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tol = None
    if args.rtol is not None or args.atol is not None:
        tol = {np.dtype(d): Tol(base.rtol if args.rtol is None else args.rtol,
                                base.atol if args.atol is None else args.atol)
               for d, base in ((d, PARITY[np.dtype(d)]) for d in DTYPES)}
    try:
        report = check_backend(args.variants, fn, golden=golden,
                               dtype=args.dtype, cases=_names(args.cases),
                               backward=not args.forward_only, tol=tol)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.table(failures_only=args.failures_only,
                       tracebacks="all" if args.traceback else "first"))
    return 0 if report.ok else 1
