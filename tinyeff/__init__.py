"""tinyeff: efficient-Transformer attention in NumPy and Numba.

Every attention variant is a module of :mod:`tinyeff.attention` with a pure
``forward(...) -> (out, ctx)`` and a hand-written ``backward(dout, ctx) -> dict``;
``tinyeff.attention.VARIANTS`` lists them all.  :mod:`tinyeff.testing` holds the
gradient checker and comparison helpers that the tests (and other backends) use.
"""

import importlib

from ._version import __version__

__all__ = ["attention", "memory", "nn", "testing", "__version__"]


def __getattr__(name: str):
    """Import the subpackages on first use (PEP 562), so that ``import tinyeff.testing...``
    (the pytest plugin, loaded in every pytest run where tinyeff is installed) does not
    import Numba and compile nothing it does not need."""
    if name in ("attention", "memory", "nn", "testing"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'tinyeff' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
