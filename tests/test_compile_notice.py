"""The one-line notice when Numba compiles tinyeff kernels (nothing when they load from cache)."""

from __future__ import annotations

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
