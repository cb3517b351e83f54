"""``python -m tinyeff demo`` end to end at tiny sizes, its helpers, the progress bar, and the
demos/ scripts as smoke tests.  No timing assertions: only that things run, learn and write."""

from __future__ import annotations

import csv
import io
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from tinyeff.attention import VARIANTS, full
from tinyeff.cli import _demo_data, _precompile, demo
from tinyeff.cli.report import parse_variant_opts
from tinyeff.progress import Progress

DEMOS = Path(__file__).resolve().parent.parent / "demos"
TINY = ["--seq-len", "32", "--batch", "4", "--d-model", "16", "--heads", "2", "--layers", "1",
        "--eval-batches", "1", "--sweep-repeat", "1", "--no-progress", "--no-precompile"]


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_demo_charlm_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    rc = demo.main(["--variants", "full,window,linformer", "--steps", "12", "--eval-every",
                    "6", "--sweep", "32,64", "--opt", "window.window=4", "--out", str(out),
                    *TINY])
    text = capsys.readouterr().out
    assert rc == 0
    # the table is printed, with every variant and the skipped one explained
    assert "| variant | params | val loss | bits/char | acc | ms/step | tokens/s |" in text
    for name in ("full", "window", "linformer"):
        assert f"| {name} |" in text
    assert "skipped: not causal" in text
    assert "# 1/2 variants done in" in text and "left at this pace" in text   # time left
    result = json.loads((out / "results.json").read_text())
    runs = {r["variant"]: r for r in result["runs"]}
    assert result["config"]["kind"] == "lm" and result["config"]["steps"] == 12
    for name in ("full", "window"):
        r = runs[name]
        assert r["status"] == "ok" and r["steps"] == 12
        assert r["val_loss"] < r["val_loss_first"] - 0.3          # it learned (ln 256 = 5.55)
        assert r["bits_per_char"] == pytest.approx(r["val_loss"] / np.log(2))
        assert [p["step"] for p in r["curve"]] == [0, 6, 12]
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 and r["peak_bytes"] > 0
    assert runs["window"]["options"] == {"window": 4}             # --opt reached the model
    assert runs["full"]["params"] == runs["window"]["params"]
    assert "not causal" in runs["linformer"]["status"]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["full", "window", "linformer"]
    assert float(rows[0]["val_loss"]) == pytest.approx(runs["full"]["val_loss"], rel=1e-5)
    assert len(list(csv.DictReader(open(out / "curves.csv")))) == 6
    sweep = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(r["variant"], r["n"]) for r in sweep] == [("full", "32"), ("full", "64"),
                                                       ("window", "32"), ("window", "64")]
    if _has_matplotlib():
        assert (out / "curves.png").exists() and (out / "scaling.png").exists()
    else:
        assert "pip install matplotlib" in text


def test_demo_is_reproducible(tmp_path, capsys):
    args = ["--variants", "window", "--steps", "3", "--sweep", "", *TINY]
    demo.main([*args, "--out", str(tmp_path / "a")])
    demo.main([*args, "--out", str(tmp_path / "b")])
    capsys.readouterr()
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in "ab")
    assert a["runs"][0]["curve"] == [{**p, "train_time_s": q["train_time_s"]}
                                     for p, q in zip(b["runs"][0]["curve"], a["runs"][0]["curve"])]


def test_demo_listops_classification(tmp_path, capsys):
    # seq-len 30 is not a multiple of LSH's chunk (8): the model pads inside attention
    rc = demo.main(["--task", "listops", "--variants", "linformer,lsh", "--steps", "3",
                    "--n-train", "16", "--n-valid", "8", "--sweep", "", "--out", str(tmp_path),
                    "--seq-len", "30", "--batch", "4", "--d-model", "16", "--heads", "2",
                    "--layers", "1", "--no-progress", "--no-precompile"])
    text = capsys.readouterr().out
    assert rc == 0 and "majority class" in text
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["ok", "ok"]
    assert runs[1]["model_options"] == {"pad_to_multiple": 8}
    assert all(0 <= r["val_acc"] <= 1 and "bits_per_char" not in r for r in runs)


MQAR_TINY = ["--task", "mqar", "--variants", "full,linformer", "--seq-len", "32",
             "--kv-pairs", "4", "--vocab", "32", "--batch", "4", "--d-model", "16",
             "--heads", "2", "--layers", "1", "--n-valid", "8", "--sweep", "",
             "--no-progress", "--no-precompile"]


