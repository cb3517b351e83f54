"""Computing the golden cases: every variant's example and conformance cases, run once
through the float64 reference (how the numbers are made: :mod:`tinyeff.testing.golden`)."""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import numpy as np

from ._golden_format import CTX_MIN_ENTRIES, GoldenCase, case_name, dtype_names

__all__ = ["make_cases", "compute_case", "resolve_variants"]


def _seed(*parts) -> int:
    return zlib.crc32("/".join(str(p) for p in parts).encode())


def _widen(x):
    """float32 ndarray -> float64 (exact); anything else unchanged."""
    if isinstance(x, np.ndarray) and x.dtype == np.float32:
        return x.astype(np.float64)
    return x


def resolve_variants(variants) -> list[str]:
    from ..attention import VARIANTS

    if variants is None:
        return list(VARIANTS)
    if isinstance(variants, str):
        variants = [variants]
    names = [v for v in variants if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; registered: {sorted(VARIANTS)}")
    return names


def make_cases(variants=None, dtype=None, seed: int = 0, size: int = 1,
               examples_only: bool = False) -> Iterator[GoldenCase]:
    """Compute the golden cases in memory (exactly what :func:`write_golden` stores).

    For each variant and each dtype (``None``: float64, then float32): the variant's
    ``example_cases``, then its conformance cases (:mod:`tinyeff.testing.suite`, whose
    sequence lengths grow with ``size``) unless ``examples_only``.
    """
    from ..attention import VARIANTS
    from .suite import suite_cases

    dtypes = dtype_names(dtype)
    for variant in resolve_variants(variants):
        mod = VARIANTS[variant]
        for dt in dtypes:
            rng = np.random.default_rng(_seed(variant, seed))
            for case in mod.example_cases(rng, np.dtype(dt)):
                yield compute_case(mod, variant, case, dt, seed)
            if examples_only:
                continue
            rng = np.random.default_rng(_seed(variant, "suite", seed))
            for case in suite_cases(variant, rng, np.dtype(dt), size):
                yield compute_case(mod, variant, case, dt, seed)


def compute_case(mod, variant: str, case, dtype: str, seed: int) -> GoldenCase:
    options = {k: v for k, v in case.options.items() if k != "impl"}
    call_opts = {k: _widen(v) for k, v in options.items()}
    if "ref" in getattr(mod, "IMPLS", ()):
        call_opts["impl"] = "ref"
    args64 = {k: _widen(x) for k, x in case.args.items()}
    out64, ctx = mod.forward(**args64, **call_opts)
    drng = np.random.default_rng(_seed(variant, case.name, seed, "dout"))
    dout = drng.standard_normal(out64.shape).astype(dtype)        # (..., N, Dv)
    grads64 = mod.backward(_widen(dout), ctx)
    if set(grads64) != set(case.args):
        raise RuntimeError(f"{variant}/{case.name}: backward returned {sorted(grads64)} for "
                           f"arguments {sorted(case.args)}")
    inputs = [np.asarray(x) for x in (*args64.values(), *case.args.values())]
    inputs += [x for x in call_opts.values() if isinstance(x, np.ndarray)]
    inputs.append(out64)
    largest = max([CTX_MIN_ENTRIES, *(x.size for x in inputs)])
    ctx_arrays = {}
    for name, a in ctx.arrays().items():
        if any(a is x or np.may_share_memory(a, x) for x in inputs):
            continue                                               # an input or out, stored
        if a.size > largest:
            continue                                               # e.g. (N, M) probabilities
        ctx_arrays[name] = a.astype(dtype) if a.dtype == np.float64 else a
    return GoldenCase(
        variant=variant, name=case_name(case.name, dtype), dtype=dtype,
        args={k: np.asarray(x) for k, x in case.args.items()},
        options=options, dout=dout, out=out64.astype(dtype),
        grads={k: grads64[k].astype(dtype) for k in case.args}, ctx=ctx_arrays)
