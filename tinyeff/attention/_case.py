"""``Case``: one complete, valid call of a variant, used by the tests and the golden writer."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Case(NamedTuple):
    """``forward(**args, **options)`` is a valid call.

    name : short identifier of the option set, unique within the variant (file-name safe).
    args : the differentiable array arguments by name (``backward`` returns a gradient for
        each of them, with the same shape and dtype).
    options : everything else: flags, sizes, masks, random features, rotations.
    """

    name: str
    args: dict[str, np.ndarray]
    options: dict


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
