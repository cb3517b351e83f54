"""The independent ports and the mutation score of the default golden suite.

* every correct port (tinyeff/testing/ports/) passes every default golden case, float64 and
  float32;
* every variant has at least 8 named, described porting bugs, and the default suite kills
  every one of them (the mutation score is 100%);
* the ports are independent: they import nothing from tinyeff.attention or tinyeff.kernels;
* ``python -m tinyeff check --mutation-score`` prints the table and exits 0 / 1.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import numpy as np
import pytest

from tinyeff.attention import VARIANTS
from tinyeff.attention._case import Case
from tinyeff.cli.check import main as check_main
from tinyeff.testing._golden_make import compute_case
from tinyeff.testing.conformance import check_case
from tinyeff.testing.golden import write_golden
from tinyeff.testing.mutation import default_cases, mutation_score, score_variant
from tinyeff.testing.ports import PORT_VARIANTS, backend, bugs, port_backend

PORTS_DIR = Path(__file__).resolve().parent.parent / "tinyeff" / "testing" / "ports"


def test_every_registered_variant_has_a_port():
    assert set(PORT_VARIANTS) == set(VARIANTS)


@functools.cache
def _score(variant):
    return score_variant(variant)


@pytest.mark.parametrize("variant", PORT_VARIANTS)
def test_correct_port_passes_the_default_suite(variant):
    failed = _score(variant).port_failures
    for name in failed[:1]:
        dtype, _, case_name = name.partition("/")
        case = next(c for c in default_cases(variant)
                    if c.dtype == dtype and c.name == case_name)
        bad = [r for r in check_case(case, backend) if r.failed]
        pytest.fail(f"{variant}: the port fails {failed}; first: {bad}")


@pytest.mark.parametrize("variant", PORT_VARIANTS)
def test_catalogue_has_at_least_8_described_bugs(variant):
    catalogue = bugs(variant)
    assert len(catalogue) >= 8
    for name, text in catalogue.items():
        assert name.isidentifier() and len(text) > 15, name


@pytest.mark.parametrize("variant", PORT_VARIANTS)
def test_default_suite_kills_every_bug(variant):
    score = _score(variant)
    assert not score.survived, (f"{variant}: {len(score.killed)}/{score.total} killed; "
                                f"surviving bugs: {score.survived}")


def test_ports_do_not_use_the_engine():
    for path in PORTS_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = "." * node.level + (node.module or "")
                assert "attention" not in mod and "kernels" not in mod, (path.name, mod)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("tinyeff"), (path.name, alias.name)


def test_unknown_bug_is_a_value_error():
    case = default_cases("full")[0]
    with pytest.raises(ValueError, match="unknown bug 'nope' for full; valid:"):
        port_backend("full", case.args, case.options, case.dout, bug="nope")
    with pytest.raises(ValueError, match="no port of variant"):
        bugs("nope")


def _case(variant, name, args, options, dtype="float64"):
    return compute_case(VARIANTS[variant], variant, Case(name, args, options), dtype, 0)


def _qkv(rng, batch, n, m, d=6, dv=3):
    return {"q": rng.standard_normal((*batch, n, d)), "k": rng.standard_normal((*batch, m, d)),
            "v": rng.standard_normal((*batch, m, dv))}


@pytest.mark.parametrize("batch", [(2, 3), (3,)])
def test_ports_handle_other_batch_shapes_and_tiles(batch):
    """Independent of the golden suite's shapes: B != H, 3-D inputs, N crossing 64."""
    rng = np.random.default_rng(7)
    kpm = np.ones((*batch[:-1], 1, 70) if len(batch) > 1 else (batch[0], 70), dtype=bool)
    kpm[..., 60:] = False
    cases = [
        _case("full", "t", _qkv(rng, batch, 70, 75), {"causal": True}),
        _case("window", "t", _qkv(rng, batch, 70, 70),
              {"window": 3, "dilation": 2, "global_indices": [1, 65],
               "key_padding_mask": kpm}),
        _case("local", "t", _qkv(rng, batch, 70, 66), {"block": 9, "look_forward": 1}),
        _case("linear", "t", _qkv(rng, batch, 70, 70), {"causal": True,
                                                         "key_padding_mask": kpm}),
    ]
    for case in cases:
        assert not [r for r in check_case(case, backend) if r.failed], case.key
        # a bug past the first 64 rows is caught by such a case
        tail = [r for r in check_case(case, lambda *a: port_backend(*a, bug="tail_rows"))
                if r.failed]
        assert tail, case.key


def test_large_logits_need_the_max_subtraction():
    rng = np.random.default_rng(3)
    x = _qkv(rng, (2, 3), 9, 11, d=4)
    x["k"][..., 0] = 1.0
    x["q"][..., 0] = 800.0 * 2.0                                   # logits ~ 800 (scale 1/2)
    case = _case("full", "large", x, {})
    assert all(np.isfinite(case.out).ravel())
    assert not [r for r in check_case(case, backend) if r.failed]
    assert [r for r in check_case(case, lambda *a: port_backend(*a, bug="no_max_sub"))
            if r.failed]


def test_mutation_command_prints_the_table(capsys):
    rc = check_main(["--mutation-score", "--variants", "linformer,full", "-v"])
    text = capsys.readouterr().out
    report = mutation_score(["linformer", "full"])
    assert rc == (0 if report.ok else 1)
    assert text.splitlines()[0].split()[:4] == ["variant", "cases", "killed", "score"]
    for s in report.scores:
        assert f"{len(s.killed)}/{s.total}" in text
    assert "padding_not_removed" in text                           # -v lists every bug


def test_mutation_command_rejects_an_unknown_variant(capsys):
    assert check_main(["--mutation-score", "--variants", "nope"]) == 2
    assert "no port of ['nope']" in capsys.readouterr().err


def test_mutation_command_on_a_golden_directory(tmp_path, capsys):
    write_golden(tmp_path, ["linformer"], dtype="float64")
    rc = check_main(["--mutation-score", "--golden", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[2:-1]] == ["linformer"]
    assert rc == (0 if mutation_score(golden=tmp_path).ok else 1)
