"""Read-only inputs reuse the Numba kernels compiled for writeable ones (issue 11).

Numba types a read-only array differently from a writeable one (``Array(..., readonly=True)``),
so a read-only input (``np.broadcast_to``, ``np.load(mmap_mode="r")``,
``setflags(write=False)``) reaching a kernel without a copy compiles a second specialization
of every kernel on the path (minutes on a loaded 2-core machine).  The wrappers therefore
make kernel inputs C-contiguous *and writeable* (``np.require(x, requirements="CW")``: a
view when the input already is, a copy of a read-only one; the caller's array is never
written).  The same held for option arrays: a key-padding mask or rel_bias of the full
batch shape went through ``np.broadcast_to`` and reached the kernel as a read-only view,
while a broadcastable one was copied -- two specializations depending on the mask's shape.

Checked here for the modules whose wrappers were changed (full ``impl="blocked"``, sparse
and window ``impl="numba"``): after a forward and backward with writeable inputs, the same
call with read-only inputs (and with option arrays of another, broadcastable shape) adds no
signature to any kernel of the module, and gives the same bits.  Arrays that are read-only
by design and on every call (a ``Pattern``'s index arrays) keep their one signature.

The same check for local, linear/performer, lsh and linformer is in their own test files
(test_local.py, test_linear.py, test_lsh.py, test_linformer.py); hierarchical runs no Numba kernel.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import scipy.sparse as sp

from tinyeff.attention import full, sparse, window

N = M = 6
D, DV = 4, 3


def _dispatchers(module_name: str) -> dict:
    mod = importlib.import_module(module_name)
    return {name: f for name in dir(mod) if hasattr(f := getattr(mod, name), "signatures")}


def _signatures(module_name: str) -> dict:
    return {name: list(f.signatures) for name, f in _dispatchers(module_name).items()}


def _readonly(x: np.ndarray) -> np.ndarray:
    y = x.copy()
    y.setflags(write=False)
    return y


CALLS = {
    "full": (full, "tinyeff.kernels.blocked", dict(causal=True, impl="blocked")),
    "sparse": (sparse, "tinyeff.kernels.sparse", dict(
        mask=sp.csr_array(np.abs(np.subtract.outer(np.arange(N), np.arange(M))) <= 2),
        impl="numba")),
    "window": (window, "tinyeff.kernels.band", dict(window=2, impl="numba")),
}


def _inputs(batch: tuple, rng) -> dict:
    x = {"q": rng.standard_normal((*batch, N, D)), "k": rng.standard_normal((*batch, M, D)),
         "v": rng.standard_normal((*batch, M, DV)),
         "rel_bias": rng.standard_normal((*batch, N + M - 1))}
    kpm = rng.random((*batch, M)) > 0.2
    kpm[..., 0] = True
    return x, kpm


def _run(mod, args, opts, dout):
    out, ctx = mod.forward(**args, **opts)
    return out, mod.backward(dout, ctx)


@pytest.mark.parametrize("batch", [(2, 2), (1, 1)], ids=["BH=4", "BH=1"])
@pytest.mark.parametrize("name", list(CALLS))
def test_read_only_inputs_add_no_kernel_signature(name, batch, rng):
    mod, kernels, opts = CALLS[name]
    x, kpm = _inputs(batch, rng)
    dout = rng.standard_normal((*batch, N, DV))
    want_out, want_grads = _run(mod, x, {**opts, "key_padding_mask": kpm}, dout)
    before = _signatures(kernels)
    assert any(before.values()), "the writeable call compiled no kernel of " + kernels

    ro = {k: _readonly(a) for k, a in x.items()}
    ro_kpm, ro_dout = _readonly(kpm), _readonly(dout)
    saved = {k: a.copy() for k, a in ro.items()}
    out, grads = _run(mod, ro, {**opts, "key_padding_mask": ro_kpm}, ro_dout)
    # a broadcastable (not full-shape) mask and rel_bias: the same specialization again
    x1 = {**x, "rel_bias": x["rel_bias"][:1, :1]}
    _run(mod, x1, {**opts, "key_padding_mask": kpm[:1, :1]}, dout)

    after = _signatures(kernels)
    added = {k: [s for s in after[k] if s not in before.get(k, [])] for k in after}
    assert not any(added.values()), f"read-only inputs compiled new signatures: {added}"
    np.testing.assert_array_equal(out, want_out, strict=True)
    for k in want_grads:
        np.testing.assert_array_equal(grads[k], want_grads[k], strict=True)
    for k, a in ro.items():                            # never written, still read-only
        np.testing.assert_array_equal(a, saved[k], strict=True)
        assert not a.flags.writeable


@pytest.mark.parametrize("name", list(CALLS))
def test_writeable_inputs_reach_the_kernels_writeable(name, rng, monkeypatch):
    """Every float or bool array a wrapper hands a kernel (inputs, masks, biases, cotangents
    and what is derived from them) is writeable; only integer index arrays may be read-only
    (a Pattern's, frozen by design on every call).  So the signature never depends on the
    caller's flags or the option arrays' shapes."""
    mod, kernels, opts = CALLS[name]
    x, kpm = _inputs((2, 2), rng)
    dout = rng.standard_normal((2, 2, N, DV))
    _run(mod, x, {**opts, "key_padding_mask": kpm}, dout)       # compiled (or cached) first
    seen = []

    class Spy:
        def __init__(self, real):
            self._real = real

        def __getattr__(self, attr):
            f = getattr(self._real, attr)
            if not hasattr(f, "signatures"):
                return f

            def call(*args):
                seen.extend((attr, i) for i, a in enumerate(args)
                            if isinstance(a, np.ndarray) and not a.flags.writeable
                            and a.dtype.kind in "fb")
                return f(*args)
            return call

    real = importlib.import_module(kernels)
    if name == "full":
        monkeypatch.setattr(importlib.import_module("tinyeff.kernels"), "blocked", Spy(real))
    else:
        owner, attr = {"sparse": (mod, "kern"),
                       "window": (importlib.import_module("tinyeff.attention._band"),
                                  "kernels")}[name]
        monkeypatch.setattr(owner, attr, Spy(real))
    for batch in ((2, 2), (1, 1)):
        xb, kb = _inputs(batch, rng)
        for args, mask in ((xb, kb), ({k: _readonly(a) for k, a in xb.items()}, _readonly(kb))):
            _run(mod, args, {**opts, "key_padding_mask": mask},
                 _readonly(rng.standard_normal((*batch, N, DV))))
    assert not seen, f"read-only arrays handed to kernels (name, argument index): {seen}"
