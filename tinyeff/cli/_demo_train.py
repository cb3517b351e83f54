"""One variant's run in ``python -m tinyeff demo``: its options, model, training and sweep.

What the demo knows about a variant comes from the variant's module (``demo_options``,
``demo_build``, ``KEY_PADDING``, ``SUPPORTS_CAUSAL``: the contract in
:mod:`tinyeff.attention`), so no name is special-cased here.  :func:`train_one` trains one
model on a task's data (:mod:`tinyeff.cli._demo_data`) and returns its record;
:func:`sweep_one` times one batch-1 step at another sequence length.  What they measure:

* **Validation**: a fixed set of held-out batches drawn once from the seed (the same for
  every variant), evaluated every ``eval_every`` steps; "val loss" is the mean
  cross-entropy in nats, bits/char = val loss / ln 2; "acc" is next-byte accuracy (char-LM),
  classification accuracy (ListOps, recall) or the fraction of queries answered (MQAR,
  whose loss and accuracy count the query positions only).
* **ms/step**: median wall time of a training step (forward, backward, clipping, AdamW
  update) over the timed steps.  Step 0 is the warm-up — it includes Numba compilation, or
  loading the compiled kernels from Numba's cache — and is reported apart ("warm-up s");
  step 1 runs under ``tracemalloc`` and is not timed either.  tokens/s = batch·seq_len /
  (ms/step).  Timings are wall-clock and depend on the machine's load.
* **peak MiB**: ``tracemalloc`` peak of one whole training step (step 1) above the memory
  held before it: every NumPy array the step allocates (activations, contexts, gradients,
  temporaries).  Parameters and optimizer state, allocated before, are not counted; nor is
  scratch memory that a Numba kernel allocates internally (tinyeff's kernels receive their
  outputs from NumPy, so that is small).  It repeats exactly for a given config for every
  variant but sparse, whose peak varies slightly from run to run.
* **Scaling sweep**: for each variant and each sequence length, a fresh model of the same
  size trains one sequence (batch 1) on random tokens: median time of a forward+backward
  step over ``repeat`` runs after one warm-up, and its tracemalloc peak.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
import tracemalloc

import numpy as np

from .. import tasks
from ..attention import VARIANTS
from ..nn import AdamW, Transformer, clip_grad_norm, cross_entropy, warmup_cosine
from ..nn import checkpoint as ckpt
from ..progress import Progress

#: Model options an --opt may set for any variant (not passed to the attention).
MODEL_OPTIONS = ("pad_to_multiple",)


def variant_options(name: str, n: int, overrides: dict | None = None, *,
                    causal: bool = True) -> tuple[dict, dict]:
    """``(attention options, model options)`` of variant ``name`` at sequence length n.

    The variant's ``demo_options(n, causal)``, updated with ``overrides`` (``--opt``), less
    the model options (:data:`MODEL_OPTIONS`), completed by the variant's ``demo_build``
    where it has one; an overridden model option wins over one ``demo_build`` sets.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; registered: {', '.join(VARIANTS)}")
    mod = VARIANTS[name]
    defaults = getattr(mod, "demo_options", None)
    opts = {**(defaults(n, causal) if defaults is not None else {}), **(overrides or {})}
    model = {k: opts.pop(k) for k in MODEL_OPTIONS if k in opts}
    build = getattr(mod, "demo_build", None)
    if build is None:
        return opts, model
    opts, built = build(n, opts)
    return opts, {**built, **model}


def printable(options: dict) -> dict:
    """``options`` with arrays and other objects replaced by a short description (JSON)."""
    out = {}
    for k, v in options.items():
        if isinstance(v, (bool, int, float, str)) or v is None:
            out[k] = v
        elif hasattr(v, "nnz"):
            out[k] = f"{type(v).__name__} {v.shape[0]}×{v.shape[1]}, nnz {v.nnz}"
        else:
            out[k] = type(v).__name__
    return out


def _evaluate(model, data) -> tuple[float, float]:
    """(mean cross-entropy in nats, accuracy) over the fixed validation batches."""
    model.eval()
    total = correct = count = 0.0
    try:
        for x, y, kp in data.valid:
            logits = model.logits(x, key_padding=kp if _wants_padding(model) else None)
            loss, _ = cross_entropy(logits, y)
            scored = y != tasks.IGNORE                   # MQAR: the query positions only
            n = int(scored.sum())
            total += loss * n
            correct += float(np.sum((np.argmax(logits, axis=-1) == y) & scored))
            count += n
    finally:
        model.train()
    return total / count, correct / count


def _wants_padding(model) -> bool:
    return model.task == "classify" and model.attention_layers()[0].mod.KEY_PADDING is not None


def build_model(name: str, data, cfg: dict, n: int, overrides: dict):
    causal = data.kind != "classify"
    opts, model_opts = variant_options(name, n, overrides, causal=causal)
    model = Transformer(data.vocab_size, cfg["d_model"], cfg["heads"], cfg["layers"],
                        max_len=n, attention=name, attention_options=opts,
                        positions=cfg.get("positions", "learned"),
                        task="lm" if causal else "classify",
                        n_classes=data.n_classes,
                        seed=cfg["seed"], dtype=np.float32, **model_opts)
    return model, opts, model_opts


def _jsonable(value):
    """``value`` as it reads back from JSON (tuples become lists, ...)."""
    return json.loads(json.dumps(value, sort_keys=True))


