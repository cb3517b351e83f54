"""Gradient checks through the attention contract (float64 central finite differences).

Two checks, both driven by a variant's ``forward(**args, **options) -> (out, ctx)`` and
``backward(dout, ctx) -> {name: grad}``:

* :func:`check_vjp` — directional (autograd/JAX style), at realistic sizes.  With a random
  cotangent g and, for each argument x in turn, a random direction u,

      lhs = ⟨g, (f(x + εu) − f(x − εu)) / 2ε⟩,      rhs = ⟨u, backward(g)[x]⟩,

  and the relative error |lhs − rhs| / max(|lhs|, |rhs|) is reported per argument (worst of
  ``n_dirs`` directions).  Cotangents are random, never ones: a constant cotangent makes
  softmax-type backwards vacuous.
* :func:`check_elementwise` — per-entry finite differences at tiny sizes (cs231n style),
  reporting the argument, the worst index, the analytic and the numeric value.

Both work in float64 only (float32 finite differences are meaningless at 1e-6).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from .tolerances import FD_EPS, GRAD_FD


@dataclasses.dataclass
class GradReport:
    """Relative error per argument; ``worst`` holds (index, analytic, numeric) where known."""

    errors: dict[str, float]
    worst: dict[str, tuple] = dataclasses.field(default_factory=dict)

    def max(self) -> float:
        return max(self.errors.values(), default=0.0)

    def ok(self, tol: float = GRAD_FD) -> bool:
        return all(e <= tol for e in self.errors.values())

    def __str__(self) -> str:
        lines = [f"{'argument':<12} {'rel. error':>11}  worst (index, analytic, numeric)"]
        for name, err in self.errors.items():
            lines.append(f"{name:<12} {err:11.3e}  {self.worst.get(name, '')}")
        return "\n".join(lines)

    def assert_ok(self, tol: float = GRAD_FD) -> GradReport:
        if not self.ok(tol):
            raise AssertionError(f"gradient check failed (tolerance {tol:g}):\n{self}")
        return self


def _rel(a: float, b: float, floor: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), floor)


def _require_float64(args):
    for name, x in args.items():
        if x.dtype != np.float64:
            raise TypeError(f"gradient checks run in float64; argument {name} is {x.dtype}")


def _check_keys(grads, args):
    if set(grads) != set(args):
        raise AssertionError(f"backward returned gradients for {sorted(grads)}, "
                             f"expected exactly {sorted(args)}")
    for name, x in args.items():
        gx = grads[name]
        if gx.shape != x.shape or gx.dtype != x.dtype:
            raise AssertionError(f"gradient of {name} has shape {gx.shape} dtype {gx.dtype}, "
                                 f"expected {x.shape} {x.dtype}")


def check_vjp(forward: Callable, backward: Callable, args: dict, options: dict | None = None,
              *, rng: np.random.Generator, eps: float = FD_EPS, n_dirs: int = 2,
              invariant: Callable | None = None) -> GradReport:
    """Directional finite-difference check of ``backward`` against ``forward``.

    ``invariant(ctx)``, if given, returns the non-differentiable choices of the forward
    (for example LSH bucket ids); the check raises if a ±ε perturbation changed them, since
    the finite difference would then cross a discontinuity.
    """
    options = dict(options or {})
    _require_float64(args)
    out, ctx = forward(**args, **options)
    g = rng.standard_normal(out.shape)                             # random cotangent
    grads = backward(g, ctx)
    _check_keys(grads, args)
    ref_inv = invariant(ctx) if invariant is not None else None
    errors = {}
    for name, x in args.items():
        worst = 0.0
        for _ in range(n_dirs):
            u = rng.standard_normal(x.shape)                       # random direction
            f = {}
            for sign in (+1, -1):
                o, c = forward(**{**args, name: x + sign * eps * u}, **options)
                if invariant is not None:
                    for a, b in zip(_as_tuple(invariant(c)), _as_tuple(ref_inv)):
                        if not np.array_equal(a, b):
                            raise AssertionError(
                                f"perturbing {name} by ±{eps:g} changed a non-differentiable "
                                "choice of the forward (e.g. a bucket); draw other inputs")
                f[sign] = o
            lhs = float(np.sum(g * (f[1] - f[-1]))) / (2 * eps)
            rhs = float(np.sum(u * grads[name]))
            floor = 1e-10 * float(np.abs(g).sum())
            worst = max(worst, _rel(lhs, rhs, floor))
        errors[name] = worst
    return GradReport(errors)


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def numeric_grad(forward: Callable, args: dict, options: dict | None, name: str,
                 dout: np.ndarray, eps: float = FD_EPS) -> np.ndarray:
    """∂⟨dout, forward(...)⟩/∂args[name], entry by entry (tiny sizes only)."""
    options = dict(options or {})
    x = args[name]
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        vals = []
        for sign in (+1, -1):
            xp = x.copy()
            xp[idx] += sign * eps
            vals.append(float(np.sum(dout * forward(**{**args, name: xp}, **options)[0])))
        grad[idx] = (vals[0] - vals[1]) / (2 * eps)
    return grad


def check_elementwise(forward: Callable, backward: Callable, args: dict,
                      options: dict | None = None, *, rng: np.random.Generator,
                      eps: float = FD_EPS) -> GradReport:
    """Entry-by-entry check; the error of an argument is max|a − n| / max(max|n|, max|a|)."""
    options = dict(options or {})
    _require_float64(args)
    out, ctx = forward(**args, **options)
    g = rng.standard_normal(out.shape)
    grads = backward(g, ctx)
    _check_keys(grads, args)
    report = GradReport({})
    for name in args:
        num = numeric_grad(forward, args, options, name, g, eps)
        ana = grads[name]
        diff = np.abs(ana - num)
        scale = max(float(np.abs(num).max(initial=0)), float(np.abs(ana).max(initial=0)), 1e-12)
        report.errors[name] = float(diff.max(initial=0)) / scale
        if diff.size:
            i = np.unravel_index(int(np.argmax(diff)), diff.shape)
            report.worst[name] = (tuple(int(t) for t in i), float(ana[i]), float(num[i]))
    return report
