"""The golden file format: constants, the case object, and the bytes of a case file.

What :mod:`tinyeff.testing.golden` describes, both directions: a :class:`GoldenCase` to the
byte-stable ``.npz`` (:func:`case_entries`, :func:`case_bytes`; options to header JSON plus
``opt.*`` arrays) and the manifest text (:func:`manifest_text`); back from bytes to arrays
(:func:`read_npz`, plain ``.npy`` entries only) and from the header to options
(:func:`decode_option`).  Writing and reading whole directories, with their checks, is
:mod:`tinyeff.testing._golden_files`; computing the cases is :mod:`tinyeff.testing._golden_make`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import zipfile
import zlib
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .._version import __version__

__all__ = ["FORMAT", "VERSION", "MANIFEST", "DTYPES", "SUFFIX", "CTX_MIN_ENTRIES",
           "GoldenError", "GoldenCase", "dtype_names", "case_name", "decode_option",
           "case_entries", "case_bytes", "array_spec", "manifest_text", "read_npz"]

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


def _dtype_name(dtype) -> str:
    name = np.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name}")
    return name


def dtype_names(dtype) -> tuple[str, ...]:
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


def decode_option(spec, arrays: dict, where: str, used: set):
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
        return tuple(decode_option(x, arrays, where, used) for x in spec["tuple"])
    if "list" in spec and len(spec) == 1 and isinstance(spec["list"], list):
        return [decode_option(x, arrays, where, used) for x in spec["list"]]
    if "dict" in spec and len(spec) == 1 and isinstance(spec["dict"], dict):
        return {k: decode_option(x, arrays, where, used) for k, x in spec["dict"].items()}
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


def array_spec(a: np.ndarray) -> dict:
    return {"shape": list(a.shape), "dtype": a.dtype.name}


def manifest_text(manifest: dict) -> str:
    """JSON with sorted keys, one line per case (readable and byte-stable)."""
    def dump(x):
        return json.dumps(x, sort_keys=True, allow_nan=False)

    head = [f" {dump(k)}: {dump(v)}," for k, v in sorted(manifest.items()) if k != "cases"]
    cases = [f"  {dump(e)}," for e in manifest["cases"]]
    if cases:
        cases[-1] = cases[-1][:-1]
    return "\n".join(["{", *head, ' "cases": [', *cases, " ]", "}", ""])

# ----------------------------------------------------------------------------------------
# Reading the zip
# ----------------------------------------------------------------------------------------

def read_npz(path: Path, data: bytes) -> dict[str, np.ndarray]:
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
