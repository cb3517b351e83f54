"""Input validation shared by every variant.

Every public entry point validates its inputs here, before any arithmetic, so that bad
input gives a ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape or value)
that names the argument and the shapes seen.  Nothing is broadcast or cast silently:
q, k, v must share one float dtype (float32 or float64) and exactly the same leading
batch dimensions.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def float_array(x, name: str, *, min_ndim: int = 0, dtype: np.dtype | None = None) -> np.ndarray:
    """Return ``x`` if it is a float32/float64 ndarray of rank >= ``min_ndim``, else raise.

    Python lists, integer arrays and 0-d scalars are rejected (no silent casting); if
    ``dtype`` is given the array must have exactly that dtype.
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(
            f"{name} must be a numpy.ndarray of float32 or float64, got {type(x).__name__}"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(
            f"{name} has dtype {x.dtype} but the inputs are {np.dtype(dtype)}; "
            "no silent casting: convert it explicitly"
        )
    if x.ndim == 0 and min_ndim > 0:
        # a 0-d array is a scalar, the wrong *kind* of argument (like a Python float)
        raise TypeError(f"{name} must be an array of rank >= {min_ndim}, got a 0-d array "
                        f"(a scalar) {x!r}")
    if x.ndim < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimensions, got shape {x.shape}"
        )
    return x


def qkv(q, k, v):
    """Validate the (q, k, v) triple of the attention contract.

    q (..., N, D), k (..., M, D), v (..., M, Dv) with the same leading batch dimensions and
    the same dtype.  Returns ``(batch_shape, N, M, D, Dv, dtype)``.
    """
    float_array(q, "q", min_ndim=2)
    float_array(k, "k", min_ndim=2)
    float_array(v, "v", min_ndim=2)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}"
        )
    if not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
        raise ValueError(
            "q, k, v must have the same leading batch dimensions (no broadcasting), got "
            f"q {q.shape}, k {k.shape}, v {v.shape}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must have the same last dimension D, got q {q.shape}, k {k.shape}"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"k and v must have the same number of keys M, got k {k.shape}, v {v.shape}"
        )
    if q.shape[-1] == 0:
        # D = 0: every score would be 0 and 1/sqrt(D) undefined (docs/robustness.md)
        raise ValueError(f"q and k must have a head dimension D >= 1, got q {q.shape}, "
                         f"k {k.shape}")
    return q.shape[:-2], q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1], q.dtype


def scale(value, d: int) -> float:
    """``scale`` option: ``None`` means 1/sqrt(D); otherwise a finite real number."""
    if value is None:
        return 1.0 / math.sqrt(d) if d > 0 else 1.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"scale must be finite, got {value}")
    return value


def flag(value, name: str) -> bool:
    """A boolean option (``True``/``False`` or a NumPy bool), nothing else."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def integer(value, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer option (not bool, not float) within [minimum, maximum]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def positive_float(value, name: str, *, allow_zero: bool = False) -> float:
    """A finite positive (or non-negative) real option such as ``eps``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    ok = value >= 0 if allow_zero else value > 0
    if not (math.isfinite(value) and ok):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value}")
    return value


def choice(value, name: str, valid: Sequence[str]) -> str:
    """A string option that must be one of ``valid`` (the error lists them)."""
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"{name} must be one of {sorted(valid)}, got {value!r}")
    return value


def _fits(shape: tuple, target: tuple) -> bool:
    """True if ``shape`` broadcasts to ``target`` without enlarging it."""
    if len(shape) > len(target):
        return False
    for s, t in zip(shape[::-1], target[::-1]):
        if s != t and s != 1:
            return False
    return True


def attn_mask(mask, batch_shape: tuple, n: int, m: int, name: str = "mask"):
    """A boolean mask broadcastable to ``(..., N, M)`` (True = may attend), or ``None``.

    A ``scipy.sparse`` matrix of shape (N, M) is accepted: its stored entries are the
    allowed pairs (explicitly stored False values are rejected rather than guessed).
    Returns a read-only boolean ndarray view (possibly with broadcast dimensions of size 1).
    """
    if mask is None:
        return None
    target = (*batch_shape, n, m)
    if sp.issparse(mask):
        if mask.shape != (n, m):
            raise ValueError(f"{name}: a sparse mask must have shape (N, M) = {(n, m)}, "
                             f"got {mask.shape}")
        if mask.dtype != np.bool_:
            raise TypeError(f"{name}: a sparse mask must have dtype bool, got {mask.dtype}")
        csr = sp.csr_array(mask)
        if csr.nnz and not np.all(csr.data):
            raise ValueError(f"{name}: the sparse mask stores explicit False entries; "
                             "call eliminate_zeros() first")
        return csr.toarray()
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"{name} must be a boolean numpy.ndarray or a scipy.sparse matrix, "
                        f"got {type(mask).__name__}")
    if mask.dtype != np.bool_:
        raise TypeError(f"{name} must have dtype bool (True = may attend), got {mask.dtype}; "
                        "an additive float mask goes into bias=")
    if not _fits(mask.shape, target):
        raise ValueError(f"{name} of shape {mask.shape} does not broadcast to (..., N, M) = "
                         f"{target} without enlarging it")
    return mask


