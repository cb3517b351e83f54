"""Independent ports: every variant transcribed from its semantics page into dense NumPy.

Each module ``tinyeff.testing.ports.<variant>`` is what a careful porter would write from
``docs/semantics/<variant>.md`` (``full``: SEMANTICS.md §6) alone: the allowed set as a dense
boolean mask, the biases as dense arrays, one softmax (or one kernelized sum), and a
hand-written VJP.  No autograd, and nothing from ``tinyeff.attention`` or
``tinyeff.kernels``: the ports are a second, independent implementation.  They are O(N·M)
in memory and meant for the golden cases, not for speed.

They serve two purposes:

* :func:`port_backend` is a conformance backend (see :mod:`tinyeff.testing.conformance`):
  ``check_backend("window", port_backend)`` passes on every golden case;
* with ``bug="<name>"`` it plants one of the realistic porting bugs listed in
  ``BUGS[variant]`` (name -> one-line description); :mod:`tinyeff.testing.mutation`
  measures how many of them the golden suite catches.

Each port module defines ``BUGS`` (its variant-specific bugs plus the shared ones it
supports) and ``compute(x, options, dout, bug) -> (out, grads)``, working on float64 copies
(float32 for the ``float32_math`` bug); the shared bugs below are applied here.
"""

from __future__ import annotations

import importlib
import math

import numpy as np

PORT_VARIANTS = ("full", "sparse", "window", "local", "linear", "performer", "linformer",
                 "lsh", "hierarchical")

#: Bugs applied by :func:`port_backend` itself, around any port.
SHARED_BUGS = {
    "tail_rows": "the grid covers N // 64 query tiles instead of ceil(N / 64): the rows of "
                 "a last, partial tile are never written (stay 0) when N > 64",
    "batch_swap": "the gradient of k (of v for lsh) is assembled as (H, B, ...) and read back "
                  "as (B, H, ...): batch and head axes swapped",
    "inplace": "scales q in place (q *= 1/sqrt(D)) instead of on a copy",
    "float32_math": "computes in float32 whatever the input dtype",
}


def port_module(variant: str):
    """The port module of ``variant`` (``tinyeff.testing.ports.<variant>``)."""
    if variant not in PORT_VARIANTS:
        raise ValueError(f"no port of variant {variant!r}; ports exist for {PORT_VARIANTS}")
    return importlib.import_module(f"{__name__}.{variant}")


def bugs(variant: str) -> dict[str, str]:
    """``{bug name: one-line description}`` of every bug the port of ``variant`` can plant."""
    return dict(port_module(variant).BUGS)


def _widen(x, work):
    if isinstance(x, np.ndarray) and x.dtype.kind == "f":
        return x.astype(work)
    if isinstance(x, (list, tuple)):
        return type(x)(_widen(e, work) for e in x)
    return x


def port_backend(variant: str, inputs: dict, options: dict, dout: np.ndarray, *,
                 bug: str | None = None):
    """The independent port of ``variant`` as a conformance backend.

    ``inputs``, ``options``, ``dout`` as :func:`tinyeff.testing.check_backend` passes them;
    returns ``(out, grads)`` in the inputs' dtype (computed in float64).  ``bug``: plant one
    bug of ``bugs(variant)`` (a ``ValueError`` names the valid ones).
    """
    mod = port_module(variant)
    if bug is not None and bug not in mod.BUGS:
        raise ValueError(f"unknown bug {bug!r} for {variant}; valid: {sorted(mod.BUGS)}")
    dtype = dout.dtype
    work = np.float32 if bug == "float32_math" else np.float64
    x = {name: np.asarray(a).astype(work) for name, a in inputs.items()}    # copies
    opts = {name: _widen(o, work) for name, o in options.items()}
    out, grads = mod.compute(x, opts, np.asarray(dout).astype(work), bug)
    n = out.shape[-2]
    if bug == "tail_rows" and n > 64:
        out = out.copy()
        out[..., 64 * (n // 64):, :] = 0.0
    if bug == "batch_swap":
        name = "k" if "k" in grads else "v"
        g = grads[name]
        if g.ndim >= 3:
            s = g.shape
            grads[name] = np.ascontiguousarray(
                g.reshape((s[1], s[0]) + s[2:]).swapaxes(0, 1)).reshape(s)
    if bug == "inplace":
        inputs["q"] *= inputs["q"].dtype.type(1.0 / math.sqrt(inputs["q"].shape[-1]))
    return out.astype(dtype), {name: g.astype(dtype) for name, g in grads.items()}


def backend(variant: str, inputs: dict, options: dict, dout: np.ndarray):
    """:func:`port_backend` without a bug (the plain four-argument backend signature)."""
    return port_backend(variant, inputs, options, dout)


__all__ = ["PORT_VARIANTS", "SHARED_BUGS", "port_backend", "backend", "bugs", "port_module"]
