"""What the ``python -m tinyeff`` commands share: argument types, machine info, JSON/CSV files."""

from __future__ import annotations

import argparse
import ast
import csv
import datetime
import json
import os
import platform
import statistics

import numpy as np


def parse_variant_opts(values: list[str]) -> dict:
    """``["window.window=64", ...]`` -> ``{"window": {"window": 64}}``.

    Values are Python literals (``64``, ``0.5``, ``(1, 2)``, ``True``); anything else is
    kept as a string.  A malformed item is a ``ValueError``.
    """
    out: dict[str, dict] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        name, dot, opt = key.partition(".")
        if not sep or not dot or not name or not opt:
            raise ValueError(f"--opt expects VARIANT.KEY=VALUE, got {item!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        out.setdefault(name, {})[opt] = value
    return out


def int_list(text: str, *, minimum: int = 1) -> list[int]:
    """``"256,512"`` -> ``[256, 512]`` for argparse ``type=``; each value must be >= minimum."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < minimum:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers >= {minimum}, got {text!r}")
    return values


def variant_list(text: str) -> list[str]:
    """``"full,window"`` -> ``["full", "window"]`` for argparse ``type=`` (``--variants``).

    Names are not checked here: each command knows which names it accepts.
    """
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated variant names, got {text!r}")
    return names


def add_variants_argument(parser: argparse.ArgumentParser, default_help: str) -> None:
    """``--variants a,b``: the same spelling in every command."""
    parser.add_argument("--variants", type=variant_list, default=None, metavar="A,B",
                        help=f"comma-separated variant names (default: {default_help})")


#: Environment variables that set thread counts; the header and results.json show them.
THREAD_ENV = ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
              "MKL_NUM_THREADS")


def machine_info() -> dict:
    """CPU model, cores, thread settings, library versions, date and load (demo, bench)."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import numba
    return {"cpu": model, "cores": os.cpu_count(), "numba_threads": numba.get_num_threads(),
            "python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__, "platform": platform.platform(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ}}


def write_json(path: str, data) -> str:
    """Write ``data`` as indented JSON to ``path`` (its directory is created); returns path."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    return path


def write_csv(path: str, header: list[str], rows: list[list]) -> str:
    """Write a header row and ``rows`` as CSV to ``path`` (its directory is created)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def mem_available() -> int:
    """Bytes of MemAvailable (/proc/meminfo), or 8 GiB where that file does not exist."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def plot_scaling(path: str, series: dict, ylabels: tuple[str, str], title: str, *,
                 xlabel: str = "N", dpi: int = 120) -> str | None:
    """Two log-log panels against N, one line per name, saved to ``path``.

    ``series`` maps a name to ``(ns, left values, right values)`` (time and memory, say);
    ``ylabels`` are the two panels' axis labels.  Returns ``path``, or None when matplotlib
    is not installed (it is optional).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, (ns, left, right) in series.items():
        axes[0].plot(ns, left, "o-", label=name)
        axes[1].plot(ns, right, "o-", label=name)
    for ax, label in zip(axes, ylabels):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def refuse(parser, args, why: str, names) -> None:
    """A usage error naming the options of ``names`` (argparse dests) that ``args`` sets,
    for a mode that does not take them: "``why``; not with --a, --b"."""
    given = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n)]
    if given:
        parser.error(f"{why}; not with {', '.join(given)}")


def ms(seconds: float) -> str:
    """Milliseconds with 3 significant digits below 100 ms, whole ones above."""
    value = seconds * 1e3
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def ms_range(ts) -> str:
    """"median [min–max]" milliseconds of the times ``ts`` (seconds), "-" if none."""
    if not ts:
        return "-"
    return f"{ms(statistics.median(ts))} [{ms(min(ts))}–{ms(max(ts))}]"


#: the folder that holds the ``tinyeff`` package (the repository root of a checkout)
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child_env(**extra: str) -> dict:
    """This process's environment for a child ``python`` that imports this tinyeff
    (PACKAGE_ROOT first on PYTHONPATH), with ``extra`` set."""
    return {**os.environ, **extra,
            "PYTHONPATH": os.pathsep.join([PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")])}