def test_demo_mqar_scores_the_queries(tmp_path, capsys):
    rc = demo.main([*MQAR_TINY, "--steps", "4", "--eval-every", "2", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert rc == 0 and "query positions only" in text
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["config"]["kind"] == "recall" and result["config"]["positions"] == "rope"
    full, linformer = result["runs"]
    assert full["status"] == "ok" and "bits_per_char" not in full
    assert [p["step"] for p in full["curve"]] == [0, 2, 4]
    assert "not causal" in linformer["status"]
    # the accuracy counts the 8 x 4 query positions only: a multiple of 1/32
    assert abs(full["val_acc"] * 32 - round(full["val_acc"] * 32)) < 1e-9
    assert (tmp_path / "checkpoints" / "full.npz").exists()


def test_demo_resume_repeats_the_uninterrupted_run(tmp_path, capsys, monkeypatch):
    args = [*MQAR_TINY, "--variants", "full", "--steps", "6", "--eval-every", "2"]
    demo.main([*args, "--out", str(tmp_path / "a")])               # uninterrupted
    batches = _demo_data.MQARData.batches

    def interrupted(self, seed):                                   # stops after 3 batches
        for i, b in enumerate(batches(self, seed)):
            if i == 3:
                raise KeyboardInterrupt
            yield b

    monkeypatch.setattr(_demo_data.MQARData, "batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.main([*args, "--out", str(tmp_path / "b")])
    monkeypatch.setattr(_demo_data.MQARData, "batches", batches)
    demo.main([*args, "--out", str(tmp_path / "b"), "--resume"])   # from step 2
    capsys.readouterr()
    a, b = (json.loads((tmp_path / d / "results.json").read_text())["runs"][0] for d in "ab")
    assert [(p["step"], p["val_loss"]) for p in a["curve"]] == \
        [(p["step"], p["val_loss"]) for p in b["curve"]]
    assert a["val_acc"] == b["val_acc"] and b["steps"] == 6
    with pytest.raises(SystemExit, match="another run"):           # other config: refused
        demo.main([*args, "--out", str(tmp_path / "b"), "--resume", "--lr", "1e-2"])


def test_demo_text_file(tmp_path, capsys):
    path = tmp_path / "my.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    rc = demo.main(["--text-file", str(path), "--variants", "full", "--steps", "2",
                    "--sweep", "", "--out", str(tmp_path / "o"), *TINY])
    assert rc == 0
    result = json.loads((tmp_path / "o" / "results.json").read_text())
    assert result["data"] == str(path) and result["task"] == f"file:{path}"
    capsys.readouterr()


def test_demo_rejects_bad_arguments(capsys):
    for argv in (["--variants", "nope"], ["--task", "chess"], ["--opt", "window"],
                 ["--opt", "full.impl=ref", "--variants", "window"],
                 ["--d-model", "10", "--heads", "4"], ["--sweep", "1,x"]):
        with pytest.raises(SystemExit) as e:
            demo.main(argv)
        assert e.value.code == 2
    capsys.readouterr()


def test_variant_options():
    opts, model = demo.variant_options("lsh", 100)
    assert opts == {"chunk_len": 24, "n_hashes": 2, "n_buckets": 10}
    assert model == {"pad_to_multiple": 24}
    opts, model = demo.variant_options("sparse", 64, {"n_random": 0, "pad_to_multiple": 4})
    assert opts["mask"].shape == (64, 64) and model == {"pad_to_multiple": 4}
    assert demo.variant_options("window", 4096) == ({"window": 64}, {})
    assert demo.variant_options("local", 256, causal=False)[0]["look_forward"] == 1
    with pytest.raises(ValueError, match="chunk_len"):
        demo.variant_options("lsh", 64, {"chunk_len": 0})
    with pytest.raises(TypeError, match="sparse options"):
        demo.variant_options("sparse", 64, {"block": 8})
    assert all(hasattr(mod, "demo_options") for mod in VARIANTS.values())
    assert parse_variant_opts(["a.b=3", "a.c=x", "d.e=(1, 2)"]) == {"a": {"b": 3, "c": "x"},
                                                                    "d": {"e": (1, 2)}}


# ----------------------------------------------------------------------------- progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_plain_stream_prints_clean_lines():
    f = io.StringIO()
    with Progress(8, "run", file=f) as bar:
        for i in range(8):
            bar.update(loss=f"{i:.1f}")
    lines = f.getvalue().splitlines()
    assert "\r" not in f.getvalue() and "\x1b" not in f.getvalue()
    assert len(lines) == 4                                        # 25 %, 50 %, 75 %, end
    assert lines[-1].startswith("run") and "8/8" in lines[-1] and "loss=7.0" in lines[-1]


def test_progress_terminal_redraws_in_place():
    f = _Tty()
    bar = Progress(3, "run", file=f, use_tqdm=False, min_interval=0.0)
    for _ in range(3):
        bar.update()
    bar.close()
    out = f.getvalue()
    assert out.count("\r") == 4 and out.endswith("\n") and "3/3" in out


def test_progress_disabled_prints_nothing():
    f = io.StringIO()
    with Progress(5, "run", file=f, enabled=False) as bar:
        bar.update(5)
    assert f.getvalue() == ""


# ----------------------------------------------------------------------------- demos/


def _run_script(name, args, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(DEMOS / name), run_name="__main__")
    return capsys.readouterr().out


def test_demo_scripts_train_and_generate(tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "lm.npz"
    out = _run_script("train_char_lm.py", ["--variant", "window", "--steps", "2", "--seq-len",
                                           "32", "--batch", "2", "--d-model", "16", "--heads",
                                           "2", "--layers", "1", "--sample", "5", "--out",
                                           str(ckpt)], monkeypatch, capsys)
    assert "step     2" in out and ckpt.exists()
    out = _run_script("generate.py", [str(ckpt), "--prompt", "ab", "--n", "5"], monkeypatch,
                      capsys)
    assert "window" in out and "\nab" in out


def test_demo_script_compare_variants(monkeypatch, capsys):
    out = _run_script("compare_variants.py", ["--quick"], monkeypatch, capsys)
    assert "error vs N" in out and "(E=F=I)" in out
    exact = [line for line in out.splitlines() if "(E=F=I)" in line][0]
    assert float(exact.split()[-1]) < 1e-12                        # Linformer with E=F=I


def test_demo_script_reversible_memory(monkeypatch, capsys):
    out = _run_script("reversible_memory.py", ["--quick"], monkeypatch, capsys)
    rows = [line.split("|") for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 2
    plain_kept = [float(r[1].split()[0]) for r in rows]
    rev_kept = [float(r[2].split()[0]) for r in rows]
    assert plain_kept[1] > plain_kept[0] and rev_kept[1] == rev_kept[0]


def test_demo_script_blocked_tiles(monkeypatch, capsys):
    band = full.BLOCKED_BAND
    out = _run_script("blocked_tiles.py", ["--quick"], monkeypatch, capsys)
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["32", "16"] and rows[0][2] == "1.000"
    assert full.BLOCKED_BAND == band                               # the setting is put back


# ----------------------------------------------------------------------------- precompile


def test_precompile_child_command_line():
    argv = ["--quick", "--variants", "a,b", "--out=x", "--resume", "--opt", "window.window=3",
            "--sweep", "64", "--steps=9", "--no-progress"]
    assert _precompile.child_argv(argv, ["c", "b"], "OUT") == [
        "--quick", "--opt", "window.window=3", "--variants", "c,b", "--steps", "1",
        "--sweep", "", "--no-progress", "--no-precompile", "--out", "OUT"]


def test_precompile_runs_the_later_variants_once_and_cleans_up(tmp_path, monkeypatch):
    calls = []

    class FakePopen:
        def __init__(self, cmd, **kw):
            calls.append((cmd, kw["env"]))
            self.returncode = None

        def poll(self):
            return self.returncode

        def terminate(self):
            self.returncode = -15

        def wait(self):
            return self.returncode

    monkeypatch.setattr(_precompile.subprocess, "Popen", FakePopen)
    monkeypatch.delenv("NUMBA_DISABLE_JIT", raising=False)
    pc = _precompile.Precompiler(["--quick"], ["full", "linear", "window"])
    (cmd, env), = calls
    assert cmd[1:4] == ["-m", "tinyeff", "demo"]
    assert cmd[cmd.index("--variants") + 1] == "window,linear"     # reversed, first one left out
    assert env["NUMBA_NUM_THREADS"] == "1" and env["OPENBLAS_NUM_THREADS"] == "1"
    out = pc.out
    assert Path(out).is_dir()
    pc.stop()
    assert pc.proc is None and not Path(out).exists()
    # nothing to do: one variant, or no JIT
    assert _precompile.Precompiler(["--quick"], ["window"]).proc is None
    monkeypatch.setenv("NUMBA_DISABLE_JIT", "1")
    assert _precompile.Precompiler(["--quick"], ["full", "window"]).proc is None
    assert len(calls) == 1


def test_precompile_child_really_runs(tmp_path, capsys):
    """The real child: the parent's results are those of a run without it."""
    args = ["--variants", "full,window", "--steps", "2", "--sweep", "", *TINY[:-1]]
    assert demo.main([*args, "--out", str(tmp_path / "with")]) == 0
    assert demo.main([*args, "--no-precompile", "--out", str(tmp_path / "without")]) == 0
    a = json.loads((tmp_path / "with" / "results.json").read_text())["runs"]
    b = json.loads((tmp_path / "without" / "results.json").read_text())["runs"]
    assert [r["val_loss"] for r in a] == [r["val_loss"] for r in b]
