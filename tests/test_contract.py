"""The attention contract, checked for every registered variant and every example case.

A variant that joins ``tinyeff.attention.VARIANTS`` is tested here with no change to this
file: shapes and dtypes, no input mutation, determinism, the float64 gradient check, and
float32-vs-float64 agreement.
"""

from __future__ import annotations

import copy
import zlib

import numpy as np
import pytest

from tinyeff.attention import VARIANTS
from tinyeff.ctx import Ctx
from tinyeff.testing import F32_VS_F64, GRAD_FD, assert_close, check_vjp

CASES = [(name, case.name) for name, mod in VARIANTS.items()
         for case in mod.example_cases(np.random.default_rng(0))]


def _case(variant, case_name, dtype=np.float64, seed=0):
    mod = VARIANTS[variant]
    rng = np.random.default_rng(zlib.crc32(f"{variant}/{case_name}/{seed}".encode()))
    cases = {c.name: c for c in mod.example_cases(rng, dtype)}
    return mod, cases[case_name]


def test_registry_names_match_modules():
    for name, mod in VARIANTS.items():
        assert mod.NAME == name
        for attr in ("forward", "backward", "example_cases", "DIFFERENTIABLE",
                     "SUPPORTS_MASK", "SUPPORTS_CAUSAL", "SUPPORTS_BIAS"):
            assert hasattr(mod, attr), f"{name} lacks {attr}"


@pytest.mark.parametrize("variant,case_name", CASES)
def test_case_names_unique(variant, case_name):
    names = [c.name for c in VARIANTS[variant].example_cases(np.random.default_rng(0))]
    assert names.count(case_name) == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("variant,case_name", CASES)
def test_shapes_dtypes_and_no_mutation(variant, case_name, dtype, rng):
    mod, case = _case(variant, case_name, dtype)
    args_before = copy.deepcopy(case.args)
    options_before = copy.deepcopy(case.options)
    out, ctx = mod.forward(**case.args, **case.options)
    q, v = case.args.get("q", next(iter(case.args.values()))), case.args["v"]
    assert out.shape == q.shape[:-1] + v.shape[-1:]
    assert out.dtype == np.dtype(dtype)
    assert isinstance(ctx, Ctx)
    assert np.all(np.isfinite(out))
    dout = rng.standard_normal(out.shape).astype(dtype)
    grads = mod.backward(dout, ctx)
    assert set(grads) == set(case.args)
    assert set(grads) <= set(mod.DIFFERENTIABLE)
    for name, x in case.args.items():
        assert grads[name].shape == x.shape and grads[name].dtype == x.dtype, name
        assert np.all(np.isfinite(grads[name])), name
    for name, x in case.args.items():
        np.testing.assert_array_equal(x, args_before[name], err_msg=f"{name} was modified")
    for name, x in case.options.items():
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, options_before[name], err_msg=f"{name} modified")


@pytest.mark.parametrize("variant,case_name", CASES)
def test_deterministic(variant, case_name, rng):
    mod, case = _case(variant, case_name)
    out1, ctx1 = mod.forward(**case.args, **case.options)
    out2, ctx2 = mod.forward(**case.args, **case.options)
    np.testing.assert_array_equal(out1, out2)
    dout = rng.standard_normal(out1.shape)
    g1, g2 = mod.backward(dout, ctx1), mod.backward(dout, ctx2)
    for name in g1:
        np.testing.assert_array_equal(g1[name], g2[name])


@pytest.mark.parametrize("variant,case_name", CASES)
def test_gradcheck_float64(variant, case_name, rng):
    mod, case = _case(variant, case_name)
    report = check_vjp(mod.forward, mod.backward, case.args, case.options, rng=rng,
                       invariant=getattr(mod, "gradcheck_invariant", None))
    report.assert_ok(GRAD_FD)


@pytest.mark.parametrize("variant,case_name", CASES)
def test_float32_agrees_with_float64(variant, case_name, rng):
    mod, c64 = _case(variant, case_name, np.float64)
    _, c32 = _case(variant, case_name, np.float32)
    # evaluate float64 on exactly the float32 inputs so only arithmetic precision differs
    args64 = {k: x.astype(np.float64) for k, x in c32.args.items()}
    opts64 = {k: (x.astype(np.float64) if isinstance(x, np.ndarray) and x.dtype == np.float32
                  else x) for k, x in c32.options.items()}
    out64, ctx64 = mod.forward(**args64, **opts64)
    out32, ctx32 = mod.forward(**c32.args, **c32.options)
    assert_close(out32, out64.astype(np.float32), rtol=F32_VS_F64.rtol, atol=F32_VS_F64.atol)
    dout = rng.standard_normal(out64.shape).astype(np.float32)
    g64 = mod.backward(dout.astype(np.float64), ctx64)
    g32 = mod.backward(dout, ctx32)
    for name in g64:
        assert_close(g32[name], g64[name].astype(np.float32), rtol=F32_VS_F64.rtol,
                     atol=F32_VS_F64.atol, err_msg=name)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_backward_rejects_bad_dout(variant, rng):
    mod = VARIANTS[variant]
    case = mod.example_cases(rng)[0]
    out, ctx = mod.forward(**case.args, **case.options)
    with pytest.raises(ValueError, match="dout"):
        mod.backward(np.zeros(out.shape[:-1] + (out.shape[-1] + 1,)), ctx)
    with pytest.raises(TypeError, match="dout"):
        mod.backward(np.zeros(out.shape, np.float32), ctx)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradcheck_catches_a_wrong_backward(variant, rng):
    """Negative control: scaling one gradient by 1.001 must fail the check."""
    mod = VARIANTS[variant]
    case = mod.example_cases(rng)[0]
    first = next(iter(case.args))

    def wrong_backward(dout, ctx):
        g = mod.backward(dout, ctx)
        g[first] = g[first] * 1.001
        return g

    report = check_vjp(mod.forward, wrong_backward, case.args, case.options, rng=rng,
                       invariant=getattr(mod, "gradcheck_invariant", None))
    assert report.errors[first] > GRAD_FD
