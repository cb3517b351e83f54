"""Golden vectors: round trip, byte stability (runs, thread counts), verification on load."""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from tinyeff.attention import VARIANTS
from tinyeff.cli import golden as golden_cli
from tinyeff.testing import golden
from tinyeff.testing.golden import GoldenError, load_golden, read_case, write_golden
from tinyeff.testing.suite import suite_cases

ROOT = Path(__file__).resolve().parents[1]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def golden_dir(tmp_path_factory):
    """The default suite (every variant, both dtypes), written once for this module."""
    root = tmp_path_factory.mktemp("golden")
    write_golden(root)
    return root


def _widen(x):
    return x.astype(np.float64) if isinstance(x, np.ndarray) and x.dtype == np.float32 else x


def _manifest(root) -> dict:
    return json.loads((Path(root) / "manifest.json").read_text())


def _rewrite_manifest(root, manifest) -> None:
    (Path(root) / "manifest.json").write_text(golden.manifest_text(manifest))


# ----------------------------------------------------------------------------------------
# Round trip
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip(variant, golden_dir):
    """Loaded cases equal freshly computed ones: inputs, options, dout, out and gradients;
    and the stored values are the float64 reference on the stored (widened) inputs,
    rounded once to the case's dtype."""
    loaded = {c.name: c for c in load_golden(golden_dir, variants=variant).cases}
    fresh = list(golden.make_cases(variant))
    assert [c.name for c in fresh] == list(loaded)
    mod = VARIANTS[variant]
    for want in fresh:
        got = loaded[want.name]
        assert got.variant == variant and got.dtype == want.dtype
        for name in want.args:
            np.testing.assert_array_equal(got.args[name], want.args[name], strict=True)
            np.testing.assert_array_equal(got.grads[name], want.grads[name], strict=True)
        np.testing.assert_array_equal(got.out, want.out, strict=True)
        np.testing.assert_array_equal(got.dout, want.dout, strict=True)
        assert set(got.options) == set(want.options)
        for key, value in want.options.items():
            _assert_option_equal(got.options[key], value)
        ref = {"impl": "ref"} if "ref" in getattr(mod, "IMPLS", ()) else {}
        args = {k: _widen(x) for k, x in got.args.items()}
        options = {k: _widen(x) for k, x in got.options.items()}
        out, ctx = mod.forward(**args, **options, **ref)
        np.testing.assert_array_equal(out.astype(got.dtype), got.out, strict=True)
        grads = mod.backward(_widen(got.dout), ctx)
        for name in got.grads:
            np.testing.assert_array_equal(grads[name].astype(got.dtype), got.grads[name],
                                          strict=True)


def _assert_option_equal(got, want):
    if sp.issparse(want):
        assert sp.issparse(got) and type(got) is type(want.tocsr())
        np.testing.assert_array_equal(got.toarray(), want.toarray(), strict=True)
    elif isinstance(want, np.ndarray):
        np.testing.assert_array_equal(got, want, strict=True)
    elif isinstance(want, (tuple, list)):
        assert type(got) is type(want) and len(got) == len(want)
        for g, w in zip(got, want):
            _assert_option_equal(g, w)
    elif isinstance(want, float) and np.isnan(want):
        assert np.isnan(got)
    else:
        assert got == want and type(got) is type(want), (got, want)


def _suite_names(variant, dtype):
    rng = np.random.default_rng(0)
    return [c.name for c in suite_cases(variant, rng, dtype)]


def test_every_variant_and_case_is_written(golden_dir):
    """The default directory holds, per variant and dtype, the example cases and then the
    conformance cases; float32 copies are named ``<case>_f32`` (no ``large_*`` ones)."""
    want = []
    for v in VARIANTS:
        for dtype, suffix in (("float64", ""), ("float32", "_f32")):
            names = [c.name for c in VARIANTS[v].example_cases(np.random.default_rng(0))]
            names += _suite_names(v, dtype)
            want += [(v, name + suffix, dtype) for name in names]
    got = [(e["variant"], e["case"], e["dtype"]) for e in _manifest(golden_dir)["cases"]]
    assert got == want
    assert all(not n.startswith("large_") for _, n, d in got if d == "float32")
    assert _manifest(golden_dir)["dtypes"] == ["float64", "float32"]


