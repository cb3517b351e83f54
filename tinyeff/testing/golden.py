"""Golden test vectors: every variant's cases, frozen into files another backend reads.

Layout of a golden directory (format ``tinyeff-golden``, version :data:`VERSION`)::

    DIR/manifest.json             what is there, with the SHA-256 of every case file
    DIR/<variant>/<case>.npz      one file per (variant, case, dtype); float32 copies are
                                  named ``<case>_f32``

The cases of a variant are its ``example_cases`` followed by its conformance cases
(:mod:`tinyeff.testing.suite`), by default in float64 and float32 (:func:`make_cases`).

Each ``.npz`` is an ordinary NumPy zip archive that ``numpy.load(path, allow_pickle=False)``
opens.  Its entries (all plain numeric, boolean or unicode arrays; never objects):

    header            0-d unicode array: JSON text (format, version, variant, case, dtype,
                      names of args / grads / options, how each option is stored)
    arg.<name>        each differentiable input (q, k, v, bias, rel_bias, E, ...)
    opt.<name>        each array option (bool masks, random features, rotations, ...);
                      a scipy.sparse option is stored as CSR: opt.<name>.indptr,
                      opt.<name>.indices, opt.<name>.data (its shape is in the header)
    dout              the fixed upstream gradient (standard normal, seeded)
    out               forward(**args, **options)[0]
    grad.<name>       backward(dout, ctx)[name] for every differentiable input
    ctx.<field>       informational: the saved-context arrays of the reference forward that
                      are not inputs or the output (log-sum-exp, probabilities, bucket ids,
                      ...) and have at most as many entries as the case's largest input or
                      output (or :data:`CTX_MIN_ENTRIES`); never compared by the harness

Scalar options (flags, sizes, floats, strings, None) live in the header JSON; a
non-finite float is written as ``{"float": "inf"}``, a tuple as ``{"tuple": [...]}``.

How the numbers are made
------------------------
* Inputs come from ``example_cases(rng, dtype)`` of the variant, with
  ``rng = default_rng(crc32("<variant>/<seed>"))``, then from
  ``suite.suite_cases(variant, rng, dtype, size)`` with
  ``rng = default_rng(crc32("<variant>/suite/<seed>"))``; the upstream gradient of each
  case from ``default_rng(crc32("<variant>/<case>/<seed>/dout"))`` (``<case>`` without
  the ``_f32`` suffix).
* Output and gradients are always computed by the float64 reference path (``impl="ref"``
  where the variant has one).  For ``dtype=float32`` the stored float32 inputs are widened
  exactly to float64, the float64 results are rounded to float32 once at the end: the
  golden values are the correctly computed function of the stored float32 inputs.
  ``impl`` is not stored among the options (it does not change the definition).

Stability: the files are byte-identical from run to run and across thread counts.  The zip
is written by hand (entries sorted, stored uncompressed, a fixed 1980-01-01 time stamp),
arrays are little-endian and C-ordered, JSON has sorted keys.  (``np.savez`` is not used: it
stamps every entry with the current time.)  Across machines the bits are as stable as the
BLAS that NumPy calls: the same library on the same instruction set gives the same bits.

Reading (:func:`load_golden`, :func:`read_case`) checks the SHA-256 from the manifest, the
format and version, that every entry is a plain ``.npy`` array (``allow_pickle=False``), and
that every shape and dtype is what the header and the manifest say; anything else raises
:class:`GoldenError` naming the file and what is wrong.  Nothing in a file is executed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .._version import __version__

FORMAT = "tinyeff-golden"
VERSION = 2
MANIFEST = "manifest.json"
DTYPES = ("float64", "float32")
SUFFIX = {"float32": "f32"}
#: a ctx array is stored when it has at most as many entries as the largest input or output
#: of its case, or at most this many (so the (N, M) probabilities of long cases are not)
CTX_MIN_ENTRIES = 4096
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


class GoldenError(ValueError):
    """A golden file or directory is missing, corrupted, edited by hand or of another format."""


@dataclasses.dataclass
class GoldenCase:
    """One case: call ``forward(**args, **options)``, then ``backward(dout, ctx)``.

    ``out`` and ``grads`` are what tinyeff's float64 reference gives (rounded to ``dtype``).
    ``ctx`` holds informational arrays of the reference's saved context (not compared).
    """

    variant: str
    name: str
    dtype: str
    args: dict[str, np.ndarray]
    options: dict
    dout: np.ndarray
    out: np.ndarray
    grads: dict[str, np.ndarray]
    ctx: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    path: str | None = None

    @property
    def key(self) -> str:
        return f"{self.variant}/{self.name}"

    def check(self, backend, **kwargs):
        """Run ``backend`` on this case (:func:`tinyeff.testing.check_case`, same keyword
        arguments) and return the report; raise ``AssertionError`` with the report's table
        when anything differs."""
        from .conformance import check_case

        report = check_case(self, backend, **kwargs)
        if not report.ok:
            raise AssertionError(f"{self.key} ({self.dtype}) differs:\n{report.table()}")
        return report


# ----------------------------------------------------------------------------------------
# Computing the cases
# ----------------------------------------------------------------------------------------

def _seed(*parts) -> int:
    return zlib.crc32("/".join(str(p) for p in parts).encode())


def _widen(x):
    """float32 ndarray -> float64 (exact); anything else unchanged."""
    if isinstance(x, np.ndarray) and x.dtype == np.float32:
        return x.astype(np.float64)
    return x


def _resolve_variants(variants) -> list[str]:
    from ..attention import VARIANTS

    if variants is None:
        return list(VARIANTS)
    if isinstance(variants, str):
        variants = [variants]
    names = [v for v in variants if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; registered: {sorted(VARIANTS)}")
    return names


def _dtype_name(dtype) -> str:
    name = np.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name}")
    return name


def _dtype_names(dtype) -> tuple[str, ...]:
    """None -> both dtypes; a dtype or a list of dtypes -> their names, validated."""
    if dtype is None:
        return DTYPES
    if isinstance(dtype, (list, tuple)):
        names = tuple(dict.fromkeys(_dtype_name(d) for d in dtype))
        if not names:
            raise ValueError(f"dtype: an empty list; choose from {DTYPES}")
        return names
    return (_dtype_name(dtype),)


def case_name(name: str, dtype: str) -> str:
    """File and report name of a case: the float32 copy of ``plain`` is ``plain_f32``."""
    return name if dtype == "float64" else f"{name}_{SUFFIX[dtype]}"


def make_cases(variants=None, dtype=None, seed: int = 0, size: int = 1,
               examples_only: bool = False) -> Iterator[GoldenCase]:
    """Compute the golden cases in memory (exactly what :func:`write_golden` stores).

    For each variant and each dtype (``None``: float64, then float32): the variant's
    ``example_cases``, then its conformance cases (:mod:`tinyeff.testing.suite`, whose
    sequence lengths grow with ``size``) unless ``examples_only``.
    """
    from ..attention import VARIANTS
    from .suite import suite_cases

    dtypes = _dtype_names(dtype)
    for variant in _resolve_variants(variants):
        mod = VARIANTS[variant]
        for dt in dtypes:
            rng = np.random.default_rng(_seed(variant, seed))
            for case in mod.example_cases(rng, np.dtype(dt)):
                yield _compute_case(mod, variant, case, dt, seed)
            if examples_only:
                continue
            rng = np.random.default_rng(_seed(variant, "suite", seed))
            for case in suite_cases(variant, rng, np.dtype(dt), size):
                yield _compute_case(mod, variant, case, dt, seed)


def _compute_case(mod, variant: str, case, dtype: str, seed: int) -> GoldenCase:
    options = {k: v for k, v in case.options.items() if k != "impl"}
    call_opts = {k: _widen(v) for k, v in options.items()}
    if "ref" in getattr(mod, "IMPLS", ()):
        call_opts["impl"] = "ref"
    args64 = {k: _widen(x) for k, x in case.args.items()}
    out64, ctx = mod.forward(**args64, **call_opts)
    drng = np.random.default_rng(_seed(variant, case.name, seed, "dout"))
    dout = drng.standard_normal(out64.shape).astype(dtype)        # (..., N, Dv)
    grads64 = mod.backward(_widen(dout), ctx)
    if set(grads64) != set(case.args):
        raise RuntimeError(f"{variant}/{case.name}: backward returned {sorted(grads64)} for "
                           f"arguments {sorted(case.args)}")
    inputs = [np.asarray(x) for x in (*args64.values(), *case.args.values())]
    inputs += [x for x in call_opts.values() if isinstance(x, np.ndarray)]
    inputs.append(out64)
    largest = max([CTX_MIN_ENTRIES, *(x.size for x in inputs)])
    ctx_arrays = {}
    for name, a in ctx.arrays().items():
        if any(a is x or np.may_share_memory(a, x) for x in inputs):
            continue                                               # an input or out, stored
        if a.size > largest:
            continue                                               # e.g. (N, M) probabilities
        ctx_arrays[name] = a.astype(dtype) if a.dtype == np.float64 else a
    return GoldenCase(
        variant=variant, name=case_name(case.name, dtype), dtype=dtype,
        args={k: np.asarray(x) for k, x in case.args.items()},
        options=options, dout=dout, out=out64.astype(dtype),
        grads={k: grads64[k].astype(dtype) for k in case.args}, ctx=ctx_arrays)


# ----------------------------------------------------------------------------------------
# Options <-> JSON + arrays
# ----------------------------------------------------------------------------------------

def _check_array(a: np.ndarray, where: str) -> np.ndarray:
    if a.dtype.hasobject or a.dtype.kind not in "biufcU":
        raise TypeError(f"{where}: arrays of dtype {a.dtype} cannot be stored in a golden file "
                        "(only bool, integer, float, complex and unicode arrays)")
    return a


def _encode(value, key: str, arrays: dict):
    """JSON-able description of one option value; its arrays go into ``arrays``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else {"float": repr(value)}
    if sp.issparse(value):
        csr = value.tocsr()
        for part in ("indptr", "indices", "data"):
            arrays[f"opt.{key}.{part}"] = _check_array(np.asarray(getattr(csr, part)), key)
        return {"csr": f"opt.{key}", "shape": [int(s) for s in csr.shape],
                "class": "csr_array" if isinstance(value, sp.sparray) else "csr_matrix"}
    if isinstance(value, np.ndarray):
        arrays[f"opt.{key}"] = _check_array(value, key)
        return {"array": f"opt.{key}"}
    if isinstance(value, (tuple, list)):
        items = [_encode(x, f"{key}.{i}", arrays) for i, x in enumerate(value)]
        return {"tuple": items} if isinstance(value, tuple) else {"list": items}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"option {key}: only dicts with string keys can be stored")
        return {"dict": {k: _encode(x, f"{key}.{k}", arrays) for k, x in value.items()}}
    raise TypeError(f"option {key} of type {type(value).__name__} cannot be stored in a golden "
                    "file (allowed: None, bool, int, float, str, ndarray, scipy.sparse, "
                    "tuple/list/dict of those)")


