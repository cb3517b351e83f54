"""tinyeff.testing.torch_backend / jax_backend, the demo ports, and the porter trial.

Each framework test skips cleanly when the framework is not installed (tinyeff never
depends on torch or jax).  To run them: install torch and/or jax in an environment of their
own and run ``python -m pytest tests/test_adapters.py`` there.

The porter trial: the torch window port of demos/ports/torch_window.py, written from
docs/semantics/window.md, passes the default window suite; with each of three realistic
bugs planted one at a time (NaN on a row with no admissible key, wrong only past row 64,
no max-subtraction), it fails it.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from tinyeff.testing import jax_backend, torch_backend
from tinyeff.testing.mutation import default_cases

ROOT = Path(__file__).resolve().parent.parent


def _demo(name):
    spec = importlib.util.spec_from_file_location(f"demo_{name}", ROOT / "demos" / "ports" /
                                                  f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _default_suite_ok(variant, backend):
    """(ok, failing case names) of ``backend`` over the default suite (float64 + float32)."""
    from tinyeff.testing.conformance import check_case

    failed = [f"{c.dtype}/{c.name}" for c in default_cases(variant)
              if any(r.failed for r in check_case(c, backend))]
    return not failed, failed


def test_importing_tinyeff_testing_imports_no_framework():
    code = ("import sys, tinyeff.testing; "
            "sys.exit(1 if {'torch', 'jax'} & set(sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


# ----------------------------------------------------------------------------------------
# torch
# ----------------------------------------------------------------------------------------

def test_torch_demo_passes_the_default_window_suite():
    pytest.importorskip("torch")
    ok, failed = _default_suite_ok("window", _demo("torch_window").backend)
    assert ok, failed


def test_torch_adapter_contract():
    """NumPy out and a NumPy gradient for every input, optional and unused ones included;
    options converted (sparse -> dense bool tensor); a non-tensor result is forward-only."""
    torch = pytest.importorskip("torch")
    seen = {}

    def fn(q, k, v, *, rel_bias=None, mask=None, scale=None, **rest):
        seen["mask"], seen["k"] = mask, k
        return (q * 2).sum(-1, keepdim=True) * v[..., :1, :] + rel_bias.sum()

    rng = np.random.default_rng(0)
    inputs = {"q": rng.standard_normal((2, 3, 4)), "k": rng.standard_normal((2, 3, 4)),
              "v": rng.standard_normal((2, 3, 2)), "rel_bias": rng.standard_normal(5)}
    options = {"mask": sp.csr_array(np.eye(3, dtype=bool)), "scale": 0.5}
    dout = np.ones((2, 3, 2))
    out, grads = torch_backend(fn)("x", inputs, options, dout)
    assert isinstance(out, np.ndarray) and out.shape == (2, 3, 2)
    assert set(grads) == set(inputs)
    assert all(isinstance(g, np.ndarray) and g.shape == inputs[n].shape
               for n, g in grads.items())
    assert np.all(grads["k"] == 0)                                 # unused: zeros
    np.testing.assert_allclose(grads["rel_bias"], np.full(5, 12.0))
    assert seen["mask"].dtype == torch.bool and seen["mask"].shape == (3, 3)
    out, grads = torch_backend(lambda q, k, v, **o: np.zeros(3))("x", inputs, {}, dout)
    assert isinstance(out, np.ndarray) and grads is None


# ----------------------------------------------------------------------------------------
# jax
# ----------------------------------------------------------------------------------------

def test_jax_demo_passes_the_default_window_suite():
    pytest.importorskip("jax")
    ok, failed = _default_suite_ok("window", _demo("jax_window").backend)
    assert ok, failed


def test_jax_adapter_contract():
    jnp = pytest.importorskip("jax.numpy")

    def fn(q, k, v, *, E, F, scale=None):
        return jnp.tanh(q @ jnp.swapaxes(E @ k, -1, -2)) @ (F @ v) * scale

    rng = np.random.default_rng(1)
    inputs = {"q": rng.standard_normal((2, 5, 3)), "k": rng.standard_normal((2, 4, 3)),
              "v": rng.standard_normal((2, 4, 2)), "E": rng.standard_normal((3, 4)),
              "F": rng.standard_normal((3, 4))}
    out, grads = jax_backend(fn)("x", inputs, {"scale": 0.5}, np.ones((2, 5, 2)))
    assert out.dtype == np.float64 and out.shape == (2, 5, 2)
    assert set(grads) == set(inputs)
    assert all(isinstance(g, np.ndarray) and g.shape == inputs[n].shape
               and g.dtype == np.float64 for n, g in grads.items())
    # a finite-difference check of one entry of dE
    eps = 1e-6
    e2 = {**inputs, "E": inputs["E"].copy()}
    e2["E"][1, 2] += eps
    out2, _ = jax_backend(fn)("x", e2, {"scale": 0.5}, np.ones((2, 5, 2)))
    assert math.isclose((out2.sum() - out.sum()) / eps, grads["E"][1, 2], rel_tol=1e-5)


# ----------------------------------------------------------------------------------------
# the porter trial
# ----------------------------------------------------------------------------------------

def _nan_on_empty_rows(torch):
    def masked_softmax(s, allowed):                                # plain softmax
        return torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    return {"masked_softmax": masked_softmax}


def _no_max_subtraction(torch):
    def masked_softmax(s, allowed):
        e = torch.exp(s.masked_fill(~allowed, float("-inf")))      # overflows for s > 709
        z = e.sum(dim=-1, keepdim=True)
        return e / torch.where(z > 0, z, torch.ones((), dtype=s.dtype))
    return {"masked_softmax": masked_softmax}


def _wrong_past_row_64(torch, demo):
    right = demo.window_mask

    def window_mask(n, m, window, dilation=1, global_indices=None, global_mask=None):
        # a tiled kernel that forgets the tile offset: rows past 64 get the band of i mod 64
        allowed, rows = right(n, m, window, dilation, global_indices, global_mask)
        if n > 64:
            tile_local, _ = right(64, m, window, dilation, global_indices, global_mask)
            idx = torch.arange(64, n) % 64
            allowed = allowed.clone()
            allowed[..., 64:, :] = tile_local[..., idx, :] | rows[..., 64:, :]
        return allowed, rows
    return {"window_mask": window_mask}


TRIAL_BUGS = ["nan_on_empty_rows", "wrong_past_row_64", "no_max_subtraction"]


@pytest.mark.parametrize("bug", TRIAL_BUGS)
def test_porter_trial_each_planted_bug_fails_the_default_suite(bug, monkeypatch):
    torch = pytest.importorskip("torch")
    demo = _demo("torch_window")
    patch = {"nan_on_empty_rows": lambda: _nan_on_empty_rows(torch),
             "no_max_subtraction": lambda: _no_max_subtraction(torch),
             "wrong_past_row_64": lambda: _wrong_past_row_64(torch, demo)}[bug]()
    for name, fn in patch.items():
        monkeypatch.setattr(demo, name, fn)
    ok, _ = _default_suite_ok("window", torch_backend(demo.window_attention))
    assert not ok, f"the default window suite passes the port with the bug {bug!r}"


def test_porter_trial_bugs_are_real():
    """Each planted bug changes the result where it should (independent of the suite)."""
    torch = pytest.importorskip("torch")
    demo = _demo("torch_window")
    rng = np.random.default_rng(5)
    q, k, v = (torch.from_numpy(rng.standard_normal((1, 70, 4))) for _ in range(3))
    kpm = torch.ones(1, 70, dtype=torch.bool)
    kpm[0, :10] = False                                            # row 0..6: no key (w = 3)
    right = demo.window_attention(q * 400, k, v, window=3, key_padding_mask=kpm)
    assert torch.all(torch.isfinite(right))
    for bug, patch in (("nan_on_empty_rows", _nan_on_empty_rows(torch)),
                       ("no_max_subtraction", _no_max_subtraction(torch)),
                       ("wrong_past_row_64", _wrong_past_row_64(torch, demo))):
        saved = {n: getattr(demo, n) for n in patch}
        for n, fn in patch.items():
            setattr(demo, n, fn)
        try:
            wrong = demo.window_attention(q * 400, k, v, window=3, key_padding_mask=kpm)
        finally:
            for n, fn in saved.items():
                setattr(demo, n, fn)
        assert not torch.allclose(wrong, right, equal_nan=False), bug