def test_default_suite_stays_modest(golden_dir):
    """SEMANTICS.md §3 quotes the default suite's size: at most ~50 MB."""
    entries = _manifest(golden_dir)["cases"]
    total = sum(e["bytes"] for e in entries)
    assert total < 40e6, total
    assert len(entries) == 209, len(entries)


def test_size_lengthens_the_long_cases_only():
    one = {c.name: c for c in golden.make_cases("window", "float64")}
    two = {c.name: c for c in golden.make_cases("window", "float64", size=2)}
    assert one.keys() == two.keys()
    for name in one:
        n1, n2 = one[name].args["q"].shape[-2], two[name].args["q"].shape[-2]
        assert n2 == (2 * n1 if name.startswith("long_") else n1), name
    with pytest.raises(ValueError, match="size"):
        list(golden.make_cases("window", size=0))


def test_examples_only_and_one_dtype(tmp_path):
    manifest = write_golden(tmp_path, ["local"], dtype="float32", examples_only=True)
    assert manifest["dtypes"] == ["float32"] and manifest["examples_only"] is True
    names = [c.name + "_f32" for c in VARIANTS["local"].example_cases(np.random.default_rng(0))]
    assert [e["case"] for e in manifest["cases"]] == names


def test_plain_numpy_load_reads_every_file(golden_dir):
    manifest = _manifest(golden_dir)
    assert manifest["format"] == "tinyeff-golden" and manifest["version"] == golden.VERSION
    assert manifest["variants"] == list(VARIANTS)
    for entry in manifest["cases"]:
        with np.load(golden_dir / entry["file"], allow_pickle=False) as npz:
            header = json.loads(str(npz["header"]))
            assert header["variant"] == entry["variant"] and header["case"] == entry["case"]
            for name, spec in entry["args"].items():
                assert list(npz[f"arg.{name}"].shape) == spec["shape"]
                assert npz[f"grad.{name}"].dtype.name == spec["dtype"]
            assert list(npz["out"].shape) == entry["out"]["shape"]
            assert npz["dout"].shape == npz["out"].shape


def test_float32_files_are_the_rounded_float64_values(tmp_path):
    write_golden(tmp_path, ["full"], dtype="float32")
    g = load_golden(tmp_path)
    assert g.dtypes == ["float32"]
    mod = VARIANTS["full"]
    for case in g.cases:
        for x in (*case.args.values(), *case.grads.values(), case.out, case.dout):
            assert x.dtype == np.float32
        args64 = {k: x.astype(np.float64) for k, x in case.args.items()}
        out, ctx = mod.forward(**args64, **case.options)
        np.testing.assert_array_equal(case.out, out.astype(np.float32))
        grads = mod.backward(case.dout.astype(np.float64), ctx)
        for name, dx in grads.items():
            np.testing.assert_array_equal(case.grads[name], dx.astype(np.float32))


@pytest.mark.parametrize("value", [
    None, True, 3, -2.5, float("inf"), float("-inf"), "top_left", (1, 2), [0.5, None],
    {"a": 1, "b": (True,)}, np.arange(6, dtype=np.int64).reshape(2, 3),
    np.array([[True, False]]), np.linspace(0, 1, 5, dtype=np.float32),
    sp.csr_array(np.tri(4, 5, dtype=bool)), sp.csr_matrix(np.eye(3, dtype=bool)),
    sp.coo_array(np.eye(3, dtype=bool)),
], ids=lambda v: type(v).__name__)
def test_option_encodings_round_trip(tmp_path, value):
    case = next(golden.make_cases("full"))
    case.options = {"opt": value}
    write_golden(tmp_path, ["full"], cases=[case])
    (loaded,) = load_golden(tmp_path).cases
    _assert_option_equal(loaded.options["opt"], value)


def test_object_options_are_refused(tmp_path):
    case = next(golden.make_cases("full"))
    case.options = {"opt": np.array([{"a": 1}], dtype=object)}
    with pytest.raises(TypeError, match="opt"):
        write_golden(tmp_path, ["full"], cases=[case])
    case.options = {"opt": object()}
    with pytest.raises(TypeError, match="opt"):
        write_golden(tmp_path, ["full"], cases=[case])


# ----------------------------------------------------------------------------------------
# Byte stability
# ----------------------------------------------------------------------------------------

def test_byte_identical_across_runs(tmp_path, golden_dir):
    write_golden(tmp_path)
    assert _files(tmp_path) == _files(golden_dir)


