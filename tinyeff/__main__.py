"""``python -m tinyeff <command> [options]``: dispatch only (commands: tinyeff/cli/)."""

from __future__ import annotations

import importlib
import sys

from .cli import COMMANDS


def usage() -> str:
    """The plain-text list of commands that ``python -m tinyeff --help`` prints."""
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m tinyeff <command> [options]", "",
             "commands (python -m tinyeff <command> --help lists its options):"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"unknown command {command!r}; valid: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
