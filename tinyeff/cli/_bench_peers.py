"""``python -m tinyeff bench --peers``: tinyeff against its torch peers, in one process.

For every pair of :data:`tinyeff.cli._peers.PAIRS` (restricted by ``--variants``) and every
length N (``--sizes``, default 4,096 and 16,384) it builds one set of NumPy inputs, runs
one untimed forward+backward of each side (compilation, caches), then ``--repeat`` rounds
of tinyeff then peer, alternating, so that both see the same load.  torch runs with as
many threads as Numba (``torch.set_num_threads``).

Columns: median (min) wall milliseconds of one forward+backward of each side; the ratio
of the medians (below 1: tinyeff faster); ``frac``, tinyeff's useful GFLOP/s (the
variant's ``useful_flops``, backward counted twice) as a fraction of NumPy's float matmul
rate measured in the same run (before and after the pairs, the better).  With
``--cpu-time`` also the process CPU milliseconds of each side and ``cpu frac``: the same
fraction with CPU time in both the case and the matmul rate (see :mod:`tinyeff.cli.bench`).

Options read: ``--variants`` (tinyeff variant names), ``--sizes``, ``--batch``, ``--heads``,
``--dim``, ``--dtype``, ``--repeat``, ``--mem-limit`` (pairs whose peer would need more are
skipped with a note), ``--cpu-time``, ``--out``; ``--causal``, ``--opt``, ``--quick`` and
``--first-touch`` are refused (each pair fixes its options); ``--budget`` and ``--timeout``
do not apply (everything runs in this process).

Without torch it prints one line and returns 0; pairs whose package is missing are
skipped with one line naming the packages.
"""

from __future__ import annotations

import gc
import os
import statistics
import time

import numpy as np

from . import _peers
from ._bench_case import case_flops, matmul_rates
from .report import machine_info, mem_available, write_json

PEER_N = (4096, 16384)


def run(args, command: str) -> int:
    """Run the pairs for the parsed ``args`` of ``python -m tinyeff bench --peers``."""
    if not _peers.available(None):
        print("# --peers: torch is not installed, nothing to compare (see BENCHMARKS.md, "
              "'Against the torch peers')")
        return 0
    import numba
    import torch
    torch.set_num_threads(numba.get_num_threads())
    pairs = [p for p in _peers.PAIRS if not args.variants or p.variant in args.variants]
    missing = sorted({p.package for p in pairs if p.package and not _peers.available(p.package)})
    if missing:
        print(f"# peers not installed, skipped: {', '.join(missing)}")
    pairs = [p for p in pairs if p.package not in missing]
    sizes = args.n or list(PEER_N)
    dtype = np.dtype(args.dtype)
    mem_limit = (args.mem_limit * 2**30 if args.mem_limit is not None
                 else 0.8 * mem_available())
    machine = machine_info()
    rates = [matmul_rates(dtype)]
    print(f"# {machine['cpu']}, {machine['cores']} cores, Numba threads "
          f"{machine['numba_threads']}, torch {torch.__version__} threads "
          f"{torch.get_num_threads()}, {machine['date']}, load {machine['load_average']}")
    print(f"# NumPy matmul 2048² {args.dtype}: {rates[0][0]:.1f} GFLOP/s"
          + (f" ({rates[0][1]:.1f} per CPU second)" if args.cpu_time else ""))
    print(f"# B={args.batch} H={args.heads} D={args.dim} {args.dtype}, forward+backward, "
          f"repeat {args.repeat} (tinyeff and peer alternating)")
    print(_header(args.cpu_time), flush=True)
    rows = []
    for pair in pairs:
        for n in sizes:
            row = _run_pair(pair, n, args, dtype, mem_limit)
            rows.append(row)
            _fractions(row, rates[0])
            print(_line(row, args.cpu_time), flush=True)
    rates.append(matmul_rates(dtype))
    best = (max(r[0] for r in rates), max(r[1] for r in rates))
    print(f"\nsummary (frac: of the {args.dtype} matmul rate {best[0]:.1f} GFLOP/s, the "
          f"better of two measurements" + (f"; cpu frac: of {best[1]:.1f} GFLOP/s per CPU "
                                            "second" if args.cpu_time else "") + ")")
    print(_header(args.cpu_time))
    for row in rows:
        _fractions(row, best)
        print(_line(row, args.cpu_time))
    if args.out:
        path = write_json(os.path.join(args.out, "peers.json"),
                          {"command": command, "machine": machine,
                           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                           "matmul_gflops": [r[0] for r in rates],
                           "matmul_gflops_per_cpu_second": [r[1] for r in rates],
                           "config": {"batch": args.batch, "heads": args.heads,
                                      "dim": args.dim, "dtype": args.dtype,
                                      "repeat": args.repeat, "n": sizes},
                           "pairs": rows})
        print(f"\nwrote {path}")
    return 0


