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
* useful GFLOP/s where the flop count is well defined (:func:`useful_flops`; matrix
  products only, recomputation not counted), and that rate as a fraction of NumPy's
  matrix-multiply rate in the same dtype, measured in the same run (2048² products,
  median of 5, before and after the cases);
* cases whose estimated memory (:func:`estimate_bytes`) exceeds ``--mem-limit`` (default
  80 % of MemAvailable) are skipped with a note, as are variants that are not registered
  or reject the options.

The table goes to stdout; ``--out DIR`` writes ``DIR/bench.json`` and, if matplotlib is
installed, ``DIR/bench.png`` (log-log time and memory against N).

Default options per variant at large N live in one table, :data:`DEFAULTS`; override any
with ``--opt variant.key=value`` (value parsed as a Python literal, else kept a string).
:data:`CONFIGS` names extra configurations of a registered variant: ``window_global_indices``
and ``window_global_mask`` run ``window`` with the same 16 global tokens given as
``global_indices`` and as a per-sample ``global_mask`` (flop counts ignore the globals).
Thread count: Numba uses ``NUMBA_NUM_THREADS`` (default: all cores); NumPy's matmul uses
its own OpenBLAS threads (all cores).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from .report import int_list, machine_info, parse_variant_opts

# ----------------------------------------------------------------------------- defaults


def _bigbird_mask(n: int):
    """BigBird pattern with about the nnz of a ±128 window: 2·96+1 + 16 global + 48 random.

    Returned as a canonical ``Pattern``, as a training loop would keep it: the pattern's
    transpose plan (used by the backward) is then built once, not on every call.
    """
    from .. import masks
    from ..masks.pattern import Pattern
    return Pattern.from_scipy(masks.bigbird(n, 96, 16, 48, np.random.default_rng(0)))


def _global_positions(n: int, count: int = 16) -> np.ndarray:
    """``count`` global tokens spread evenly over the sequence (fewer for tiny n)."""
    return np.unique(np.linspace(0, n - 1, count).astype(np.int64))


def _global_mask(n: int) -> np.ndarray:
    """The tokens of :func:`_global_positions` as a per-sample ``global_mask`` (1, 1, N)."""
    mask = np.zeros((1, 1, n), dtype=bool)
    mask[..., _global_positions(n)] = True
    return mask


# configurations that run a registered variant under another name (same tokens, two forms:
# the per-sample path against the batch-wide one)
CONFIGS = {"window_global_indices": "window", "window_global_mask": "window"}

