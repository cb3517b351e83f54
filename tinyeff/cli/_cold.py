"""Cold start: the first forward+backward of each kernel path on an empty Numba cache.

    python -m tinyeff bench --cold-start [--paths NAME,...] [--dtype float32|float64] [--list]

Each path runs in a fresh Python process whose ``NUMBA_CACHE_DIR`` is a new empty directory,
so everything it calls is compiled; the table gives the wall and CPU seconds of that first
``forward`` + ``backward`` (compilation included, import excluded).  Compilation is mostly
single-threaded, so on a shared machine the CPU seconds are the steadier number; the load
(``os.getloadavg``) is printed with each row.

A path is a variant at one length N with its benchmark options (``bench_options(n)``),
batch (1, 2), D = Dv = 64: every variant at N = 256 with impl="auto", full's blocked kernel
at N = 2,048, and the causal scans of linear and Performer at N = 4,096.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from .report import child_env

#: name -> (variant, N, extra options)
PATHS = {
    **{f"{v}-256": (v, 256, {}) for v in ("full", "hierarchical", "linear", "linformer", "local",
                                           "lsh", "performer", "sparse", "window")},
    "full-blocked-2048": ("full", 2048, {"impl": "blocked"}),
    "full-blocked-causal-2048": ("full", 2048, {"impl": "blocked", "causal": True}),
    "linear-causal-4096": ("linear", 4096, {"causal": True}),
    "performer-causal-4096": ("performer", 4096, {"causal": True}),
}

_CHILD = r"""
import json, sys, time
import numpy as np
from tinyeff.attention import VARIANTS
from tinyeff.attention._options import split_options
from tinyeff._random import random_qkv

name, n, extra, dtype = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
mod = VARIANTS[name]
rng = np.random.default_rng(0)
fwd, rnd, lay = split_options(mod, {**mod.bench_options(n), **extra})
d = 64
args = random_qkv(rng, (1, 2), n, n, d=d, dv=d, dtype=np.dtype(dtype))
if getattr(mod, "SHARED_QK", False):
    args["k"] = args["q"]
if hasattr(mod, "draw_random_options"):
    fwd.update(mod.draw_random_options(rng, d, np.dtype(dtype), **rnd))
if hasattr(mod, "init_layer_params"):
    fwd.update(mod.init_layer_params(rng, n, np.dtype(dtype), **lay))
w0, c0 = time.perf_counter(), time.process_time()
out, ctx = mod.forward(**args, **fwd)
mod.backward(np.ones_like(out), ctx)
w1, c1 = time.perf_counter(), time.process_time()
print(json.dumps({"wall": w1 - w0, "cpu": c1 - c0, "impl": getattr(ctx, "impl", None)}))
"""


def run_path(name: str, dtype: str = "float32") -> dict:
    """One path in a fresh process on an empty cache -> {"wall", "cpu", "impl", "load"}."""
    variant, n, extra = PATHS[name]
    with tempfile.TemporaryDirectory(prefix="tinyeff-cold-") as cache:
        env = child_env(NUMBA_CACHE_DIR=cache)
        load = os.getloadavg()[0]
        res = subprocess.run([sys.executable, "-c", _CHILD, variant, str(n), json.dumps(extra),
                              dtype], env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{res.stderr}")
    return {**json.loads(res.stdout.strip().splitlines()[-1]), "load": load}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tinyeff bench --cold-start", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paths", default=",".join(PATHS),
                   help="comma-separated path names (default: all; --list shows them)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--list", action="store_true", help="list the paths and exit")
    args = p.parse_args(argv)
    if args.list:
        for name, (variant, n, extra) in PATHS.items():
            print(f"{name:26s} {variant} N={n} {extra or ''}")
        return 0
    names = [x for x in args.paths.split(",") if x]
    unknown = [x for x in names if x not in PATHS]
    if unknown:
        p.error(f"unknown path(s) {unknown}; known: {', '.join(PATHS)}")
    print(f"{'path':26s} {'impl':8s} {'wall s':>7s} {'cpu s':>7s} {'load':>5s}", flush=True)
    for name in names:
        r = run_path(name, args.dtype)
        print(f"{name:26s} {str(r['impl']):8s} {r['wall']:7.1f} {r['cpu']:7.1f} "
              f"{r['load']:5.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
