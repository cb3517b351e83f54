"""Gradient checks through the attention contract (float64 central finite differences).

Two checks, both driven by a variant's ``forward(**args, **options) -> (out, ctx)`` and
``backward(dout, ctx) -> {name: grad}``:

* :func:`check_vjp` — directional (autograd/JAX style), at realistic sizes.  With a random
  cotangent g and, for each argument x in turn, a random direction u,

      lhs = ⟨g, (f(x + εu) − f(x − εu)) / 2ε⟩,      rhs = ⟨u, backward(g)[x]⟩,

  and the error |lhs − rhs| / max(|lhs|, |rhs|, atol·‖g‖₁·‖f‖∞) is reported per argument
  (worst of ``n_dirs`` directions): relative, with an absolute floor at the resolution of
  the finite difference, so that a gradient that is zero by structure is not reported as a
  huge relative error of two rounding residues (see :func:`check_vjp`).  Cotangents are
  random, never ones: a constant cotangent makes softmax-type backwards vacuous.
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
    """Error per argument.  ``worst`` holds, where known, (index, analytic, numeric) for
    :func:`check_elementwise` and (direction, analytic, numeric, floor) for :func:`check_vjp`."""

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
    """|a − b| / max(|a|, |b|, floor); inf when either is not finite, 0 when a = b = 0."""
    if not (np.isfinite(a) and np.isfinite(b)):
        return float("inf")
    denom = max(abs(a), abs(b), floor)
    return abs(a - b) / denom if denom > 0 else 0.0


# the floor is VJP_FLOOR_UNITS rounding resolutions of the finite difference at GRAD_FD
VJP_FLOOR_UNITS = 100.0


def default_vjp_atol(dtype=np.float64, eps: float = FD_EPS) -> float:
    """The default ``atol`` of :func:`check_vjp`: 100·u / (ε·GRAD_FD), u = finfo(dtype).eps.

    float64 at ε = 1e-6: 100 · 2.2e-16 / (1e-6 · 1e-6) = 2.2e-2.  See :func:`check_vjp`.
    """
    return VJP_FLOOR_UNITS * float(np.finfo(dtype).eps) / (eps * GRAD_FD)


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
              invariant: Callable | None = None, atol: float | None = None) -> GradReport:
    """Directional finite-difference check of ``backward`` against ``forward``.

    For each argument x and each of ``n_dirs`` random directions u (g a random cotangent):

        lhs = ⟨g, f(x + εu) − f(x − εu)⟩ / 2ε                 (finite difference)
        rhs = ⟨u, backward(g)[x]⟩                              (analytic)
        error = |lhs − rhs| / max(|lhs|, |rhs|, atol · ‖g‖₁ · ‖f‖∞)

    with ‖f‖∞ the largest |entry| of f(x), f(x + εu) and f(x − εu).  The worst error over
    the directions is reported per argument (``report.worst[name]`` holds the direction
    index, rhs, lhs and the floor).

    Why the floor.  Each output entry is known only to about one rounding unit
    u·‖f‖∞ (u = ``finfo(dtype).eps``), so lhs carries an absolute rounding error of order
    res = u·‖g‖₁·‖f‖∞ / ε whatever the true derivative is (2.2e-10·‖g‖₁‖f‖∞ in float64 at
    ε = 1e-6).  Without a floor, an argument whose gradient is zero by structure (a
    per-row logit shift under softmax, a key that no query sees, a feature that cancels in
    a normalized output) compares two rounding residues (~1e-17 analytic against ~1e-11 FD)
    and reports a relative error of ~1.  The floor puts the denominator at no less than
    ``VJP_FLOOR_UNITS`` = 100 resolutions divided by the tolerance ``GRAD_FD``:

        atol = 100 · u / (ε · GRAD_FD)      (:func:`default_vjp_atol`; float64, ε = 1e-6:
                                             2.2e-2)

    so a disagreement of up to 100 rounding resolutions -- pure finite-difference noise;
    measured ≤ 8 resolutions on softmax-type functions with logits up to 30 and values up
    to 1e3 -- reports at most GRAD_FD, and a wrong gradient is still reported as soon as its
    directional error exceeds 100 resolutions (≈ 2.2e-8·‖g‖₁‖f‖∞ in float64), far below
    any real bug: a 0.1 % error in a gradient of ordinary size still reports ~1e-3.  The
    floor only acts where |lhs| and |rhs| are both below atol·‖g‖₁‖f‖∞; above it the error
    is the plain relative error.  Pass a larger ``atol`` when intermediates are much larger
    than the output (rounding then exceeds u·‖f‖∞), ``atol=0`` for the bare relative error.
    The default depends on the dtype through u; the check itself runs in float64 only.

    ``invariant(ctx)``, if given, returns the non-differentiable choices of the forward
    (for example LSH bucket ids); the check raises if a ±ε perturbation changed them, since
    the finite difference would then cross a discontinuity.
    """
    options = dict(options or {})
    _require_float64(args)
    if atol is None:
        atol = default_vjp_atol(np.float64, eps)
    if not atol >= 0:
        raise ValueError(f"atol must be >= 0, got {atol!r}")
    out, ctx = forward(**args, **options)
    g = rng.standard_normal(out.shape)                             # random cotangent
    g_l1 = float(np.abs(g).sum())
    grads = backward(g, ctx)
    _check_keys(grads, args)
    ref_inv = invariant(ctx) if invariant is not None else None
    errors, report_worst = {}, {}
    for name, x in args.items():
        worst = -1.0
        for i in range(n_dirs):
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
            f_inf = max((float(np.abs(o).max(initial=0.0)) for o in (out, f[1], f[-1])),
                        default=0.0)
            floor = atol * g_l1 * f_inf
            err = _rel(lhs, rhs, floor)
            if err > worst:
                worst = err
                report_worst[name] = (f"direction {i}", rhs, lhs, floor)
        errors[name] = max(worst, 0.0)
    return GradReport(errors, report_worst)


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
