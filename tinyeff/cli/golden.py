"""``python -m tinyeff golden --out DIR``: write golden test vectors for other backends.

For every selected variant and both dtypes (float64, then float32 with names ending in
``_f32``): its example cases and its conformance cases (long sequences that cross the 64-
and 128-row tiles, B ≠ H batches, 3-D inputs, rows with no admissible key, logits beyond
exp's overflow, the edge cases of its page; :mod:`tinyeff.testing.suite`).  One
``DIR/<variant>/<case>.npz`` per case (inputs, options, a fixed upstream gradient, the
output and every gradient, computed by the float64 reference) and ``DIR/manifest.json``
with shapes, dtypes, tinyeff's version and the SHA-256 of each file.  The same command
writes byte-identical files on every run.  A directory that already holds a suite is
refused unless ``--force``, which replaces that whole suite.  The format is described in
:mod:`tinyeff.testing.golden` and SEMANTICS.md; check a backend against the files with
``python -m tinyeff check DIR --against module:function``.
"""

from __future__ import annotations

import argparse
import sys
import time

from ..attention import VARIANTS
from ..testing.golden import DTYPES, write_golden
from .report import add_variants_argument


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinyeff golden", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write (created if needed)")
    add_variants_argument(parser, f"all of {', '.join(VARIANTS)}")
    parser.add_argument("--dtype", choices=(*DTYPES, "both"), default="both",
                        help="dtype of the stored arrays (default: both; values are always "
                             "computed in float64, then rounded once)")
    parser.add_argument("--size", type=_positive_int, default=1, metavar="K",
                        help="multiply the sequence lengths of the long conformance cases "
                             "by K (default 1: N = 267, M = 293); float32 sums round more "
                             "over longer sequences (see SEMANTICS.md §3)")
    parser.add_argument("--examples-only", action="store_true",
                        help="only the small example cases of each variant (a quick smoke "
                             "test; not the conformance suite)")
    parser.add_argument("--force", action="store_true",
                        help="replace the golden suite already in --out (all of its files)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--quiet", action="store_true", help="print only the summary line")
    args = parser.parse_args(argv)
    names = args.variants
    unknown = sorted(set(names or ()) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
    dtype = None if args.dtype == "both" else args.dtype
    start = time.perf_counter()
    try:
        manifest = write_golden(args.out, names, dtype=dtype, seed=args.seed, size=args.size,
                                examples_only=args.examples_only, overwrite=args.force)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    total = sum(entry["bytes"] for entry in manifest["cases"])
    if not args.quiet:
        for entry in manifest["cases"]:
            print(f"{entry['file']:<52} {entry['bytes']:>9} bytes  "
                  f"sha256 {entry['sha256'][:16]}…")
    counts = {v: {d: 0 for d in manifest["dtypes"]} for v in manifest["variants"]}
    for entry in manifest["cases"]:
        counts[entry["variant"]][entry["dtype"]] += 1
    per_variant = ", ".join(f"{v} {' + '.join(str(n) for n in c.values())}"
                            for v, c in counts.items())
    print(f"wrote {len(manifest['cases'])} cases ({per_variant}; "
          f"{' + '.join(manifest['dtypes'])}, seed {args.seed}, size {args.size}), "
          f"{total / 1e6:.1f} MB, and manifest.json to {args.out} in {seconds:.1f} s")
    return 0
