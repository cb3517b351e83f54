"""One case of ``python -m tinyeff bench``: its options, cost model, and the timed run.

The driver (:mod:`tinyeff.cli.bench`) runs each case in a fresh subprocess through
:func:`worker`; what the bench knows about a variant comes from that variant's module
(``bench_options``, ``scored_pairs``, ``useful_flops``, ``extra_bytes``: the contract in
:mod:`tinyeff.attention`).
"""

from __future__ import annotations

import gc
import json
import resource
import statistics
import time

import numpy as np

from ..attention import VARIANTS
from ..attention._options import split_options


def _global_positions(n: int, count: int = 16) -> np.ndarray:
    """``count`` global tokens spread evenly over the sequence (fewer for tiny n)."""
    return np.unique(np.linspace(0, n - 1, count).astype(np.int64))


def _global_mask(n: int) -> np.ndarray:
    """The tokens of :func:`_global_positions` as a per-sample ``global_mask`` (1, 1, N)."""
    mask = np.zeros((1, 1, n), dtype=bool)
    mask[..., _global_positions(n)] = True
    return mask


#: Configurations that run a registered variant under another name: name -> (variant,
#: options at length n added to the variant's ``bench_options``).  The same 16 global tokens
#: in two forms: the batch-wide ``global_indices`` and the per-sample ``global_mask``.
CONFIGS = {
    "window_global_indices": ("window", lambda n: {"global_indices": _global_positions(n)}),
    "window_global_mask": ("window", lambda n: {"global_mask": _global_mask(n)}),
}


def base_variant(name: str) -> str:
    """The registered variant a case named ``name`` runs."""
    return CONFIGS[name][0] if name in CONFIGS else name


def case_options(name: str, n: int, overrides: dict | None = None) -> dict:
    """Options of case ``name`` at length n: the variant's ``bench_options(n)``, then the
    configuration's additions, then ``overrides`` (``--opt``)."""
    mod = VARIANTS.get(base_variant(name))
    defaults = getattr(mod, "bench_options", None)
    opts = dict(defaults(n)) if defaults is not None else {}
    if name in CONFIGS:
        opts.update(CONFIGS[name][1](n))
    opts.update(overrides or {})
    return opts


def case_flops(mod, b: int, h: int, n: int, d: int, options: dict,
               causal: bool) -> tuple[int, int] | None:
    """(forward, forward+backward) flops of the matrix products, or None.

    The backward counts twice the forward (dP, dv, dq, dk against q kᵀ and P v); the
    recomputation of q kᵀ is not useful work and is not counted (FlashAttention papers count
    it and report 2.5×).  Per batch·head from the variant's ``useful_flops``.
    """
    fn = getattr(mod, "useful_flops", None)
    fwd = None if fn is None else fn(n, d, options, causal)
    if fwd is None:
        return None
    return b * h * fwd, b * h * 3 * fwd


def estimate_bytes(mod, b: int, h: int, n: int, d: int, itemsize: int, options: dict,
                   causal: bool) -> int:
    """A generous estimate of one forward+backward's memory, to skip cases that cannot fit:
    inputs, output and gradients (about ten (B, H, N, D) arrays) plus the variant's
    ``extra_bytes`` per batch·head (as much again when the variant does not say)."""
    base = 10 * b * h * n * d * itemsize
    fn = getattr(mod, "extra_bytes", None)
    if fn is None:
        return 2 * base
    return base + b * h * fn(n, d, itemsize, options, causal)


def matmul_gflops(dtype, size: int = 2048, repeat: int = 5) -> float:
    """NumPy (size × size) @ (size × size) rate, median of ``repeat`` runs."""
    return matmul_rates(dtype, size, repeat)[0]


