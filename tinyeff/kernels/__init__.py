"""Numba kernels.  Optimizations only: each is tested against the NumPy reference of its variant.

Conventions: outputs first, then inputs, then sizes and scalars, all contiguous arrays; no
validation and no defaults (the variant's wrapper does that); parallel only over
independent outputs (blocks of tasks on threads, ``run_tasks``), every reduction serial in
a fixed order, so results are bit-identical whatever the thread count.
The jit policy and ``run_tasks`` live in :mod:`tinyeff.kernels._jit`.

:func:`blas_single_thread` is the helper the variants' wrappers use around kernels that
call BLAS from their threads; :func:`run_tasks` also runs a wrapper's own NumPy tasks on the
same threads (Linformer's projections).
"""

from ._jit import run_tasks
from ._math import blas_single_thread

__all__ = ["blas_single_thread", "run_tasks"]