def _decode(spec, arrays: dict, where: str, used: set):
    if spec is None or isinstance(spec, (bool, int, float, str)):
        return spec
    if isinstance(spec, list):
        raise GoldenError(f"{where}: a bare JSON list is not a valid option encoding")
    if not isinstance(spec, dict) or len(spec) not in (1, 3):
        raise GoldenError(f"{where}: invalid option encoding {spec!r}")

    def need(name):
        if not isinstance(name, str) or name not in arrays:
            raise GoldenError(f"{where}: the header refers to entry {name!r}, which is missing")
        used.add(name)
        return arrays[name]

    if "float" in spec and len(spec) == 1:
        if spec["float"] not in ("inf", "-inf", "nan"):
            raise GoldenError(f"{where}: invalid float {spec['float']!r}")
        return float(spec["float"])
    if "array" in spec and len(spec) == 1:
        return need(spec["array"])
    if "tuple" in spec and len(spec) == 1 and isinstance(spec["tuple"], list):
        return tuple(_decode(x, arrays, where, used) for x in spec["tuple"])
    if "list" in spec and len(spec) == 1 and isinstance(spec["list"], list):
        return [_decode(x, arrays, where, used) for x in spec["list"]]
    if "dict" in spec and len(spec) == 1 and isinstance(spec["dict"], dict):
        return {k: _decode(x, arrays, where, used) for k, x in spec["dict"].items()}
    if set(spec) == {"csr", "shape", "class"}:
        base = spec["csr"]
        indptr, indices, data = (need(f"{base}.{p}") for p in ("indptr", "indices", "data"))
        shape = spec["shape"]
        if (not isinstance(shape, list) or len(shape) != 2
                or not all(isinstance(s, int) and s >= 0 for s in shape)):
            raise GoldenError(f"{where}: invalid sparse shape {shape!r}")
        if (indptr.ndim != 1 or indices.ndim != 1 or data.shape != indices.shape
                or indptr.shape[0] != shape[0] + 1 or indptr.dtype.kind not in "iu"
                or indices.dtype.kind not in "iu"):
            raise GoldenError(f"{where}: inconsistent CSR arrays: indptr {indptr.shape} "
                              f"{indptr.dtype}, indices {indices.shape} {indices.dtype}, data "
                              f"{data.shape} for shape {tuple(shape)}")
        if (indptr[0] != 0 or indptr[-1] != indices.shape[0] or np.any(np.diff(indptr) < 0)
                or np.any(indices < 0) or np.any(indices >= max(shape[1], 1))):
            raise GoldenError(f"{where}: CSR index arrays out of range")
        cls = {"csr_array": sp.csr_array, "csr_matrix": sp.csr_matrix}.get(spec["class"])
        if cls is None:
            raise GoldenError(f"{where}: unknown sparse class {spec['class']!r}")
        return cls((data, indices, indptr), shape=tuple(shape))
    raise GoldenError(f"{where}: invalid option encoding {spec!r}")


