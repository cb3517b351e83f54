"""Allocation of the large arrays the kernel paths return (outputs and gradients).

``empty(shape, dtype)`` is ``np.empty(shape, dtype)`` that is cheap to call once per
training step at large N.  It differs from ``np.empty`` in two ways, both about fresh
memory, never about results.

Why: glibc serves an allocation above 32 MiB straight from the operating system (``mmap``)
and hands it back at ``free``; smaller ones come from its heap, but when more than its trim
threshold (twice the mmap threshold, which rises up to 32 MiB) lies free at the top of the
heap, it hands that back too — as it does when a backward's three 16 MiB gradients
(N = 16,384, H = 4, D = 64, float32) are dropped together.  So without reuse a
forward+backward at large N page-faults its outputs and gradients afresh, and each fresh
page is zeroed by the kernel (and, on a virtual machine that returns freed memory to its
host, backed again by the host).
``python -m tinyeff bench --first-touch`` measures that cost; BENCHMARKS.md ("Fresh memory")
has the figures.

1. **Reuse.**  Blocks of at least :data:`CACHE_MIN_BYTES` (4 MiB) are kept after the
   caller drops them and handed out again for a request of the same size.  (Below it,
   glibc's heap recycles them well enough, and a block kept for one exact size would hold
   memory that glibc could hand to a request of another.)  A block is
   free when nothing but this cache refers to it: every array ``empty`` returns is a view
   of the block, and every view of that array has the block as its ``base``, so the
   block's reference count says whether any of them is alive.  The cache holds at most
   :func:`cache_limit` bytes (default the smaller of 1 GiB and 1/8 of physical memory,
   or the environment variable ``TINYEFF_CACHE_MIB`` read at import; beyond it ``empty``
   falls back to plain allocation); :func:`clear_cache` lets the free blocks go, and
   ``set_cache_limit(0)`` or ``TINYEFF_CACHE_MIB=0`` turns reuse off.  The returned arrays are
   ordinary writeable C-contiguous arrays, except that ``a.base`` is the block
   (``a.flags.owndata`` is False).
2. **Small pages.** NumPy asks Linux for transparent huge pages (``madvise``) on every
   allocation of 4 MiB or more; on a VM that returns freed memory to its host a fresh huge
   page costs more than its 512 small pages (BENCHMARKS.md). ``empty`` skips that request
   for its blocks (only the request: a system set to ``transparent_hugepage=always`` still
   gets huge pages). NumPy's setting is process-wide, so it is switched off for the one
   allocation under a lock and restored; another thread allocating at that instant can at
   worst miss it too.

Thread-safe (under locks).  Nothing here changes a value: tests compare every variant's
output with and without reuse bit for bit.
"""

from __future__ import annotations

import numbers
import os
import sys
import threading

import numpy as np

try:                                   # NumPy >= 2
    from numpy._core.multiarray import _set_madvise_hugepage
except ImportError:                    # pragma: no cover - NumPy 1.x
    try:
        from numpy.core.multiarray import _set_madvise_hugepage
    except ImportError:
        _set_madvise_hugepage = None

__all__ = ["empty", "zeros", "cache_limit", "set_cache_limit", "clear_cache", "cached_bytes"]

CACHE_MIN_BYTES = 4 << 20              # smaller blocks: glibc's heap serves them (docstring)


