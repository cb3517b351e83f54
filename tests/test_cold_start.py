"""The cold-start measurement (tinyeff/cli/_cold.py) runs a path in a fresh process."""

from __future__ import annotations

from tinyeff.cli import _cold


def test_lists_the_paths(capsys):
    assert _cold.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "full-blocked-2048" in out and "linear-causal-4096" in out


def test_one_path_without_kernels_in_a_fresh_process():
    r = _cold.run_path("linformer-256")                 # NumPy only: nothing to compile
    assert r["wall"] >= 0 and r["cpu"] >= 0 and "load" in r


def test_bench_hands_cold_start_to_its_own_options(capsys):
    from tinyeff.cli import bench
    assert bench.main(["--cold-start", "--list"]) == 0
    assert "performer-causal-4096" in capsys.readouterr().out
