"""``python -m tinyeff bench --against REV``: this tree against an earlier commit, in one process.

Whole-process timings of two trees taken one after the other drift with the machine's load
(on a shared 2-core machine the same case moved between 0.6× and 2× from run to run).  This
mode imports the commit ``REV`` of this git checkout next to the working tree, as a second
package, and alternates their calls one by one, so that both see the same load:

1. ``git archive REV tinyeff`` is unpacked once into ``$TMPDIR/tinyeff-against-<sha>/`` as
   the package ``tinyeff_<sha>`` (its absolute ``tinyeff`` imports renamed); the folder is
   kept, so the old tree's Numba cache survives from one run to the next;
2. for every variant (``--variants``) and length (``--n``, default 4,096), one set of
   inputs is built by this tree's ``build_call`` (B, H, D, dtype, ``--causal``, the
   variant's ``bench_options(n)`` and ``--opt``) and given to both trees; a ``Pattern`` the
   old tree does not take (another package's class) is rebuilt once as the old tree's own
   Pattern, so that both trees reuse the tile plan a Pattern caches (or passed as the SciPy
   array it holds, if the old tree has no Pattern);
3. two untimed forward+backward calls per tree, then ``--repeat`` rounds of old then new.

It cannot judge a change to how NumPy's BLAS threads run next to the kernels: in one process
the BLAS workers that one tree's products leave spinning land on the other tree's calls
(BENCHMARKS.md, "NumPy's BLAS threads next to the kernels").  Nor a change to where large
arrays come from (``tinyeff.memory`` against ``np.zeros``): the tree that reuses its blocks
leaves the other tree's fresh allocations to fault in new pages, so the old tree runs slower
than it does alone (BENCHMARKS.md, 2026-12-05, "Fresh pages in one process").  Alternate the
two trees as whole processes for such a change.

Columns: median milliseconds of one forward+backward of each tree; ``new/old``, the median
of the round-by-round ratios, with its quartiles (below 1: this tree is faster); and whether
the two trees' outputs and gradients are bit-identical (else the largest difference).
"""

from __future__ import annotations

import importlib
import io
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

from ..attention import VARIANTS
from ._bench_case import build_call
from .report import PACKAGE_ROOT, machine_info, parse_variant_opts, refuse, write_json

DEFAULT_N = (4096,)
_IMPORT = re.compile(r"^(\s*(?:from|import)\s+)tinyeff(?=[.\s])", re.MULTILINE)


def _git(root: str, *args: str) -> bytes:
    res = subprocess.run(["git", "-C", root, *args], capture_output=True, check=False)
    if res.returncode != 0:
        raise ValueError(f"git {' '.join(args)}: {res.stderr.decode().strip()}")
    return res.stdout


