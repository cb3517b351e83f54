"""Shared fixtures, and how the suite compiles its Numba kernels.

Compilation dominates a cold run of the suite (every kernel in float32 and float64), so the
tests compile at LLVM optimization level 1 (``NUMBA_OPT=1``: about half the compile time of
the default level 3, measured on the window and blocked kernels: 35 s against 72 s) into a
cache of their own (``.numba-test-cache/`` at the repository root), so that the
optimized kernels a user's own runs cache next to the sources are never replaced by these.
Both are defaults: set ``NUMBA_OPT`` or ``NUMBA_CACHE_DIR`` to override them.  The level
changes speed only, not results: the jit policy keeps ``fastmath`` off, so LLVM may not
reorder floating-point operations (the one documented ``reassoc`` opt-in, in the sparse
kernels, is compared with tolerances, and its thread-count bit identity holds per build).
These variables are set before anything imports Numba, and subprocesses started by tests
inherit them.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

os.environ.setdefault("NUMBA_OPT", "1")
os.environ.setdefault("NUMBA_CACHE_DIR",
                      str(Path(__file__).resolve().parent.parent / ".numba-test-cache"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A ``numpy.random.Generator`` seeded by a stable hash of the test's node id."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
