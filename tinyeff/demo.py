"""``python -m tinyeff demo``: a small working tour of tinyeff on random data.

For every registered attention variant: run its example cases forward and backward in
float64, check the hand-written backward against central finite differences, compare
float32 with float64, and print one table.  (The training comparison replaces this tour
once the model lands.)
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from .attention import VARIANTS
from .testing import check_vjp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinyeff demo", description=__doc__)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated variant names (default: all)")
    args = parser.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; valid: {sorted(VARIANTS)}")
    rng = np.random.default_rng(args.seed)
    print(f"{'variant':<13}{'case':<16}{'out shape':<16}{'grad rel err':>13}"
          f"{'f32 vs f64':>12}{'ms fwd+bwd':>12}")
    worst = 0.0
    for name in names:
        mod = VARIANTS[name]
        for case in mod.example_cases(rng):
            t0 = time.perf_counter()
            out, ctx = mod.forward(**case.args, **case.options)
            mod.backward(np.ones_like(out), ctx)
            ms = (time.perf_counter() - t0) * 1e3
            err = check_vjp(mod.forward, mod.backward, case.args, case.options, rng=rng,
                            invariant=getattr(mod, "gradcheck_invariant", None)).max()
            args32 = {k: a.astype(np.float32) for k, a in case.args.items()}
            opts32 = {k: (a.astype(np.float32) if isinstance(a, np.ndarray)
                          and a.dtype == np.float64 else a) for k, a in case.options.items()}
            out32, _ = mod.forward(**args32, **opts32)
            f32 = float(np.max(np.abs(out32 - out), initial=0))
            worst = max(worst, err)
            print(f"{name:<13}{case.name:<16}{str(out.shape):<16}{err:>13.2e}{f32:>12.1e}"
                  f"{ms:>12.2f}")
    print(f"\nworst float64 gradient relative error: {worst:.2e} (bar: 1e-6)")
    return 0 if worst < 1e-6 else 1
