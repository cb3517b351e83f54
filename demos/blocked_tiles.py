"""How fast is exact attention's blocked kernel at other tile sizes and causal bands?

``full(impl="blocked")`` (tinyeff/kernels/blocked.py) works in square tiles of
``full.BLOCKED_TILE`` queries and keys, and takes a causal diagonal tile in bands of
``full.BLOCKED_BAND`` keys, each against the queries that see it.  This script times one
forward + backward (B = 1, H = 4, D = 64, float32, random q, k, v) for each value of one of
the two settings, the values alternated round by round in one process so that all of them
see the same load, and prints per value the median time and the median of the
round-by-round ratios to the first value (< 1: faster than the first).

Run:  python demos/blocked_tiles.py --causal --n 4096 --band 384,192,128,96,64,48,32
      python demos/blocked_tiles.py --causal --n 4096 --tile 384,256,320,448,512
      python demos/blocked_tiles.py --quick
"""

import argparse
import statistics
import time

import numpy as np

from tinyeff.attention import full


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--band", help="comma-separated BLOCKED_BAND values (keys)")
    which.add_argument("--tile", help="comma-separated BLOCKED_TILE values (queries and keys)")
    p.add_argument("--n", type=int, default=4096, help="sequence length N")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--rounds", type=int, default=9, help="timed rounds (each value once)")
    p.add_argument("--quick", action="store_true", help="smoke test: N = 256, 2 rounds")
    args = p.parse_args()
    if args.quick:
        args.n, args.rounds = 256, 2
        args.band = args.band or (None if args.tile else "32,16")
        args.causal = True
    name = "BLOCKED_TILE" if args.tile else "BLOCKED_BAND"
    values = [int(x) for x in (args.tile or args.band or "384,128,64").split(",")]

    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((1, 4, args.n, 64)).astype(np.float32)
                     for _ in range(4))

    def step(value):
        setattr(full, name, value)
        t = time.perf_counter()
        out, ctx = full.forward(q, k, v, causal=args.causal, impl="blocked")
        full.backward(dout, ctx)
        return time.perf_counter() - t

    default = getattr(full, name)
    try:
        for value in values:                                       # compile, warm the cache
            step(value)
        times = {value: [] for value in values}
        for _ in range(args.rounds):
            for value in values:
                times[value].append(step(value))
    finally:
        setattr(full, name, default)
    first = times[values[0]]
    print(f"full impl='blocked', N = {args.n}, causal = {args.causal}, B = 1, H = 4, D = 64, "
          f"float32, forward + backward, {args.rounds} rounds")
    print(f"{name:>13}  median ms  ratio to {values[0]}")
    for value in values:
        ratio = statistics.median(t / t0 for t, t0 in zip(times[value], first))
        print(f"{value:>13}  {1e3 * statistics.median(times[value]):9.1f}  {ratio:.3f}")


if __name__ == "__main__":
    main()
