"""Smoke test of ``python -m tinyeff bench`` at tiny sizes: a table, a JSON file, clean skips.

No timing assertions: speed lives in the benchmark, never in tests.
"""

from __future__ import annotations

import json

import pytest

from tinyeff.__main__ import main as cli
from tinyeff.cli import _bench_case as bench_case
from tinyeff.cli import bench


def test_bench_quick_writes_table_and_json(tmp_path, capsys):
    code = cli(["bench", "--quick", "--variants", "full,not_a_variant", "--n", "32,64",
                "--heads", "1", "--dim", "8", "--repeat", "1", "--causal",
                "--opt", "full.impl=blocked", "--out", str(tmp_path)])
    assert code == 0
    text = capsys.readouterr().out
    assert "full" in text and "not registered" in text and "fwd+bwd" in text
    result = json.loads((tmp_path / "bench.json").read_text())
    assert set(result["matmul_gflops"]) == {"float32", "float64"}
    done = [c for c in result["cases"] if c["variant"] == "full"]
    assert [c["n"] for c in done] == [32, 64]
    for case in done:
        assert case["options"] == {"impl": "blocked"}
        assert len(case["fwd_bwd_s"]) == 1 and case["peak_extra_bytes"] >= 0
        assert case["flops_fwd_bwd"] == 3 * case["flops_fwd"] > 0
        assert 0 < case["fraction_fwd_bwd"]


def test_cases_that_cannot_fit_are_skipped(tmp_path, capsys):
    assert bench.main(["--variants", "full", "--n", "4096", "--opt", "full.impl='ref'",
                       "--mem-limit", "0.01", "--quick"]) == 0
    assert "skipped: needs" in capsys.readouterr().out


def test_flop_counts():
    from tinyeff.attention import full, local, window
    assert full.scored_pairs(5, {}, True) == 15
    assert window.scored_pairs(6, {"window": 1}, False) == 16
    assert local.scored_pairs(8, {"block": 2, "look_backward": 1, "look_forward": 0},
                              False) == 2 * 2 + 6 * 4
    fwd, both = bench_case.case_flops(full, 1, 2, 4, 3, {}, False)
    assert fwd == 2 * 4 * 16 * 3 and both == 3 * fwd


def test_every_variant_gives_its_bench_options_and_cost_model():
    """What the bench knows about a variant comes from the variant's module."""
    from tinyeff.attention import VARIANTS, lsh
    for name, mod in VARIANTS.items():
        options = mod.bench_options(1000)
        assert isinstance(options, dict), name
        assert mod.extra_bytes(1000, 64, 4, options, False) >= 0, name
    assert lsh.bench_options(1000)["n_buckets"] == lsh.suggest_n_buckets(1000, 64)
    for name in bench_case.CONFIGS:
        assert "window" in bench_case.case_options(name, 256)


def test_split_options_routes_each_option_once():
    from tinyeff.attention import linformer, lsh, window
    from tinyeff.attention._options import accepted_options, split_options
    fwd, rnd, layer = split_options(linformer, {"k": 8})
    assert fwd == {} and rnd == {} and layer == {"k": 8}
    fwd, rnd, layer = split_options(lsh, {"chunk_len": 4, "n_hashes": 2, "n_buckets": 4})
    assert fwd["chunk_len"] == 4 and rnd["n_hashes"] == 2 and layer == {}
    assert split_options(window, {"window": 3}) == ({"window": 3}, {}, {})
    with pytest.raises(TypeError, match="nonsense"):
        split_options(window, {"nonsense": 1})
    with pytest.raises(TypeError, match=r"\['causal'\].*valid options: .*'window'"):
        split_options(window, {"window": 3, "causal": True}, reserved=("causal",))
    valid, var_kw = accepted_options(linformer, reserved=("E", "F"))
    assert "k" in valid and "share_kv" in valid and not {"E", "F", "q"} & valid and not var_kw


def test_first_touch_times_both_page_sizes():
    from tinyeff import memory
    touch = bench_case.first_touch_ms(nbytes=1 << 20, repeat=1, settle=0.0)
    if memory._set_madvise_hugepage is None:
        assert touch == {}
        return
    assert set(touch) == {"huge", "small"} and all(t > 0 for t in touch.values())
