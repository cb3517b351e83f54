"""tinyeff.memory: the block cache never hands out memory that a live array still uses, and
the huge-page setting of NumPy is restored."""

import subprocess
import sys

import numpy as np
import pytest

from tinyeff import memory
from tinyeff.attention import linear, linformer, local, performer, sparse, window


@pytest.fixture
def small_blocks(monkeypatch):
    """Cache every block of at least 1 byte, with an empty cache and a 1 MiB limit."""
    monkeypatch.setattr(memory, "CACHE_MIN_BYTES", 1)
    memory.clear_cache()
    previous = memory.set_cache_limit(1 << 20)
    yield
    memory.set_cache_limit(previous)
    memory.clear_cache()


def test_array_like_np_empty(small_blocks):
    for shape, dtype in [((3, 256), np.float32), (700, np.float64), ((2, 0, 5), np.float32),
                         ((), np.float64), ((4, 4096), np.float64)]:
        a = memory.empty(shape, dtype)
        b = np.empty(shape, dtype)
        assert a.shape == b.shape and a.dtype == b.dtype
        assert a.flags.c_contiguous and a.flags.writeable and a.flags.aligned
    with pytest.raises(ValueError):
        memory.empty((-1, 512), np.float32)


def test_live_arrays_and_views_are_never_reused(small_blocks):
    a = memory.empty((64, 64), np.float64)                         # 32 KiB: cached
    a[...] = 1.0
    view = a[3:, ::2]
    del a
    b = memory.empty((64, 64), np.float64)
    assert not np.shares_memory(b, view)                           # the view keeps it
    b[...] = 2.0
    assert np.all(view == 1.0)
    address = view.base.__array_interface__["data"][0]             # the first block
    del view
    c = memory.empty((64, 64), np.float64)                         # now it is free
    assert c.__array_interface__["data"][0] == address
    assert memory.cached_bytes() == (2 * 32768, 0)
    del b, c
    assert memory.cached_bytes() == (0, 2 * 32768)
    memory.clear_cache()
    assert memory.cached_bytes() == (0, 0)


def test_limit_is_respected(small_blocks):
    held = [memory.empty((256, 1024), np.float32) for _ in range(3)]  # 1 MiB each
    assert memory.cached_bytes() == (1 << 20, 0)                   # only the first cached
    assert [h.base is not None and h.base.nbytes == 1 << 20 for h in held] == [True] * 3
    del held
    memory.empty((512,), np.float64)                               # 4 KiB: evicts the free
    assert memory.cached_bytes() == (0, 4096)                      # 1 MiB block to fit
    assert memory.set_cache_limit(0) == 1 << 20
    assert memory.cached_bytes() == (0, 0)
    with pytest.raises(ValueError, match="nbytes"):
        memory.set_cache_limit(-1)
    with pytest.raises(TypeError, match="nbytes"):
        memory.set_cache_limit(1.5)
    assert memory.set_cache_limit(np.int64(2048)) == 0 and memory.cache_limit() == 2048


def _cases():
    rng = np.random.default_rng(0)
    for variant in (linear, performer, local, window, linformer, sparse):
        for case in variant.example_cases(rng):
            yield pytest.param(variant, case, id=f"{variant.NAME}-{case.name}")


@pytest.mark.parametrize("variant,case", list(_cases()))
def test_results_identical_and_not_aliased(small_blocks, variant, case):
    """Every path that allocates through memory.empty (example cases of the variants that use it)
    gives the same bits with reuse on and off, and never writes into a result still held."""
    dout = np.random.default_rng(1).standard_normal(
        variant.forward(**case.args, **case.options)[0].shape)
    first, ctx = variant.forward(**case.args, **case.options)
    grads = variant.backward(dout, ctx)
    kept = [first.copy()] + [g.copy() for g in grads.values()]
    for reuse in (True, True, False):
        memory.set_cache_limit(1 << 20 if reuse else 0)
        out, ctx2 = variant.forward(**case.args, **case.options)
        for a, b in zip([out, *variant.backward(dout, ctx2).values()], kept):
            np.testing.assert_array_equal(a, b)
    for a, b in zip([first, *grads.values()], kept):               # the first results are
        np.testing.assert_array_equal(a, b)                        # untouched


@pytest.mark.skipif(memory._set_madvise_hugepage is None, reason="no NumPy madvise setting")
@pytest.mark.parametrize("before", [True, False])
def test_huge_page_setting_restored(before):
    setting = memory._set_madvise_hugepage
    previous = setting(before)
    try:
        memory.empty((3, 2**20), np.float32)                       # 12 MiB: above 4 MiB
        with pytest.raises(ValueError):
            memory.empty((-1,), np.float32)
        assert setting(before) is before                           # unchanged by the calls
    finally:
        setting(previous)


def test_environment_variable():
    code = "from tinyeff import memory; print(memory.cache_limit())"
    run = [sys.executable, "-c", code]
    out = subprocess.run(run, capture_output=True, text=True,
                         env={"TINYEFF_CACHE_MIB": "3", "PATH": ""})
    assert out.stdout.strip() == str(3 << 20)
    bad = subprocess.run(run, capture_output=True, text=True,
                         env={"TINYEFF_CACHE_MIB": "lots", "PATH": ""})
    assert bad.returncode != 0 and "TINYEFF_CACHE_MIB" in bad.stderr
