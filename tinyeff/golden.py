"""``python -m tinyeff golden --out DIR``: write golden test vectors for other backends.

One ``DIR/<variant>/<case>.npz`` per example case of every selected variant (inputs,
options, a fixed upstream gradient, the output and every gradient, computed by the float64
reference), and ``DIR/manifest.json`` with shapes, dtypes, tinyeff's version and the SHA-256
of each file.  The same command writes byte-identical files on every run.  The format is
described in :mod:`tinyeff.testing.golden` and SEMANTICS.md; check a backend against the
files with ``python -m tinyeff check DIR --against module:function``.
"""

from __future__ import annotations

import argparse

from .attention import VARIANTS
from .testing.golden import DTYPES, write_golden


def split_names(values: list[str] | None) -> list[str] | None:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]`` (both spellings of a list are accepted)."""
    if values is None:
        return None
    return [name for value in values for name in value.split(",") if name]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinyeff golden", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write (created if needed)")
    parser.add_argument("--variants", nargs="+", metavar="NAME",
                        help=f"variants to write (default: all of {', '.join(VARIANTS)})")
    parser.add_argument("--dtype", choices=DTYPES, default="float64",
                        help="dtype of the stored arrays (values are always computed in "
                             "float64, then rounded once)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    args = parser.parse_args(argv)
    names = split_names(args.variants)
    unknown = sorted(set(names or ()) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
    manifest = write_golden(args.out, names, dtype=args.dtype, seed=args.seed)
    for entry in manifest["cases"]:
        print(f"{entry['file']:<40} {entry['bytes']:>8} bytes  sha256 {entry['sha256'][:16]}…")
    print(f"wrote {len(manifest['cases'])} cases of {', '.join(manifest['variants'])} "
          f"({args.dtype}, seed {args.seed}) and manifest.json to {args.out}")
    return 0
