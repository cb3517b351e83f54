"""Safe loading of checkpoints and golden files (issue 11), beyond what is tested already.

Already covered elsewhere (not repeated here): checkpoint round trip, atomic write on an
``OSError`` mid-write, wrong parameter shape/dtype/missing/unexpected parameter, config
mismatch and "not a checkpoint" (tests/test_training.py); golden files flipped byte,
truncation, missing file/manifest, wrong shape/dtype, missing/extra entries, pickle refused
and never run, other version, manifest escaping the directory (tests/test_golden.py).

Added here, for checkpoints: truncated, bit-flipped, empty and non-zip files; entries
missing or hand-edited (format, version, meta, optimizer state); a pickle inside every kind
of entry never executes; a failed load leaves the model and optimizer untouched; an
interrupted save (KeyboardInterrupt, or the process killed mid-write) leaves the previous
file intact.  For golden files: an interrupted write leaves the previous file intact, and
the damage tests/test_golden.py does not cover (a JSON nesting bomb in the header or the
manifest, an encrypted entry or an unknown compression method, a truncated entry, manifest
fields of the wrong JSON type) gives a ``GoldenError`` (a ``ValueError``) naming the file.

Expected behaviour of a bad file: a ``ValueError`` whose message names the file and what is
wrong (the entry, expected vs seen shape/dtype, the missing key), never a
``KeyError``/``BadZipFile``/``EOFError``/``JSONDecodeError`` from inside, never any code
executed, and the model and optimizer bit-identical to before the call.  A file that
cannot be opened (missing, a directory) keeps the operating system's error.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from tinyeff.nn import AdamW, checkpoint
from tinyeff.testing import golden

from .test_model_gradcheck import build

ROOT = pathlib.Path(__file__).resolve().parents[1]
MARKER = "tinyeff-pwned"


class _Evil:
    """Unpickling this would create the marker file: the test fails if it ever exists."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def _npy(a, allow_pickle=False) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, allow_pickle=allow_pickle)
    return buf.getvalue()


def _read(raw, name):
    return np.lib.format.read_array(io.BytesIO(raw[name]), allow_pickle=False)


