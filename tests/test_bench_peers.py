"""``python -m tinyeff bench --peers`` and ``--cpu-time``: options, clean skips, and that
every torch peer computes what tinyeff computes.

The comparisons need torch and the peer packages (``pip install tinyeff[peers]`` in a
separate environment, BENCHMARKS.md) and skip without them.  No timing assertions.
"""

from __future__ import annotations

import json
import sys

import pytest

from tinyeff.__main__ import main as cli
from tinyeff.cli import _peers

#: Small options per variant for the comparison at N = 64, D = 16.
SMALL = {"full": {}, "window": {"window": 8},
         "local": {"block": 8, "look_backward": 1, "look_forward": 1},
         "performer": {"m": 16}, "lsh": {"chunk_len": 8, "n_hashes": 2, "n_buckets": 8},
         "linear": {}, "linformer": {"k": 8}}

#: Largest difference allowed, relative to the largest magnitude of tinyeff's array.
#: lsh: tinyeff normalizes keys by sqrt(‖k‖² + D·1e-6), reformer-pytorch by ‖k‖ (~1e-6).
TOLERANCE = {"float64": 1e-12, "float32": 1e-5}
LSH_TOLERANCE = 1e-5


def test_parser_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(["bench", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--peers", "--cpu-time", "--sizes"):
        assert option in text
    for other in (["--causal"], ["--quick"], ["--opt", "full.impl=ref"]):
        with pytest.raises(SystemExit) as exit_:
            cli(["bench", "--peers", *other])
        assert exit_.value.code == 2
    assert "not with" in capsys.readouterr().err


def test_peers_without_torch_prints_one_line_and_exits_0(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)          # import torch -> ImportError
    assert not _peers.available(None)
    assert cli(["bench", "--peers", "--sizes", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "torch is not installed" in lines[0]


def test_cpu_time_columns(tmp_path, capsys):
    assert cli(["bench", "--quick", "--variants", "full", "--sizes", "16,32", "--heads", "1",
                "--dim", "4", "--cpu-time", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "per CPU second" in text
    header = [line for line in text.splitlines() if line.startswith("variant")]
    assert header and all("cpu ms" in h and "cpu frac" in h for h in header)
    result = json.loads((tmp_path / "bench.json").read_text())
    assert all(r > 0 for r in result["matmul_gflops_per_cpu_second"]["float32"])
    for case in result["cases"]:
        assert len(case["fwd_bwd_cpu_s"]) == len(case["fwd_bwd_s"]) == 1
        assert case["fraction_cpu_fwd_bwd"] > 0


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("pair", _peers.PAIRS, ids=lambda p: f"{p.label}-{p.peer}")
def test_peer_computes_what_tinyeff_computes(pair, dtype):
    pytest.importorskip("torch")
    if not _peers.available(pair.package):
        pytest.skip(f"{pair.package} is not installed")
    options = {**pair.options(64), **SMALL[pair.variant]}
    if pair.variant == "local" and pair.causal:
        options["look_forward"] = 0
    errors = _peers.compare(pair, 1, 2, 64, 16, dtype, options)
    assert set(errors) >= {"out", "q", "v"}
    tol = LSH_TOLERANCE if pair.variant == "lsh" else TOLERANCE[dtype]
    assert max(errors.values()) <= tol, errors


def test_tiny_peers_run(tmp_path, capsys):
    pytest.importorskip("torch")
    assert cli(["bench", "--peers", "--sizes", "256", "--heads", "2", "--repeat", "1",
                "--cpu-time", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "tinyeff/peer" in text and "cpu frac" in text
    rows = json.loads((tmp_path / "peers.json").read_text())["pairs"]
    ran = [p for p in _peers.PAIRS if _peers.available(p.package)]
    assert [(r["variant"], r["peer"]) for r in rows] == [(p.label, p.peer) for p in ran]
    for row in rows:
        assert row["note"] == "" and len(row["tinyeff_s"]) == len(row["peer_s"]) == 1
        assert row["ratio"] > 0 and row["fraction"] > 0 and row["fraction_cpu"] > 0


def test_a_missing_peer_is_skipped_with_one_line(monkeypatch, capsys):
    pytest.importorskip("torch")
    monkeypatch.setitem(sys.modules, "reformer_pytorch", None)
    assert cli(["bench", "--peers", "--variants", "full,lsh", "--sizes", "128", "--heads",
                "1", "--repeat", "1"]) == 0
    text = capsys.readouterr().out
    assert text.count("peers not installed, skipped: reformer-pytorch") == 1
    assert "LSHAttention" not in text and "torch sdpa" in text


def test_a_length_the_peer_rejects_is_a_note(capsys):
    pytest.importorskip("torch")
    if not _peers.available("local-attention"):
        pytest.skip("local-attention is not installed")
    assert cli(["bench", "--peers", "--variants", "window", "--sizes", "200", "--heads", "1",
                "--repeat", "1"]) == 0
    text = capsys.readouterr().out
    assert "peer failed: AssertionError" in text
