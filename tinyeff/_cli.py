"""Argument parsing shared by the ``python -m tinyeff`` commands (demo, bench)."""

from __future__ import annotations

import argparse
import ast


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
