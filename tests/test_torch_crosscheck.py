"""Optional cross-checks against PyTorch autograd (skipped when torch is not installed).

For each variant, ``TORCH_REFS[variant]`` is a short PyTorch transcription of the pinned
formula in SEMANTICS.md, written from the document, not from tinyeff's code.  torch's
autograd differentiates it in float64; on every golden case (the variant's example cases,
the fixed upstream gradient of the golden files) its output and gradients must agree with
tinyeff's forward and hand-written backward to PARITY[float64]: |a − b| <= 1e-12 + 1e-10·|b|
entry by entry.  Both tinyeff paths are checked: the float64 reference (the golden values)
and the default implementation (Numba kernels where they exist).

``full`` is also compared with ``torch.nn.functional.scaled_dot_product_attention`` (SDPA):
causal masks are top-left in both, boolean masks mean "may attend" in both, and fully masked
rows give zeros in PyTorch >= 2.5 as in tinyeff.

To add a variant: write ``torch_<variant>(x, options) -> out`` (``x``: dict of float64
tensors that require grad; ``options``: the golden options as tinyeff received them) and
register it in ``TORCH_REFS``; then update the list in SEMANTICS.md.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from tinyeff.attention import VARIANTS
from tinyeff.testing import reference_backend
from tinyeff.testing.conformance import OK, compare
from tinyeff.testing.golden import make_cases
from tinyeff.testing.tolerances import PARITY

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.torch
TOL = PARITY[np.dtype(np.float64)]


def _tensor(x, grad=False):
    if sp.issparse(x):
        x = x.toarray()
    t = torch.from_numpy(np.array(x))                              # a copy: never aliases
    return t.requires_grad_(True) if grad else t


def _opt(options, name):
    value = options.get(name)
    return None if value is None else _tensor(value)


# ----------------------------------------------------------------------------------------
# Transcriptions of the pinned formulas
# ----------------------------------------------------------------------------------------

def safe_softmax(s, allowed):
    """Row softmax over the allowed entries; a row with none gives zeros (and zero grads)."""
    s = s.masked_fill(~allowed, float("-inf"))
    allowed = allowed & (s > float("-inf"))
    nonempty = allowed.any(dim=-1, keepdim=True)
    s = torch.where(nonempty, s, torch.zeros((), dtype=s.dtype))   # no NaN anywhere
    return torch.softmax(s, dim=-1) * nonempty


def full_allowed(q, k, options):
    n, m = q.shape[-2], k.shape[-2]
    allowed = torch.ones(n, m, dtype=torch.bool)
    mask = _opt(options, "mask")
    if mask is not None:
        allowed = allowed & mask
    kpm = _opt(options, "key_padding_mask")
    if kpm is not None:
        allowed = allowed & kpm[..., None, :]
    if options.get("causal", False):
        allowed = allowed & torch.ones(n, m, dtype=torch.bool).tril()   # top-left: j <= i
    return allowed


def full_bias(x, n, m):
    """bias + rel_bias as one (..., N, M) additive term (or None)."""
    total = x.get("bias")
    if "rel_bias" in x:
        offsets = torch.arange(n)[:, None] - torch.arange(m)[None, :] + (m - 1)
        rel = x["rel_bias"][..., offsets]                          # [..., i, j] = r[i − j + M − 1]
        total = rel if total is None else total + rel
    return total


def torch_full(x, options):
    """SEMANTICS.md, `full`: out = softmax_A(q kᵀ·scale + bias + rel_bias) v."""
    q, k, v = x["q"], x["k"], x["v"]
    scale = options.get("scale")
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    bias = full_bias(x, q.shape[-2], k.shape[-2])
    if bias is not None:
        s = s + bias
    return safe_softmax(s, full_allowed(q, k, options)) @ v


TORCH_REFS = {
    "full": torch_full,
}

CASES = [(v, c.name) for v in VARIANTS
         for c in VARIANTS[v].example_cases(np.random.default_rng(0))]


def _golden(variant, case_name):
    for case in make_cases(variant):
        if case.name == case_name:
            return case
    raise KeyError(case_name)


def _run_torch(fn, case):
    x = {k: _tensor(a, grad=True) for k, a in case.args.items()}
    out = fn(x, case.options)
    out.backward(_tensor(case.dout))
    return out.detach().numpy(), {k: t.grad.numpy() for k, t in x.items()}


def _assert_agree(actual, desired, label):
    _, max_rel, ratio, status, note = compare(actual, desired, TOL)
    assert status == OK, f"{label}: rel {max_rel:.2e}, ratio {ratio:.2e}; {note}"


@pytest.mark.parametrize("variant,case_name", CASES)
def test_autograd_agrees_with_tinyeff(variant, case_name):
    if variant not in TORCH_REFS:
        pytest.skip(f"no PyTorch transcription of {variant} yet (listed in SEMANTICS.md)")
    case = _golden(variant, case_name)
    out_t, grads_t = _run_torch(TORCH_REFS[variant], case)
    # the float64 reference (what the golden files hold)
    _assert_agree(out_t, case.out, "out (reference)")
    for name in case.grads:
        _assert_agree(grads_t[name], case.grads[name], f"grad {name} (reference)")
    # the default implementation (Numba kernels where the variant has them)
    out, grads = reference_backend(variant, case.args, case.options, case.dout)
    _assert_agree(out_t, out, "out (default impl)")
    for name in case.grads:
        _assert_agree(grads_t[name], grads[name], f"grad {name} (default impl)")


# ----------------------------------------------------------------------------------------
# full against PyTorch's own scaled_dot_product_attention
# ----------------------------------------------------------------------------------------

def sdpa_full(x, options):
    """tinyeff's `full` options expressed through SDPA's arguments."""
    q, k, v = x["q"], x["k"], x["v"]
    f = torch.nn.functional.scaled_dot_product_attention
    plain_causal = set(options) <= {"causal", "scale"} and set(x) == {"q", "k", "v"}
    if plain_causal:
        return f(q, k, v, is_causal=bool(options.get("causal")), scale=options.get("scale"))
    allowed = full_allowed(q, k, options)
    bias = full_bias(x, q.shape[-2], k.shape[-2])
    if bias is None:
        mask = allowed                                             # bool: True = may attend
    else:
        mask = bias.masked_fill(~allowed, float("-inf"))           # float: added to scores
    return f(q, k, v, attn_mask=mask, scale=options.get("scale"))


@pytest.mark.parametrize("case_name", [c for v, c in CASES if v == "full"])
def test_full_matches_torch_sdpa(case_name):
    case = _golden("full", case_name)
    out_t, grads_t = _run_torch(sdpa_full, case)
    _assert_agree(out_t, case.out, "out")
    for name in case.grads:
        _assert_agree(grads_t[name], case.grads[name], f"grad {name}")


def test_sdpa_causal_is_top_left_and_masked_rows_are_zero():
    """The two conventions SEMANTICS.md relies on, checked on this torch."""
    rng = np.random.default_rng(0)
    q, k, v = (torch.from_numpy(rng.standard_normal(s)) for s in
               ((1, 1, 3, 4), (1, 1, 6, 4), (1, 1, 6, 2)))
    f = torch.nn.functional.scaled_dot_product_attention
    top_left = torch.ones(3, 6, dtype=torch.bool).tril()
    torch.testing.assert_close(f(q, k, v, is_causal=True), f(q, k, v, attn_mask=top_left))
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1] = False
    out = f(q, k, v, attn_mask=mask)
    assert torch.all(out[..., 1, :] == 0) and torch.all(torch.isfinite(out))


def test_transcription_catches_a_wrong_backward():
    """Negative control: the comparison fails on a gradient scaled by 1.001."""
    case = _golden("full", "plain")
    _, grads_t = _run_torch(torch_full, case)
    with pytest.raises(AssertionError):
        _assert_agree(grads_t["q"] * 1.001, case.grads["q"], "grad q")
