"""One key-padding rule for every variant: ``key_padding_mask`` has exactly ``q.ndim − 1``
dimensions, lined up with the batch dimensions from the left (size 1 broadcasts).

A PyTorch-style ``(B, M)`` mask against ``(B, H, N, D)`` inputs would be read as ``(H, M)``
by right-aligned broadcasting when B == H; it must raise instead, whatever the sizes.
"""

from __future__ import annotations

import numpy as np
import pytest

from tinyeff.attention import VARIANTS

PADDED = [name for name, mod in VARIANTS.items() if mod.KEY_PADDING is not None]


def _four_d_case(mod):
    """An example case with (B, H, ·, ·) inputs and B == H, and its number of keys M."""
    for case in mod.example_cases(np.random.default_rng(0)):
        q = case.args["q"] if "q" in case.args else case.args["qk"]
        if q.ndim == 4 and q.shape[0] == q.shape[1]:
            keys = case.args.get("k", q)
            return case, q.shape[:2], keys.shape[-2]
    pytest.skip("no (B, H, N, D) example case with B == H")


@pytest.mark.parametrize("variant", PADDED)
def test_every_variant_names_key_padding_the_same(variant):
    assert VARIANTS[variant].KEY_PADDING == "key_padding_mask"


@pytest.mark.parametrize("variant", PADDED)
def test_a_batch_by_key_mask_is_refused_even_when_b_equals_h(variant):
    mod = VARIANTS[variant]
    case, (b, h), m = _four_d_case(mod)
    assert b == h
    opts = {k: v for k, v in case.options.items() if k != mod.KEY_PADDING}
    pad = np.ones((b, m), dtype=bool)
    pad[0, -1] = False
    with pytest.raises(ValueError, match=r"key_padding_mask.*\[:, None, :\]"):
        mod.forward(**case.args, **opts, key_padding_mask=pad)
    for short in (np.ones((m,), bool), np.ones((1, m), bool)):
        with pytest.raises(ValueError, match="key_padding_mask"):
            mod.forward(**case.args, **opts, key_padding_mask=short)
    out, _ = mod.forward(**case.args, **opts, key_padding_mask=pad[:, None, :])
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("variant", PADDED)
def test_the_suggested_mask_means_one_mask_per_batch_item(variant):
    """(B, 1, M) applies row b of the mask to every head of batch item b."""
    mod = VARIANTS[variant]
    case, (b, h), m = _four_d_case(mod)
    opts = {k: v for k, v in case.options.items() if k != mod.KEY_PADDING}
    pad = np.ones((b, m), dtype=bool)
    pad[1, : m // 2] = False
    out, _ = mod.forward(**case.args, **opts, key_padding_mask=pad[:, None, :])
    full_pad = np.broadcast_to(pad[:, None, :], (b, h, m)).copy()
    out2, _ = mod.forward(**case.args, **opts, key_padding_mask=full_pad)
    np.testing.assert_array_equal(out, out2)


@pytest.mark.parametrize("variant", ["linear", "performer"])
def test_mask_is_not_an_alias_for_key_padding(variant):
    mod = VARIANTS[variant]
    case, (b, _), m = _four_d_case(mod)
    opts = {k: v for k, v in case.options.items() if k != mod.KEY_PADDING}
    with pytest.raises(TypeError, match="key_padding_mask"):
        mod.forward(**case.args, **opts, mask=np.ones((b, 1, m), bool))


def test_float_and_non_array_masks_name_the_argument():
    mod = VARIANTS["window"]
    case, (b, _), m = _four_d_case(mod)
    opts = {k: v for k, v in case.options.items() if k != mod.KEY_PADDING}
    with pytest.raises(TypeError, match="key_padding_mask.*dtype bool.*float64"):
        mod.forward(**case.args, **opts, key_padding_mask=np.ones((b, 1, m)))
    with pytest.raises(TypeError, match="key_padding_mask.*numpy.ndarray.*list"):
        mod.forward(**case.args, **opts, key_padding_mask=[[True] * m] * b)
