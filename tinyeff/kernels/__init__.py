"""Numba kernels.  Optimizations only: each is tested against the NumPy reference of its variant.

Conventions: outputs first, then inputs, then sizes and scalars, all contiguous arrays; no
validation and no defaults (the variant's wrapper does that); ``prange`` only over
independent outputs, every reduction serial in a fixed order, so results are bit-identical
whatever the thread count.  The jit policy lives in :mod:`tinyeff.kernels._jit`.

:func:`blas_single_thread` is the one helper the variants' wrappers use around kernels that
call BLAS from ``prange`` threads.
"""

from ._math import blas_single_thread

__all__ = ["blas_single_thread"]
