"""The one jit policy of tinyeff.

``cache=True`` (compiled code is cached next to the source, so the test suite and the CLI
do not recompile), ``fastmath=False`` (masked logits rely on −inf, which fastmath's
no-inf/no-NaN assumptions may remove; and reassociation would change bits), ``nogil=True``.
``kernel`` is for parallel kernels (``prange`` over independent outputs), ``serial`` for
helpers called from them.  ``NUMBA_DISABLE_JIT=1`` runs every kernel as plain Python.
"""

from __future__ import annotations

import contextlib

import numba

kernel = numba.njit(cache=True, parallel=True, fastmath=False, nogil=True)
serial = numba.njit(cache=True, parallel=False, fastmath=False, nogil=True)
prange = numba.prange


@contextlib.contextmanager
def num_threads(n: int):
    """Run the enclosed code with ``n`` Numba threads (at most NUMBA_NUM_THREADS)."""
    old = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(old)