def _rezip(raw: bytes, edit) -> bytes:
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        entries = {i.filename: zf.read(i) for i in zf.infolist()}
    edit(entries)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The bytes of a checkpoint of a small model with optimizer state, and its param names."""
    path = tmp_path_factory.mktemp("ckpt") / "m.npz"
    model = build("full", seed=1)
    checkpoint.save(path, model, optimizer=AdamW(model, lr=1e-2), step=1)
    return path.read_bytes()


def _first(entries, prefix):
    return next(k for k in entries if k.startswith(prefix))


def _set(name_or_prefix, value_fn):
    def edit(e):
        key = name_or_prefix if name_or_prefix in e else _first(e, name_or_prefix)
        e[key] = value_fn(e, key)
    return edit


def _corruptions(marker):
    """name -> (bytes transform, a regex the error message must match besides the path)."""
    evil = np.array([_Evil(marker)], dtype=object)
    return {
        "truncated": (lambda raw: raw[:len(raw) // 2], "truncated or corrupted"),
        "bit_flipped": (lambda raw: raw[:len(raw) // 2] + bytes([raw[len(raw) // 2] ^ 1])
                        + raw[len(raw) // 2 + 1:], "truncated or corrupted"),
        "empty": (lambda raw: b"", "truncated or corrupted"),
        "not_a_zip": (lambda raw: b"tinyeff" * 50, "not a .npz"),
        "unknown_compression_method": (lambda raw: _zip_flags((8, 10, b"\x63\x00"))(raw),
                                       "truncated or corrupted"),
        "encrypted_entries": (lambda raw: _zip_flags((6, 8, b"\x01\x00"))(raw),
                              "truncated or corrupted"),
        "single_npy": (lambda raw: _npy(np.zeros(3)), "single .npy"),
        "no_format": (lambda raw: _rezip(raw, lambda e: e.pop("format.npy")),
                      "not a tinyeff checkpoint"),
        "no_version": (lambda raw: _rezip(raw, lambda e: e.pop("version.npy")),
                       "no 'version' entry"),
        "no_meta": (lambda raw: _rezip(raw, lambda e: e.pop("meta.npy")), "no 'meta' entry"),
        "meta_not_json": (lambda raw: _rezip(raw, _set("meta.npy", lambda e, k: _npy(
            np.array("{not json")))), "not valid JSON"),
        "meta_not_a_dict": (lambda raw: _rezip(raw, _set("meta.npy", lambda e, k: _npy(
            np.array("[1, 2]")))), "JSON object, got list"),
        "meta_nested_too_deep": (lambda raw: _rezip(raw, _set("meta.npy", lambda e, k: _npy(
            np.array("[" * 100_000 + "]" * 100_000)))), "not valid JSON"),
        "meta_not_text": (lambda raw: _rezip(raw, _set("meta.npy", lambda e, k: _npy(
            np.zeros(2)))), "JSON text scalar"),
        "meta_without_config": (lambda raw: _rezip(raw, _set("meta.npy", lambda e, k: _npy(
            np.array('{"step": 1, "extra": {}}')))), "no 'config' key"),
        "meta_config_not_a_dict": (lambda raw: _rezip(raw, _set("meta.npy", lambda e, k: _npy(
            np.array('{"config": 3, "step": 1, "extra": {}}')))), "'config' should be"),
        "version_not_int": (lambda raw: _rezip(raw, _set("version.npy", lambda e, k: _npy(
            np.array("one")))), "integer scalar"),
        "version_other": (lambda raw: _rezip(raw, _set("version.npy", lambda e, k: _npy(
            np.array(2)))), "version 2"),
        "unknown_entry": (lambda raw: _rezip(raw, lambda e: e.update(
            {"sneaky.npy": _npy(np.zeros(2))})), "unexpected entries.*sneaky"),
        "param_int_dtype": (lambda raw: _rezip(raw, _set("param/", lambda e, k: _npy(
            _read(e, k).astype(np.int64)))), "dtype int64 in the checkpoint"),
        "param_float32": (lambda raw: _rezip(raw, _set("param/", lambda e, k: _npy(
            _read(e, k).astype(np.float32)))), "dtype float32 in the checkpoint"),
        "param_wrong_shape": (lambda raw: _rezip(raw, _set("param/", lambda e, k: _npy(
            _read(e, k)[..., :1]))), r"shape \(.*\) in the checkpoint but \(.*\) in the model"),
        "param_missing": (lambda raw: _rezip(raw, lambda e: e.pop(_first(e, "param/"))),
                          "has no parameter"),
        "pickle_in_param": (lambda raw: _rezip(raw, _set("param/", lambda e, k: _npy(
            evil, True))), "pickle"),
        "pickle_in_meta": (lambda raw: _rezip(raw, _set("meta.npy", lambda e, k: _npy(
            evil, True))), "pickle"),
        "pickle_in_optimizer": (lambda raw: _rezip(raw, _set("optim/m/", lambda e, k: _npy(
            evil, True))), "pickle"),
        "optimizer_t_missing": (lambda raw: _rezip(raw, lambda e: e.pop("optim/t.npy")),
                                "no optimizer state 't'"),
        "optimizer_t_negative": (lambda raw: _rezip(raw, _set("optim/t.npy", lambda e, k: _npy(
            np.array(-1, dtype=np.int64)))), "'t'.* < 0"),
        "optimizer_m_missing": (lambda raw: _rezip(raw, lambda e: e.pop(_first(e, "optim/m/"))),
                                "no optimizer state 'm/"),
        "optimizer_wrong_shape": (lambda raw: _rezip(raw, _set("optim/m/", lambda e, k: _npy(
            np.zeros(3)))), r"optimizer state 'm/.*shape \(3,\) in the checkpoint"),
        "optimizer_wrong_dtype": (lambda raw: _rezip(raw, _set("optim/v/", lambda e, k: _npy(
            _read(e, k).astype(np.float32)))), "optimizer state 'v/.*dtype float32 in the "
                                               "checkpoint but float64 in the optimizer"),
        "no_optimizer_state": (lambda raw: _rezip(raw, lambda e: [
            e.pop(k) for k in list(e) if k.startswith("optim/")]), "no optimizer state"),
    }


@pytest.mark.parametrize("corruption", list(_corruptions("x")))
def test_bad_checkpoint_gives_a_clear_error_and_changes_nothing(corruption, saved, tmp_path):
    """A damaged file raises ValueError naming the file and what is wrong, executes nothing,
    and leaves the model and the optimizer bit-identical to before the call."""
    marker = tmp_path / MARKER
    transform, what = _corruptions(marker)[corruption]
    path = tmp_path / "bad.npz"
    path.write_bytes(transform(saved))
    model = build("full", seed=1)                      # the file's config ...
    opt = AdamW(model, lr=1e-2)
    for v in model.named_parameters().values():        # ... but other values
        v += 1.0
    for v in opt.state_arrays().values():
        if v.ndim:                                     # m and v (t is a fresh 0-d copy)
            v += 0.5
    opt.t = 7
    before = {k: v.copy() for k, v in model.named_parameters().items()}
    opt_before = {k: v.copy() for k, v in opt.state_arrays().items()}
    try:
        with pytest.raises(ValueError) as err:
            checkpoint.load(path, model, optimizer=opt)
    finally:
        assert not marker.exists(), "loading executed code from the file"
    message = str(err.value)
    assert str(path) in message, message
    assert re.search(what, message), message
    for k, v in model.named_parameters().items():
        np.testing.assert_array_equal(v, before[k], err_msg=f"{k} modified by a failed load",
                                      strict=True)
    for k, v in opt.state_arrays().items():
        np.testing.assert_array_equal(v, opt_before[k], err_msg=f"optimizer {k} modified",
                                      strict=True)


def test_a_failed_load_leaves_model_and_optimizer_bit_identical(saved, tmp_path):
    """The last optimizer array is damaged: every parameter and every other optimizer array
    would be copied before it if validation and copying were interleaved."""
    path = tmp_path / "late.npz"
    last = sorted(k for k in _entries(saved) if k.startswith("optim/v/"))[-1]
    path.write_bytes(_rezip(saved, _set(last, lambda e, k: _npy(
        _read(e, k).astype(np.float32)))))
    model = build("full", seed=1)                      # the file's config, other values
    opt = AdamW(model, lr=1e-2)
    rng = np.random.default_rng(0)
    for v in (*model.named_parameters().values(), *model.named_buffers().values(),
              *opt.state_arrays().values()):
        if v.ndim:
            v[...] = rng.standard_normal(v.shape)
    opt.t = 11
    before = {k: v.tobytes() for k, v in model.named_parameters().items()}
    buffers = {k: v.tobytes() for k, v in model.named_buffers().items()}
    state = {k: v.tobytes() for k, v in opt.state_arrays().items()}
    with pytest.raises(ValueError, match=re.escape(last[6:-4])):
        checkpoint.load(path, model, optimizer=opt)
    assert {k: v.tobytes() for k, v in model.named_parameters().items()} == before
    assert {k: v.tobytes() for k, v in model.named_buffers().items()} == buffers
    assert {k: v.tobytes() for k, v in opt.state_arrays().items()} == state
    assert opt.t == 11
    # the intact file loads into the same objects afterwards
    good = tmp_path / "good.npz"
    good.write_bytes(saved)
    checkpoint.load(good, model, optimizer=opt)
    assert opt.t == 0


def _entries(raw: bytes) -> list[str]:
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        return [i.filename for i in zf.infolist()]


def test_missing_file_and_directory_keep_the_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        checkpoint.load(tmp_path / "nope.npz", build("full"))
    with pytest.raises(IsADirectoryError):
        checkpoint.load(tmp_path, build("full"))


def test_load_without_optimizer_ignores_its_state(saved, tmp_path):
    path = tmp_path / "m.npz"
    path.write_bytes(saved)
    model = build("full", seed=1)
    want = {k: v.copy() for k, v in model.named_parameters().items()}
    for v in model.named_parameters().values():
        v *= 2.0
    checkpoint.load(path, model)
    for k, v in model.named_parameters().items():
        np.testing.assert_array_equal(v, want[k], strict=True)


def test_hand_edited_config_through_load_transformer(saved, tmp_path):
    path = tmp_path / "bad.npz"

    def edit(e, k):
        meta = json.loads(str(_read(e, k)))
        meta["config"]["no_such_option"] = 1
        return _npy(np.array(json.dumps(meta)))
    path.write_bytes(_rezip(saved, _set("meta.npy", edit)))
    with pytest.raises(ValueError, match=r"bad\.npz.*does not build a Transformer"):
        checkpoint.load_transformer(path)


def test_pickled_checkpoint_never_runs_through_load_transformer(saved, tmp_path):
    marker = tmp_path / MARKER
    path = tmp_path / "bad.npz"
    path.write_bytes(_rezip(saved, _set("param/", lambda e, k: _npy(
        np.array([_Evil(marker)], dtype=object), True))))
    with pytest.raises(ValueError):
        checkpoint.load_transformer(path)
    assert not marker.exists()


def test_save_interrupted_by_keyboard_interrupt_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.npz"
    model = build("full")
    checkpoint.save(path, model)
    before = path.read_bytes()

    def interrupted(f, **arrays):
        f.write(b"PK\x03\x04partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, build("full", seed=5))
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]


_KILLED_SAVE = """
import os, sys
import numpy as np
from tinyeff.nn import checkpoint
from tests.test_model_gradcheck import build
model = build("full", seed=5)
real = np.savez
def dying(f, **arrays):
    f.write(b"PK\\x03\\x04 half a checkpoint")
    f.flush()
    os._exit(3)                       # the process dies mid-write: no cleanup runs
