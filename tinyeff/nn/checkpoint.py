"""Checkpoints: a model's parameters and buffers (and optionally the optimizer) in one .npz.

File layout (every entry a plain array, so it loads with ``allow_pickle=False``):

    format                 "tinyeff-checkpoint" (unicode scalar)
    version                1
    meta                   JSON: {"config": <Transformer config or null>, "step": ..., ...}
    param/<name>           each distinct parameter, named as in ``model.named_parameters()``
    buffer/<name>          non-trainable state (Performer features, LSH rotations)
    optim/m/<name>, optim/v/<name>, optim/t     AdamW state, when an optimizer is given

Writes are atomic: the file is written to a temporary file in the same directory, flushed
to disk, given the mode a new file gets under the process's umask (0644 under umask 022,
as ``np.savez`` would create it), and renamed over the target (``os.replace``), so a crash
never leaves a truncated checkpoint under the real name.  A missing directory, or a path
that is a directory, raises ``FileNotFoundError`` / ``IsADirectoryError`` naming the path
given (never the temporary file).

Loading (``allow_pickle=False``, nothing in a file is ever executed) checks the whole file
against the model and the optimizer before copying anything: a truncated or corrupted
archive, a missing or malformed header entry (format, version, meta JSON), an entry that is
not a plain array (a pickle), a parameter/buffer/optimizer array missing from either side,
a shape or dtype mismatch (nothing is cast), or a config mismatch raises a ``ValueError``
naming the file, the entry (or config key) and both values; the model and the optimizer are
left untouched.  A file that is not a .npz archive at all (a text file, a pickle) raises a
``ValueError`` saying so; a file that cannot be opened at all raises the operating
system's error (``FileNotFoundError`` ...) unchanged.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
import zipfile
import zlib

import numpy as np

from .base import Layer

FORMAT = "tinyeff-checkpoint"
VERSION = 1
_HEADER = ("format", "version", "meta")
_SECTIONS = ("param/", "buffer/", "optim/")


def save(path, model: Layer, *, optimizer=None, step: int | None = None,
         extra: dict | None = None, config: bool = True) -> None:
    """Write ``model`` (and ``optimizer``) to ``path`` atomically.

    ``step`` (an int or None) and ``extra`` (a JSON-serialisable dict) are stored in the
    meta entry that :func:`load` returns.  ``config=False`` stores no model config (null):
    for a model whose options are arrays (a BigBird mask), which JSON cannot hold; such a
    checkpoint loads into a model built by the caller, and :func:`load_transformer` refuses
    it.
    """
    path = os.fspath(path)
    config = model.config if config and hasattr(model, "config") else None
    if config is not None and hasattr(model, "config_json"):
        model.config_json()                                        # raises if not storable
    meta = {"config": config, "step": step, "extra": extra or {}}
    arrays = {"format": np.array(FORMAT), "version": np.array(VERSION),
              "meta": np.array(json.dumps(meta, sort_keys=True))}
    arrays.update({f"param/{k}": v for k, v in model.named_parameters().items()})
    arrays.update({f"buffer/{k}": v for k, v in model.named_buffers().items()})
    if optimizer is not None:
        arrays.update({f"optim/{k}": v for k, v in optimizer.state_arrays().items()})
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "cannot save a checkpoint: the path is a "
                                "directory (give a file name such as model.npz)", path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(errno.ENOENT, f"cannot save a checkpoint: the directory "
                                f"{directory!r} does not exist", path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=directory)
    except OSError as e:                       # e.g. no write permission: name the target
        raise type(e)(e.errno, f"cannot save a checkpoint in {directory!r}: {e.strerror}",
                      path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())       # as open() would create it (mkstemp: 0600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    """The process's file-creation mask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read(path) -> tuple[dict, dict[str, np.ndarray]]:
    """``(meta, arrays)`` of a checkpoint file, loaded with ``allow_pickle=False``.

    Checks the archive and its header entries (format, version, meta) but not the arrays
    against a model (that is :func:`load`'s job).  A file that cannot be opened raises the
    operating system's error (``FileNotFoundError``, ``PermissionError``, ...); a file that
    opens but is not a readable checkpoint raises ``ValueError`` naming the path and what
    is wrong.
    """
    arrays = _read_arrays(path)
    fmt = arrays.get("format")
    if fmt is None or fmt.dtype.kind != "U" or fmt.ndim != 0 or str(fmt) != FORMAT:
        raise ValueError(f"{path} is not a tinyeff checkpoint (no format={FORMAT!r} entry)")
    version = arrays.get("version")
    if version is None:
        raise ValueError(f"{path}: the checkpoint has no 'version' entry")
    if version.dtype.kind not in "iu" or version.ndim != 0:
        raise ValueError(f"{path}: the 'version' entry should be an integer scalar, got "
                         f"shape {version.shape} dtype {version.dtype}")
    if int(version) != VERSION:
        raise ValueError(f"{path}: checkpoint version {int(version)}, this tinyeff reads "
                         f"version {VERSION}")
    unknown = sorted(k for k in arrays
                     if k not in _HEADER and not k.startswith(_SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unexpected entries {unknown[:5]} (a version-{VERSION} "
                         f"checkpoint holds {', '.join(_HEADER)} and "
                         f"{', '.join(s + '<name>' for s in _SECTIONS)})")
    return _read_meta(arrays, path), arrays


def _read_arrays(path) -> dict[str, np.ndarray]:
    """Every entry of the .npz at ``path`` (``allow_pickle=False``), or a ``ValueError``."""
    with open(os.fspath(path), "rb") as f:             # OS errors (missing file) propagate
        head = f.read(4)
        f.seek(0)
        if not head:
            raise ValueError(f"{path} is empty: truncated or corrupted, not a readable .npz "
                             "archive")
        if head != b"PK\x03\x04" and head != b"\x93NUM":
            raise ValueError(f"{path} is not a .npz checkpoint archive (a tinyeff checkpoint "
                             f"is a zip file; this file starts with {head!r})")
        try:
            z = np.load(f, allow_pickle=False)
        except ValueError:                             # NumPy's refusal of a pickle
            raise ValueError(f"{path} is not a .npz checkpoint archive") from None
        except (EOFError, OSError, zipfile.BadZipFile, zlib.error) as e:
            raise ValueError(f"{path} is truncated or corrupted: not a readable .npz "
                             f"archive ({type(e).__name__}: {e})") from None
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError(f"{path} holds a single .npy array, not a .npz checkpoint archive")
        arrays = {}
        with z:
            for name in z.files:
                try:
                    a = z[name]
                except ValueError as e:
                    raise ValueError(f"{path}: entry {name!r} is not a plain array ({e}); "
                                     "pickled or object content is refused") from None
                except (EOFError, OSError, KeyError, RuntimeError, NotImplementedError,
                        zipfile.BadZipFile, zlib.error) as e:
                    raise ValueError(f"{path}: entry {name!r} is truncated or corrupted "
                                     f"({type(e).__name__}: {e})") from None
                if not isinstance(a, np.ndarray) or a.dtype.hasobject:
                    raise ValueError(f"{path}: entry {name!r} holds objects; refused")
                arrays[name] = a
    return arrays


def _read_meta(arrays: dict, path) -> dict:
    meta = arrays.get("meta")
    if meta is None:
        raise ValueError(f"{path}: the checkpoint has no 'meta' entry")
    if meta.dtype.kind != "U" or meta.ndim != 0:
        raise ValueError(f"{path}: the 'meta' entry should be a JSON text scalar, got shape "
                         f"{meta.shape} dtype {meta.dtype}")
    try:
        meta = json.loads(str(meta))
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: the 'meta' entry is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: the 'meta' entry should be a JSON object, got "
                         f"{type(meta).__name__}")
    for key, kinds, what in (("config", (dict, type(None)), "an object or null"),
                             ("step", (int, type(None)), "an integer or null"),
                             ("extra", (dict,), "an object")):
        if key not in meta:
            raise ValueError(f"{path}: the 'meta' entry has no {key!r} key")
        if not isinstance(meta[key], kinds) or isinstance(meta[key], bool):
            raise ValueError(f"{path}: meta {key!r} should be {what}, got {meta[key]!r}")
    return meta


def _check(kind: str, file_arrays: dict, model_arrays: dict, path,
           holder: str = "model") -> None:
    """Names, shapes and dtypes of ``file_arrays`` equal those of ``model_arrays``."""
    missing = sorted(set(model_arrays) - set(file_arrays))
    if missing:
        raise ValueError(f"{path}: the checkpoint has no {kind} {missing[0]!r} that this "
                         f"{holder} has (missing: {missing[:5]}); it was saved from another "
                         "config")
    unexpected = sorted(set(file_arrays) - set(model_arrays))
    if unexpected:
        raise ValueError(f"{path}: the checkpoint has {kind} {unexpected[0]!r} that this "
                         f"{holder} lacks (unexpected: {unexpected[:5]}); it was saved from "
                         "another config")
    for name, target in model_arrays.items():
        src = file_arrays[name]
        if src.shape != target.shape:
            raise ValueError(f"{path}: {kind} {name!r} has shape {src.shape} in the checkpoint "
                             f"but {target.shape} in the {holder}")
        if src.dtype != target.dtype:
            raise ValueError(f"{path}: {kind} {name!r} has dtype {src.dtype} in the checkpoint "
                             f"but {target.dtype} in the {holder} (no silent casting)")


def load(path, model: Layer, *, optimizer=None, check_config: bool = True) -> dict:
    """Load ``path`` into ``model`` (and ``optimizer``) in place; returns the meta dict.

    Everything is validated before anything is copied: the archive, its header, every
    parameter and buffer, and (with ``optimizer``) every optimizer state array against
    ``optimizer.state_arrays()`` -- names, shapes and dtypes, nothing cast.  A failed load
    raises ``ValueError`` naming the path and leaves the model and the optimizer untouched.
    With ``check_config`` the stored config must equal ``model.config`` key by key (the
    error names the differing keys).
    """
    meta, arrays = read(path)
    config = getattr(model, "config", None)
    stored = meta.get("config")
    if check_config and config is not None and stored is not None:
        # compare through JSON so tuples/lists and numpy scalars compare as stored
        mine = json.loads(json.dumps(config, sort_keys=True))
        diff = sorted(k for k in set(mine) | set(stored) if mine.get(k) != stored.get(k))
        if diff:
            detail = ", ".join(f"{k}: checkpoint {stored.get(k)!r} vs model {mine.get(k)!r}"
                               for k in diff)
            raise ValueError(f"{path}: config mismatch ({detail})")
    params = {k[6:]: v for k, v in arrays.items() if k.startswith("param/")}
    buffers = {k[7:]: v for k, v in arrays.items() if k.startswith("buffer/")}
    model_params, model_buffers = model.named_parameters(), model.named_buffers()
    _check("parameter", params, model_params, path)
    _check("buffer", buffers, model_buffers, path)
    if optimizer is not None:
        state = {k[6:]: v for k, v in arrays.items() if k.startswith("optim/")}
        if not state:
            raise ValueError(f"{path}: the checkpoint holds no optimizer state (it was saved "
                             "without optimizer=); load it without an optimizer")
        _check("optimizer state", state, optimizer.state_arrays(), path, "optimizer")
        t = state.get("t")
        if t is not None and t.ndim == 0 and int(t) < 0:
            raise ValueError(f"{path}: optimizer state 't' (the step count) is {int(t)} < 0")
    # nothing is written before this line
    for source, target in ((params, model_params), (buffers, model_buffers)):
        for name, array in target.items():
            array[...] = source[name]
    if optimizer is not None:
        optimizer.load_state_arrays(state)
    return meta


def load_transformer(path):
    """Build the :class:`~tinyeff.nn.Transformer` stored in ``path`` and load its weights."""
    from .transformer import Transformer

    meta, _ = read(path)
    if meta.get("config") is None:
        raise ValueError(f"{path} stores no model config; build the model and call load()")
    try:
        model = Transformer.from_config(meta["config"])
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: the stored config does not build a Transformer "
                         f"({type(e).__name__}: {e})") from None
    load(path, model)
    return model
