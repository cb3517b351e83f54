"""Memory of reversible blocks (Reformer) against plain pre-LN blocks, as the model deepens.

A plain Transformer keeps every block's activations for the backward pass, so its training
memory grows with depth.  A reversible block y₁ = x₁ + F(x₂), y₂ = x₂ + G(y₁) can rebuild
its inputs from its outputs, so the backward recomputes them block by block and the kept
activations do not grow with depth; the price is one more forward per block.

Measured here, for L = 1, 2, 4, 8 blocks (same width, same data):

* "kept MiB": the bytes of the arrays that the forward pass keeps for the backward
  (``tinyeff.nn.activation_nbytes`` of the model's context, each buffer counted once);
* "peak MiB": ``tracemalloc`` peak of one whole training step (forward + backward), above
  the memory held before it — every NumPy array, including the recomputation's temporaries;
* "ms": median wall time of a training step (3 runs).

Run:  python demos/reversible_memory.py [--quick]
"""

import argparse
import statistics
import time
import tracemalloc

import numpy as np

from tinyeff.nn import Transformer, activation_nbytes


def measure(reversible, layers, args):
    model = Transformer(256, args.d_model, 4, layers, max_len=args.seq_len,
                        attention=args.variant, reversible=reversible, seed=0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(args.batch, args.seq_len))
    y = rng.integers(0, 256, size=(args.batch, args.seq_len))
    model.loss_and_grads(x, y)                                       # warm-up
    _, ctx = model.forward(x)
    kept = activation_nbytes(ctx)
    del ctx
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    model.loss_and_grads(x, y)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        model.loss_and_grads(x, y)
        times.append(time.perf_counter() - t0)
    return kept, peak, statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="full")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    args = p.parse_args()
    depths = (1, 2, 4, 8)
    if args.quick:
        args.seq_len, args.batch, args.d_model, depths = 64, 2, 32, (1, 2)
    print(f"{args.variant} attention, N={args.seq_len}, batch {args.batch}, "
          f"d_model {args.d_model}, float32")
    print(f"{'layers':>6} | {'plain kept MiB':>14} {'peak MiB':>9} {'ms':>7} | "
          f"{'reversible kept MiB':>19} {'peak MiB':>9} {'ms':>7}")
    mib = 2.0 ** 20
    for layers in depths:
        pk, pp, pt = measure(False, layers, args)
        rk, rp, rt = measure(True, layers, args)
        print(f"{layers:>6} | {pk / mib:>14.1f} {pp / mib:>9.1f} {1e3 * pt:>7.0f} | "
              f"{rk / mib:>19.1f} {rp / mib:>9.1f} {1e3 * rt:>7.0f}")


if __name__ == "__main__":
    main()
