"""Golden directories on disk: :func:`write_golden` (atomic files, then the manifest, an old
suite replaced as a whole) and :func:`load_golden` / :func:`read_case` (every file verified
against the manifest's SHA-256, its header and the shapes and dtypes it announces; anything
else raises :class:`~tinyeff.testing.golden.GoldenError` naming the file)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from .._version import __version__
from ._golden_format import (
    DTYPES,
    FORMAT,
    MANIFEST,
    VERSION,
    GoldenCase,
    GoldenError,
    array_spec,
    case_bytes,
    decode_option,
    dtype_names,
    manifest_text,
    read_npz,
)
from ._golden_make import make_cases, resolve_variants

__all__ = ["write_golden", "read_case", "Golden", "load_manifest", "load_golden"]


# ----------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------

def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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
    names = resolve_variants(variants)
    dtypes = dtype_names(dtype)
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
            "args": {k: array_spec(x) for k, x in case.args.items()},
            "options": sorted(case.options),
            "dout": array_spec(case.dout), "out": array_spec(case.out),
            "grads": {k: array_spec(x) for k, x in case.grads.items()},
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
    arrays = read_npz(path, data)
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
    options = {k: decode_option(spec, arrays, f"{path}: option {k!r}", referenced)
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
            _expect(path, want == array_spec(a),
                    f"{label} is {array_spec(a)}, the manifest says {want}")
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
            wanted = dtype_names(dtype)
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
