"""Seeded random inputs of the attention contract's shapes (no Numba, no tinyeff imports)."""

from __future__ import annotations

import numpy as np


def random_qkv(rng: np.random.Generator, batch=(2, 2), n: int = 8, m: int | None = None,
               d: int = 4, dv: int | None = None, dtype=np.float64) -> dict[str, np.ndarray]:
    """Standard-normal ``{"q", "k", "v"}``: (*batch, N, D), (*batch, M, D), (*batch, M, Dv),
    drawn from ``rng`` in that order (M defaults to N, Dv to D)."""
    m = n if m is None else m
    dv = d if dv is None else dv
    batch = tuple(batch)
    return {"q": rng.standard_normal((*batch, n, d)).astype(dtype),
            "k": rng.standard_normal((*batch, m, d)).astype(dtype),
            "v": rng.standard_normal((*batch, m, dv)).astype(dtype)}
