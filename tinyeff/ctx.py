"""The saved context of a forward pass.

Every variant's ``forward`` returns ``(out, ctx)`` where ``ctx`` is a frozen dataclass deriving
from :class:`Ctx`: named fields (each with a shape comment in the variant module) holding
what the backward needs.  Because it is plain data it can be inspected, measured with
:meth:`Ctx.nbytes`, exported into golden files with :meth:`Ctx.arrays`, and handed to the
other implementation (reference or Numba) of the same variant.

A ctx holds *references* to the inputs (q, k, v, ...), not copies: do not modify an input
in place between a forward and its backward.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Ctx:
    """Base class of every variant's saved context."""

    def arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """All ndarray fields, nested contexts flattened as ``outer.inner``."""
        found: dict[str, np.ndarray] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                found[prefix + f.name] = value
            elif isinstance(value, Ctx):
                found.update(value.arrays(prefix + f.name + "."))
        return found

    def nbytes(self) -> int:
        """Bytes held by the context's arrays (counting each distinct buffer once)."""
        seen: dict[int, int] = {}
        for a in self.arrays().values():
            base = a
            while isinstance(base.base, np.ndarray):
                base = base.base
            seen[id(base)] = base.nbytes
        return sum(seen.values())