# ----------------------------------------------------------------------------------------
# The byte-stable zip
# ----------------------------------------------------------------------------------------

def _npy_bytes(a: np.ndarray) -> bytes:
    a = np.asarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    if not a.flags.c_contiguous:
        a = a.copy(order="C")                                      # (keeps 0-d arrays 0-d)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, version=(1, 0), allow_pickle=False)
    return buf.getvalue()


def _zip_bytes(entries: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_STORED
            info.create_system = 3                                 # fixed: "Unix"
            info.external_attr = 0o644 << 16
            zf.writestr(info, _npy_bytes(entries[name]))
    return buf.getvalue()


def case_entries(case: GoldenCase) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and the header of a case file (what :func:`write_case` stores)."""
    arrays: dict[str, np.ndarray] = {}
    options = {k: _encode(v, k, arrays) for k, v in case.options.items()}
    for name, x in case.args.items():
        arrays[f"arg.{name}"] = x
        arrays[f"grad.{name}"] = case.grads[name]
    for name, x in case.ctx.items():
        arrays[f"ctx.{name}"] = x
    arrays["dout"] = case.dout
    arrays["out"] = case.out
    header = {"format": FORMAT, "version": VERSION, "variant": case.variant, "case": case.name,
              "dtype": case.dtype, "computed_in": "float64", "tinyeff_version": __version__,
              "args": list(case.args), "options": options, "ctx": sorted(case.ctx)}
    return arrays, header


def case_bytes(case: GoldenCase) -> bytes:
    arrays, header = case_entries(case)
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False)
    arrays["header"] = np.array(text)
    return _zip_bytes(arrays)


def _spec(a: np.ndarray) -> dict:
    return {"shape": list(a.shape), "dtype": a.dtype.name}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def manifest_text(manifest: dict) -> str:
    """JSON with sorted keys, one line per case (readable and byte-stable)."""
    def dump(x):
        return json.dumps(x, sort_keys=True, allow_nan=False)

    head = [f" {dump(k)}: {dump(v)}," for k, v in sorted(manifest.items()) if k != "cases"]
    cases = [f"  {dump(e)}," for e in manifest["cases"]]
    if cases:
        cases[-1] = cases[-1][:-1]
    return "\n".join(["{", *head, ' "cases": [', *cases, " ]", "}", ""])


def _existing_suite(out_dir: Path) -> list[Path]:
    """The files of a golden suite already in ``out_dir``: its manifest and every
    ``<subdir>/*.npz`` (whether the manifest lists it or not)."""
    found = [out_dir / MANIFEST] if (out_dir / MANIFEST).exists() else []
    found += sorted(p for p in out_dir.glob("*/*.npz") if p.is_file())
    found += sorted(p for p in out_dir.glob("*/*.npz.tmp") if p.is_file())
    return found


def write_golden(out_dir, variants=None, dtype=None, seed: int = 0,
                 cases: Iterable[GoldenCase] | None = None, *, size: int = 1,
                 examples_only: bool = False, overwrite: bool = False) -> dict:
    """Write ``<out_dir>/<variant>/<case>.npz`` for every case, then the manifest.

    The cases are :func:`make_cases` ``(variants, dtype, seed, size, examples_only)``
    unless given.  A directory that already holds a suite (a ``manifest.json`` or
    ``<subdir>/*.npz`` files) is refused with :class:`FileExistsError` unless
    ``overwrite``, which replaces that whole suite: once the new files and manifest are
    written, every file of the old suite that the new manifest does not list is deleted,
    listed by the old manifest or not.  Returns the manifest (also written to
    ``manifest.json``).
    """
    out_dir = Path(out_dir)
    names = _resolve_variants(variants)
    dtypes = _dtype_names(dtype)
    old = _existing_suite(out_dir) if out_dir.is_dir() else []
    if old and not overwrite:
        shown = ", ".join(str(p.relative_to(out_dir)) for p in old[:3])
        raise FileExistsError(
            f"{out_dir} already holds a golden suite ({len(old)} files: {shown}"
            f"{', ...' if len(old) > 3 else ''}); pass --force (overwrite=True) to replace "
            "it as a whole, or choose another directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    if cases is None:
        cases = make_cases(names, dtypes, seed, size=size, examples_only=examples_only)
    entries = []
    seen: set[str] = set()
    for case in cases:
        if not case.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"{case.key}: case names must be file-name safe")
        rel = f"{case.variant}/{case.name}.npz"
        if rel in seen:
            raise ValueError(f"{case.key}: two cases with this name")
        seen.add(rel)
        data = case_bytes(case)
        (out_dir / case.variant).mkdir(exist_ok=True)
        _write_atomic(out_dir / rel, data)
        entries.append({
            "variant": case.variant, "case": case.name, "dtype": case.dtype, "file": rel,
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
            "args": {k: _spec(x) for k, x in case.args.items()},
            "options": sorted(case.options),
            "dout": _spec(case.dout), "out": _spec(case.out),
            "grads": {k: _spec(x) for k, x in case.grads.items()},
        })
    present = [d for d in DTYPES if any(e["dtype"] == d for e in entries)]
    manifest = {"format": FORMAT, "version": VERSION, "tinyeff_version": __version__,
                "dtypes": present or list(dtypes), "computed_in": "float64",
                "seed": int(seed), "size": int(size), "examples_only": bool(examples_only),
                "variants": names, "cases": entries}
    _write_atomic(out_dir / MANIFEST, manifest_text(manifest).encode())
    # the new suite is complete: delete what is left of the old one (an interrupted run
    # leaves the old manifest, whose SHA-256s the new files fail: refused on load)
    keep = {out_dir / MANIFEST, *(out_dir / e["file"] for e in entries)}
    for path in old:
        if path not in keep:
            path.unlink(missing_ok=True)
    for sub in sorted({p.parent for p in old if p.parent != out_dir}):
        if sub.is_dir() and not any(sub.iterdir()):
            sub.rmdir()
    return manifest


# ----------------------------------------------------------------------------------------
# Reading and verifying
# ----------------------------------------------------------------------------------------

def _read_npz(path: Path, data: bytes) -> dict[str, np.ndarray]:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise GoldenError(f"{path}: not a readable .npz (zip) file ({e})") from None
    arrays = {}
    with zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                raise GoldenError(f"{path}: unexpected entry {info.filename!r} "
                                  "(a golden file holds only .npy arrays)")
            name = info.filename[:-4]
            try:
                raw = zf.read(info)
                a = np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
            except ValueError as e:
                raise GoldenError(f"{path}: entry {name!r} is not a complete plain array "
                                  f"({e}); pickled or object content is refused") from None
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error, RuntimeError,
                    NotImplementedError) as e:
                # RuntimeError: an encrypted entry; NotImplementedError: an unknown
                # compression method (zipfile's own exceptions for those)
                raise GoldenError(f"{path}: entry {name!r} is corrupted "
                                  f"({type(e).__name__}: {e})") from None
            if a.dtype.hasobject:
                raise GoldenError(f"{path}: entry {name!r} holds objects; refused")
            arrays[name] = a
    return arrays