DEFAULTS = {
    # variant:      options at length n (a function, since some depend on n)
    "full":         lambda n: {},
    "window":       lambda n: {"window": 128},
    "local":        lambda n: {"block": 128, "look_backward": 1, "look_forward": 1},
    "sparse":       lambda n: {"mask": _bigbird_mask(n)},
    "linear":       lambda n: {},
    "performer":    lambda n: {"m": 256},
    "lsh":          lambda n: {"chunk_len": 64, "n_hashes": 4, "n_buckets": 2 * max(1, n // 64)},
    "linformer":    lambda n: {"k": 256},
    "hierarchical": lambda n: {"block": 64},
    "window_global_indices": lambda n: {"window": 128, "global_indices": _global_positions(n)},
    "window_global_mask":    lambda n: {"window": 128, "global_mask": _global_mask(n)},
}

DEFAULT_N = (1024, 4096, 16384, 65536)
QUICK_N = (128, 256)

# ----------------------------------------------------------------------------- flop counts


def allowed_pairs(name: str, n: int, options: dict, causal: bool) -> int | None:
    """Number of (query, key) pairs a variant scores (per batch·head), if well defined."""
    i = np.arange(n)
    if name == "full":
        return n * (n + 1) // 2 if causal else n * n
    if name == "window":
        w = int(options.get("window", 0))
        hi = i if causal else np.minimum(i + w, n - 1)
        return int(np.sum(hi - np.maximum(i - w, 0) + 1))
    if name == "local":
        b = int(options.get("block", 1))
        back, fwd = int(options.get("look_backward", 1)), int(options.get("look_forward", 0))
        blk = i // b
        lo = np.maximum(blk - back, 0) * b
        hi = np.minimum((blk + fwd + 1) * b, n) - 1
        hi = np.minimum(hi, i) if causal else hi
        return int(np.sum(hi - lo + 1))
    if name == "sparse" and "mask" in options and hasattr(options["mask"], "nnz"):
        mask = options["mask"]
        return int(mask.nnz) if not causal else int(sum(
            np.count_nonzero(mask.indices[mask.indptr[r]:mask.indptr[r + 1]] <= r)
            for r in range(n)))
    if name == "lsh":
        c, r = int(options.get("chunk_len", 64)), int(options.get("n_hashes", 1))
        return r * n * 2 * c               # each chunk attends itself and the previous one
    return None


def useful_flops(name: str, b: int, h: int, n: int, d: int, options: dict,
                 causal: bool) -> tuple[int, int] | None:
    """(forward, forward+backward) multiply-add flops of the matrix products, or None.

    Softmax-type variants over P scored pairs: forward 2·P·D (q kᵀ) + 2·P·D (P v), backward
    2·P·D each for dP, dv, dq, dk, i.e. twice the forward (FlashAttention papers count the
    recomputation of q kᵀ and report 2.5×; recomputation is not useful work, so tinyeff
    does not count it).  Linear attention: 4·N·D² forward (φ(k)ᵀv and φ(q)(kv)); Performer
    adds its random features (m of them): 4·N·D·m + 4·N·m·D; Linformer (rank k): the E, F
    projections 4·k·N·D plus attention to k keys 4·N·k·D.  Hashing, sorting, feature
    nonlinearities and normalizers are not counted.  Hierarchical: None.
    """
    bh = b * h
    pairs = allowed_pairs(name, n, options, causal)
    if pairs is not None:
        fwd = 4 * pairs * d
    elif name == "linear":
        fwd = 4 * n * d * d
    elif name == "performer":
        m = int(options.get("m", d))
        fwd = 4 * n * d * m + 4 * n * m * d
    elif name == "linformer":
        k = int(options.get("k", 256))
        fwd = 4 * k * n * d + 4 * n * k * d
    else:
        return None
    return bh * fwd, bh * 3 * fwd


# ----------------------------------------------------------------------------- memory


def estimate_bytes(name: str, b: int, h: int, n: int, d: int, itemsize: int, options: dict,
                   causal: bool) -> int:
    """A generous estimate of one forward+backward's memory, to skip cases that cannot fit.

    Inputs, output and gradients (about 10 arrays of (B, H, N, D)) plus the variant's
    saved context: (N, M) scores for the reference ``full``, P·(a few) for pair-based
    variants that store their pairs (sparse, the reference paths), the features for the
    kernelized ones; the band kernels of window and local keep only per-row statistics
    (measured: local at N = 262,144 peaks at about 1 GiB).
    """
    bh = b * h
    base = 10 * bh * n * d * itemsize
    if name == "full":
        impl = options.get("impl", "auto")
        from ..attention import full
        blocked = impl == "blocked" or (impl == "auto" and n * n >= full.AUTO_BLOCKED_MIN_NM)
        return base + (0 if blocked else 5 * bh * n * n * itemsize)
    if name in ("window", "local") and options.get("impl", "auto") != "ref":
        return base + 2 * bh * n * 8           # band kernels: tiles only, plus lse (and δ)
    pairs = allowed_pairs(name, n, options, causal)
    if pairs is not None:
        return base + 5 * bh * pairs * (itemsize + 8)
    if name == "performer":
        return base + 8 * bh * n * int(options.get("m", d)) * itemsize
    if name == "linformer":
        return base + 8 * bh * n * int(options.get("k", 256)) * itemsize
    if name == "hierarchical":
        return base + 16 * bh * n * int(options.get("block", 64)) * itemsize
    return 2 * base


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset this process's VmHWM (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- machine


def matmul_gflops(dtype, size: int = 2048, repeat: int = 5) -> float:
    """NumPy (size × size) @ (size × size) rate, median of ``repeat`` runs."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size)).astype(dtype)          # (size, size)
    a @ a
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - t0)
    return 2 * size ** 3 / statistics.median(times) / 1e9


def first_touch_ms(nbytes: int = 64 << 20, repeat: int = 6, settle: float = 3.0) -> dict:
    """Milliseconds to first write a fresh ``nbytes`` array, with NumPy's transparent
    huge-page request (``"huge"``, its default) and without it (``"small"``, as
    :func:`tinyeff.memory.empty` allocates outputs); medians of ``repeat`` alternating
    runs, each after ``settle`` seconds with the previous arrays freed, so a virtual
    machine has time to hand the freed memory back to its host (``--first-touch``)."""
    from ..memory import _set_madvise_hugepage as setting
    if setting is None:
        return {}
    times = {"huge": [], "small": []}
    previous = setting(True)
    try:
        for _ in range(repeat):
            for mode in times:
                setting(mode == "huge")
                a = np.empty(nbytes // 4, np.float32)              # (nbytes/4,) fresh
                t0 = time.perf_counter()
                a.fill(0)
                times[mode].append(time.perf_counter() - t0)
                del a
                time.sleep(settle)
    finally:
        setting(previous)
    return {mode: 1e3 * statistics.median(t) for mode, t in times.items()}


# ----------------------------------------------------------------------------- one case


def _keywords(fn) -> tuple[set, bool]:
    params = inspect.signature(fn).parameters.values()
    names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def build_call(mod, b: int, h: int, n: int, d: int, dtype, options: dict, causal: bool,
               seed: int = 0):
    """(args, forward options) for one call of ``mod.forward`` with the contract's helpers.

    Options that ``forward`` does not take go only to ``draw_random_options`` /
    ``init_layer_params``; an option nobody takes is a TypeError naming it.
    """
    rng = np.random.default_rng(seed)
    fwd_names, fwd_var = _keywords(mod.forward)
    fwd_names -= {"q", "k", "v"}             # Linformer's rank option is also called k
    used = set(fwd_names) if not fwd_var else set(options)
    args = {"q": rng.standard_normal((b, h, n, d)).astype(dtype),
            "k": rng.standard_normal((b, h, n, d)).astype(dtype),
            "v": rng.standard_normal((b, h, n, d)).astype(dtype)}
    if getattr(mod, "SHARED_QK", False):
        args["k"] = args["q"]
    fwd_opts = {key: val for key, val in options.items() if key in fwd_names or fwd_var}
    if causal:
        fwd_opts["causal"] = True
    if getattr(mod, "RANDOM_OPTIONS", ()):
        names, _ = _keywords(mod.draw_random_options)
        used |= names
        fwd_opts.update(mod.draw_random_options(rng, d, dtype, **options))
    if getattr(mod, "LAYER_PARAMS", ()):
        names, _ = _keywords(mod.init_layer_params)
        used |= names
        fwd_opts.update(mod.init_layer_params(rng, n, dtype, **options))
    unknown = sorted(set(options) - used)
    if unknown:
        raise TypeError(f"options {unknown} are taken by neither {mod.NAME}.forward nor its "
                        "helpers")
    return args, fwd_opts


def run_case(spec: dict) -> dict:
    """Time one (variant, N) case in this process; see the module docstring."""
    from ..attention import VARIANTS
    mod = VARIANTS[CONFIGS.get(spec["variant"], spec["variant"])]
    dtype = np.dtype(spec["dtype"])
    b, h, n, d = spec["batch"], spec["heads"], spec["n"], spec["dim"]
    options, causal = spec["options"], spec["causal"]

    def one(args, fwd_opts, dout):
        t0 = time.perf_counter()
        out, ctx = mod.forward(**args, **fwd_opts)
        t1 = time.perf_counter()
        mod.backward(dout if dout is not None else np.ones_like(out), ctx)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t0

    n_warm = min(n, 1024)
    wargs, wopts = build_call(mod, b, h, n_warm, d, dtype, _eval_options(spec, n_warm), causal)
    t0 = time.perf_counter()
    one(wargs, wopts, None)
    warmup = time.perf_counter() - t0
    del wargs, wopts

    args, fwd_opts = build_call(mod, b, h, n, d, dtype, options, causal)
    dout = np.random.default_rng(1).standard_normal((b, h, n, d)).astype(dtype)
    memory = _memory_run(mod, args, fwd_opts, dout)
    fwd_t, both_t = [], []
    budget = spec["budget"]
    while not both_t or (len(both_t) < spec["repeat"]
                         and sum(both_t) + statistics.median(both_t) <= budget):
        f, fb = one(args, fwd_opts, dout)
        fwd_t.append(f)
        both_t.append(fb)
    return {"warmup_s": warmup, "warmup_n": n_warm, "fwd_s": fwd_t, "fwd_bwd_s": both_t,
            **memory}


def _memory_run(mod, args: dict, fwd_opts: dict, dout: np.ndarray) -> dict:
    """One untimed full-size forward+backward that measures memory (module docstring).

    ``peak_extra_bytes``: the resident high-water mark of the forward+backward minus the
    resident set before it (the output and the gradients are alive at the end, so they
    count).  ``workspace_bytes``: the same peak less the arrays the call returns — the
    output during the forward, the output and the gradients during the backward — i.e.
    the saved context and the temporaries, what "O(N) extra memory" is about.
    """
    gc.collect()
    base_kib = _status_kib("VmRSS")
    if not (_reset_peak() and base_kib is not None):
        out, ctx = mod.forward(**args, **fwd_opts)
        mod.backward(dout, ctx)
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - (base_kib or 0)) * 1024
        return {"peak_extra_bytes": max(int(peak), 0), "workspace_bytes": None,
                "memory_method": "ru_maxrss - VmRSS (includes warm-up peak)"}
    out, ctx = mod.forward(**args, **fwd_opts)
    peak_fwd = (_status_kib("VmHWM") - base_kib) * 1024
    _reset_peak()
    grads = mod.backward(dout, ctx)
    peak_bwd = (_status_kib("VmHWM") - base_kib) * 1024
    returned = out.nbytes + sum(g.nbytes for g in grads.values())
    work = max(peak_fwd - out.nbytes, peak_bwd - returned)
    return {"peak_extra_bytes": max(int(max(peak_fwd, peak_bwd)), 0),
            "workspace_bytes": max(int(work), 0), "returned_bytes": int(returned),
            "memory_method": "VmHWM after clear_refs - VmRSS"}


def _eval_options(spec: dict, n: int) -> dict:
    opts = dict(DEFAULTS.get(spec["variant"], lambda n: {})(n))
    opts.update(spec.get("overrides", {}))
    return opts


def _worker(spec_json: str) -> int:
    spec = json.loads(spec_json)
    spec["options"] = _eval_options(spec, spec["n"])
    try:
        result = {"ok": True, **run_case(spec)}
    except (TypeError, ValueError) as e:              # the variant rejects the options
        result = {"ok": False, "note": f"rejected: {type(e).__name__}: {e}"}
    print("@@RESULT@@" + json.dumps(result))
    return 0


# ----------------------------------------------------------------------------- driver


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def _fmt_t(ts) -> str:
    if not ts:
        return "-"
    return f"{_ms(statistics.median(ts))} [{_ms(min(ts))}–{_ms(max(ts))}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinyeff bench",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Default options per variant: see DEFAULTS in "
                                            "tinyeff/cli/bench.py.")
    parser.add_argument("--variants", default=None,
                        help="comma-separated names (default: every registered variant)")
    parser.add_argument("--n", type=int_list, default=None,
                        help=f"sequence lengths (default {','.join(map(str, DEFAULT_N))})")
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
    parser.add_argument("--out", default=None, help="directory for bench.json (and bench.png)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return _worker(args.worker)

    from ..attention import VARIANTS
    names = (args.variants.split(",") if args.variants
             else list(VARIANTS) + [v for v in DEFAULTS if v not in VARIANTS])
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
                 else 0.8 * _mem_available())

    machine = machine_info()
    mm = {"size": 512, "repeat": 3} if args.quick else {}     # quick: a rough rate, fast
    rates = {"float32": [matmul_gflops(np.float32, **mm)],
             "float64": [matmul_gflops(np.float64, **mm)]}
    print(f"# {machine['cpu']}, {machine['cores']} cores, Numba threads "
          f"{machine['numba_threads']}, {machine['date']}, load {machine['load_average']}")
    print(f"# NumPy matmul {mm.get('size', 2048)}²: float32 {rates['float32'][0]:.1f} GFLOP/s, "
          f"float64 {rates['float64'][0]:.1f} GFLOP/s")
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
            base = CONFIGS.get(name, name)                 # the variant the case runs
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
                options = _eval_options(spec, n)
            except (TypeError, ValueError) as e:
                case["note"] = f"options: {e}"
                continue
            case["options"] = {k: (v if isinstance(v, (int, float, str, bool)) else
                                   type(v).__name__) for k, v in options.items()}
            est = estimate_bytes(base, args.batch, args.heads, n, args.dim, dtype.itemsize,
                                 options, args.causal)
            case["estimate_bytes"] = est
            if est > mem_limit:
                case["note"] = f"skipped: needs ~{est / 2**30:.1f} GiB"
                continue
            flops = useful_flops(base, args.batch, args.heads, n, args.dim, options,
                                 args.causal)
            case["flops_fwd"], case["flops_fwd_bwd"] = flops if flops else (None, None)
            case.update(_spawn(spec, args.timeout))
            _print_row(case, rates[args.dtype][0], header=len(cases) == 1)
    rates["float32"].append(matmul_gflops(np.float32, **mm))
    rates["float64"].append(matmul_gflops(np.float64, **mm))
    peak = max(rates[args.dtype])
    for case in cases:
        _rates(case, peak)
    print()
    _print_table(cases, args.dtype, peak)
    result = {"command": "python -m tinyeff bench " + " ".join(argv or sys.argv[1:]),
              "machine": machine, "matmul_gflops": rates, "reference_gflops": peak,
              "first_touch_ms": touch,
              "config": {"batch": args.batch, "heads": args.heads, "dim": args.dim,
                         "dtype": args.dtype, "causal": args.causal, "repeat": repeat,
                         "n": n_list},
              "cases": cases}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "bench.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
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
        if line.startswith("@@RESULT@@"):
            result = json.loads(line[len("@@RESULT@@"):])
            ok = result.pop("ok")
            return result if ok else {"note": result["note"][:200]}
    err = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return {"note": f"failed (exit {proc.returncode}): {err[:160]}"}


def _rates(case: dict, peak: float) -> None:
    for key, flops in (("fwd", case.get("flops_fwd")), ("fwd_bwd", case.get("flops_fwd_bwd"))):
        ts = case.get(f"{key}_s")
        if flops and ts:
            rate = flops / statistics.median(ts) / 1e9
            case[f"gflops_{key}"] = rate
            case[f"fraction_{key}"] = rate / peak


_COLS = (f"{'variant':<13}{'N':>7}  {'warm-up s':>9}  {'fwd ms med [min–max]':<26}"
         f"{'fwd+bwd ms med [min–max]':<30}{'runs':>4}{'peak MiB':>10}{'work MiB':>10}{'GF/s':>7}"
         f"{'frac':>6}"
         "  note")


def _row(case: dict) -> str:
    if "fwd_bwd_s" not in case:
        return f"{case['variant']:<13}{case['n']:>7}  {'':>9}  {'':<26}{'':<30}{'':>4}{'':>10}" \
               f"{'':>10}{'':>7}{'':>6}  {case['note']}"
    gf = case.get("gflops_fwd_bwd")
    fr = case.get("fraction_fwd_bwd")
    work = case.get("workspace_bytes")
    return (f"{case['variant']:<13}{case['n']:>7}  {case['warmup_s']:>9.2f}  "
            f"{_fmt_t(case['fwd_s']):<26}{_fmt_t(case['fwd_bwd_s']):<30}"
            f"{len(case['fwd_bwd_s']):>4}{case['peak_extra_bytes'] / 2**20:>10.1f}"
            f"{'' if work is None else f'{work / 2**20:.1f}':>10}"
            f"{'' if gf is None else f'{gf:.1f}':>7}{'' if fr is None else f'{fr:.2f}':>6}"
            f"  {case['note']}")


def _print_row(case: dict, peak: float, header: bool) -> None:
    if header:
        print(_COLS)
    _rates(case, peak)
    print(_row(case), flush=True)


def _print_table(cases: list, dtype: str, peak: float) -> None:
    print(f"summary (GF/s: useful forward+backward GFLOP/s; frac: of the {dtype} matmul rate "
          f"{peak:.1f} GFLOP/s, the better of the two measurements)")
    print(_COLS)
    for case in cases:
        print(_row(case))
    print("options:")
    for name in dict.fromkeys(c["variant"] for c in cases):
        opts = next((c["options"] for c in cases if c["variant"] == name and "options" in c),
                    None)
        if opts is not None:
            print(f"  {name}: {opts}")


def _plot(cases: list, path: str, args) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: `pip install matplotlib` (optional) to get "
              "bench.png; bench.json has every number")
        return
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name in dict.fromkeys(c["variant"] for c in cases):
        rows = [c for c in cases if c["variant"] == name and "fwd_bwd_s" in c]
        if not rows:
            continue
        ns = [c["n"] for c in rows]
        ax_t.plot(ns, [statistics.median(c["fwd_bwd_s"]) for c in rows], "o-", label=name)
        ax_m.plot(ns, [max(c["peak_extra_bytes"], 1) / 2**20 for c in rows], "o-", label=name)
    for ax, label in ((ax_t, "forward+backward time (s)"), (ax_m, "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(f"tinyeff bench: B={args.batch} H={args.heads} D={args.dim} {args.dtype}"
                 f"{' causal' if args.causal else ''}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