def matmul_rates(dtype, size: int = 2048, repeat: int = 5) -> tuple[float, float]:
    """(GFLOP/s of wall time, GFLOP/s per second of process CPU time) of NumPy's
    (size × size) @ (size × size), medians of ``repeat`` runs.  CPU time sums the threads,
    so with t busy threads the second number is about the first divided by t."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size)).astype(dtype)          # (size, size)
    a @ a
    wall, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        a @ a
        c1, t1 = time.process_time(), time.perf_counter()
        wall.append(t1 - t0)
        cpu.append(c1 - c0)
    flops = 2 * size ** 3 / 1e9
    return flops / statistics.median(wall), flops / max(statistics.median(cpu), 1e-9)


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


def build_call(mod, b: int, h: int, n: int, d: int, dtype, options: dict, causal: bool,
               seed: int = 0):
    """(args, forward options) for one call of ``mod.forward`` with the contract's helpers.

    :func:`tinyeff.attention._options.split_options` routes ``options``; an option nobody
    takes is a TypeError naming it.
    """
    rng = np.random.default_rng(seed)
    fwd_opts, random_opts, layer_opts = split_options(mod, options)
    args = {"q": rng.standard_normal((b, h, n, d)).astype(dtype),
            "k": rng.standard_normal((b, h, n, d)).astype(dtype),
            "v": rng.standard_normal((b, h, n, d)).astype(dtype)}
    if getattr(mod, "SHARED_QK", False):
        args["k"] = args["q"]
    if causal:
        fwd_opts["causal"] = True
    if getattr(mod, "RANDOM_OPTIONS", ()):
        fwd_opts.update(mod.draw_random_options(rng, d, dtype, **random_opts))
    if getattr(mod, "LAYER_PARAMS", ()):
        fwd_opts.update(mod.init_layer_params(rng, n, dtype, **layer_opts))
    return args, fwd_opts


def run_case(spec: dict) -> dict:
    """Time one (variant, N) case in this process; see the module docstring."""
    mod = VARIANTS[base_variant(spec["variant"])]
    dtype = np.dtype(spec["dtype"])
    b, h, n, d = spec["batch"], spec["heads"], spec["n"], spec["dim"]
    options, causal = spec["options"], spec["causal"]

    def one(args, fwd_opts, dout):
        t0, c0 = time.perf_counter(), time.process_time()
        out, ctx = mod.forward(**args, **fwd_opts)
        t1, c1 = time.perf_counter(), time.process_time()
        mod.backward(dout if dout is not None else np.ones_like(out), ctx)
        c2, t2 = time.process_time(), time.perf_counter()
        return t1 - t0, t2 - t0, c1 - c0, c2 - c0

    n_warm = min(n, 1024)
    warm_options = case_options(spec["variant"], n_warm, spec.get("overrides"))
    wargs, wopts = build_call(mod, b, h, n_warm, d, dtype, warm_options, causal)
    t0 = time.perf_counter()
    one(wargs, wopts, None)
    warmup = time.perf_counter() - t0
    del wargs, wopts

    args, fwd_opts = build_call(mod, b, h, n, d, dtype, options, causal)
    dout = np.random.default_rng(1).standard_normal((b, h, n, d)).astype(dtype)
    memory = _memory_run(mod, args, fwd_opts, dout)
    fwd_t, both_t, fwd_c, both_c = [], [], [], []
    budget = spec["budget"]
    while not both_t or (len(both_t) < spec["repeat"]
                         and sum(both_t) + statistics.median(both_t) <= budget):
        f, fb, fc, fbc = one(args, fwd_opts, dout)
        fwd_t.append(f)
        both_t.append(fb)
        fwd_c.append(fc)
        both_c.append(fbc)
    return {"warmup_s": warmup, "warmup_n": n_warm, "fwd_s": fwd_t, "fwd_bwd_s": both_t,
            "fwd_cpu_s": fwd_c, "fwd_bwd_cpu_s": both_c, **memory}


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


def worker(spec_json: str) -> int:
    """Run the case ``spec_json`` describes and print its result as one JSON line."""
    spec = json.loads(spec_json)
    spec["options"] = case_options(spec["variant"], spec["n"], spec.get("overrides"))
    try:
        result = {"ok": True, **run_case(spec)}
    except (TypeError, ValueError) as e:              # the variant rejects the options
        result = {"ok": False, "note": f"rejected: {type(e).__name__}: {e}"}
    print(RESULT_TAG + json.dumps(result))
    return 0


#: The prefix of the result line a worker prints.
RESULT_TAG = "@@RESULT@@"
