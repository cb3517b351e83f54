"""Determinism and state (issue 11): same seed, same bits.

* No module of tinyeff touches NumPy's global random state (a source scan).
* Every random helper takes a ``numpy.random.Generator`` (an int, None or a legacy
  ``RandomState`` is a TypeError), and the same seed gives the same bits.
* Every variant's default implementation gives bit-identical outputs and gradients (float64)
  across repeated calls and across Numba thread counts 1 and 2.
* Deleting the Numba compile cache does not change a single bit: a subprocess with
  ``NUMBA_CACHE_DIR`` pointing at a fresh temporary directory recompiles every kernel and
  must print the same hashes as this process (a few variants by default, all of them with
  ``TINYEFF_FUZZ=long``).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from tinyeff import masks
from tinyeff.attention import VARIANTS
from tinyeff.kernels._jit import num_threads
from tinyeff.ops import feature_maps

from .test_robustness import LONG, NAMES, seeded

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_no_global_numpy_random_state():
    """``np.random.<fn>`` is only ever default_rng/Generator/SeedSequence/bit generators."""
    allowed = {"default_rng", "Generator", "SeedSequence", "PCG64", "Philox"}
    offenders = []
    for path in sorted((ROOT / "tinyeff").rglob("*.py")):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for fn in re.findall(r"(?:np|numpy)\.random\.(\w+)", line):
                if fn not in allowed:
                    offenders.append(f"{path.relative_to(ROOT)}:{lineno}: np.random.{fn}")
    assert not offenders, "global random state used:\n" + "\n".join(offenders)


def _helpers():
    """Every public random helper, as ``f(rng) -> array``."""
    out = {
        "masks.random": lambda r: masks.random(8, 2, r).toarray(),
        "masks.bigbird": lambda r: masks.bigbird(8, 1, 1, 2, r).toarray(),
        "feature_maps.gaussian_features": lambda r: feature_maps.gaussian_features(r, 3, 4),
        "feature_maps.orthogonal_features":
            lambda r: feature_maps.orthogonal_features(r, 6, 4),
    }
    for name, mod in VARIANTS.items():
        if hasattr(mod, "draw_random_options"):
            out[f"{name}.draw_random_options"] = (
                lambda r, mod=mod: mod.draw_random_options(r, 4, n_hashes=2, n_buckets=4,
                                                           m=6))
        if hasattr(mod, "init_layer_params"):
            out[f"{name}.init_layer_params"] = (
                lambda r, mod=mod: mod.init_layer_params(r, 6, k=3))
    return out


HELPERS = _helpers()


def _bits(x) -> bytes:
    if isinstance(x, dict):
        return b"".join(k.encode() + _bits(v) for k, v in sorted(x.items()))
    return np.ascontiguousarray(x).tobytes()


@pytest.mark.parametrize("helper", list(HELPERS))
def test_random_helpers_take_a_generator_and_are_seeded(helper):
    f = HELPERS[helper]
    assert _bits(f(np.random.default_rng(7))) == _bits(f(np.random.default_rng(7)))
    assert _bits(f(np.random.default_rng(7))) != _bits(f(np.random.default_rng(8)))
    for bad in (7, None, np.random.RandomState(7)):
        with pytest.raises(TypeError, match="Generator"):
            f(bad)


def _default_cases(name, n_cases=2):
    return VARIANTS[name].example_cases(seeded(name, "det"))[:n_cases]


def _result(name, case):
    mod = VARIANTS[name]
    out, ctx = mod.forward(**case.args, **case.options)
    dout = seeded("dout", name, case.name).standard_normal(out.shape)
    return out, mod.backward(dout, ctx)


@pytest.mark.numba_threads
@pytest.mark.parametrize("name", NAMES)
def test_bit_identical_across_runs_and_thread_counts(name):
    """float64, the default implementation ("auto"), the first two example cases."""
    for case in _default_cases(name):
        with num_threads(1):
            out1, g1 = _result(name, case)
        with num_threads(2):
            out2, g2 = _result(name, case)
            out3, g3 = _result(name, case)
        for out, g in ((out2, g2), (out3, g3)):
            assert out.tobytes() == out1.tobytes(), f"{name}/{case.name}: out"
            for key in g1:
                assert g[key].tobytes() == g1[key].tobytes(), f"{name}/{case.name}: d{key}"


_SCRIPT = """
import json, sys
from tests.test_determinism import _hashes
print(json.dumps(_hashes([tuple(a.split("/")) for a in sys.argv[1:]])))
"""


def _hashes(ids) -> dict:
    """{"variant/case": sha256 of out and every gradient} for (variant, case name) pairs."""
    hashes = {}
    for name, case_name in ids:
        case = {c.name: c for c in VARIANTS[name].example_cases(seeded(name, "det"))}[case_name]
        out, g = _result(name, case)
        h = hashlib.sha256(out.tobytes())
        for key in sorted(g):
            h.update(g[key].tobytes())
        hashes[f"{name}/{case_name}"] = h.hexdigest()
    return hashes


# By default one small kernel (linear's causal prefix sums); every variant's first two cases
# in the long profile (recompiling every kernel from nothing takes minutes on a loaded
# 2-core machine).
CACHE_IDS = ([(n, c.name) for n in NAMES for c in _default_cases(n)] if LONG
             else [("linear", "causal")] if "linear" in VARIANTS else [])


@pytest.mark.skipif(not CACHE_IDS, reason="no variant to compile")
def test_fresh_numba_cache_gives_the_same_bits(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}
    ids = [f"{n}/{c}" for n, c in CACHE_IDS]
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, *ids], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    assert any((tmp_path / "numba-cache").rglob("*.nbi")), "the subprocess used no fresh cache"
    assert fresh == _hashes(CACHE_IDS)


@pytest.mark.numba_threads
def test_run_tasks_splits_into_one_block_per_thread_and_reraises():
    """kernels._jit.run_tasks: consecutive blocks covering every task once, the first block
    on the calling thread; an exception in any block reaches the caller."""
    import threading

    from tinyeff.kernels._jit import run_tasks
    seen = []

    def record(lo, hi, tag):
        seen.append((lo, hi, tag, threading.current_thread() is threading.main_thread()))

    for threads, n_tasks, want in [(1, 5, [(0, 5)]), (2, 5, [(0, 2), (2, 5)]),
                                   (2, 1, [(0, 1)]), (2, 0, [(0, 0)])]:
        seen.clear()
        with num_threads(threads):
            run_tasks(record, n_tasks, "x")
        assert sorted((lo, hi) for lo, hi, _, _ in seen) == want
        assert all(main == (lo == 0) for lo, _, _, main in seen)

    def fail(lo, hi):
        if lo > 0:
            raise ValueError("block 2")

    with num_threads(2), pytest.raises(ValueError, match="block 2"):
        run_tasks(fail, 4)


@pytest.mark.numba_threads
def test_run_tasks_runs_small_passes_on_one_thread(monkeypatch):
    """A pass that finished quickly on several threads runs in one block the next time,
    and goes back to several when a one-block call of it is slow."""
    import time

    from tinyeff.kernels import _jit
    monkeypatch.setattr(_jit, "_SMALL", set())
    monkeypatch.setattr(_jit, "SMALL_S", 0.5)           # "fast" is small even on a busy machine
    monkeypatch.setattr(_jit, "LARGE_S", 0.75)
    x = np.zeros(3)
    seen = []

    def fast(lo, hi, arr):
        seen.append((lo, hi))

    def slow(lo, hi, arr):
        seen.append((lo, hi))
        time.sleep(2 * _jit.LARGE_S)

    with num_threads(2):
        _jit.run_tasks(fast, 4, x)
        assert sorted(seen) == [(0, 2), (2, 4)]
        seen.clear()
        _jit.run_tasks(fast, 4, x)                     # small: one block now
        assert seen == [(0, 4)]
        seen.clear()
        _jit.run_tasks(fast, 4, np.zeros(5))           # another shape: several again
        assert sorted(seen) == [(0, 2), (2, 4)]
        monkeypatch.setattr(_jit, "_SMALL", {(slow, 4, (3,))})
        seen.clear()
        _jit.run_tasks(slow, 4, x)                     # one block, but slow: unmarked
        _jit.run_tasks(slow, 4, x)
        assert seen[0] == (0, 4) and sorted(seen[1:]) == [(0, 2), (2, 4)]


def test_blas_single_thread_limits_both_openblas_libraries():
    """Inside ``blas_single_thread`` both OpenBLAS libraries (SciPy's, which the kernels'
    ``np.dot`` calls, and NumPy's, which ``np.matmul`` calls) run one thread; the previous
    counts come back after, also when the block raises.  The NumPy and SciPy wheels bundle
    both; a build without them has nothing to limit."""
    from tinyeff.kernels import _math
    if not _math._BLAS:
        pytest.skip("no OpenBLAS thread control found in this NumPy/SciPy build")
    before = [get() for _, get in _math._BLAS]
    with pytest.raises(RuntimeError):
        with _math.blas_single_thread():
            assert [get() for _, get in _math._BLAS] == [1] * len(_math._BLAS)
            raise RuntimeError
    assert [get() for _, get in _math._BLAS] == before