def _expect(path, cond: bool, what: str) -> None:
    if not cond:
        raise GoldenError(f"{path}: {what}")


def read_case(path, sha256: str | None = None, expect: dict | None = None) -> GoldenCase:
    """Load and verify one case file.

    ``sha256``: the expected digest (from the manifest).  ``expect``: the manifest's entry
    for this file; its shapes and dtypes are checked against the arrays.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GoldenError(f"{path}: cannot read ({e.strerror})") from None
    if sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        _expect(path, digest == sha256,
                f"SHA-256 {digest} differs from the manifest's {sha256}: the file was "
                "changed, truncated or replaced after it was written")
    arrays = _read_npz(path, data)
    _expect(path, "header" in arrays, "no header entry (not a tinyeff golden file)")
    htext = arrays.pop("header")
    _expect(path, htext.dtype.kind == "U" and htext.ndim == 0, "the header is not a text scalar")
    try:
        header = json.loads(str(htext))
    except (json.JSONDecodeError, RecursionError) as e:
        raise GoldenError(f"{path}: the header is not valid JSON ({e})") from None
    _expect(path, isinstance(header, dict), "the header is not a JSON object")
    _expect(path, header.get("format") == FORMAT,
            f"format {header.get('format')!r}, expected {FORMAT!r}")
    _expect(path, header.get("version") == VERSION,
            f"format version {header.get('version')!r}; this tinyeff reads version {VERSION} "
            "(regenerate the files with `python -m tinyeff golden`)")
    for key, kind in (("variant", str), ("case", str), ("dtype", str), ("args", list),
                      ("options", dict), ("ctx", list)):
        _expect(path, isinstance(header.get(key), kind), f"header field {key!r} missing or "
                f"not a {kind.__name__}")
    dtype = header["dtype"]
    _expect(path, dtype in DTYPES, f"dtype {dtype!r} is not one of {DTYPES}")
    names = header["args"]
    required = {"dout", "out", *(f"arg.{n}" for n in names), *(f"grad.{n}" for n in names),
                *(f"ctx.{n}" for n in header["ctx"])}
    missing = sorted(required - set(arrays))
    _expect(path, not missing, f"missing entries {missing}")
    referenced: set[str] = set()
    options = {k: _decode(spec, arrays, f"{path}: option {k!r}", referenced)
               for k, spec in header["options"].items()}
    extra = sorted(set(arrays) - required - referenced)
    _expect(path, not extra, f"unexpected entries {extra}")
    args = {n: arrays[f"arg.{n}"] for n in names}
    grads = {n: arrays[f"grad.{n}"] for n in names}
    for n in names:
        _expect(path, args[n].dtype.name == dtype, f"arg.{n} has dtype {args[n].dtype}, the "
                f"header says {dtype}")
        _expect(path, grads[n].shape == args[n].shape and grads[n].dtype == args[n].dtype,
                f"grad.{n} has shape {grads[n].shape} {grads[n].dtype}, its argument "
                f"{args[n].shape} {args[n].dtype}")
    out, dout = arrays["out"], arrays["dout"]
    _expect(path, out.dtype.name == dtype and dout.dtype.name == dtype,
            f"out/dout dtypes {out.dtype}/{dout.dtype}, the header says {dtype}")
    _expect(path, out.shape == dout.shape, f"out {out.shape} and dout {dout.shape} differ")
    if expect is not None:
        _expect(path, isinstance(expect, dict), f"the manifest entry {expect!r} is not an object")
        for key, kind in (("args", dict), ("grads", dict), ("options", list)):
            _expect(path, isinstance(expect.get(key, kind()), kind),
                    f"the manifest entry's {key!r} is not a {kind.__name__}")
        _expect(path, all(isinstance(o, str) for o in expect.get("options", [])),
                f"the manifest entry's options {expect.get('options')!r} are not names")
        for key in ("variant", "case"):
            _expect(path, expect.get(key) == header[key],
                    f"{key} {header[key]!r} but the manifest says {expect.get(key)!r}")
        checks = [("out", out), ("dout", dout)]
        checks += [(f"args.{n}", args[n]) for n in names]
        checks += [(f"grads.{n}", grads[n]) for n in names]
        for label, a in checks:
            group, _, name = label.partition(".")
            want = expect.get(group, {}).get(name) if name else expect.get(group)
            _expect(path, want == _spec(a), f"{label} is {_spec(a)}, the manifest says {want}")
        _expect(path, sorted(expect.get("args", {})) == sorted(names),
                f"arguments {sorted(names)}, the manifest says {sorted(expect.get('args', {}))}")
        _expect(path, sorted(expect.get("options", [])) == sorted(options),
                f"options {sorted(options)}, the manifest says {expect.get('options')}")
    ctx = {n: arrays[f"ctx.{n}"] for n in header["ctx"]}
    return GoldenCase(variant=header["variant"], name=header["case"], dtype=dtype, args=args,
                      options=options, dout=dout, out=out, grads=grads, ctx=ctx, path=str(path))


@dataclasses.dataclass
class Golden:
    """A verified golden directory: ``manifest`` and the list of ``cases`` (all loaded)."""

    root: str
    manifest: dict
    cases: list[GoldenCase]

    @property
    def dtypes(self) -> list[str]:
        return list(self.manifest["dtypes"])

    def select(self, variants=None, dtype=None) -> list[GoldenCase]:
        """The cases of ``variants`` (None: all) in ``dtype`` (None: every dtype)."""
        cases = list(self.cases)
        if variants is not None:
            if isinstance(variants, str):
                variants = [variants]
            present = {c.variant for c in cases}
            unknown = [v for v in variants if v not in present]
            if unknown:
                raise ValueError(f"variants {unknown} are not in {self.root}; it holds "
                                 f"{sorted(present)}")
            cases = [c for c in cases if c.variant in variants]
        if dtype is not None:
            wanted = _dtype_names(dtype)
            held = sorted({c.dtype for c in cases})
            cases = [c for c in cases if c.dtype in wanted]
            if not cases:
                raise ValueError(f"{self.root} holds no {'/'.join(wanted)} cases"
                                 f"{' of ' + ', '.join(variants) if variants else ''}; its "
                                 f"cases are {', '.join(held) or 'none'} (write them with "
                                 "`python -m tinyeff golden --dtype ...`)")
        return cases


def load_manifest(root) -> dict:
    path = Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except OSError as e:
        raise GoldenError(f"{path}: cannot read ({e.strerror}); is {root} a golden directory "
                          "written by `python -m tinyeff golden`?") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise GoldenError(f"{path}: not valid JSON ({e})") from None
    _expect(path, isinstance(manifest, dict) and manifest.get("format") == FORMAT,
            f"not a {FORMAT} manifest")
    _expect(path, manifest.get("version") == VERSION,
            f"format version {manifest.get('version')!r}; this tinyeff reads version {VERSION} "
            "(regenerate the files with `python -m tinyeff golden --out DIR --force`)")
    dtypes = manifest.get("dtypes")
    _expect(path, isinstance(dtypes, list) and all(d in DTYPES for d in dtypes),
            f"dtypes {dtypes!r} (expected a list of {DTYPES})")
    _expect(path, isinstance(manifest.get("cases"), list), "no list of cases")
    for entry in manifest["cases"]:
        _expect(path, isinstance(entry, dict) and isinstance(entry.get("file"), str)
                and isinstance(entry.get("sha256"), str) and entry.get("dtype") in dtypes,
                f"invalid case entry {entry!r}")
        rel = Path(entry["file"])
        _expect(path, not rel.is_absolute() and ".." not in rel.parts,
                f"case file {entry['file']!r} points outside the directory")
    return manifest


def load_golden(root, variants=None) -> Golden:
    """Load a golden directory, verifying every file against the manifest's SHA-256."""
    manifest = load_manifest(root)
    cases = []
    for entry in manifest["cases"]:
        if variants is not None and entry.get("variant") not in (
                [variants] if isinstance(variants, str) else variants):
            continue
        case = read_case(Path(root) / entry["file"], sha256=entry["sha256"], expect=entry)
        _expect(case.path, case.dtype == entry["dtype"],
                f"dtype {case.dtype}, the manifest says {entry['dtype']}")
        cases.append(case)
    return Golden(root=str(root), manifest=manifest, cases=cases)
