"""The ``python -m tinyeff <command>`` tools, one module per command.

:data:`COMMANDS` maps each command to its module and a one-line description (what
``python -m tinyeff --help`` prints).  :mod:`tinyeff.cli.report` holds what the commands
share: argument types, machine info, JSON and CSV writing.
"""

COMMANDS = {
    "demo":   ("tinyeff.cli.demo", "train a small model per variant and compare them on your CPU"),
    "bench":  ("tinyeff.cli.bench", "time and memory of every attention variant against N"),
    "golden": ("tinyeff.cli.golden", "write golden test vectors for other backends"),
    "check":  ("tinyeff.cli.check", "test another backend against golden vectors"),
}
