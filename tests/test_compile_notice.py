"""The one-line notice when Numba compiles tinyeff kernels (nothing when they load from cache),
and the kernels' caches kept fresh when a helper in another file changes."""

from __future__ import annotations

import os
import shutil
import types

from tinyeff.kernels import _jit


def _event(module: str):
    func = types.SimpleNamespace(__module__=module)
    return types.SimpleNamespace(data={"dispatcher": types.SimpleNamespace(py_func=func)})


def test_one_line_per_kernel_module_and_none_for_other_code(capsys):
    notice = _jit._CompileNotice()
    notice.on_start(_event("tinyeff.kernels.sparse"))
    notice.on_start(_event("tinyeff.kernels.sparse"))             # same module: silent
    notice.on_start(_event("tinyeff.kernels._math"))
    notice.on_start(_event("somebody_else.kernels"))              # not tinyeff: silent
    err = capsys.readouterr().err.splitlines()
    assert err == ["tinyeff: compiling the sparse kernels (first run only; later runs load "
                   "them from the cache)",
                   "tinyeff: compiling the math kernels (first run only; later runs load "
                   "them from the cache)"]


def test_workers_sleep_between_regions_unless_the_user_says_otherwise():
    import os
    import subprocess
    import sys
    code = "import os, tinyeff.kernels._jit; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for given, want in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        if given is not None:
            env["OMP_WAIT_POLICY"] = given
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True).stdout.strip()
        assert out == want


def test_sources_digest_covers_every_python_file_of_the_kernels(tmp_path):
    for src in os.listdir(_jit.KERNELS_DIR):
        if src.endswith(".py"):
            shutil.copy(os.path.join(_jit.KERNELS_DIR, src), tmp_path / src)
    first = _jit.sources_digest(str(tmp_path))
    assert first == _jit.SOURCES_DIGEST
    (tmp_path / "notes.txt").write_text("not a source")
    assert _jit.sources_digest(str(tmp_path)) == first
    with open(tmp_path / "_math.py", "a") as f:
        f.write("# edited\n")
    assert _jit.sources_digest(str(tmp_path)) != first


def test_kernel_caches_carry_the_digest_and_other_code_keeps_numbas_locators(tmp_path):
    import importlib.util

    from tinyeff.kernels import favor_noncausal
    locator = favor_noncausal._features._cache._impl.locator
    assert locator.get_source_stamp()[1] == _jit.SOURCES_DIGEST
    (tmp_path / "elsewhere.py").write_text(
        "import numba\n\n@numba.njit(cache=True)\ndef f(x):\n    return x\n")
    spec = importlib.util.spec_from_file_location("elsewhere", tmp_path / "elsewhere.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert getattr(type(module.f._cache._impl.locator), "tinyeff_kernels", None) is None


def test_an_edited_helper_recompiles_the_kernels_of_other_files(tmp_path):
    """favor_noncausal._features inlines _math.rowmax: editing _math.py alone (Numba would
    only look at favor_noncausal.py) must recompile it instead of loading the stale copy."""
    import subprocess
    import sys
    shutil.copytree(os.path.dirname(_jit.KERNELS_DIR), tmp_path / "tinyeff",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import numpy as np; from tinyeff.kernels import favor_noncausal as m; "
            "f, ell, one = np.empty((1, 2), np.float32), np.empty(1, np.float32), np.float32(1); "
            "m._features(f, ell, np.empty((1, 1), np.float32), np.ones((1, 1), np.float32), "
            "np.zeros((1, 2), np.float32), one, one - one); print(ell[0])")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(tmp_path)}

    def compiles() -> bool:
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                              capture_output=True, text=True, check=True)
        assert proc.stdout.strip() == "-0.5"                       # a = −‖x̂‖²/2 = c
        return "compiling the favor_noncausal kernels" in proc.stderr

    assert compiles()                                              # empty cache
    assert not compiles()                                          # loaded from the cache
    with open(tmp_path / "tinyeff" / "kernels" / "_math.py", "a") as f:
        f.write("# edited\n")
    assert compiles()                                              # stale: compiled again
