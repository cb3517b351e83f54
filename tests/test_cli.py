"""The ``python -m tinyeff`` command line: one dispatcher, the same ``--variants a,b``."""

from __future__ import annotations

import json

import pytest

from tinyeff.__main__ import main as cli
from tinyeff.cli import COMMANDS
from tinyeff.testing.golden import load_golden


def test_help_lists_every_command_in_plain_text(capsys):
    assert cli(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (_, text) in COMMANDS.items():
        assert f"  {name}" in out and text in out
    assert "``" not in out and ":mod:" not in out
    assert cli([]) == 2 and cli(["nope"]) == 2


@pytest.mark.parametrize("command", ["bench", "golden", "check"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli([command, "--help"])
    assert exit_.value.code == 0
    assert "--variants A,B" in capsys.readouterr().out


def test_variants_is_one_comma_separated_list_everywhere(tmp_path, capsys):
    out = tmp_path / "g"
    assert cli(["golden", "--out", str(out), "--variants", "full,window",
                "--examples-only", "--dtype", "float64", "--quiet"]) == 0
    assert load_golden(out).manifest["variants"] == ["full", "window"]
    assert cli(["check", str(out), "--against",
                "tinyeff.testing.conformance:reference_backend", "--variants", "window"]) == 0
    text = capsys.readouterr().out
    assert "window" in text and "full/" not in text
    assert cli(["bench", "--quick", "--variants", "full,linear", "--n", "16", "--heads", "1",
                "--dim", "4", "--out", str(tmp_path / "b")]) == 0
    cases = json.loads((tmp_path / "b" / "bench.json").read_text())["cases"]
    assert [c["variant"] for c in cases] == ["full", "linear"]
    with pytest.raises(SystemExit):
        cli(["golden", "--out", str(tmp_path / "x"), "--variants", ","])
