"""The one jit policy of tinyeff, and the way its kernels use the cores.

``serial``: ``cache=True`` (compiled code is cached next to the source, so the test suite
and the CLI do not recompile), ``fastmath=False`` (masked logits rely on −inf, which
fastmath's no-inf/no-NaN assumptions may remove; and reassociation would change bits),
``nogil=True``.  ``NUMBA_DISABLE_JIT=1`` runs every kernel as plain Python.

Parallelism: :func:`run_tasks` runs a ``serial`` kernel over blocks of independent tasks,
one block per thread (``numba.get_num_threads()``, so :func:`num_threads` and
``NUMBA_NUM_THREADS`` apply); the kernels release the GIL, so the blocks run at once.  The
tasks of a pass write disjoint outputs and every sum runs in a fixed order inside a task,
so results are bit-identical whatever the number of threads.  No kernel uses ``prange``:
every ``prange`` loop is compiled as a function of its own (a gufunc) whose module links in
and re-optimizes every helper the loop calls, and the kernel's module does it once more, so
the same loops compiled in about twice the time (BENCHMARKS.md, "Cold start"); the price of
threads is a few Python calls per pass.

Compiling is slow (seconds per kernel module) and happens once per machine: the first time a
kernel module compiles in a process, one line on stderr says so, so that a first call does
not wait in silence; loading from the cache prints nothing.

Cache freshness: Numba keys a function's cache on its own source file only, yet a kernel
carries the compiled code of every helper it calls from another file (``fast_exp`` of
``_math.py`` is inlined into nearly every kernel), so an edited helper would keep running,
stale, inside the other modules' cached kernels (numba/numba#1833).  :func:`_stamp_caches`
therefore adds :data:`SOURCES_DIGEST`, one hash of every ``.py`` file of this package, to
the source stamp of each kernel's cache: any change to any kernel source recompiles all of
them once, as a fresh install does.

SPEEDTIP (compile time; ``python -m tinyeff bench --cold-start`` measures it on an empty cache):

* the loop over a block of tasks belongs inside the task kernel: a kernel that calls
  another links in and re-optimizes the callee's code, so a thin loop kernel around a
  per-task helper compiles every task body once more (measured: 1–2 s per kernel);
* array expressions (``x += np.dot(a, b)``, ``x[i0:i1] = y``) compile broadcasting checks
  whose error messages format strings (seconds per kernel): loops (``_math.add_rows``) do
  the same sums without them.

``OMP_WAIT_POLICY`` is set to PASSIVE before Numba can start an OpenMP thread pool, unless
the environment already sets it: should a parallel region ever run (a user's own ``prange``
code in the same process), its workers then sleep afterwards instead of spinning on the
cores that OpenBLAS needs for the matrix products of the NumPy code (BENCHMARKS.md).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")     # read once, when the pool starts

import numba  # noqa: E402
import numpy as np  # noqa: E402
from numba.core import event  # noqa: E402

serial = numba.njit(cache=True, parallel=False, fastmath=False, nogil=True)

KERNELS_DIR = os.path.dirname(os.path.abspath(__file__))


def sources_digest(directory: str = KERNELS_DIR) -> str:
    """SHA-256 over the names and contents of the ``.py`` files of ``directory``."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        if name.endswith(".py"):
            with open(os.path.join(directory, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()


SOURCES_DIGEST = sources_digest()


def _stamp_caches() -> bool:
    """Put, in front of Numba's cache locators, one subclass of each whose source stamp
    adds :data:`SOURCES_DIGEST` for functions defined in this package (module docstring).
    Returns False, leaving Numba as it is, if its caching module lacks the locator list."""
    from numba.core import caching
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    bases = getattr(impl, "_locator_classes", None)
    if not isinstance(bases, list):
        return False
    # (a second copy of the package, e.g. the old tree of ``bench --against``, adds its own)
    bases[:] = [b for b in bases if getattr(b, "tinyeff_kernels", None) != KERNELS_DIR]
    numba_own = [b for b in bases if getattr(b, "tinyeff_kernels", None) is None]

    def stamped(base):
        class Stamped(base):
            tinyeff_kernels = KERNELS_DIR

            def get_source_stamp(self):
                return super().get_source_stamp(), SOURCES_DIGEST

            @classmethod
            def from_function(cls, py_func, py_file):
                if os.path.dirname(os.path.abspath(py_file)) != KERNELS_DIR:
                    return None
                return super().from_function(py_func, py_file)

        Stamped.__name__ = Stamped.__qualname__ = "Stamped" + base.__name__.lstrip("_")
        return Stamped

    bases[:0] = [stamped(b) for b in numba_own]
    return True


_stamp_caches()


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
    """Run the enclosed code with ``n`` Numba threads (at most NUMBA_NUM_THREADS); the
    passes :func:`run_tasks` had found too small for several threads are tried anew."""
    old = numba.get_num_threads()
    numba.set_num_threads(n)
    _SMALL.clear()
    try:
        yield
    finally:
        numba.set_num_threads(old)
        _SMALL.clear()


_POOL: list = []          # the worker threads of run_tasks, started on first use
_SMALL: set = set()       # (fn, n_tasks, shape) of passes too small for more than one thread
SMALL_S = 250e-6          # a pass on several threads faster than this is run on one next time
LARGE_S = 500e-6          # a pass on one thread (so marked) slower than this goes back to several


def run_tasks(fn, n_tasks: int, *args) -> None:
    """``fn(lo, hi, *args)`` over the tasks 0 … n_tasks − 1, in one block of consecutive
    tasks per Numba thread (``numba.get_num_threads()``, so ``num_threads`` applies); the
    calling thread runs the first block, worker threads the others, in parallel when ``fn``
    is a ``serial`` kernel (it releases the GIL).  The blocks must write disjoint outputs;
    which thread runs a task then changes no result.

    Threads per call from its size: handing blocks to other threads costs tens of
    microseconds, more than a small pass gains.  A pass of ``fn`` over ``n_tasks`` tasks
    with a first array argument of a given shape that took less than ``SMALL_S`` on several
    threads runs in one block from then on (and on several again if such a one-block call
    ever takes more than ``LARGE_S``).  Results are the same bits either way.
    """
    threads = max(1, min(numba.get_num_threads(), n_tasks))
    first = next((x for x in args if isinstance(x, np.ndarray)), None)
    key = (fn, n_tasks, None if first is None else first.shape)
    small = key in _SMALL
    blocks = 1 if small else threads
    start = time.perf_counter()
    _run_blocks(fn, n_tasks, blocks, args)
    took = time.perf_counter() - start
    if blocks > 1 and took < SMALL_S:
        _SMALL.add(key)
    elif small and took > LARGE_S:
        _SMALL.discard(key)


def _run_blocks(fn, n_tasks, blocks, args):
    """fn over ``blocks`` consecutive blocks of the tasks, the first on this thread."""
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
