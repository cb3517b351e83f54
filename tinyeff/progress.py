"""A small progress bar for training runs: ``tqdm`` when it is installed, else hand-written.

    bar = Progress(total=300, desc="window")
    for step in range(300):
        ...
        bar.update(loss=f"{loss:.3f}", ms=f"{ms:.0f}")
    bar.close()

On a terminal the bar redraws one line in place (at most ten times a second)::

    window   ████████████░░░░░░░░░░░░  150/300 [00:41<00:41, 3.6 it/s] loss=2.113 ms=270

When the stream is not a terminal (a pipe, a log file, CI), nothing is redrawn: one plain
line is printed at each quarter of the run and one at the end, so logs stay clean.
``tqdm`` is used only on a terminal; pass ``enabled=False`` to print nothing at all.
"""

from __future__ import annotations

import sys
import time


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """Progress over ``total`` steps written to ``file`` (default ``sys.stderr``).

    ``update(n=1, **postfix)`` advances by n steps and shows the ``postfix`` values
    (already formatted strings or numbers); ``close()`` ends the line.  Also a context
    manager.  ``use_tqdm=None`` uses tqdm when it is importable and ``file`` is a terminal.
    """

    WIDTH = 24

    def __init__(self, total: int, desc: str = "", *, file=None, enabled: bool = True,
                 use_tqdm: bool | None = None, min_interval: float = 0.1):
        self.total = max(int(total), 0)
        self.desc = desc
        self.file = sys.stderr if file is None else file
        self.enabled = bool(enabled)
        self.tty = _isatty(self.file)
        self.n = 0
        self.postfix: dict = {}
        self.start = time.perf_counter()
        self.min_interval = float(min_interval)
        self._last_draw = 0.0
        self._next_quarter = 1
        self._closed = False
        self._tqdm = None
        if self.enabled and self.tty and use_tqdm is not False:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._tqdm = tqdm(total=self.total, desc=desc, file=self.file,
                                  dynamic_ncols=True, leave=True)

    # ------------------------------------------------------------------------------------
    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1, **postfix) -> None:
        self.n += int(n)
        if postfix:
            self.postfix.update(postfix)
        if not self.enabled:
            return
        if self._tqdm is not None:
            if postfix:
                self._tqdm.set_postfix({k: str(v) for k, v in self.postfix.items()},
                                       refresh=False)
            self._tqdm.update(n)
            return
        now = time.perf_counter()
        if self.tty:
            if now - self._last_draw >= self.min_interval or self.n >= self.total:
                self._last_draw = now
                self.file.write("\r" + self.line() + "\x1b[K")
                self.file.flush()
        elif self.total and self.n * 4 >= self._next_quarter * self.total and self.n < self.total:
            while self.n * 4 >= self._next_quarter * self.total:
                self._next_quarter += 1
            self.file.write(self.line() + "\n")
            self.file.flush()

    def line(self) -> str:
        """The current state as one line of text."""
        elapsed = time.perf_counter() - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.n) / rate if rate > 0 else 0.0
        frac = self.n / self.total if self.total else 1.0
        filled = int(round(self.WIDTH * min(frac, 1.0)))
        bar = "█" * filled + "░" * (self.WIDTH - filled) if self.tty else f"{100 * frac:3.0f}%"
        post = " ".join(f"{k}={v}" for k, v in self.postfix.items())
        return (f"{self.desc:<13}{bar} {self.n:>{len(str(self.total))}}/{self.total} "
                f"[{_fmt_time(elapsed)}<{_fmt_time(left)}, {rate:.2f} it/s] {post}").rstrip()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.close()
            return
        self.file.write(("\r" + self.line() + "\x1b[K\n") if self.tty else self.line() + "\n")
        self.file.flush()
