"""The one jit policy of tinyeff.

``cache=True`` (compiled code is cached next to the source, so the test suite and the CLI
do not recompile), ``fastmath=False`` (masked logits rely on −inf, which fastmath's
no-inf/no-NaN assumptions may remove; and reassociation would change bits), ``nogil=True``.
``kernel`` is for parallel kernels (``prange`` over independent outputs), ``serial`` for
helpers called from them.  ``NUMBA_DISABLE_JIT=1`` runs every kernel as plain Python.

Compiling is slow (seconds per kernel module) and happens once per machine: the first time a
kernel module compiles in a process, one line on stderr says so, so that a first call does
not wait in silence; loading from the cache prints nothing.

SPEEDTIP (compile time; ``python -m tinyeff bench --cold-start`` measures it on an empty cache):

* every ``prange`` body is compiled as a function of its own (a gufunc) whose module links
  in and re-optimizes every helper it calls, and the kernel's module does it once more:
  few ``prange`` loops per kernel, each a short loop around one ``serial`` helper that holds
  the body (the helper is then compiled once and the two re-optimizations see small code);
* a raw ``prange`` index passed to a helper types as int64 in one pass and as uint64 in the
  gufunc: two compilations of the helper.  Pass ``np.int64(i)``, or index arithmetic;
* ``prange(a if c else b)`` is not parallelized at all: compute the count first;
* array expressions (``x += np.dot(a, b)``, ``x[i0:i1] = y``) compile broadcasting checks
  whose error messages format strings (seconds per kernel): loops (``_math.add_rows``) do
  the same sums without them;
* parallel kernels cost a fixed second or more each: O(n) bookkeeping runs ``serial``.

``run_tasks`` is the other way to use the cores: serial kernels (``nogil``) over blocks of
independent tasks, one block per Python thread.  It compiles no gufunc, so a kernel module
built on it compiles in about half the time of the same loops under ``prange``.

Between parallel regions the worker threads sleep: ``OMP_WAIT_POLICY`` is set to PASSIVE
before Numba starts its OpenMP thread pool, unless the environment already sets it.  With
OpenMP's default the workers spin after each region and take the cores that OpenBLAS then
needs for the matrix products of the NumPy code between kernel calls (BENCHMARKS.md).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")     # read once, when the pool starts

import numba  # noqa: E402
from numba.core import event  # noqa: E402

kernel = numba.njit(cache=True, parallel=True, fastmath=False, nogil=True)
serial = numba.njit(cache=True, parallel=False, fastmath=False, nogil=True)
prange = numba.prange


class _CompileNotice(event.Listener):
    """One stderr line per kernel module, the first time one of its kernels compiles."""

    def __init__(self):
        self.seen: set[str] = set()

    def on_start(self, ev):
        module = getattr(getattr(ev.data["dispatcher"], "py_func", None), "__module__", "")
        if module.startswith("tinyeff.kernels.") and module not in self.seen:
            self.seen.add(module)
            name = module.rsplit(".", 1)[-1].lstrip("_")
            print(f"tinyeff: compiling the {name} kernels (first run only; later runs load "
                  "them from the cache)", file=sys.stderr, flush=True)

    def on_end(self, ev):
        pass


event.register("numba:compile", _CompileNotice())


@contextlib.contextmanager
def num_threads(n: int):
    """Run the enclosed code with ``n`` Numba threads (at most NUMBA_NUM_THREADS)."""
    old = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(old)


_POOL: list = []          # the worker threads of run_tasks, started on first use


def run_tasks(fn, n_tasks: int, *args) -> None:
    """``fn(lo, hi, *args)`` over the tasks 0 … n_tasks − 1, in one block of consecutive
    tasks per Numba thread (``numba.get_num_threads()``, so ``num_threads`` applies); the
    calling thread runs the first block, worker threads the others, in parallel when ``fn``
    is a ``serial`` kernel (it releases the GIL).  The blocks must write disjoint outputs;
    which thread runs a task then changes no result."""
    blocks = max(1, min(numba.get_num_threads(), n_tasks))
    bounds = [n_tasks * i // blocks for i in range(blocks + 1)]
    if blocks == 1:
        fn(0, n_tasks, *args)
        return
    if not _POOL:
        _POOL.append(concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, numba.config.NUMBA_NUM_THREADS - 1),
            thread_name_prefix="tinyeff"))
    rest = [_POOL[0].submit(fn, bounds[i], bounds[i + 1], *args) for i in range(1, blocks)]
    try:
        fn(bounds[0], bounds[1], *args)
    finally:
        for f in rest:
            f.result()
