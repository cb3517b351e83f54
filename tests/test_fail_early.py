"""Training fails early and clearly: each bad input gets a TypeError/ValueError (or the OS
error of a bad path) whose message names the argument.  Tiny models, seconds in all."""

from __future__ import annotations

import os
import re
import stat

import numpy as np
import pytest

from tinyeff import tasks
from tinyeff.cli import demo
from tinyeff.nn import AdamW, MultiHeadAttention, Transformer, checkpoint


def tiny(**kw) -> Transformer:
    opts = dict(vocab_size=11, d_model=8, n_heads=2, n_layers=1, max_len=16, seed=0)
    opts.update(kw)
    return Transformer(**opts)


# --------------------------------------------------------------------- required options


@pytest.mark.parametrize("attention,options", [
    ("window", ["window"]), ("local", ["block"]), ("hierarchical", ["block"]),
    ("lsh", ["chunk_len", "n_buckets", "n_hashes"]),          # forward's and the hashing's
    ("sparse", ["mask"]), ("linformer", ["k"])])               # linformer: init_layer_params
def test_missing_required_option_fails_at_construction(attention, options):
    needs = re.escape(f"attention '{attention}' needs the option(s) {options}")
    with pytest.raises(ValueError, match=needs) as e:
        tiny(attention=attention, task="classify", n_classes=3)
    for option in options:
        assert f"{option} = " in str(e.value)                   # says what each option means
        assert "see tinyeff.attention" not in str(e.value)
    with pytest.raises(ValueError, match=f"'{options[0]}'"):
        MultiHeadAttention(8, 2, attention, rng=np.random.default_rng(0))


def test_options_given_build_and_run():
    m = tiny(attention="window", attention_options={"window": 2})
    logits, _ = m.forward(np.zeros((1, 5), dtype=np.int64))
    assert logits.shape == (1, 5, 11)


# --------------------------------------------------------------------- inputs


def test_float_key_padding_names_the_dtype():
    m = tiny(task="classify", n_classes=3)
    tokens = np.zeros((2, 16), dtype=np.int64)
    with pytest.raises(TypeError, match=r"key_padding must be a bool array.*dtype float64"):
        m.forward(tokens, key_padding=np.ones((2, 16)))
    with pytest.raises(ValueError, match=r"key_padding .*\(2, 16\), got shape \(2, 15\)"):
        m.forward(tokens, key_padding=np.ones((2, 15), dtype=bool))
    with pytest.raises(TypeError, match="key_padding .* got list"):
        m.forward(tokens, key_padding=[[True] * 16] * 2)


@pytest.mark.parametrize("shape", [(2, 0), (0, 4)])
def test_empty_tokens(shape):
    with pytest.raises(ValueError, match=rf"tokens must hold .* got shape \({shape[0]}, "
                                         rf"{shape[1]}\)"):
        tiny().loss_and_grads(np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64))


# --------------------------------------------------------------------- optimizer


@pytest.mark.parametrize("kwargs,name", [
    (dict(lr=-1), "lr"), (dict(lr=float("nan")), "lr"), (dict(eps=-1e-8), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(betas=(-0.1, 0.999)), r"betas\[0\]"),
    (dict(betas=(0.9, 1.0)), r"betas\[1\]"), (dict(betas=(0.9, -2)), r"betas\[1\]"),
])
def test_adamw_rejects_negative_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AdamW(tiny(), **kwargs)


def test_adamw_rejects_wrong_types():
    with pytest.raises(TypeError, match="betas"):
        AdamW(tiny(), betas=0.9)
    with pytest.raises(TypeError, match="lr"):
        AdamW(tiny(), lr="1e-3")
    opt = AdamW(tiny())
    with pytest.raises(ValueError, match="lr"):
        opt.step(-1e-3)


# --------------------------------------------------------------------- demo


