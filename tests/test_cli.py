"""The ``python -m tinyeff`` command line: one dispatcher, the same ``--variants a,b``."""

from __future__ import annotations

import ast
import importlib
import json
from pathlib import Path

import pytest

from tinyeff.__main__ import main as cli
from tinyeff.attention import VARIANTS
from tinyeff.cli import COMMANDS
from tinyeff.testing.golden import load_golden


def test_help_lists_every_command_in_plain_text(capsys):
    assert cli(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (_, text) in COMMANDS.items():
        assert f"  {name}" in out and text in out
    assert "``" not in out and ":mod:" not in out
    assert cli([]) == 2 and cli(["nope"]) == 2


@pytest.mark.parametrize("command", ["demo", "bench", "golden", "check"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli([command, "--help"])
    assert exit_.value.code == 0
    assert "--variants A,B" in capsys.readouterr().out


def test_every_demo_option_has_a_help_string():
    parser = importlib.import_module(COMMANDS["demo"][0]).make_parser()
    missing = [a.option_strings for a in parser._actions if not a.help]
    assert missing == []


CLI = Path(__file__).resolve().parent.parent / "tinyeff" / "cli"


def _variant_literals(node: ast.Compare) -> set[str]:
    """The variant names among a comparison's string constants (also inside tuples, lists
    and sets: ``name in ("lsh", "local")``)."""
    found = set()
    for operand in (node.left, *node.comparators):
        items = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
        found |= {i.value for i in items if isinstance(i, ast.Constant) and i.value in VARIANTS}
    return found


@pytest.mark.parametrize("path", sorted(CLI.glob("*.py")), ids=lambda p: p.name)
def test_no_tool_compares_a_variant_name_to_a_literal(path):
    """What a tool knows about a variant is data of the variant's module, never a name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    hits = [(node.lineno, sorted(_variant_literals(node))) for node in ast.walk(tree)
            if isinstance(node, ast.Compare) and _variant_literals(node)]
    hits += [(node.lineno, [node.pattern.value.value]) for node in ast.walk(tree)
             if isinstance(node, ast.match_case) and isinstance(node.pattern, ast.MatchValue)
             and getattr(node.pattern.value, "value", None) in VARIANTS]
    assert hits == [], f"{path.name} compares variant names to literals at {hits}"


def test_the_compare_scan_finds_a_comparison():
    tree = ast.parse('if name == "lsh" or kind in ("x", "local"): pass')
    found = set().union(*(_variant_literals(n) for n in ast.walk(tree)
                          if isinstance(n, ast.Compare)))
    assert found == {"lsh", "local"}


@pytest.mark.parametrize("path", sorted(CLI.glob("*.py")), ids=lambda p: p.name)
def test_every_cli_module_is_short(path):
    assert len(path.read_text().splitlines()) < 350


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