def train_one(name: str, data, cfg: dict, overrides: dict, *, progress: bool = True,
              stream=None, checkpoint: str | None = None, resume: bool = False) -> dict:
    """Train one variant; returns its record (options, curve, timings, memory).

    With ``checkpoint`` (a path), the model, the optimizer and the record so far are saved
    there after every evaluation; with ``resume`` as well, a run finds its checkpoint,
    checks that it was written with the same config and options, and continues from its
    step (the batches are replayed up to that step, so a resumed run sees the same data
    and, with the same library versions, repeats the uninterrupted run's losses).
    """
    n, steps = cfg["seq_len"], cfg["steps"]
    model, opts, model_opts = build_model(name, data, cfg, n, overrides)
    optim = AdamW(model, lr=cfg["lr"], weight_decay=0.01)
    warmup_steps = max(1, steps // 10)
    batches = data.batches(cfg["seed"])
    pad = _wants_padding(model)
    record = {"variant": name, "status": "ok", "params": int(model.num_parameters()),
              "options": printable(opts), "model_options": model_opts, "curve": []}
    run_id = _jsonable({"variant": name, "config": cfg, "options": record["options"],
                        "overrides": {k: repr(v) for k, v in overrides.items()}})
    step_times, train_time, train_losses, start = [], 0.0, [], 0
    if checkpoint and resume and os.path.exists(checkpoint):
        meta = ckpt.load(checkpoint, model, optimizer=optim, check_config=False)
        saved = meta["extra"]
        if saved.get("run") != run_id:
            raise SystemExit(f"{checkpoint} was written by another run (config or options "
                             "differ); delete it or choose another --out")
        record, step_times = saved["record"], saved["step_times"]
        train_time, train_losses, start = saved["train_time"], saved["train_losses"], meta["step"]
        for _ in range(start):                     # replay the data up to the saved step
            next(batches)

    def evaluate(step: int, train_time: float) -> None:
        loss, acc = _evaluate(model, data)
        record["curve"].append({"step": step, "train_time_s": train_time, "val_loss": loss,
                                "val_acc": acc})

    def save(step: int) -> None:
        if checkpoint:
            ckpt.save(checkpoint, model, optimizer=optim, step=step, config=False,
                      extra={"run": run_id, "record": record, "step_times": step_times,
                             "train_time": train_time, "train_losses": train_losses})

    if start == 0:
        evaluate(0, 0.0)
    bar = Progress(steps, name, enabled=progress, file=stream)
    bar.update(start)
    for step in range(start, steps):
        x, y, kp = next(batches)
        if step == 1:
            tracemalloc.start()
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        loss, grads = model.loss_and_grads(x, y, key_padding=kp if pad else None)
        clip_grad_norm(grads, 1.0)
        optim.step(warmup_cosine(step, base_lr=cfg["lr"], warmup_steps=warmup_steps,
                                 total_steps=steps))
        dt = time.perf_counter() - t0
        if step == 1:
            record["peak_bytes"] = int(tracemalloc.get_traced_memory()[1] - base)
            tracemalloc.stop()
        if step == 0:
            record["warmup_s"] = dt
        elif step > 1:
            step_times.append(dt)
        train_time += dt
        train_losses.append(float(loss))
        if not math.isfinite(loss):
            record["status"] = f"diverged at step {step} (loss {loss})"
            bar.close()
            break
        if (step + 1) % cfg["eval_every"] == 0 or step + 1 == steps:
            evaluate(step + 1, train_time)
            save(step + 1)
        bar.update(loss=f"{loss:.3f}", val=f"{record['curve'][-1]['val_loss']:.3f}",
                   acc=f"{100 * record['curve'][-1]['val_acc']:.1f}%",
                   ms=f"{1e3 * (statistics.median(step_times) if step_times else dt):.0f}")
    bar.close()
    if not step_times:                         # runs of 1–2 steps: report what there is
        step_times = [train_time / max(1, len(train_losses))]
    last = record["curve"][-1]
    ms = 1e3 * statistics.median(step_times)
    record.update({
        "steps": len(train_losses), "train_loss_first": train_losses[0],
        "train_loss_last": float(np.mean(train_losses[-max(1, steps // 10):])),
        "val_loss_first": record["curve"][0]["val_loss"], "val_loss": last["val_loss"],
        "val_acc": last["val_acc"], "ms_per_step": ms,
        "ms_per_step_min": 1e3 * min(step_times), "timed_steps": len(step_times),
        "tokens_per_s": data.batch * n / (ms / 1e3), "train_time_s": train_time,
    })
    if data.kind == "lm":
        record["bits_per_char"] = last["val_loss"] / math.log(2)
    return record


def sweep_one(name: str, data, cfg: dict, overrides: dict, n: int, repeat: int) -> dict:
    """Time and tracemalloc peak of a batch-1 forward+backward at length n (random tokens)."""
    model, opts, _ = build_model(name, data, cfg, n, overrides)
    rng = np.random.default_rng([cfg["seed"], 4, n])
    x = rng.integers(0, data.vocab_size, size=(1, n))                     # (1, n)
    if data.kind != "classify":
        y = rng.integers(0, data.vocab_size, size=(1, n))                 # (1, n)
    else:
        y = rng.integers(0, data.n_classes, size=(1,))                    # (1,)
    kp = np.ones((1, n), dtype=bool) if _wants_padding(model) else None
    model.loss_and_grads(x, y, key_padding=kp)                            # warm-up
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        model.loss_and_grads(x, y, key_padding=kp)
        times.append(time.perf_counter() - t0)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    model.loss_and_grads(x, y, key_padding=kp)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return {"variant": name, "n": n, "ms": 1e3 * statistics.median(times),
            "ms_min": 1e3 * min(times), "peak_bytes": int(peak), "options": printable(opts)}