np.savez = dying
checkpoint.save(sys.argv[1], model)
"""


def test_process_killed_mid_save_leaves_the_old_checkpoint(tmp_path):
    path = tmp_path / "m.npz"
    model = build("full")
    checkpoint.save(path, model)
    before = path.read_bytes()
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert path.read_bytes() == before               # the real name still holds the old file
    checkpoint.load(path, build("full"))             # and it still loads
    # the half-written temporary file is left under a hidden .tmp- name, never the real one
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "m.npz"]
    assert all(name.startswith(".tmp-") for name in leftovers), leftovers


def test_interrupted_golden_write_never_leaves_a_half_written_file(tmp_path, monkeypatch):
    """Each file is replaced atomically; a run interrupted between files leaves a set whose
    manifest no longer matches, which load_golden refuses (never silently wrong)."""
    golden.write_golden(tmp_path, ["full"])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    real = pathlib.Path.write_bytes
    calls = []

    def failing(self, data):
        calls.append(self)
        if len(calls) == 2:                          # the second file of the run
            real(self, data[:len(data) // 3])
            raise OSError("disk full")
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", failing)
    with pytest.raises(OSError, match="disk full"):
        golden.write_golden(tmp_path, ["full"], seed=1, overwrite=True)
    monkeypatch.undo()
    half = calls[1]
    assert half.name.endswith(".tmp")                # the partial bytes went to a temp name
    target = half.with_name(half.name.removesuffix(".tmp"))
    assert target.read_bytes() == before[target]     # the real file is the old, whole one
    try:
        golden.load_golden(tmp_path)
    except golden.GoldenError as e:                  # first file new, manifest old: refused
        assert "SHA-256" in str(e) or "manifest" in str(e), e


# ----------------------------------------------------------------------------------------
# Golden files: damage that tests/test_golden.py does not cover
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def golden_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    golden.write_golden(root, ["full"])
    return root


def _golden_manifest(root) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _golden_hand_edit(root, edit=None, raw=None):
    """Rewrite the first case file (``edit`` its entries, then ``raw`` its bytes) and re-hash
    it in the manifest, as a person editing the files would; returns the path."""
    manifest = _golden_manifest(root)
    path = root / manifest["cases"][0]["file"]
    data = path.read_bytes()
    if edit is not None:
        data = _rezip(data, edit)
    if raw is not None:
        data = raw(data)
    path.write_bytes(data)
    manifest["cases"][0]["sha256"] = hashlib.sha256(data).hexdigest()
    (root / "manifest.json").write_text(golden.manifest_text(manifest))
    return path


def _set_header(text):
    def edit(e):
        e["header.npy"] = _npy(np.array(text))
    return edit


def _edit_manifest(fn):
    def go(root):
        manifest = _golden_manifest(root)
        fn(manifest)
        (root / "manifest.json").write_text(json.dumps(manifest))
    return go


def _zip_flags(flag_offset_value):
    """Set a field of every zip header: (local-header offset, central-header offset, bytes)."""
    local_off, central_off, value = flag_offset_value

    def raw(data):
        out = bytearray(data)
        for sig, off in ((b"PK\x03\x04", local_off), (b"PK\x01\x02", central_off)):
            i = out.find(sig)
            while i >= 0:
                out[i + off:i + off + len(value)] = value
                i = out.find(sig, i + 4)
        return bytes(out)
    return raw


_GOLDEN_DAMAGE = {
    # a JSON bomb: json.loads raises RecursionError, not JSONDecodeError
    "header_nested_too_deep": (lambda r: _golden_hand_edit(
        r, _set_header("[" * 100_000 + "]" * 100_000)), "not valid JSON"),
    "manifest_nested_too_deep": (lambda r: (r / "manifest.json").write_text(
        "[" * 100_000 + "]" * 100_000), "not valid JSON"),
    # zipfile raises NotImplementedError / RuntimeError for these
    "unknown_compression_method": (lambda r: _golden_hand_edit(
        r, raw=_zip_flags((8, 10, b"\x63\x00"))), "corrupted"),
    "encrypted_entry": (lambda r: _golden_hand_edit(
        r, raw=_zip_flags((6, 8, b"\x01\x00"))), "corrupted"),
    "truncated_entry": (lambda r: _golden_hand_edit(r, lambda e: e.update(
        {"out.npy": e["out.npy"][:-8]})), "entry 'out' is not a complete plain array"),
    # hand-edited manifest fields of the wrong JSON type
    "manifest_args_a_list": (_edit_manifest(lambda m: m["cases"][0].update(args=[1])),
                             "'args' is not a dict"),
    "manifest_options_not_names": (_edit_manifest(lambda m: m["cases"][0].update(
        options=[1, "x"])), "options .* are not names"),
    "manifest_options_an_int": (_edit_manifest(lambda m: m["cases"][0].update(options=3)),
                                "'options' is not a list"),
}


@pytest.mark.parametrize("damage", list(_GOLDEN_DAMAGE))
def test_damaged_golden_directory_gives_a_golden_error(damage, golden_base, tmp_path):
    root = tmp_path / "g"
    shutil.copytree(golden_base, root)
    edit, what = _GOLDEN_DAMAGE[damage]
    edit(root)
    with pytest.raises(golden.GoldenError) as err:
        golden.load_golden(root)
    assert isinstance(err.value, ValueError)
    assert str(root) in str(err.value) and re.search(what, str(err.value)), err.value