def test_manifest_hashes_match_files(golden_dir):
    for entry in _manifest(golden_dir)["cases"]:
        data = (golden_dir / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert len(data) == entry["bytes"]
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = [i.filename for i in zf.infolist()]
            assert names == sorted(names)
            assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in zf.infolist())


THREAD_VARIANTS = ["full", "window", "lsh", "performer"]


@pytest.mark.numba_threads
def test_byte_identical_with_one_and_two_threads(tmp_path, golden_dir):
    """Two fresh processes, 1 and 2 Numba (and BLAS) threads, write the same bytes (for a
    few variants, long cases included), and the same as this process."""
    procs = {}
    for threads in ("1", "2"):
        env = {**os.environ, "NUMBA_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
               "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        procs[threads] = subprocess.Popen(
            [sys.executable, "-m", "tinyeff", "golden", "--out", str(tmp_path / threads),
             "--quiet", "--variants", ",".join(THREAD_VARIANTS)],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for proc in procs.values():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    one, two = _files(tmp_path / "1"), _files(tmp_path / "2")
    assert one == two
    here = {k: v for k, v in _files(golden_dir).items() if k.split("/")[0] in THREAD_VARIANTS}
    assert {k: v for k, v in one.items() if k != "manifest.json"} == here


def test_seed_changes_the_inputs(tmp_path):
    write_golden(tmp_path / "a", ["full"], seed=0)
    write_golden(tmp_path / "b", ["full"], seed=1)
    a, b = load_golden(tmp_path / "a").cases[0], load_golden(tmp_path / "b").cases[0]
    assert not np.array_equal(a.args["q"], b.args["q"])


# ----------------------------------------------------------------------------------------
# Verification on load: truncated, corrupted, hand-edited, pickled files
# ----------------------------------------------------------------------------------------

@pytest.fixture
def small_dir(tmp_path):
    write_golden(tmp_path, ["full"], dtype="float64", examples_only=True)
    return tmp_path


def _first(root) -> tuple[dict, Path]:
    entry = _manifest(root)["cases"][0]
    return entry, Path(root) / entry["file"]


def test_flipped_byte_fails_the_hash(small_dir):
    _, path = _first(small_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(GoldenError, match="SHA-256"):
        load_golden(small_dir)


def test_truncated_file(small_dir):
    entry, path = _first(small_dir)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(GoldenError, match="SHA-256"):
        load_golden(small_dir)
    with pytest.raises(GoldenError, match="not a readable"):
        read_case(path)                                            # without the manifest


def test_missing_file_and_missing_manifest(small_dir):
    _, path = _first(small_dir)
    path.unlink()
    with pytest.raises(GoldenError, match="cannot read"):
        load_golden(small_dir)
    (small_dir / "manifest.json").unlink()
    with pytest.raises(GoldenError, match="manifest.json"):
        load_golden(small_dir)


def _hand_edit(root, edit):
    """Rewrite the first case file through ``edit(entries)`` and re-hash it in the manifest,
    as someone editing the files by hand would; returns the path."""
    entry, path = _first(root)
    with zipfile.ZipFile(path) as zf:
        entries = {i.filename: zf.read(i) for i in zf.infolist()}
    edit(entries)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, raw in entries.items():
            zf.writestr(name, raw)
    path.write_bytes(buf.getvalue())
    manifest = _manifest(root)
    manifest["cases"][0]["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    _rewrite_manifest(root, manifest)
    return path


def _npy(a, allow_pickle=False):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, allow_pickle=allow_pickle)
    return buf.getvalue()


def test_wrong_shape_is_refused(small_dir):
    def edit(entries):
        entries["out.npy"] = _npy(np.zeros((2, 2, 7, 4)))
    _hand_edit(small_dir, edit)
    with pytest.raises(GoldenError, match="out"):
        load_golden(small_dir)


def test_wrong_dtype_is_refused(small_dir):
    def edit(entries):
        q = np.lib.format.read_array(io.BytesIO(entries["arg.q.npy"]))
        entries["arg.q.npy"] = _npy(q.astype(np.float32))
    _hand_edit(small_dir, edit)
    with pytest.raises(GoldenError, match="arg.q"):
        load_golden(small_dir)


def test_missing_and_extra_entries_are_refused(small_dir):
    _hand_edit(small_dir, lambda entries: entries.pop("grad.k.npy"))
    with pytest.raises(GoldenError, match="missing entries"):
        load_golden(small_dir)


def test_extra_entry_is_refused(small_dir):
    def edit(entries):
        entries["opt.sneaky.npy"] = _npy(np.zeros(3))
    _hand_edit(small_dir, edit)
    with pytest.raises(GoldenError, match="unexpected entries"):
        load_golden(small_dir)


def test_pickled_content_is_refused_and_never_run(small_dir, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    def edit(entries):
        entries["out.npy"] = _npy(np.array([Evil()], dtype=object), allow_pickle=True)
    _hand_edit(small_dir, edit)
    with pytest.raises(GoldenError, match="pickle"):
        load_golden(small_dir)
    assert not marker.exists()


def test_other_format_version_is_refused(small_dir):
    def edit(entries):
        header = json.loads(str(np.lib.format.read_array(io.BytesIO(entries["header.npy"]))))
        header["version"] = golden.VERSION + 1
        entries["header.npy"] = _npy(np.array(json.dumps(header)))
    _hand_edit(small_dir, edit)
    with pytest.raises(GoldenError, match="version"):
        load_golden(small_dir)


def test_manifest_cannot_point_outside(small_dir):
    manifest = _manifest(small_dir)
    manifest["cases"][0]["file"] = "../elsewhere.npz"
    _rewrite_manifest(small_dir, manifest)
    with pytest.raises(GoldenError, match="outside"):
        load_golden(small_dir)


def test_manifest_shapes_are_checked(small_dir):
    manifest = _manifest(small_dir)
    manifest["cases"][0]["out"]["shape"][-1] += 1
    _rewrite_manifest(small_dir, manifest)
    with pytest.raises(GoldenError, match="manifest says"):
        load_golden(small_dir)


# ----------------------------------------------------------------------------------------
# The command line and SEMANTICS.md
# ----------------------------------------------------------------------------------------

def test_cli_writes_and_rejects_unknown_variants(tmp_path, capsys):
    assert golden_cli.main(["--out", str(tmp_path), "--variants", "full", "--seed", "3"]) == 0
    assert "wrote 25 cases (full 13 + 12; float64 + float32" in capsys.readouterr().out
    assert load_golden(tmp_path).manifest["seed"] == 3
    with pytest.raises(SystemExit):
        golden_cli.main(["--out", str(tmp_path / "x"), "--variants", "nope"])
    with pytest.raises(SystemExit):
        golden_cli.main(["--out", str(tmp_path / "x"), "--size", "0"])


def test_existing_suite_is_refused_or_replaced_whole(tmp_path, capsys):
    """`golden --out` into a directory holding a suite refuses without --force; with it the
    old suite goes entirely (also files its manifest does not list), other files stay."""
    root = tmp_path / "g"
    write_golden(root, ["full", "window"], dtype="float64", examples_only=True)
    (root / "full" / "stale.npz").write_bytes(b"old")              # unlisted leftover
    (root / "README.txt").write_text("mine")
    before = _files(root)
    assert golden_cli.main(["--out", str(root), "--variants", "local"]) == 2
    assert "--force" in capsys.readouterr().err
    assert _files(root) == before                                  # nothing touched
    with pytest.raises(FileExistsError, match="already holds a golden suite"):
        write_golden(root, ["local"])
    assert golden_cli.main(["--out", str(root), "--variants", "local", "--examples-only",
                            "--force", "--quiet"]) == 0
    listed = {e["file"] for e in _manifest(root)["cases"]}
    npz = {str(p.relative_to(root)) for p in root.rglob("*.npz")}
    assert npz == listed and all(f.startswith("local/") for f in listed)
    assert not (root / "full").exists() and not (root / "window").exists()
    assert (root / "README.txt").read_text() == "mine"
    assert len(load_golden(root).cases) == len(listed)


def test_a_directory_with_only_case_files_counts_as_a_suite(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "plain.npz").write_bytes(b"x")
    with pytest.raises(FileExistsError):
        write_golden(tmp_path, ["full"], examples_only=True)
    write_golden(tmp_path, ["full"], dtype="float64", examples_only=True, overwrite=True)
    assert load_golden(tmp_path).cases[0].name == "plain"


def test_semantics_index_lists_every_variant():
    text = (ROOT / "SEMANTICS.md").read_text()
    for name in VARIANTS:
        assert f"`{name}`" in text, f"SEMANTICS.md does not list the variant {name}"
    for link in re.findall(r"\]\(([^)#]+\.md)", text):
        assert (ROOT / link).is_file(), f"SEMANTICS.md links to missing {link}"


def test_crc_seeding_is_documented():
    """The seeds the docs promise are the seeds the code uses."""
    case = next(golden.make_cases("full", seed=5))
    rng = np.random.default_rng(zlib.crc32(b"full/5"))
    first = VARIANTS["full"].example_cases(rng, np.float64)[0]
    np.testing.assert_array_equal(case.args["q"], first.args["q"])
    drng = np.random.default_rng(zlib.crc32(f"full/{case.name}/5/dout".encode()))
    np.testing.assert_array_equal(case.dout, drng.standard_normal(case.out.shape))


# ----------------------------------------------------------------------------------------
# SEMANTICS.md §3.1: every pinned edge case names a case that exercises it (checked on
# the stored files, not taken from the names)
# ----------------------------------------------------------------------------------------

EXP_OVERFLOW = 709.79                                              # exp(x) = inf above (float64)


def _n_m(case):
    n = case.args["q"].shape[-2]
    return n, (case.args["k"].shape[-2] if "k" in case.args else n)


def _kpm(case):
    kpm = case.options.get("key_padding_mask")
    return None if kpm is None else np.asarray(kpm)


def _zero_rows(case) -> np.ndarray:
    """(..., N) rows whose output and query gradient are exactly 0."""
    return np.all(case.out == 0, axis=-1) & np.all(case.grads["q"] == 0, axis=-1)


def _empty_row(case) -> bool:
    rows = _zero_rows(case)
    if "lse" in case.ctx:                                          # out 0, dq 0, lse −inf
        rows = rows & np.isneginf(case.ctx["lse"])
    return bool(rows.any())


def _overflow(case) -> bool:
    """Some row's largest admissible logit exceeds exp's overflow: lse − log(#entries)."""
    if case.dtype != "float64" or "lse" not in case.ctx:
        return False
    lse = case.ctx["lse"]
    rounds = case.options["rotations"].shape[1] if "rotations" in case.options else 1
    entries = 4 * max(_n_m(case)[1], 1) * rounds                   # a generous bound
    return bool(np.any(lse[np.isfinite(lse)] - np.log(entries) > EXP_OVERFLOW))


def _large_exponents(case) -> bool:
    """FAVOR+: a query row whose every exponent ω·x̂ − ‖x̂‖²/2 is below −745 (each feature
    underflows to 0 unless stabilized)."""
    q = case.args["q"].astype(np.float64)
    scale = case.options.get("scale") or 1 / np.sqrt(q.shape[-1])
    xh = q * np.sqrt(scale)
    a = xh @ case.options["features"].astype(np.float64).T - 0.5 * (xh * xh).sum(-1)[..., None]
    return bool(np.any(a.max(-1) < -745))


def _self_only_row(case) -> bool:
    out, v = case.out, case.args["v"]
    same = np.all(np.abs(out - v) <= 1e-9 * np.abs(v) + 1e-300, axis=-1)
    return bool(np.any(same & np.any(v != 0, axis=-1)))


def _empty_span(case) -> bool:
    """A level-1 span (two aligned keys) with no real key, in some batch item."""
    kpm = _kpm(case)
    if kpm is None:
        return False
    n = kpm.shape[-1] // 2 * 2
    return bool(np.any(~kpm[..., 0:n:2] & ~kpm[..., 1:n:2]))


def _all_keys_padded(case) -> bool:
    kpm = _kpm(case)
    return kpm is not None and bool(np.any(~kpm.any(-1)))


def _option(case, spec: str) -> bool:
    name, sep, literal = spec.partition("=")
    if name not in case.options:
        return False
    value = case.options[name]
    if not sep:
        return value is not None and value is not False and not (
            isinstance(value, (list, tuple)) and not value)
    return bool(value == ast.literal_eval(literal) and type(value) is type(
        ast.literal_eval(literal)))


PROPERTIES = {
    "empty_row": _empty_row,
    "zero_out_row": lambda c: bool(_zero_rows(c).any()),
    "overflow": _overflow,
    "large_inputs": lambda c: bool(max(np.abs(c.args["q"]).max(), np.abs(c.args["k"]).max())
                                   > EXP_OVERFLOW),
    "large_exponents": _large_exponents,
    "long": lambda c: (min(_n_m(c)) > 128 and all(x % 64 for x in _n_m(c))
                       and c.args["q"].shape[-1] in (32, 64)),
    "b_ne_h": lambda c: c.args["q"].ndim == 4 and c.args["q"].shape[0] != c.args["q"].shape[1],
    "3d": lambda c: c.args["q"].ndim == 3,
    "float32": lambda c: c.dtype == "float32" and c.out.dtype == np.float32,
    "n_ne_m": lambda c: _n_m(c)[0] != _n_m(c)[1],
    "n_gt_m": lambda c: _n_m(c)[0] > _n_m(c)[1],
    "n0": lambda c: _n_m(c)[0] == 0,
    "m0": lambda c: _n_m(c)[1] == 0,
    "nnz0": lambda c: sp.issparse(c.options["mask"]) and c.options["mask"].nnz == 0,
    "per_head": lambda c: isinstance(c.options.get("mask"), (list, tuple)),
    "neg_inf_bias": lambda c: bool(np.any(np.all(np.isneginf(c.args["bias"]), axis=-1))),
    "exact_zeros": lambda c: bool(np.any(c.args["q"] == 0) and np.any(c.args["k"] == 0)),
    "zero_q_rows": lambda c: bool(np.any(np.all(c.args["q"] == 0, axis=-1))),
    "self_only_row": _self_only_row,
    "empty_span": _empty_span,
    "all_keys_padded": _all_keys_padded,
    "rounds_gt_1": lambda c: c.options["rotations"].shape[1] > 1,
    "chunks_gt_1": lambda c: _n_m(c)[0] // c.options["chunk_len"] > 1,
    "default_scale": lambda c: c.options.get("scale") is None,
    "rank_gt_m": lambda c: c.args["E"].shape[-2] > _n_m(c)[1],
    "odd_block": lambda c: c.options["block"] % 2 == 1,
    "block_ge_nm": lambda c: c.options["block"] >= max(_n_m(c)),
    "window_ge_nm": lambda c: c.options["window"] >= max(_n_m(c)),
}
PREFIXED = {
    "opt": _option,
    "arg": lambda c, name: name in c.args,
    "not_multiple": lambda c, opt: all(x % c.options[opt] for x in _n_m(c)),
}
#: what every variant's rows must show between them (issue: empty row wherever defined,
#: N > 128, B ≠ H, large logits; plus 3-D, float32 and N ≠ M where defined)
REQUIRED = [{"long"}, {"b_ne_h"}, {"3d"}, {"float32"}, {"empty_row", "zero_out_row"},
            {"overflow", "large_inputs", "large_exponents"}]
M_EQUALS_N = {"lsh", "hierarchical"}


def _coverage_table() -> list[tuple[str, str, str, list[str]]]:
    """(variant, edge case, case, properties) for every row of SEMANTICS.md §3.1."""
    text = (ROOT / "SEMANTICS.md").read_text()
    section = text.split("### 3.1 ", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        props = re.findall(r"`([^`]+)`", cells[3])
        rows.append((cells[0].strip("`"), cells[1], cells[2].strip("`"), props))
    return rows


def test_coverage_table_names_cases_that_exercise_each_edge_case(golden_dir):
    rows = _coverage_table()
    cases = {c.key: c for c in load_golden(golden_dir).cases}
    assert {v for v, *_ in rows} == set(VARIANTS)
    problems = []
    for variant, what, name, props in rows:
        case = cases.get(f"{variant}/{name}")
        if case is None:
            problems.append(f"{variant}/{name} ({what}): no such case in the default suite")
            continue
        assert props, f"{variant}/{name}: the row names no property to check"
        for prop in props:
            kind, colon, arg = prop.partition(":")
            if colon and kind in PREFIXED:
                ok = PREFIXED[kind](case, arg)
            elif prop in PROPERTIES:
                ok = PROPERTIES[prop](case)
            else:
                raise AssertionError(f"SEMANTICS.md §3.1 uses an unknown property {prop!r}")
            if not ok:
                problems.append(f"{variant}/{name} ({what}): {prop} does not hold")
    assert not problems, "\n".join(problems)
    for variant in VARIANTS:
        shown = {p for v, _, _, props in rows if v == variant for p in props}
        required = REQUIRED + ([] if variant in M_EQUALS_N else [{"n_ne_m"}])
        missing = [sorted(r) for r in required if not r & shown]
        assert not missing, f"{variant}: no row of SEMANTICS.md §3.1 shows {missing}"
