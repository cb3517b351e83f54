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
