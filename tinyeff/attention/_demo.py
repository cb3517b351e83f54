"""The size rule of the sparse patterns in ``python -m tinyeff demo`` (each variant's
``demo_options``).

A query sees about 64 keys from N = 256 on, and about N/4 on shorter sequences, so that
the patterns stay sparser than ``full`` there.
"""

from __future__ import annotations


def span(n: int, cap: int = 64) -> int:
    """The local span of the demo's sparse patterns at length n: N/4 rounded down to even,
    within [8, cap]."""
    return max(8, min(cap, n // 8 * 2))