def import_tree(rev: str):
    """The ``tinyeff`` package of commit ``rev`` of this checkout, imported as
    ``tinyeff_<sha>`` -> (its module, the full sha)."""
    root = PACKAGE_ROOT
    if not os.path.exists(os.path.join(root, ".git")):          # a folder, or a worktree's file
        raise ValueError(f"--against needs a git checkout; {root} has no .git")
    sha = _git(root, "rev-parse", "--verify", f"{rev}^{{commit}}").decode().strip()
    name = f"tinyeff_{sha[:12]}"
    base = os.path.join(tempfile.gettempdir(), f"tinyeff-against-{sha[:12]}")
    if not os.path.exists(os.path.join(base, name, ".complete")):
        shutil.rmtree(base, ignore_errors=True)              # an interrupted unpacking
        archive = _git(root, "archive", "--format=tar", sha, "tinyeff")
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            if hasattr(tarfile, "data_filter"):           # Python >= 3.11.4, 3.12
                tar.extractall(base, filter="data")
            else:
                tar.extractall(base)
        os.replace(os.path.join(base, "tinyeff"), os.path.join(base, name))
        for folder, _, files in os.walk(os.path.join(base, name)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(folder, f)
                    with open(path, encoding="utf-8") as fh:
                        text = fh.read()
                    with open(path, "w", encoding="utf-8") as fh:
                        fh.write(_IMPORT.sub(rf"\g<1>{name}", text))
        open(os.path.join(base, name, ".complete"), "w").close()
    if base not in sys.path:
        sys.path.insert(0, base)
    return importlib.import_module(f"{name}.attention"), sha


def _step(mod, args, fwd, dout):
    out, ctx = mod.forward(**args, **fwd)
    return out, mod.backward(dout, ctx)


def _old_options(old_mod, args, fwd, dout):
    """``fwd`` as the old tree takes it: a Pattern it rejects becomes the old tree's own
    Pattern of the same SciPy array (built once, so that both trees reuse the plan their
    Pattern caches), or the SciPy array itself if the old tree has no Pattern."""
    try:
        _step(old_mod, args, fwd, dout)
        return fwd
    except (TypeError, ValueError):
        masks = importlib.import_module(old_mod.__name__.split(".")[0] + ".masks")
        conv = {k: as_pattern_of(masks, v) for k, v in fwd.items()}
        _step(old_mod, args, conv, dout)
        return conv


def as_pattern_of(masks, value):
    """``value`` unchanged unless it is a Pattern: then the same pattern as ``masks``'s own
    Pattern class (another tree's package), or as a SciPy array if it has none."""
    if not hasattr(value, "to_scipy"):
        return value
    own = getattr(masks, "Pattern", None)
    return value.to_scipy() if own is None else own.from_scipy(value.to_scipy())


def _difference(a, b) -> float:
    """0 if the (out, grads) pairs are bit-identical, else their largest difference."""
    (oa, ga), (ob, gb) = a, b
    pairs = [(oa, ob)] + [(ga[k], gb.get(k)) for k in ga if ga[k] is not None]
    if all(y is not None and np.array_equal(x, y, equal_nan=True) for x, y in pairs):
        return 0.0
    return max(float(np.nanmax(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               if y is not None and np.shape(x) == np.shape(y) else float("inf")
               for x, y in pairs)


def main(parser, args, command: str) -> int:
    """``python -m tinyeff bench --against``: bad options and revisions are usage errors."""
    refuse(parser, args, "--against times forward+backward only",
           ("peers", "quick", "first_touch", "cpu_time"))
    try:
        old_pkg, sha = import_tree(args.against)
    except ValueError as e:
        parser.error(str(e))
    return run(args, command, old_pkg, sha)


def run(args, command: str, old_pkg, sha: str) -> int:
    """Time this tree against ``old_pkg`` (commit ``sha``) for the parsed ``args``."""
    names = args.variants or list(VARIANTS)
    overrides = parse_variant_opts(args.opt)
    dtype = np.dtype(args.dtype)
    machine = machine_info()
    print(f"# this tree against {sha[:12]} ({args.against}), alternated in one process")
    print(f"# {machine['cpu']}, {machine['cores']} cores, Numba threads "
          f"{machine['numba_threads']}, {machine['date']}, load {machine['load_average']}")
    print(f"# B={args.batch} H={args.heads} D={args.dim} {args.dtype}"
          f"{' causal' if args.causal else ''}, {args.repeat} rounds")
    print("| variant | N | old ms | new ms | new/old [q1, q3] | identical |")
    print("|---|---:|---:|---:|---|---|")
    rows = []
    for name in names:
        if name not in VARIANTS or name not in old_pkg.VARIANTS:
            print(f"| {name} | | | | | not a variant of both trees |")
            continue
        mod, old_mod = VARIANTS[name], old_pkg.VARIANTS[name]
        for n in args.n or DEFAULT_N:
            options = {**mod.bench_options(n), **overrides.get(name, {})}
            call, fwd = build_call(mod, args.batch, args.heads, n, args.dim, dtype, options,
                                   args.causal)
            dout = np.random.default_rng(1).standard_normal(
                (args.batch, args.heads, n, args.dim)).astype(dtype)
            old_fwd = _old_options(old_mod, call, fwd, dout)      # the old tree's 1st call
            sides = {"old": (old_mod, old_fwd), "new": (mod, fwd)}
            results = {tag: _step(m, call, f, dout) for tag, (m, f) in sides.items()}
            _step(mod, call, fwd, dout)                           # the new tree's 2nd call
            times = {"old": [], "new": []}
            for _ in range(args.repeat):
                for tag, (m, f) in sides.items():
                    t0 = time.perf_counter()
                    _step(m, call, f, dout)
                    times[tag].append(time.perf_counter() - t0)
            ratios = [b / a for a, b in zip(times["old"], times["new"])]
            q1, q3 = np.quantile(ratios, [0.25, 0.75])
            diff = _difference(results["old"], results["new"])
            row = {"variant": name, "n": n, "old_ms": 1e3 * statistics.median(times["old"]),
                   "new_ms": 1e3 * statistics.median(times["new"]),
                   "ratio": statistics.median(ratios), "q1": float(q1), "q3": float(q3),
                   "max_difference": diff}
            rows.append(row)
            print(f"| {name} | {n:,} | {row['old_ms']:.1f} | {row['new_ms']:.1f} | "
                  f"{row['ratio']:.2f} [{q1:.2f}, {q3:.2f}] | "
                  f"{'yes' if diff == 0 else f'no: {diff:.1e}'} |", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        write_json(os.path.join(args.out, "against.json"),
                   {"command": command, "against": sha, "machine": machine, "rows": rows})
    return 0
