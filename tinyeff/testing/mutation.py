"""Mutation score of the golden suite: how many realistic porting bugs does it catch?

Each variant has an independent dense port (:mod:`tinyeff.testing.ports`) and a catalogue of
realistic porting bugs that can be planted in it one at a time (``bugs(variant)``: name ->
one-line description).  A bug is *killed* when the conformance harness
(:func:`tinyeff.testing.conformance.check_case`) reports a failure on at least one golden
case; it *survives* when every case passes.  The correct port must pass every case.

The suite is the default one: every case ``python -m tinyeff golden`` writes, in float64 and
in float32 (computed in memory exactly as written), or the cases of a golden directory.

From a shell::

    python -m tinyeff check --mutation-score [--variants full,window] [--golden DIR] [-v]

prints killed/total per variant and the names of the surviving bugs (``-v``: every bug with
the first case that kills it).  Exit status 0 when every bug is killed and every correct
port passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys

from .conformance import check_case
from .golden import DTYPES, GoldenCase, load_golden, make_cases
from .ports import PORT_VARIANTS, bugs, port_backend


@dataclasses.dataclass
class VariantScore:
    """The outcome for one variant: which bugs were killed, by which case."""

    variant: str
    n_cases: int
    killed: dict[str, str]            # bug -> first case (dtype/name) that fails it
    survived: list[str]
    port_failures: list[str]          # cases the correct port fails (must be empty)

    @property
    def total(self) -> int:
        return len(self.killed) + len(self.survived)

    @property
    def ok(self) -> bool:
        return not self.survived and not self.port_failures


@dataclasses.dataclass
class MutationReport:
    scores: list[VariantScore]

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.scores)

    def table(self, verbose: bool = False) -> str:
        head = ["variant", "cases", "killed", "score", "correct port", "survivors"]
        cells = []
        for s in self.scores:
            pct = 100.0 * len(s.killed) / s.total if s.total else 100.0
            port = "passes" if not s.port_failures else f"FAILS {', '.join(s.port_failures)}"
            cells.append([s.variant, str(s.n_cases), f"{len(s.killed)}/{s.total}",
                          f"{pct:.0f}%", port, ", ".join(s.survived) or "-"])
        width = [max(len(c) for c in col) for col in zip(head, *cells)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, width)).rstrip()
                 for row in [head, ["-" * w for w in width], *cells]]
        killed = sum(len(s.killed) for s in self.scores)
        total = sum(s.total for s in self.scores)
        lines.append(f"{'PASS' if self.ok else 'FAIL'}: {killed}/{total} bugs killed over "
                     f"{len(self.scores)} variants")
        if verbose:
            for s in self.scores:
                lines.append("")
                lines.append(f"{s.variant}:")
                desc = bugs(s.variant)
                for bug in desc:
                    by = (f"killed by {s.killed[bug]}" if bug in s.killed else "SURVIVES")
                    lines.append(f"  {bug:<24} {by:<40} {desc[bug]}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


@functools.cache
def _default_cases(variant: str) -> tuple[GoldenCase, ...]:
    return tuple(c for dtype in DTYPES for c in make_cases(variant, dtype))


def default_cases(variant: str) -> list[GoldenCase]:
    """The default suite of ``variant``: its golden cases in every dtype (cached)."""
    return list(_default_cases(variant))


def _fails(case: GoldenCase, bug: str | None) -> bool:
    fn = functools.partial(port_backend, bug=bug)
    return any(r.failed for r in check_case(case, fn))


def score_variant(variant: str, cases: list[GoldenCase] | None = None) -> VariantScore:
    """Run the correct port and every bug of ``variant`` over ``cases`` (default suite)."""
    cases = default_cases(variant) if cases is None else list(cases)
    label = {id(c): f"{c.dtype}/{c.name}" for c in cases}
    port_failures = [label[id(c)] for c in cases if _fails(c, None)]
    killed, survived = {}, []
    for bug in bugs(variant):
        hit = next((c for c in cases if _fails(c, bug)), None)
        if hit is None:
            survived.append(bug)
        else:
            killed[bug] = label[id(hit)]
    return VariantScore(variant, len(cases), killed, survived, port_failures)


def mutation_score(variants=None, golden=None) -> MutationReport:
    """:class:`MutationReport` for ``variants`` (default: every ported variant, or every
    one that ``golden`` holds).

    ``golden``: a golden directory (or loaded :class:`~tinyeff.testing.golden.Golden`)
    instead of the in-memory default suite.
    """
    if golden is not None and not hasattr(golden, "select"):
        golden = load_golden(golden)
    if variants is None:
        present = None if golden is None else {c.variant for c in golden.cases}
        variants = [v for v in PORT_VARIANTS if present is None or v in present]
    elif isinstance(variants, str):
        variants = [variants]
    unknown = [v for v in variants if v not in PORT_VARIANTS]
    if unknown:
        raise ValueError(f"no port of {unknown}; ported variants: {', '.join(PORT_VARIANTS)}")
    scores = []
    for v in variants:
        cases = None if golden is None else golden.select(v)
        scores.append(score_variant(v, cases))
    return MutationReport(scores)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tinyeff check --mutation-score", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", metavar="NAME",
                        help="only these variants (comma- or space-separated)")
    parser.add_argument("--golden", metavar="DIR",
                        help="score the cases of this golden directory instead of the "
                             "default suite (float64 and float32, computed in memory)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="list every bug, what kills it and what it is")
    args = parser.parse_args(argv)
    names = None
    if args.variants:
        names = [n for value in args.variants for n in value.split(",") if n]
    try:
        report = mutation_score(names, golden=args.golden)
    except ValueError as e:                                        # GoldenError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.table(verbose=args.verbose))
    return 0 if report.ok else 1