def test_demo_missing_text_file_is_a_clean_usage_error(tmp_path, capsys):
    missing = tmp_path / "missing.txt"
    with pytest.raises(SystemExit) as e:
        demo.main(["--text-file", str(missing), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--text-file" in err and str(missing) in err and "Traceback" not in err


# --------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoint_mode_follows_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        checkpoint.save(tmp_path / "m.npz", tiny())
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "m.npz").st_mode) == mode


def test_loading_a_text_file_gives_a_tinyeff_message(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("these are notes, not weights\n")
    with pytest.raises(ValueError) as e:
        checkpoint.load(path, tiny())
    assert str(path) in str(e.value) and "not a .npz checkpoint" in str(e.value)
    assert "allow_pickle" not in str(e.value)


def test_loading_a_pickle_never_advises_allow_pickle(tmp_path):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError) as e:
        checkpoint.load(path, tiny())
    assert str(path) in str(e.value) and "allow_pickle" not in str(e.value)


def test_save_into_a_missing_directory_names_the_path(tmp_path):
    path = tmp_path / "no" / "such" / "m.npz"
    with pytest.raises(FileNotFoundError) as e:
        checkpoint.save(path, tiny())
    assert str(path) in str(e.value) and ".tmp-" not in str(e.value)
    assert e.value.filename == str(path)


def test_save_onto_a_directory_names_the_path(tmp_path):
    with pytest.raises(IsADirectoryError) as e:
        checkpoint.save(tmp_path, tiny())
    assert str(tmp_path) in str(e.value) and ".tmp-" not in str(e.value)
    assert os.listdir(tmp_path) == []                          # no temporary file left


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoint_is_a_value_error_naming_the_file(tmp_path, damage):
    path = tmp_path / "m.npz"
    model = tiny()
    checkpoint.save(path, model)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[:len(raw) // 2]
    else:
        for i in range(200, len(raw) - 100, 61):
            raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    before = {k: v.copy() for k, v in model.named_parameters().items()}
    with pytest.raises(ValueError, match=str(path)):
        checkpoint.load(path, model)
    for k, v in model.named_parameters().items():              # nothing was copied
        assert np.array_equal(v, before[k])


def test_load_returns_the_meta_dict(tmp_path):
    model = tiny()
    checkpoint.save(tmp_path / "m.npz", model, step=7, extra={"note": "x"})
    meta = checkpoint.load(tmp_path / "m.npz", model)
    assert meta["step"] == 7 and meta["extra"] == {"note": "x"}
    assert meta["config"]["d_model"] == 8


def test_save_without_config(tmp_path):
    """config=False: for models whose options JSON cannot hold (a BigBird mask)."""
    from tinyeff import masks
    mask = masks.bigbird(16, 2, 1, 2, np.random.default_rng(0))
    model = tiny(attention="sparse", attention_options={"mask": mask})
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        checkpoint.save(tmp_path / "m.npz", model)
    checkpoint.save(tmp_path / "m.npz", model, config=False, step=3)
    assert checkpoint.load(tmp_path / "m.npz", model)["config"] is None
    with pytest.raises(ValueError, match="stores no model config"):
        checkpoint.load_transformer(tmp_path / "m.npz")


# --------------------------------------------------------------------- MQAR generator


def test_mqar_rejects_bad_sizes():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="num_kv_pairs must be <= seq_len / 4"):
        tasks.mqar(rng, 2, seq_len=32, num_kv_pairs=9)
    with pytest.raises(ValueError, match="seq_len must be even"):
        tasks.mqar(rng, 2, seq_len=33, num_kv_pairs=4)
    with pytest.raises(ValueError, match="vocab_size 16 gives 7 keys"):
        tasks.mqar(rng, 2, seq_len=64, num_kv_pairs=8, vocab_size=16)
    with pytest.raises(ValueError, match="power_a"):
        tasks.mqar(rng, 2, seq_len=64, num_kv_pairs=8, power_a=0)
    with pytest.raises(TypeError, match="num_kv_pairs"):
        tasks.mqar(rng, 2, seq_len=64, num_kv_pairs=8.0)
