"""``python -m tinyeff bench``: time and memory of every attention variant against N.

For each variant of ``tinyeff.attention.VARIANTS`` (or ``--variants``) and each length N it
reports, on random float inputs of shape (B, H, N, D):

* the warm-up: one forward+backward at min(N, 1024) before anything is timed, so Numba
  compilation (or loading it from the cache) is reported apart and never mixed into the
  timings;
* median, min and max wall time of the forward, and of forward+backward, over ``--repeat``
  runs (fewer if one run exceeds the per-case ``--budget``; the table says how many);
* memory, from one untimed forward+backward at full size that runs before the timed ones
  (so the timed runs never pay the first touch of fresh pages): each case runs in a fresh
  subprocess, which builds its inputs, warms up, then resets the kernel's resident-set
  high-water mark (``/proc/self/clear_refs``, Linux) and reads ``VmHWM`` from
  ``/proc/self/status``, minus the resident set just before the call.  That counts every
  buffer — NumPy's, Numba's and BLAS's — which ``tracemalloc`` would not (Numba's allocator
  is invisible to it).  Two numbers: **peak** (``peak_extra_bytes``) is that high-water mark
  over the forward+backward, so it includes the output and the gradients; **work**
  (``workspace_bytes``) is the peak less the arrays the call returns (the output during the
  forward; the output and the gradients during the backward) — the saved context plus the
  temporaries, the "extra memory" of an O(N)-memory claim.  Without clear_refs it falls back
  to ``resource.getrusage`` peak RSS minus the baseline and reports no work column;
* useful GFLOP/s where the flop count is well defined (the variant's ``useful_flops``;
  matrix products only, recomputation not counted), and that rate as a fraction of NumPy's
  matrix-multiply rate in the same dtype, measured in the same run (2048² products,
  median of 5, before and after the cases);
* cases whose estimated memory (the inputs and gradients plus the variant's
  ``extra_bytes``) exceeds ``--mem-limit`` (default
  80 % of MemAvailable) are skipped with a note, as are variants that are not registered
  or reject the options.

* with ``--cpu-time``, the median process CPU time of a forward+backward (``cpu ms``,
  ``time.process_time`` in the case's process) and ``cpu frac``: the case's flops per CPU
  second over NumPy's matmul flops per CPU second, both in the same run.  CPU time sums the
  threads, so with 2 threads each rate is per core-second: time the process waits for a
  core (other load) is not counted, but neither is a thread's idle time, so a case that
  keeps only one of its 2 threads busy gets a higher cpu frac than wall frac.

``--peers`` instead runs each variant against its PyTorch peer in one process (torch and
the peer packages where installed, else one line and exit 0): tinyeff/cli/_bench_peers.py
describes the table, tinyeff/cli/_peers.py the pairs.  ``--against REV`` instead times this
tree against commit REV, calls alternated in one process (tinyeff/cli/_bench_against.py).

The table goes to stdout; ``--out DIR`` writes ``DIR/bench.json`` and, if matplotlib is
installed, ``DIR/bench.png`` (log-log time and memory against N).

Each variant's module gives its options at length N (``bench_options``); override any
with ``--opt variant.key=value`` (value parsed as a Python literal, else kept a string).
``CONFIGS`` (tinyeff/cli/_bench_case.py) names extra configurations of a registered
variant: ``window_global_indices`` and ``window_global_mask`` run ``window`` with the same
16 global tokens given as ``global_indices`` and as a per-sample ``global_mask`` (flop
counts ignore the globals).
Thread count: Numba uses ``NUMBA_NUM_THREADS`` (default: all cores); NumPy's matmul uses
its own OpenBLAS threads (all cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import numpy as np

from ..attention import VARIANTS
from . import _bench_against, _bench_peers, _cold, report
from ._bench_case import (
    CONFIGS,
    RESULT_TAG,
    base_variant,
    case_flops,
    case_options,
    estimate_bytes,
    first_touch_ms,
    matmul_rates,
    worker,
)
from ._bench_peers import PEER_N
from .report import (
    add_variants_argument,
    int_list,
    machine_info,
    mem_available,
    parse_variant_opts,
    plot_scaling,
    write_json,
)

DEFAULT_N = (1024, 4096, 16384, 65536)
QUICK_N = (128, 256)

# ----------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--cold-start" in argv:                   # its own options (tinyeff/cli/_cold.py)
        return _cold.main([a for a in argv if a != "--cold-start"])
    parser = argparse.ArgumentParser(prog="python -m tinyeff bench",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Default options per variant: bench_options(n) in "
                                            "each tinyeff/attention/<variant>.py.")
    add_variants_argument(parser, "every registered variant, then "
                          + ", ".join(CONFIGS))
    parser.add_argument("--n", "--sizes", dest="n", type=int_list, default=None,
                        help=f"sequence lengths (default {','.join(map(str, DEFAULT_N))}; "
                             f"with --peers {','.join(map(str, PEER_N))})")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64, help="head dimension D (= Dv)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per case")
    parser.add_argument("--budget", type=float, default=120.0,
                        help="seconds per case: stop repeating beyond it (at least 1 run)")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds before a case's subprocess is killed")
    parser.add_argument("--mem-limit", type=float, default=None,
                        help="GiB; skip cases estimated above it (default 80%% of available)")
    parser.add_argument("--opt", action="append", default=[], metavar="VARIANT.KEY=VALUE",
                        help="override a default option (repeatable), e.g. window.window=64")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: n={','.join(map(str, QUICK_N))}, repeat 1, "
                             "matmul rate from 512² products")
    parser.add_argument("--first-touch", action="store_true",
                        help="also time the first write of a fresh 64 MiB array with and "
                             "without transparent huge pages (~40 s; see tinyeff/memory.py)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="also report process CPU time and fractions of the matmul rate "
                             "per CPU second (less sensitive to other load)")
    parser.add_argument("--cold-start", action="store_true",
                        help="instead: the first forward+backward of each kernel path on an "
                             "empty Numba cache (--cold-start --help lists its options)")
    parser.add_argument("--peers", action="store_true",
                        help="compare with the torch peers, where installed, in this process "
                             "(tinyeff/cli/_peers.py)")
    parser.add_argument("--against", metavar="REV", help="instead: this tree against commit "
                        "REV, calls alternated in one process (tinyeff/cli/_bench_against.py)")
    parser.add_argument("--out", default=None, help="directory for bench.json (and bench.png)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return worker(args.worker)
    command = "python -m tinyeff bench " + " ".join(argv)
    if args.against is not None:
        return _bench_against.main(parser, args, command)
    if args.peers:
        report.refuse(parser, args, "--peers fixes each pair's options",
                      ("causal", "quick", "first_touch", "opt"))
        return _bench_peers.run(args, command)

    names = args.variants or list(VARIANTS) + [v for v in CONFIGS if v not in VARIANTS]
    n_list = args.n or (list(QUICK_N) if args.quick else list(DEFAULT_N))
    repeat = 1 if args.quick else args.repeat
    try:
        overrides = parse_variant_opts(args.opt)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    unknown_opt = sorted(set(overrides) - set(names))
    if unknown_opt:
        parser.error(f"--opt names variants not benchmarked: {unknown_opt}")
    dtype = np.dtype(args.dtype)
    mem_limit = (args.mem_limit * 2**30 if args.mem_limit is not None
                 else 0.8 * mem_available())

    machine = machine_info()
    mm = {"size": 512, "repeat": 3} if args.quick else {}     # quick: a rough rate, fast
    both = {dt: [matmul_rates(dt, **mm)] for dt in ("float32", "float64")}
    print(f"# {machine['cpu']}, {machine['cores']} cores, Numba threads "
          f"{machine['numba_threads']}, {machine['date']}, load {machine['load_average']}")
    print(f"# NumPy matmul {mm.get('size', 2048)}²: "
          + ", ".join(f"{dt} {r[0][0]:.1f} GFLOP/s" + (f" ({r[0][1]:.1f} per CPU second)"
                                                      if args.cpu_time else "")
                      for dt, r in both.items()))
    touch = first_touch_ms() if args.first_touch else {}
    if touch:
        print(f"# first write of a fresh 64 MiB array: {touch['huge']:.1f} ms with "
              f"transparent huge pages, {touch['small']:.1f} ms with 4 KiB pages (medians "
              f"of 6)")
    print(f"# B={args.batch} H={args.heads} D={args.dim} {args.dtype}"
          f"{' causal' if args.causal else ''}, repeat {repeat}")

    cases = []
    for name in names:
        for n in n_list:
            case = {"variant": name, "n": n, "note": ""}
            cases.append(case)
            base = base_variant(name)                     # the variant the case runs
            if base not in VARIANTS:
                case["note"] = "not registered"
                continue
            mod = VARIANTS[base]
            if args.causal and not getattr(mod, "SUPPORTS_CAUSAL", False):
                case["note"] = "no causal"
                continue
            spec = {"variant": name, "n": n, "batch": args.batch, "heads": args.heads,
                    "dim": args.dim, "dtype": args.dtype, "causal": args.causal,
                    "repeat": repeat, "budget": args.budget,
                    "overrides": overrides.get(name, {})}
            try:
                options = case_options(name, n, spec["overrides"])
            except (TypeError, ValueError) as e:
                case["note"] = f"options: {e}"
                continue
            case["options"] = {k: (v if isinstance(v, (int, float, str, bool)) else
                                   type(v).__name__) for k, v in options.items()}
            est = estimate_bytes(mod, args.batch, args.heads, n, args.dim, dtype.itemsize,
                                 options, args.causal)
            case["estimate_bytes"] = est
            if est > mem_limit:
                case["note"] = f"skipped: needs ~{est / 2**30:.1f} GiB"
                continue
            flops = case_flops(mod, args.batch, args.heads, n, args.dim, options,
                                 args.causal)
            case["flops_fwd"], case["flops_fwd_bwd"] = flops if flops else (None, None)
            case.update(_spawn(spec, args.timeout))
            _print_row(case, both[args.dtype][0], args.cpu_time, header=len(cases) == 1)
    for dt in both:
        both[dt].append(matmul_rates(dt, **mm))
    rates = {dt: [r[0] for r in both[dt]] for dt in both}
    cpu_rates = {dt: [r[1] for r in both[dt]] for dt in both}
    peak = (max(rates[args.dtype]), max(cpu_rates[args.dtype]))
    for case in cases:
        _rates(case, peak)
    print()
    _print_table(cases, args.dtype, peak, args.cpu_time)
    result = {"command": command, "machine": machine, "matmul_gflops": rates,
              "matmul_gflops_per_cpu_second": cpu_rates, "reference_gflops": peak[0],
              "first_touch_ms": touch,
              "config": {"batch": args.batch, "heads": args.heads, "dim": args.dim,
                         "dtype": args.dtype, "causal": args.causal, "repeat": repeat,
                         "n": n_list},
              "cases": cases}
    if args.out:
        path = write_json(os.path.join(args.out, "bench.json"), result)
        print(f"\nwrote {path}")
        _plot(cases, os.path.join(args.out, "bench.png"), args)
    return 0


def _spawn(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "tinyeff.cli.bench", "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"note": f"timeout after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
            ok = result.pop("ok")
            return result if ok else {"note": result["note"][:200]}
    err = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return {"note": f"failed (exit {proc.returncode}): {err[:160]}"}


def _rates(case: dict, peak: tuple) -> None:
    """GF/s and fractions of ``peak`` = (wall, per-CPU-second matmul rate) of a case."""
    for key, flops in (("fwd", case.get("flops_fwd")), ("fwd_bwd", case.get("flops_fwd_bwd"))):
        ts, cpu = case.get(f"{key}_s"), case.get(f"{key}_cpu_s")
        if flops and ts:
            rate = flops / statistics.median(ts) / 1e9
            case[f"gflops_{key}"] = rate
            case[f"fraction_{key}"] = rate / peak[0]
        if flops and cpu:
            case[f"fraction_cpu_{key}"] = flops / max(statistics.median(cpu), 1e-9) / 1e9 / peak[1]


def _cols(cpu: bool) -> str:
    return (f"{'variant':<13}{'N':>7}  {'warm-up s':>9}  {'fwd ms med [min–max]':<26}"
            f"{'fwd+bwd ms med [min–max]':<30}{'runs':>4}{'peak MiB':>10}{'work MiB':>10}"
            f"{'GF/s':>7}{'frac':>6}" + (f"{'cpu ms':>9}{'cpu frac':>9}" if cpu else "")
            + "  note")


def _row(case: dict, cpu: bool) -> str:
    if "fwd_bwd_s" not in case:
        return (f"{case['variant']:<13}{case['n']:>7}  {'':>9}  {'':<26}{'':<30}{'':>4}"
                f"{'':>10}{'':>10}{'':>7}{'':>6}" + " " * (18 if cpu else 0) + f"  {case['note']}")
    gf = case.get("gflops_fwd_bwd")
    fr = case.get("fraction_fwd_bwd")
    work = case.get("workspace_bytes")
    text = (f"{case['variant']:<13}{case['n']:>7}  {case['warmup_s']:>9.2f}  "
            f"{report.ms_range(case['fwd_s']):<26}{report.ms_range(case['fwd_bwd_s']):<30}"
            f"{len(case['fwd_bwd_s']):>4}{case['peak_extra_bytes'] / 2**20:>10.1f}"
            f"{'' if work is None else f'{work / 2**20:.1f}':>10}"
            f"{'' if gf is None else f'{gf:.1f}':>7}{'' if fr is None else f'{fr:.2f}':>6}")
    if cpu:
        fc = case.get("fraction_cpu_fwd_bwd")
        text += (f"{report.ms(statistics.median(case['fwd_bwd_cpu_s'])):>9}"
                 f"{'' if fc is None else f'{fc:.2f}':>9}")
    return text + f"  {case['note']}"


def _print_row(case: dict, peak: tuple, cpu: bool, header: bool) -> None:
    if header:
        print(_cols(cpu))
    _rates(case, peak)
    print(_row(case, cpu), flush=True)


def _print_table(cases: list, dtype: str, peak: tuple, cpu: bool) -> None:
    print(f"summary (GF/s: useful forward+backward GFLOP/s; frac: of the {dtype} matmul rate "
          f"{peak[0]:.1f} GFLOP/s, the better of the two measurements"
          + (f"; cpu ms: median fwd+bwd process CPU time; cpu frac: of {peak[1]:.1f} GFLOP/s "
             "per CPU second" if cpu else "") + ")")
    print(_cols(cpu))
    for case in cases:
        print(_row(case, cpu))
    print("options:")
    for name in dict.fromkeys(c["variant"] for c in cases):
        opts = next((c["options"] for c in cases if c["variant"] == name and "options" in c),
                    None)
        if opts is not None:
            print(f"  {name}: {opts}")


def _plot(cases: list, path: str, args) -> None:
    series = {}
    for name in dict.fromkeys(c["variant"] for c in cases):
        rows = [c for c in cases if c["variant"] == name and "fwd_bwd_s" in c]
        if rows:
            series[name] = ([c["n"] for c in rows],
                            [statistics.median(c["fwd_bwd_s"]) for c in rows],
                            [max(c["peak_extra_bytes"], 1) / 2**20 for c in rows])
    title = (f"tinyeff bench: B={args.batch} H={args.heads} D={args.dim} {args.dtype}"
             f"{' causal' if args.causal else ''}")
    if plot_scaling(path, series, ("forward+backward time (s)", "peak extra memory (MiB)"),
                    title) is None:
        print("matplotlib is not installed: `pip install matplotlib` (optional) to get "
              "bench.png; bench.json has every number")
    else:
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
