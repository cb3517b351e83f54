"""Helpers every test uses, and that other backends can use to test themselves against tinyeff.

* :func:`check_vjp`, :func:`check_elementwise`, :func:`numeric_grad` — float64 gradient
  checks through the forward/backward contract (:mod:`tinyeff.testing.gradcheck`).
* :func:`assert_close` — strict comparison (shape and dtype must match) with tolerances from
  the one table :mod:`tinyeff.testing.tolerances`.
* :func:`random_qkv` — seeded random inputs of the contract's shapes.
* :func:`write_golden`, :func:`load_golden`, :func:`read_case`, :func:`make_cases` — golden
  test vectors (:mod:`tinyeff.testing.golden`; the larger conformance cases are built in
  :mod:`tinyeff.testing.suite`).
* :func:`check_backend` runs another backend over them, :func:`check_case` over one case
  (``GoldenCase.check(backend)`` does the same and raises with the table); both return a
  :class:`ConformanceReport` whose ``str()`` is the table (:mod:`tinyeff.testing.conformance`).
"""

from __future__ import annotations

import numpy as np

from .._random import random_qkv
from .conformance import ConformanceReport, Row, check_backend, check_case, reference_backend
from .golden import GoldenCase, GoldenError, load_golden, make_cases, read_case, write_golden
from .gradcheck import GradReport, check_elementwise, check_vjp, numeric_grad
from .tolerances import F32_VS_F64, FD_EPS, GRAD_FD, PARITY, Tol


def assert_close(actual, desired, *, rtol: float | None = None, atol: float | None = None,
                 err_msg: str = "") -> None:
    """``numpy.testing.assert_allclose`` with strict shape and dtype, tolerances by dtype.

    Dicts of arrays (gradients) are compared key by key, and must have the same keys.
    Without ``rtol``/``atol`` the :data:`PARITY` tolerance of the arrays' dtype is used.
    """
    if isinstance(desired, dict):
        if not isinstance(actual, dict) or set(actual) != set(desired):
            raise AssertionError(f"{err_msg} keys differ: {sorted(actual)} vs {sorted(desired)}")
        for key in desired:
            assert_close(actual[key], desired[key], rtol=rtol, atol=atol,
                         err_msg=f"{err_msg} [{key}]")
        return
    actual = np.asarray(actual)
    desired = np.asarray(desired)
    if actual.shape != desired.shape or actual.dtype != desired.dtype:
        raise AssertionError(f"{err_msg} shape/dtype differ: {actual.shape} {actual.dtype} vs "
                             f"{desired.shape} {desired.dtype}")
    tol = PARITY.get(desired.dtype, PARITY[np.dtype(np.float64)])
    np.testing.assert_allclose(actual, desired,
                               rtol=tol.rtol if rtol is None else rtol,
                               atol=tol.atol if atol is None else atol,
                               err_msg=err_msg, strict=True)


__all__ = ["GradReport", "check_vjp", "check_elementwise", "numeric_grad", "assert_close",
           "random_qkv", "Tol", "PARITY", "F32_VS_F64", "GRAD_FD", "FD_EPS",
           "check_backend", "check_case", "ConformanceReport", "Row", "reference_backend",
           "write_golden",
           "load_golden", "read_case", "make_cases", "GoldenCase", "GoldenError"]

# framework adapters (tinyeff.testing.adapters): torch / jax are imported only when called
from .adapters import jax_backend, torch_backend  # noqa: E402

__all__ += ["torch_backend", "jax_backend"]
