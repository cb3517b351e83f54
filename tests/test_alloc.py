"""tinyeff._alloc.empty: np.empty without the huge-page request, NumPy's setting restored."""

import numpy as np
import pytest

from tinyeff import _alloc

setting = _alloc._set_madvise_hugepage
pytestmark = pytest.mark.skipif(setting is None, reason="NumPy has no madvise setting")


@pytest.mark.parametrize("before", [True, False])
def test_setting_restored(before):
    previous = setting(before)
    try:
        a = _alloc.empty((3, 2**20), np.float32)                   # 12 MiB: above 4 MiB
        assert a.shape == (3, 2**20) and a.dtype == np.float32
        assert a.flags.c_contiguous and a.flags.writeable and a.flags.owndata
        assert setting(before) is before                           # unchanged by the call
    finally:
        setting(previous)


def test_setting_restored_after_error():
    current = setting(True)
    setting(current)                                               # read it, unchanged
    with pytest.raises((ValueError, TypeError)):
        _alloc.empty((-1,), np.float32)
    assert setting(current) is current
