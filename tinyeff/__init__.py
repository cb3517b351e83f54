"""tinyeff: efficient-Transformer attention in NumPy and Numba.

Every attention variant is a module of :mod:`tinyeff.attention` with a pure
``forward(...) -> (out, ctx)`` and a hand-written ``backward(dout, ctx) -> dict``;
``tinyeff.attention.VARIANTS`` lists them all.  :mod:`tinyeff.testing` holds the
gradient checker and comparison helpers that the tests (and other backends) use.
"""

from . import attention, memory, nn, testing
from ._version import __version__

__all__ = ["attention", "memory", "nn", "testing", "__version__"]
