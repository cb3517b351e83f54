"""Checkpoints: a model's parameters and buffers (and optionally the optimizer) in one .npz.

File layout (every entry a plain array, so it loads with ``allow_pickle=False``):

    format                 "tinyeff-checkpoint" (unicode scalar)
    version                1
    meta                   JSON: {"config": <Transformer config or null>, "step": ..., ...}
    param/<name>           each distinct parameter, named as in ``model.named_parameters()``
    buffer/<name>          non-trainable state (Performer features, LSH rotations)
    optim/m/<name>, optim/v/<name>, optim/t     AdamW state, when an optimizer is given

Writes are atomic: the file is written to a temporary file in the same directory, flushed
to disk, and renamed over the target (``os.replace``), so a crash never leaves a truncated
checkpoint under the real name.

Loading checks the file against the model before copying anything: a parameter missing
from either side, a shape or dtype mismatch, or a config mismatch raises a ``ValueError``
naming the parameter (or config key) and both values.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from .layers import Layer

FORMAT = "tinyeff-checkpoint"
VERSION = 1


def save(path, model: Layer, *, optimizer=None, step: int | None = None,
         extra: dict | None = None) -> None:
    """Write ``model`` (and ``optimizer``) to ``path`` atomically."""
    path = os.fspath(path)
    config = model.config if hasattr(model, "config") else None
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
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read(path) -> tuple[dict, dict[str, np.ndarray]]:
    """``(meta, arrays)`` of a checkpoint file, loaded with ``allow_pickle=False``."""
    with np.load(os.fspath(path), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if str(arrays.get("format", "")) != FORMAT:
        raise ValueError(f"{path} is not a tinyeff checkpoint (no format={FORMAT!r} entry)")
    if int(arrays["version"]) != VERSION:
        raise ValueError(f"{path}: checkpoint version {int(arrays['version'])}, this tinyeff "
                         f"reads version {VERSION}")
    return json.loads(str(arrays["meta"])), arrays


def _check(kind: str, file_arrays: dict, model_arrays: dict, path) -> None:
    missing = sorted(set(model_arrays) - set(file_arrays))
    if missing:
        raise ValueError(f"{path}: the checkpoint has no {kind} {missing[0]!r} that this model "
                         f"has (missing: {missing[:5]}); it was saved from another config")
    unexpected = sorted(set(file_arrays) - set(model_arrays))
    if unexpected:
        raise ValueError(f"{path}: the checkpoint has {kind} {unexpected[0]!r} that this model "
                         f"lacks (unexpected: {unexpected[:5]}); it was saved from another "
                         "config")
    for name, target in model_arrays.items():
        src = file_arrays[name]
        if src.shape != target.shape:
            raise ValueError(f"{path}: {kind} {name!r} has shape {src.shape} in the checkpoint "
                             f"but {target.shape} in the model")
        if src.dtype != target.dtype:
            raise ValueError(f"{path}: {kind} {name!r} has dtype {src.dtype} in the checkpoint "
                             f"but {target.dtype} in the model (no silent casting)")


def load(path, model: Layer, *, optimizer=None, check_config: bool = True) -> dict:
    """Load ``path`` into ``model`` (and ``optimizer``) in place; returns the meta dict.

    Everything is validated before anything is copied.  With ``check_config`` the stored
    config must equal ``model.config`` key by key (the error names the differing keys).
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
    for source, target in ((params, model_params), (buffers, model_buffers)):
        for name, array in target.items():
            array[...] = source[name]
    if optimizer is not None:
        optimizer.load_state_arrays({k[6:]: v for k, v in arrays.items()
                                     if k.startswith("optim/")})
    return meta


def load_transformer(path):
    """Build the :class:`~tinyeff.nn.Transformer` stored in ``path`` and load its weights."""
    from .blocks import Transformer

    meta, _ = read(path)
    if meta.get("config") is None:
        raise ValueError(f"{path} stores no model config; build the model and call load()")
    model = Transformer.from_config(meta["config"])
    load(path, model)
    return model
