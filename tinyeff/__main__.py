"""``python -m tinyeff <command> [options]``: dispatch only; each command lives in its own module.

Commands (``python -m tinyeff <command> --help`` lists each one's options):
  demo     what tinyeff does, on your CPU (tinyeff/demo.py)
  golden   write golden test vectors for other backends (tinyeff/golden.py)
  check    test another backend against golden vectors (tinyeff/check.py)
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": "tinyeff.demo",
    "golden": "tinyeff.golden",
    "check": "tinyeff.check",
    "bench": "tinyeff.bench",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\navailable: " + ", ".join(COMMANDS))
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"unknown command {command!r}; valid: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