def _run_pair(pair, n: int, args, dtype, mem_limit: float) -> dict:
    row = {"variant": pair.label, "peer": pair.peer, "n": n, "note": ""}
    b, h, d = args.batch, args.heads, args.dim
    if pair.peer_bytes is not None and pair.peer_bytes(b, h, n, d, dtype.itemsize) > mem_limit:
        row["note"] = (f"skipped: the peer needs ~"
                       f"{pair.peer_bytes(b, h, n, d, dtype.itemsize) / 2**30:.1f} GiB")
        return row
    try:
        tinyeff_step, peer_step, info = _peers.make_pair(pair, b, h, n, d, dtype)
    except (TypeError, ValueError) as e:
        row["note"] = f"skipped: {e}"[:160]
        return row
    row["options"] = {k: v for k, v in info["options"].items()
                      if isinstance(v, (int, float, str, bool))}
    flops = case_flops(info["module"], b, h, n, d, info["options"], pair.causal)
    row["flops_fwd_bwd"] = flops[1] if flops else None
    for side, step in (("tinyeff", tinyeff_step), ("peer", peer_step)):
        t0 = time.perf_counter()
        try:
            step()                                        # warm-up: compile, caches
        except Exception as e:                            # e.g. a peer's assert on N
            row["note"] = f"{side} failed: {type(e).__name__}: {e}"[:160]
            return row
        row[f"{side}_warmup_s"] = time.perf_counter() - t0
    for side in ("tinyeff", "peer"):
        row[f"{side}_s"], row[f"{side}_cpu_s"] = [], []
    for _ in range(args.repeat):
        for side, step in (("tinyeff", tinyeff_step), ("peer", peer_step)):
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            c1, t1 = time.process_time(), time.perf_counter()
            row[f"{side}_s"].append(t1 - t0)
            row[f"{side}_cpu_s"].append(c1 - c0)
    row["ratio"] = statistics.median(row["tinyeff_s"]) / statistics.median(row["peer_s"])
    return row


def _fractions(row: dict, rates: tuple) -> None:
    """``fraction`` (wall) and ``fraction_cpu`` of tinyeff's median against ``rates``."""
    flops = row.get("flops_fwd_bwd")
    if not flops or "tinyeff_s" not in row:
        return
    row["fraction"] = flops / statistics.median(row["tinyeff_s"]) / 1e9 / rates[0]
    row["fraction_cpu"] = flops / statistics.median(row["tinyeff_cpu_s"]) / 1e9 / rates[1]


def _ms(ts) -> str:
    med, low = 1e3 * statistics.median(ts), 1e3 * min(ts)
    fmt = (lambda x: f"{x:.0f}") if med >= 100 else (lambda x: f"{x:.3g}")
    return f"{fmt(med)} ({fmt(low)})"


def _header(cpu: bool) -> str:
    text = (f"{'variant':<17}{'peer':<35}{'N':>7}  {'tinyeff ms':<16}{'peer ms':<16}"
            f"{'tinyeff/peer':>12}{'frac':>6}")
    if cpu:
        text += f"  {'tinyeff cpu ms':<16}{'peer cpu ms':<16}{'cpu frac':>8}"
    return text + "  note"


def _line(row: dict, cpu: bool) -> str:
    head = f"{row['variant']:<17}{row['peer']:<35}{row['n']:>7}  "
    if "tinyeff_s" not in row:
        return head + f"{'':<16}{'':<16}{'':>12}{'':>6}" + (
            f"  {'':<16}{'':<16}{'':>8}" if cpu else "") + f"  {row['note']}"
    frac, frac_cpu = row.get("fraction"), row.get("fraction_cpu")
    text = (head + f"{_ms(row['tinyeff_s']):<16}{_ms(row['peer_s']):<16}"
            f"{row['ratio']:>12.2f}{'' if frac is None else f'{frac:.2f}':>6}")
    if cpu:
        text += (f"  {_ms(row['tinyeff_cpu_s']):<16}{_ms(row['peer_cpu_s']):<16}"
                 f"{'' if frac_cpu is None else f'{frac_cpu:.2f}':>8}")
    return text + f"  {row['note']}"
