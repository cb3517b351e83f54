"""Argument checks shared by the modules of ``tinyeff.nn``.

Each raises a ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape or value)
naming the argument and what was seen; nothing is cast or broadcast.
"""

from __future__ import annotations

import numpy as np

from .. import _checks


def float_dtype(dtype) -> np.dtype:
    """``np.dtype(dtype)`` if it is float32 or float64, else a TypeError."""
    dtype = np.dtype(dtype)
    if dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


def generator(rng) -> np.random.Generator:
    """``rng`` if it is a ``numpy.random.Generator``; None -> ``default_rng(0)``."""
    if rng is None:
        return np.random.default_rng(0)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng


def heads(d_model, n_heads) -> tuple[int, int]:
    """(d_model, n_heads): positive ints with d_model divisible by n_heads."""
    d_model = _checks.integer(d_model, "d_model", minimum=1)
    n_heads = _checks.integer(n_heads, "n_heads", minimum=1)
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
    return d_model, n_heads


def layer_input(x, name: str, dtype, last: int) -> np.ndarray:
    """A layer input: float ndarray of the layer's dtype with last dimension ``last``."""
    _checks.float_array(x, name, min_ndim=1, dtype=dtype)
    if x.shape[-1] != last:
        raise ValueError(f"{name} must have last dimension {last}, got shape {x.shape}")
    return x


def sequence_input(x, dtype, d_model: int) -> tuple[int, int]:
    """``x`` (B, N, d_model) of the layer's dtype; returns (B, N)."""
    layer_input(x, "x", dtype, d_model)
    if x.ndim != 3:
        raise ValueError(f"x must be (B, N, d_model), got shape {x.shape}")
    return x.shape[:2]


def grad_output(dy, shape, dtype) -> np.ndarray:
    """``dy`` of exactly ``shape`` and ``dtype`` (the gradient of a layer's output)."""
    return _checks.dout(dy, shape, dtype, name="dy")


def token_ids(tokens, vocab: int, name: str = "tokens") -> np.ndarray:
    """An integer ndarray with values in [0, vocab)."""
    if not isinstance(tokens, np.ndarray) or not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"{name} must be an integer numpy.ndarray, got "
                        f"{type(tokens).__name__} {getattr(tokens, 'dtype', '')}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
        raise ValueError(f"{name} must lie in [0, {vocab}), got values in "
                         f"[{tokens.min()}, {tokens.max()}] (shape {tokens.shape})")
    return tokens


def token_batch(tokens, vocab: int, max_len: int) -> tuple[int, int]:
    """Model input tokens (B, N): integer ids in [0, vocab), 1 <= N <= max_len, B >= 1;
    returns (B, N)."""
    token_ids(tokens, vocab)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (B, N), got shape {tokens.shape}")
    b, n = tokens.shape
    if b == 0 or n == 0:
        raise ValueError(f"tokens must hold at least one sequence of at least one token, got "
                         f"shape {tokens.shape}")
    if n > max_len:
        raise ValueError(f"sequence length {n} exceeds max_len {max_len}")
    return b, n


def token_mask(mask, b: int, n: int, name: str = "key_padding",
               meaning: str = "True = real token") -> None:
    """None, or a bool array (B, N) (by default the key padding, True = real token);
    TypeError for another type or dtype (nothing is cast), ValueError for another shape."""
    if mask is None:
        return
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"{name} must be a bool numpy.ndarray of shape (B, N) = {(b, n)}, got "
                        f"{type(mask).__name__}")
    if mask.dtype != np.bool_:
        raise TypeError(f"{name} must be a bool array ({meaning}), got dtype "
                        f"{mask.dtype} (shape {mask.shape}); nothing is cast, "
                        f"pass e.g. {name} != 0")
    if mask.shape != (b, n):
        raise ValueError(f"{name} must be a bool array of shape (B, N) = {(b, n)}, got shape "
                         f"{mask.shape}")
