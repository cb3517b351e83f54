"""The one jit policy of tinyeff.

``cache=True`` (compiled code is cached next to the source, so the test suite and the CLI
do not recompile), ``fastmath=False`` (masked logits rely on −inf, which fastmath's
no-inf/no-NaN assumptions may remove; and reassociation would change bits), ``nogil=True``.
``kernel`` is for parallel kernels (``prange`` over independent outputs), ``serial`` for
helpers called from them.  ``NUMBA_DISABLE_JIT=1`` runs every kernel as plain Python.

Compiling is slow (seconds per kernel module) and happens once per machine: the first time a
kernel module compiles in a process, one line on stderr says so, so that a first call does
not wait in silence; loading from the cache prints nothing.
"""

from __future__ import annotations

import contextlib
import sys

import numba
from numba.core import event

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