def position_mask(mask, batch_shape: tuple, length: int, name: str, meaning: str):
    """A per-position boolean mask of shape ``(*batch_shape, length)``, or ``None``.

    The mask has exactly ``len(batch_shape) + 1`` dimensions and lines up with the batch
    dimensions from the left; a dimension of size 1 broadcasts (``(B, 1, M)`` for (B, H)
    batches).  A mask with fewer dimensions is an error whatever its sizes: a PyTorch-style
    ``(B, M)`` padding mask against ``(B, H, N, D)`` inputs would otherwise be read as
    ``(H, M)`` when B == H.  ``meaning`` says what True means.  Returns the array unchanged.
    """
    if mask is None:
        return None
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"{name} must be a boolean numpy.ndarray, got {type(mask).__name__}")
    if mask.dtype != np.bool_:
        raise TypeError(f"{name} must have dtype bool ({meaning}), got {mask.dtype}")
    target = (*batch_shape, length)
    letters = ("B", "H", "G", "P")[:len(batch_shape)] + ("L",)
    want = "(" + ", ".join(letters) + ")"
    if mask.ndim < len(target) and mask.ndim >= 1:
        hint = ""
        if mask.ndim == 2 and len(target) == 3:
            hint = f"; for one mask per batch item use {name}[:, None, :] (shape (B, 1, L))"
        raise ValueError(f"{name} of shape {mask.shape} must have {len(target)} dimensions "
                         f"{want} = {target}, one per batch dimension of q plus the position "
                         f"(size-1 dimensions broadcast){hint}")
    if mask.ndim != len(target) or mask.shape[-1] != length or not _fits(mask.shape, target):
        raise ValueError(f"{name} of shape {mask.shape} does not match {want} = {target} "
                         "(each dimension equal or 1)")
    return mask


def key_padding_mask(mask, batch_shape: tuple, m: int, name: str = "key_padding_mask"):
    """A per-key padding mask ``(..., M)`` (True = real token): :func:`position_mask`."""
    return position_mask(mask, batch_shape, m, name, "True = real token")


def renamed(**old_to_new):
    """Decorator: calling ``fn(old=...)`` raises a TypeError naming the new option.

    Used where an option was renamed and an alias would change its meaning silently
    (``mask=`` is a pair mask in ``full`` but was key padding in ``linear``).
    """
    def wrap(fn):
        @functools.wraps(fn)
        def checked(*args, **kwargs):
            for old, new in old_to_new.items():
                if old in kwargs:
                    raise TypeError(f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}() takes "
                                    f"no option {old!r}: key padding is {new}= (shape "
                                    f"(..., M), True = real token) in every variant")
            return fn(*args, **kwargs)
        return checked
    return wrap


def bias(value, batch_shape: tuple, n: int, m: int, dtype, name: str = "bias"):
    """An additive float bias broadcastable to ``(..., N, M)``, same dtype as q, or ``None``."""
    if value is None:
        return None
    float_array(value, name, dtype=dtype)
    target = (*batch_shape, n, m)
    if not _fits(value.shape, target):
        raise ValueError(f"{name} of shape {value.shape} does not broadcast to (..., N, M) = "
                         f"{target} without enlarging it")
    return value


def rel_bias(value, batch_shape: tuple, n: int, m: int, dtype, name: str = "rel_bias"):
    """An offset bias (..., N + M − 1), leading dims broadcastable to the batch, or ``None``."""
    if value is None:
        return None
    float_array(value, name, min_ndim=1, dtype=dtype)
    target = (*batch_shape, n + m - 1)
    if value.shape[-1] != n + m - 1 or not _fits(value.shape, target):
        raise ValueError(f"{name} of shape {value.shape} does not broadcast to "
                         f"(..., N + M − 1) = {target} without enlarging it")
    return value


def dout(value, shape: tuple, dtype, name: str = "dout") -> np.ndarray:
    """The upstream gradient must have exactly the output's shape and dtype."""
    float_array(value, name, min_ndim=min(1, len(shape)), dtype=dtype)  # 0-d: TypeError
    if value.shape != tuple(shape):
        raise ValueError(f"{name} must have the output's shape {tuple(shape)}, "
                         f"got {value.shape}")
    return value


def reduce_to_shape(x: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum ``x`` over the axes along which an array of ``shape`` was broadcast to x.shape.

    This is the backward of NumPy broadcasting: the gradient of a broadcast argument is the
    sum of the gradient over the broadcast axes.
    """
    lead = x.ndim - len(shape)
    if lead:
        x = x.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and x.shape[i] != 1)
    if axes:
        x = x.sum(axis=axes, keepdims=True)
    return x.reshape(shape)


def generator(rng, name: str = "rng") -> np.random.Generator:
    """A ``numpy.random.Generator`` (never global state: an int, None or a legacy RandomState
    is a TypeError that says how to make one)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"{name} must be a numpy.random.Generator (np.random.default_rng(seed)), "
                        f"got {type(rng).__name__}")
    return rng
