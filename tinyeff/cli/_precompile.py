"""The demo's background precompilation: the later variants' kernels compile on the second core
while the first variants train.

Numba compiles a kernel the first time it is called with new argument types and keeps it in
its on-disk cache; compiling is single-threaded and takes seconds per kernel module (the
table in BENCHMARKS.md, ``python -m tinyeff bench --cold-start``).  On an empty cache,
``python -m tinyeff demo`` would compile each variant's kernels in turn on one core.  Instead
it starts one child process that runs the same demo command for one training step per
variant, the variants in reverse order, with one thread and a lower priority; the child's
only lasting effect is the kernels it writes to the cache, which the parent then loads when
it reaches those variants.  The two meet in the middle of the list: a kernel that both start
before either has finished is compiled twice, which costs time but changes no result.

On a warm cache the child only loads the kernels and exits after a few seconds of CPU.
``--no-precompile`` turns it off; so do ``NUMBA_DISABLE_JIT=1`` and a single variant.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from .report import child_env

#: demo flags the child does not take over from the parent's command line: flags without a
#: value, and flags with one value (``--flag VALUE`` or ``--flag=VALUE``)
_DROP_FLAGS = ("--resume", "--no-progress", "--no-precompile")
_DROP_VALUED = ("--variants", "--steps", "--sweep", "--out")


def child_argv(argv: list[str], variants: list[str], out: str) -> list[str]:
    """The demo command line of the child: the parent's ``argv`` with one training step per
    variant, ``variants`` in the order given, no sweep, no resume and output in ``out``."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in _DROP_FLAGS:
            continue
        if a in _DROP_VALUED:
            skip = True
            continue
        if a.split("=", 1)[0] in _DROP_VALUED:
            continue
        kept.append(a)
    return kept + ["--variants", ",".join(variants), "--steps", "1", "--sweep", "",
                   "--no-progress", "--no-precompile", "--out", out]


class Precompiler:
    """The child process (or nothing); ``stop()`` ends it and removes its output folder."""

    def __init__(self, argv: list[str], variants: list[str]):
        self.proc, self.out = None, None
        if len(variants) < 2 or os.environ.get("NUMBA_DISABLE_JIT", "0") not in ("", "0"):
            return
        self.out = tempfile.mkdtemp(prefix="tinyeff-precompile-")
        env = child_env(NUMBA_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        later = list(reversed(variants[1:]))      # the parent trains variants[0] first
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tinyeff", "demo", *child_argv(argv, later, self.out)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL, preexec_fn=_lower_priority if os.name == "posix" else None)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
        if self.proc is not None:
            self.proc.wait()
        if self.out is not None:
            shutil.rmtree(self.out, ignore_errors=True)
        self.proc, self.out = None, None


def _lower_priority() -> None:
    os.nice(10)
