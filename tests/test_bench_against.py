"""``python -m tinyeff bench --against REV``: the working tree against a commit, in one
process.  Runs only in a git checkout (skips otherwise); no timing assertions."""

from __future__ import annotations

import os
import shutil

import pytest

from tinyeff.cli import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(
    shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")),
    reason="needs git and a git checkout")


def test_against_head_is_bit_identical(capsys, tmp_path):
    rc = bench.main(["--against", "HEAD", "--variants", "full,linformer", "--n", "64",
                     "--dim", "16", "--repeat", "2", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "| variant | N | old ms | new ms | new/old [q1, q3] | identical |" in text
    rows = [line for line in text.splitlines() if line.startswith(("| full |", "| linformer |"))]
    assert len(rows) == 2 and all(r.rstrip().endswith("| yes |") for r in rows)
    assert (tmp_path / "against.json").exists()


def test_against_unknown_revision_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--against", "no-such-revision-xyz", "--variants", "full", "--n", "64"])
    assert e.value.code == 2
    assert "no-such-revision-xyz" in capsys.readouterr().err


def test_against_refuses_other_modes(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--against", "HEAD", "--peers"])
    assert e.value.code == 2 and "--peers" in capsys.readouterr().err


def test_a_pattern_is_rebuilt_as_the_old_trees_own_pattern():
    """The old tree gets its own Pattern of the same mask (so that both trees reuse the
    plan a Pattern caches), or the SciPy array if it has no Pattern class."""
    import types

    import numpy as np
    import scipy.sparse as sp

    from tinyeff import masks
    from tinyeff.cli._bench_against import as_pattern_of

    dense = np.tri(6, dtype=bool)
    pattern = masks.Pattern.from_scipy(sp.csr_array(dense))
    got = as_pattern_of(masks, pattern)
    assert isinstance(got, masks.Pattern) and got is not pattern
    np.testing.assert_array_equal(got.to_scipy().toarray(), dense)
    old = as_pattern_of(types.SimpleNamespace(), pattern)          # a tree without Pattern
    assert sp.issparse(old)
    np.testing.assert_array_equal(old.toarray(), dense)
    assert as_pattern_of(masks, 3) == 3
