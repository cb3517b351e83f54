"""Allocation of the large arrays a kernel path returns (outputs and gradients).

``empty(shape, dtype)`` is ``np.empty`` without NumPy's request for transparent huge pages.

NumPy calls ``madvise(MADV_HUGEPAGE)`` on every allocation of 4 MiB or more (Linux; its
``NUMPY_MADVISE_HUGEPAGE`` setting).  Arrays that large come straight from the operating
system (``mmap``) and go back to it when freed, so an (N, D) output or gradient at large N
is fresh memory on every call, and its first write pays for the page faults.  On a
virtual machine that hands freed memory back to its host in 2 MiB blocks (virtio-balloon
free page reporting, as on the Firecracker VMs the benchmark runs on), a fresh huge page
waits for the host to back it: first writes to a fresh 64 MiB array measured 230 ms with
huge pages and 48 ms with 4 KiB pages there (medians of 6, freed memory given 3 s to be
reported).  That cost grew the Performer forward+backward at N = 65,536 by ~0.7 s (16 %),
and it is absent at small N, where the allocator recycles the same memory.  These arrays
are written and read once in order, where small pages cost nothing measurable on bare
metal either.  So the kernel paths allocate what they return here.

Only NumPy's own request is skipped; a system set to ``transparent_hugepage=always``
still gets huge pages.  The setting is process-wide in NumPy: it is switched off for the
one allocation under a lock and restored, so another thread allocating at that instant
can at worst miss the request too (speed only, never a result).
"""

from __future__ import annotations

import threading

import numpy as np

try:                                   # NumPy >= 2
    from numpy._core.multiarray import _set_madvise_hugepage
except ImportError:                    # pragma: no cover - NumPy 1.x
    try:
        from numpy.core.multiarray import _set_madvise_hugepage
    except ImportError:
        _set_madvise_hugepage = None

_LOCK = threading.Lock()


def empty(shape, dtype) -> np.ndarray:
    """``np.empty(shape, dtype)`` without asking for transparent huge pages (see above)."""
    if _set_madvise_hugepage is None:  # pragma: no cover - NumPy without the setting
        return np.empty(shape, dtype)
    with _LOCK:
        previous = _set_madvise_hugepage(False)
        try:
            return np.empty(shape, dtype)
        finally:
            _set_madvise_hugepage(previous)