def _default_limit() -> int:
    env = os.environ.get("TINYEFF_CACHE_MIB")
    if env is not None:
        try:
            mib = int(env)
        except ValueError:
            mib = -1
        if mib < 0:
            raise ValueError(f"TINYEFF_CACHE_MIB must be an integer >= 0 (MiB), got {env!r}")
        return mib << 20
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        ram = 8 << 30
    return min(1 << 30, ram // 8)


_LOCK = threading.Lock()                # the block list
_HUGE_LOCK = threading.Lock()           # NumPy's process-wide huge-page setting
_blocks: list[np.ndarray] = []         # (nbytes,) uint8 blocks, oldest first
_limit = _default_limit()


def empty(shape, dtype) -> np.ndarray:
    """An uninitialized array like ``np.empty(shape, dtype)`` (module docstring)."""
    dtype = np.dtype(dtype)
    shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(s) for s in shape)
    nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if nbytes < CACHE_MIN_BYTES or min(shape, default=0) < 0:  # (< 0: np.empty raises)
        return _fresh(shape, dtype)
    with _LOCK:
        block = _take(nbytes)
    return block.view(dtype).reshape(shape)


def zeros(shape, dtype) -> np.ndarray:
    """Like ``np.zeros(shape, dtype)``: :func:`empty`, then filled with 0 (one pass over
    reused memory, where ``np.zeros`` of a large size gets fresh pages that fault in as the
    kernels first write them)."""
    a = empty(shape, dtype)
    a[...] = 0
    return a


def cache_limit() -> int:
    """Bytes the cache may hold (blocks in use and free)."""
    return _limit


def set_cache_limit(nbytes: int) -> int:
    """Set :func:`cache_limit` (0 turns reuse off); returns the previous limit."""
    global _limit
    if isinstance(nbytes, bool) or not isinstance(nbytes, numbers.Integral):
        raise TypeError(f"nbytes must be an integer, got {type(nbytes).__name__}")
    nbytes = int(nbytes)
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    with _LOCK:
        previous, _limit = _limit, nbytes
        _evict(0)
    return previous


def clear_cache() -> None:
    """Let go of every free block (blocks still in use stay until they are dropped)."""
    with _LOCK:
        _evict(None)


def cached_bytes() -> tuple[int, int]:
    """(bytes in blocks in use, bytes in free blocks)."""
    with _LOCK:
        free = [_is_free(i) for i in range(len(_blocks))]
        return (sum(b.nbytes for b, f in zip(_blocks, free) if not f),
                sum(b.nbytes for b, f in zip(_blocks, free) if f))


# --------------------------------------------------------------------------- under _LOCK

def _is_free(i: int) -> bool:
    # Free = as many references as an object held by a list alone (_ONLY_LISTED: the list,
    # plus getrefcount's argument where the interpreter counts it); every live array that
    # empty() returned, and every view of one, holds one more (its base is the block).
    return sys.getrefcount(_blocks[i]) == _ONLY_LISTED


def _count_only_listed() -> int:
    probe = [object()]
    return sys.getrefcount(probe[0])


_ONLY_LISTED = _count_only_listed()


def _take(nbytes: int) -> np.ndarray:
    for i in range(len(_blocks)):
        if _blocks[i].nbytes == nbytes and _is_free(i):
            _blocks.append(_blocks.pop(i))                         # now the newest
            return _blocks[-1]
    _evict(nbytes)
    block = _fresh((nbytes,), np.dtype(np.uint8))                  # (nbytes,)
    if sum(b.nbytes for b in _blocks) + nbytes <= _limit:
        _blocks.append(block)
    return block


def _evict(room: int | None) -> None:
    """Drop free blocks, oldest first, until ``room`` more bytes fit under the limit
    (``None``: drop every free block)."""
    i = 0
    while i < len(_blocks):
        total = sum(b.nbytes for b in _blocks)
        if room is not None and total + room <= _limit:
            return
        if _is_free(i):
            del _blocks[i]
        else:
            i += 1


def _fresh(shape, dtype) -> np.ndarray:
    """``np.empty`` without NumPy's transparent-huge-page request."""
    if _set_madvise_hugepage is None:  # pragma: no cover - NumPy without the setting
        return np.empty(shape, dtype)
    with _HUGE_LOCK:
        previous = _set_madvise_hugepage(False)
        try:
            return np.empty(shape, dtype)
        finally:
            _set_madvise_hugepage(previous)

