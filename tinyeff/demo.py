"""``python -m tinyeff demo``: train one small Transformer per attention variant on the same
task and data, on the CPU, and compare them in one table.

For every variant of ``tinyeff.attention.VARIANTS`` (or ``--variants``) the demo trains the
same model (``tinyeff.nn.Transformer``: learned positions, pre-LN blocks, float32, AdamW,
warm-up + cosine schedule, gradient clipping at 1.0) on the same batches, in the same order,
from the same seed, and reports:

  variant | parameters | final validation loss | bits/char (char-LM) | accuracy | ms per
  training step | tokens/s | peak MiB | warm-up s

* **Validation**: a fixed set of held-out batches drawn once from the seed (the same for
  every variant), evaluated every ``--eval-every`` steps; "val loss" is the mean
  cross-entropy in nats, bits/char = val loss / ln 2; "acc" is next-byte accuracy (char-LM)
  or classification accuracy (ListOps, recall).
* **ms/step**: median wall time of a training step (forward, backward, clipping, AdamW
  update) over the timed steps.  Step 0 is the warm-up — it includes Numba compilation, or
  loading the compiled kernels from Numba's cache — and is reported apart ("warm-up s");
  step 1 runs under ``tracemalloc`` and is not timed either.  tokens/s = batch·seq_len /
  (ms/step).  Timings are wall-clock and depend on the machine's load.
* **peak MiB**: ``tracemalloc`` peak of one whole training step (step 1) above the memory
  held before it: every NumPy array the step allocates (activations, contexts, gradients,
  temporaries).  Parameters and optimizer state, allocated before, are not counted; nor is
  scratch memory that a Numba kernel allocates internally (tinyeff's kernels receive their
  outputs from NumPy, so that is small).  The number is deterministic for a given config.
* **Scaling sweep** (after training; ``--sweep``): for each variant and each sequence
  length, a fresh model of the same size trains one sequence (batch 1) on random tokens:
  median time of a forward+backward step over ``--sweep-repeat`` runs after one warm-up,
  and its tracemalloc peak.  Skip it with ``--sweep ""``.

Tasks (``--task``), all with data present on any machine:

* ``charlm`` (default): byte-level language modelling on the Python standard library's
  source that the running interpreter ships (``tinyeff.tasks.stdlib_corpus``: 4 MB of
  ``.py`` files in sorted order, last 10 % for validation); random windows of seq_len + 1
  bytes.  Causal attention, so variants without causal support (Linformer) are listed as
  skipped.
* ``listops``: ListOps as in the Long Range Arena (``tinyeff.tasks.listops``), expressions of
  seq_len/4 … seq_len − 1 tokens, classify the value 0–9; bidirectional attention with key
  padding, mean pooling.  Default: N = 512 (LRA: 2,000), 9,600 training and 512 held-out
  expressions, sinusoidal positions, batch 32, 400 steps, lr 3e-3.
* ``recall``: single-query associative recall (``tinyeff.tasks.associative_recall``),
  classify the value paired with the query key from mean-pooled states (kept as the
  classification counterpart; ``mqar`` is the recall benchmark).
* ``mqar``: multi-query associative recall, the Zoology study's task (Arora et al. 2023;
  ``tinyeff.tasks.mqar``): ``--kv-pairs`` key-value pairs, then every key queried once at
  a random later position; a causal model predicts each value at its query position, and
  loss and accuracy count those positions only.  Training batches are drawn fresh from
  ``--seed``, the held-out set (``--n-valid`` sequences) from its own seed.  Default size:
  N = 256, 16 pairs, vocabulary 64, d_model 64, 2 layers, 4 heads, RoPE positions,
  batch 32, 1000 steps, lr 3e-3; ``--quick`` is the first look (N = 64, 4 pairs,
  vocabulary 64, 600 steps).
* ``file:PATH`` or ``--text-file PATH``: byte-level language modelling on your own text.

Long-range runs (each variant sees sequences of 256–4096 tokens; the sweep is optional)::

    python -m tinyeff demo --task mqar
    python -m tinyeff demo --task listops
    python -m tinyeff demo --task recall --seq-len 2048 --steps 300 \
        --variants window,lsh,performer,linformer
    python -m tinyeff demo --task listops --seq-len 4096 --batch 4 --sweep "" \
        --variants window,local,lsh,linear,performer,linformer,hierarchical

Each variant's own options come from :data:`DEFAULTS`: the sparse patterns give a query
about 64 keys from N = 256 on (window w = 64, local blocks of 64 with one block of
look-back, and one of look-ahead on the bidirectional tasks, BigBird 2·24 + 1 window + 8
global + 24 random keys, LSH chunks of 32 with look-back, 2 rounds; N/4 on shorter
sequences), Performer m = 64 features, Linformer rank k = 64, hierarchical blocks of 16.
Override any with ``--opt VARIANT.KEY=VALUE`` (repeatable; VALUE is a Python literal),
e.g. ``--opt window.window=32 --opt performer.m=128 --opt full.impl=ref``.  For ``sparse``
the keys are the BigBird parameters ``window``, ``n_global``, ``n_random`` and ``seed``
(the pattern is built with ``tinyeff.masks.bigbird`` at the run's sequence length);
``pad_to_multiple`` is a model option that any variant accepts.

Implementation choice (``impl``): measured at the default size (batch 8, N = 256,
d_model 64, 4 heads, 2 layers, float32, causal), CPU time of a training step with one
thread (NUMBA_NUM_THREADS=1, OPENBLAS_NUM_THREADS=1; the machine was shared, so read the
ratios, not the times), Numba kernels ("auto") vs the NumPy reference ("ref"): window 102
vs 327 ms, local 97 vs 107, sparse 120 vs 171, linear 108 vs 246, performer 163 vs 430,
lsh 377 vs 499; full "blocked" (the FlashAttention-style kernel, O(N) memory) 144 vs "ref"
175 ("auto" is "ref" below N·M = 1024²); hierarchical has one implementation (195).  So
the demo runs full with impl="blocked" and every other variant with its default "auto".
Reproduce a pair with e.g. ``python -m tinyeff demo --variants window --steps 30 --sweep ""
--opt window.impl=ref``.

Checkpoints and resuming: every variant's model, optimizer and curve so far are saved to
``OUT/checkpoints/VARIANT.npz`` after each evaluation.  ``--resume`` continues an
interrupted comparison from there: the batches are replayed up to the saved step, so the
losses are those of an uninterrupted run.  Progress bars show each variant's time left,
and a line after each variant estimates the time left for the whole comparison.

Outputs in ``--out`` (default ``tinyeff_demo/``): ``results.json`` (the command, the
machine, the config, every variant's options, curves, timings and the sweep),
``results.csv`` (the table), ``curves.csv`` (validation loss per evaluation, with step and
training wall time), ``sweep.csv``, and with matplotlib installed ``curves.png``
(validation loss against step and against training wall time) and ``scaling.png`` (step
time and peak memory against sequence length).

Reproducibility: the data, the batch order, the validation set, the initialisation and
every random option (Performer features, LSH rotations, BigBird random keys) come from
``--seed``; tinyeff's kernels are deterministic, so losses repeat exactly on the same
machine and library versions.  Times do not.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import time
import tracemalloc

import numpy as np

from . import tasks
from ._cli import int_list, machine_info, parse_variant_opts
from .progress import Progress

# ----------------------------------------------------------------------------- defaults


def _sparse_options(n: int, window: int = 24, n_global: int = 8, n_random: int = 24,
                    seed: int = 0) -> dict:
    from . import masks
    return {"mask": masks.bigbird(n, min(window, n), min(n_global, n), n_random,
                                  np.random.default_rng(seed))}


def _span(n: int, cap: int = 64) -> int:
    """The local span of the sparse patterns: N/4 rounded down to even, in [8, cap]."""
    return max(8, min(cap, n // 8 * 2))


#: Each variant's options at sequence length n (functions, since some depend on n).  The
#: sparse patterns give a query about 64 keys from N = 256 on (N/4 below that, so that
#: they stay sparser than ``full`` on short sequences); causal halves the symmetric ones.
#: (Bidirectional tasks also set local's look_forward = 1: see :func:`variant_options`.)
DEFAULTS = {
    "full":         lambda n: {"impl": "blocked"},
    "window":       lambda n: {"window": _span(n)},
    "local":        lambda n: {"block": _span(n), "look_backward": 1, "look_forward": 0},
    "sparse":       lambda n: {"window": _span(n, 24), "n_global": _span(n, 32) // 4,
                               "n_random": _span(n, 24), "seed": 0},
    "linear":       lambda n: {},
    "performer":    lambda n: {"m": 64},
    "lsh":          lambda n: {"chunk_len": _span(n, 32), "n_hashes": 2},
    "linformer":    lambda n: {"k": _span(n)},
    "hierarchical": lambda n: {"block": _span(n, 16)},
}

#: Options whose builders turn demo-level keys into variant options.
BUILDERS = {"sparse": _sparse_options}

#: Model options an --opt may set for any variant (not passed to the attention).
MODEL_OPTIONS = ("pad_to_multiple",)


def variant_options(name: str, n: int, overrides: dict | None = None, *,
                    causal: bool = True) -> tuple[dict, dict]:
    """``(attention options, model options)`` of variant ``name`` at sequence length n.

    LSH needs N to be a multiple of ``chunk_len``: when it is not, the model pads inside
    attention (``pad_to_multiple=chunk_len``); its ``n_buckets`` defaults to trax's rule
    2·⌈N/chunk_len⌉.  For a bidirectional model (``causal=False``) local attention also
    looks one block forward, so that it is symmetric like the window.
    """
    opts = dict(DEFAULTS.get(name, lambda n: {})(n))
    if name == "local" and not causal:
        opts["look_forward"] = 1
    opts.update(overrides or {})
    model = {k: opts.pop(k) for k in MODEL_OPTIONS if k in opts}
    if name in BUILDERS:
        opts = BUILDERS[name](n, **opts)
    if name == "lsh":
        c = int(opts.get("chunk_len", 32))
        n_pad = -(-n // c) * c
        opts.setdefault("n_buckets", 2 * max(1, n_pad // c))
        if n % c:
            model.setdefault("pad_to_multiple", c)
    return opts, model


def _printable(options: dict) -> dict:
    out = {}
    for k, v in options.items():
        if isinstance(v, (bool, int, float, str)) or v is None:
            out[k] = v
        elif hasattr(v, "nnz"):
            out[k] = f"{type(v).__name__} {v.shape[0]}×{v.shape[1]}, nnz {v.nnz}"
        else:
            out[k] = type(v).__name__
    return out


# ----------------------------------------------------------------------------- sizes

#: Per-task defaults; ``--quick`` replaces them with the "quick" column.
SIZES = {
    "charlm":  dict(seq_len=256, steps=300, batch=8, d_model=64, heads=4, layers=2, lr=3e-3,
                    eval_every=50, eval_batches=8, sweep="256,512,1024,2048"),
    "listops": dict(seq_len=512, steps=400, batch=32, d_model=64, heads=4, layers=2, lr=3e-3,
                    eval_every=50, eval_batches=8, sweep="", n_train=9600, n_valid=512,
                    positions="sinusoidal"),
    "recall":  dict(seq_len=512, steps=300, batch=8, d_model=64, heads=4, layers=2, lr=1e-3,
                    eval_every=30, eval_batches=8, sweep="512,1024,2048", n_train=2000,
                    n_valid=256),
    "mqar":    dict(seq_len=256, steps=1000, batch=32, d_model=64, heads=4, layers=2,
                    lr=3e-3, eval_every=100, eval_batches=8, sweep="", kv_pairs=16, vocab=64,
                    positions="rope"),
}
#: ``--task mqar --quick``: the first look (`full` alone trains in about a minute).
QUICK_MQAR = dict(seq_len=64, steps=600, batch=32, d_model=64, heads=4, layers=2,
                  eval_every=50, kv_pairs=4, vocab=64)
QUICK = dict(seq_len=64, steps=40, batch=4, d_model=32, heads=2, layers=1, eval_every=10,
             eval_batches=2, sweep="64,128")


# ----------------------------------------------------------------------------- data


class LMData:
    """Byte-level language modelling: random training windows, a fixed validation set."""

    kind = "lm"

    def __init__(self, corpus: tasks.Corpus, seq_len: int, batch: int, eval_batches: int,
                 seed: int):
        self.corpus, self.seq_len, self.batch = corpus, seq_len, batch
        self.vocab_size, self.n_classes = corpus.vocab_size, None
        self.source = corpus.source
        for split, data in (("training", corpus.train), ("validation", corpus.valid)):
            if len(data) <= seq_len + 1:
                raise SystemExit(f"the {split} split of {corpus.source} has {len(data)} bytes; "
                                 f"seq_len {seq_len} needs more (use a smaller --seq-len)")
        rng = np.random.default_rng([seed, 2])
        self.valid = [(*tasks.lm_batch(corpus.valid, batch, seq_len, rng), None)
                      for _ in range(eval_batches)]

    def batches(self, seed: int):
        """The training batches (tokens, targets, key_padding=None), the same for every run."""
        rng = np.random.default_rng([seed, 1])
        while True:
            x, y = tasks.lm_batch(self.corpus.train, self.batch, self.seq_len, rng)
            yield x, y, None


class ClassifyData:
    """A generated classification task: a fixed training set (shuffled each epoch from the
    seed) and a fixed validation set; key padding marks the real tokens."""

    kind = "classify"

    def __init__(self, task: str, seq_len: int, batch: int, n_train: int, n_valid: int,
                 seed: int):
        rng = np.random.default_rng([seed, 3])
        if task == "listops":
            make = lambda n: tasks.listops(rng, n, min_len=max(2, seq_len // 4),  # noqa: E731
                                           max_len=seq_len)
            self.source = (f"ListOps (LRA rules), {seq_len // 4}–{seq_len - 1} tokens, "
                           f"{n_train} train / {n_valid} valid")
        else:
            make = lambda n: tasks.associative_recall(rng, n, seq_len=seq_len)  # noqa: E731
            self.source = f"associative recall, {seq_len} tokens, {n_train} train / {n_valid} valid"
        data = make(n_train + n_valid)
        self.vocab_size, self.n_classes = len(data.vocab), data.n_classes
        self.seq_len, self.batch = seq_len, batch
        pad = np.arange(seq_len)[None, :] < data.lengths[:, None]          # (n, N) real
        self.train = (data.tokens[:n_train], data.labels[:n_train], pad[:n_train])
        vt, vl, vp = data.tokens[n_train:], data.labels[n_train:], pad[n_train:]
        self.valid = [(vt[i:i + batch], vl[i:i + batch], vp[i:i + batch])
                      for i in range(0, n_valid, batch)]
        self.majority = float(np.max(np.bincount(vl, minlength=data.n_classes)) / len(vl))

    def batches(self, seed: int):
        rng = np.random.default_rng([seed, 1])
        tokens, labels, pad = self.train
        while True:
            perm = rng.permutation(len(labels))
            for i in range(0, len(perm) - self.batch + 1, self.batch):
                idx = perm[i:i + self.batch]
                yield tokens[idx], labels[idx], pad[idx]


class MQARData:
    """Multi-query associative recall (:func:`tinyeff.tasks.mqar`): a causal model predicts
    the value at each query position; every other target is ignored (-100).  Training
    batches are drawn fresh from the seed (the same for every variant); the held-out set is
    drawn once from its own seed."""

    kind = "recall"

    def __init__(self, seq_len: int, batch: int, n_valid: int, seed: int, *,
                 num_kv_pairs: int, vocab_size: int):
        self.seq_len, self.batch = seq_len, batch
        self.opts = dict(seq_len=seq_len, num_kv_pairs=num_kv_pairs, vocab_size=vocab_size)
        self.vocab_size, self.n_classes = vocab_size, None
        held = tasks.mqar(np.random.default_rng([seed, 6]), n_valid, **self.opts)
        self.valid = [(held.tokens[i:i + batch], held.targets[i:i + batch], None)
                      for i in range(0, n_valid, batch)]
        self.source = (f"MQAR (Zoology generator), {seq_len} tokens, {num_kv_pairs} key-value "
                       f"pairs, vocabulary {vocab_size}; fresh training batches, "
                       f"{n_valid} held-out sequences ({n_valid * num_kv_pairs} queries)")

    def batches(self, seed: int):
        rng = np.random.default_rng([seed, 5])
        while True:
            d = tasks.mqar(rng, self.batch, **self.opts)
            yield d.tokens, d.targets, None


# ----------------------------------------------------------------------------- one run


def _evaluate(model, data) -> tuple[float, float]:
    """(mean cross-entropy in nats, accuracy) over the fixed validation batches."""
    from .nn import cross_entropy
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
    from .nn import Transformer
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
    from .nn import AdamW, clip_grad_norm, warmup_cosine
    from .nn import checkpoint as ckpt
    n, steps = cfg["seq_len"], cfg["steps"]
    model, opts, model_opts = build_model(name, data, cfg, n, overrides)
    optim = AdamW(model, lr=cfg["lr"], weight_decay=0.01)
    warmup_steps = max(1, steps // 10)
    batches = data.batches(cfg["seed"])
    pad = _wants_padding(model)
    record = {"variant": name, "status": "ok", "params": int(model.num_parameters()),
              "options": _printable(opts), "model_options": model_opts, "curve": []}
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
            "ms_min": 1e3 * min(times), "peak_bytes": int(peak), "options": _printable(opts)}


# ----------------------------------------------------------------------------- reporting

_COLUMNS = ("variant", "params", "val loss", "bits/char", "acc", "ms/step", "tokens/s",
            "peak MiB", "warm-up s")


def table_rows(records: list, kind: str) -> list[list[str]]:
    rows = []
    for r in records:
        if r["status"] != "ok" and "val_loss" not in r:
            rows.append([r["variant"]] + [""] * (len(_COLUMNS) - 2) + [r["status"]])
            continue
        rows.append([
            r["variant"] + ("" if r["status"] == "ok" else f" ({r['status']})"),
            f"{r['params']:,}", f"{r['val_loss']:.3f}",
            f"{r['bits_per_char']:.3f}" if kind == "lm" else "-",
            f"{100 * r['val_acc']:.1f}%", f"{r['ms_per_step']:.0f}",
            f"{r['tokens_per_s']:,.0f}", f"{r['peak_bytes'] / 2**20:.1f}"
            if "peak_bytes" in r else "-", f"{r.get('warmup_s', 0.0):.1f}"])
    return rows


def format_table(records: list, kind: str) -> str:
    """The comparison table as GitHub-flavoured Markdown (readable as plain text too)."""
    rows = table_rows(records, kind)
    lines = ["| " + " | ".join(_COLUMNS) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(_COLUMNS) - 1)) + "|"]
    for row in rows:
        if len(row) < len(_COLUMNS):               # skipped: the note spans the rest
            row = row[:1] + [""] * (len(_COLUMNS) - 2) + row[-1:]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_outputs(out: str, result: dict) -> list[str]:
    os.makedirs(out, exist_ok=True)
    written = []
    path = os.path.join(out, "results.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    written.append(path)
    kind = result["config"]["kind"]
    path = os.path.join(out, "results.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "status", "params", "val_loss", "bits_per_char", "val_acc",
                    "ms_per_step", "tokens_per_s", "peak_mib", "warmup_s", "steps",
                    "options"])
        for r in result["runs"]:
            ok = "val_loss" in r
            w.writerow([r["variant"], r["status"], r.get("params", ""),
                        f"{r['val_loss']:.6f}" if ok else "",
                        f"{r['bits_per_char']:.6f}" if ok and kind == "lm" else "",
                        f"{r['val_acc']:.6f}" if ok else "",
                        f"{r['ms_per_step']:.3f}" if ok else "",
                        f"{r['tokens_per_s']:.1f}" if ok else "",
                        f"{r['peak_bytes'] / 2**20:.3f}" if "peak_bytes" in r else "",
                        f"{r['warmup_s']:.3f}" if "warmup_s" in r else "",
                        r.get("steps", ""), json.dumps(r.get("options", {}))])
    written.append(path)
    path = os.path.join(out, "curves.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "step", "train_time_s", "val_loss", "val_acc"])
        for r in result["runs"]:
            for p in r.get("curve", []):
                w.writerow([r["variant"], p["step"], f"{p['train_time_s']:.4f}",
                            f"{p['val_loss']:.6f}", f"{p['val_acc']:.6f}"])
    written.append(path)
    if result["sweep"]:
        path = os.path.join(out, "sweep.csv")
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["variant", "n", "ms_median", "ms_min", "peak_mib", "note"])
            for s in result["sweep"]:
                w.writerow([s["variant"], s["n"], f"{s['ms']:.3f}" if "ms" in s else "",
                            f"{s['ms_min']:.3f}" if "ms_min" in s else "",
                            f"{s['peak_bytes'] / 2**20:.3f}" if "peak_bytes" in s else "",
                            s.get("note", "")])
        written.append(path)
    return written


def plot(out: str, result: dict) -> list[str]:
    """curves.png and scaling.png, or [] without matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    runs = [r for r in result["runs"] if r.get("curve")]
    unit = "bits/char" if result["config"]["kind"] == "lm" else "nats"
    conv = (1 / math.log(2)) if unit == "bits/char" else 1.0
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for r in runs:
        steps = [p["step"] for p in r["curve"]]
        times = [p["train_time_s"] for p in r["curve"]]
        losses = [p["val_loss"] * conv for p in r["curve"]]
        a1.plot(steps, losses, "o-", ms=3, label=r["variant"])
        a2.plot(times, losses, "o-", ms=3, label=r["variant"])
    a1.set_xlabel("training step")
    a2.set_xlabel("training wall time (s, evaluation excluded)")
    for ax in (a1, a2):
        ax.set_ylabel(f"validation loss ({unit})")
        ax.grid(True, alpha=0.3)
    a1.legend(fontsize=8)
    fig.suptitle(result["title"], fontsize=9)
    fig.tight_layout()
    path = os.path.join(out, "curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    sweep = [s for s in result["sweep"] if "ms" in s]
    if sweep:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
        for name in dict.fromkeys(s["variant"] for s in sweep):
            pts = [s for s in sweep if s["variant"] == name]
            ns = [s["n"] for s in pts]
            a1.plot(ns, [s["ms"] for s in pts], "o-", label=name)
            a2.plot(ns, [max(s["peak_bytes"], 1) / 2**20 for s in pts], "o-", label=name)
        for ax, label in ((a1, "forward+backward ms (batch 1)"),
                          (a2, "tracemalloc peak MiB (batch 1)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length N")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
        a1.legend(fontsize=8)
        fig.suptitle(result["title"], fontsize=9)
        fig.tight_layout()
        path = os.path.join(out, "scaling.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ----------------------------------------------------------------------------- command line


def _hms(seconds: float) -> str:
    m, sec = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{sec:02d}"


def _ints(text: str) -> list[int]:
    return int_list(text, minimum=2)                               # sequence lengths


parse_opts = parse_variant_opts


def make_parser() -> argparse.ArgumentParser:
    doc = __doc__
    p = argparse.ArgumentParser(
        prog="python -m tinyeff demo", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=doc.split("\n\n")[0] + "\n\n" + doc.split("\n\n")[1],
        epilog="Long-range runs:\n"
               "  python -m tinyeff demo --task mqar\n"
               "  python -m tinyeff demo --task listops\n"
               "  python -m tinyeff demo --task recall --seq-len 2048 --variants "
               "window,lsh,performer,linformer\n\n"
               "Default variant options (override with --opt VARIANT.KEY=VALUE):\n" +
               "\n".join(f"  {k:<13}{_printable(v(256))}" for k, v in DEFAULTS.items()) +
               "\n\nSee the docstring of tinyeff/demo.py for how every column is measured.")
    p.add_argument("--task", default="charlm",
                   help="charlm (default: the Python stdlib's source), listops, recall, or "
                        "file:PATH (your own text)")
    p.add_argument("--text-file", default=None, metavar="PATH",
                   help="same as --task file:PATH")
    p.add_argument("--variants", default=None,
                   help="comma-separated variant names (default: every registered variant)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length N (charlm 256, "
                   "mqar 256, listops/recall 512)")
    p.add_argument("--steps", type=int, default=None, help="training steps per variant "
                   "(charlm/recall 300, listops 400, mqar 1000)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (charlm/recall 8, "
                   "listops/mqar 32)")
    p.add_argument("--layers", type=int, default=None, help="Transformer blocks (2)")
    p.add_argument("--d-model", type=int, default=None, help="model width (64)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (4)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate "
                   "(recall 1e-3, the other tasks 3e-3)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between validations")
    p.add_argument("--eval-batches", type=int, default=None,
                   help="validation batches (charlm; listops/recall use --n-valid)")
    p.add_argument("--positions", default=None, choices=("learned", "sinusoidal", "rope"),
                   help="position encoding (mqar: rope, listops: sinusoidal, the other "
                        "tasks: learned)")
    p.add_argument("--kv-pairs", type=int, default=None,
                   help="mqar: key-value pairs per sequence (16)")
    p.add_argument("--vocab", type=int, default=None,
                   help="mqar: vocabulary, keys from the lower half, values from the upper "
                        "(64)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoints in OUT/checkpoints/ (written after "
                        "every evaluation); a finished variant is not retrained")
    p.add_argument("--n-train", type=int, default=None,
                   help="listops/recall training examples (listops 10000, recall 2000)")
    p.add_argument("--n-valid", type=int, default=None,
                   help="held-out examples (listops 500, recall and mqar 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--opt", action="append", default=[], metavar="VARIANT.KEY=VALUE",
                   help="a variant option (repeatable), e.g. window.window=32")
    p.add_argument("--sweep", default=None, metavar="N1,N2,...",
                   help="sequence lengths of the time/memory sweep (\"\" to skip; default "
                        "charlm 256,512,1024,2048)")
    p.add_argument("--sweep-repeat", type=int, default=2, help="timed runs per sweep point")
    p.add_argument("--out", default="tinyeff_demo", help="output folder (tinyeff_demo)")
    p.add_argument("--quick", action="store_true",
                   help="about a minute: seq-len 64, 40 steps, batch 4, d-model 32, 2 heads, "
                        "1 layer, sweep 64,128; with --task mqar: seq-len 64, 4 pairs, "
                        "vocabulary 64, 600 steps, batch 32 (explicit options still win)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


#: How each --task builds its data (``file:PATH`` is charlm on the user's text).
TASKS = {
    "charlm": lambda cfg, args: LMData(tasks.stdlib_corpus(), cfg["seq_len"], cfg["batch"],
                                       cfg["eval_batches"], cfg["seed"]),
    "file": lambda cfg, args: LMData(tasks.text_file_corpus(args.text_file), cfg["seq_len"],
                                     cfg["batch"], cfg["eval_batches"], cfg["seed"]),
    "listops": lambda cfg, args: ClassifyData("listops", cfg["seq_len"], cfg["batch"],
                                              cfg["n_train"], cfg["n_valid"], cfg["seed"]),
    "recall": lambda cfg, args: ClassifyData("recall", cfg["seq_len"], cfg["batch"],
                                             cfg["n_train"], cfg["n_valid"], cfg["seed"]),
    "mqar": lambda cfg, args: MQARData(cfg["seq_len"], cfg["batch"], args.n_valid or 256,
                                       cfg["seed"], num_kv_pairs=cfg["kv_pairs"],
                                       vocab_size=cfg["vocab"]),
}


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    from .attention import VARIANTS

    task = f"file:{args.text_file}" if args.text_file else args.task
    if task.startswith("file:"):
        args.text_file = task[5:]
    base = "file" if task.startswith("file:") else task
    if base not in TASKS:
        parser.error(f"--task must be charlm, listops, recall, mqar or file:PATH, got {task!r}")
    cfg = dict(SIZES["charlm" if base == "file" else base])
    if args.quick:
        cfg.update(QUICK_MQAR if base == "mqar" else QUICK)
    for key in ("seq_len", "steps", "batch", "layers", "d_model", "heads", "lr", "eval_every",
                "eval_batches", "sweep", "kv_pairs", "vocab", "positions", "n_train",
                "n_valid"):
        if key in ("n_train", "n_valid") and base not in ("listops", "recall"):
            continue
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if base != "mqar":
        cfg.pop("kv_pairs", None)
        cfg.pop("vocab", None)
    cfg["seed"] = args.seed
    for key in ("seq_len", "steps", "batch", "layers", "d_model", "heads", "eval_every",
                "eval_batches", "kv_pairs", "vocab", "n_train", "n_valid"):
        if key not in cfg:
            continue
        if cfg[key] < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    if cfg["d_model"] % cfg["heads"]:
        parser.error(f"--d-model {cfg['d_model']} must be divisible by --heads {cfg['heads']}")
    try:
        sweep_ns = _ints(cfg["sweep"]) if cfg["sweep"] else []
    except argparse.ArgumentTypeError as e:
        parser.error(f"--sweep: {e}")
    names = [v for v in (args.variants.split(",") if args.variants else VARIANTS) if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; registered: {', '.join(VARIANTS)}")
    try:
        overrides = parse_opts(args.opt)
    except ValueError as e:
        parser.error(str(e))
    stray = sorted(set(overrides) - set(names))
    if stray:
        parser.error(f"--opt names variants that are not run: {stray}")

    t_start = time.perf_counter()
    try:
        data = TASKS[base](cfg, args)
    except OSError as e:
        if base != "file":
            raise
        parser.error(f"--text-file: cannot read {args.text_file!r} "
                     f"({e.strerror or type(e).__name__})")
    except ValueError as e:
        parser.error(f"--task {task}: {e}")
    cfg["kind"] = data.kind
    machine = machine_info()
    title = (f"tinyeff demo --task {task}: N={cfg['seq_len']}, batch {cfg['batch']}, "
             f"d_model {cfg['d_model']}, {cfg['heads']} heads, {cfg['layers']} layers, "
             f"{cfg['steps']} steps, seed {cfg['seed']}")
    print(f"# {title}")
    print(f"# data: {data.source}")
    print(f"# machine: {machine['cpu']}, {machine['cores']} cores, Numba threads "
          f"{machine['numba_threads']}, {machine['date']}, load {machine['load_average']}"
          + "".join(f", {k}={v}" for k, v in machine["env"].items()))
    if data.kind == "classify":
        print(f"# validation majority-class accuracy: {100 * data.majority:.1f}%")
    sys.stdout.flush()

    command = "python -m tinyeff demo" + "".join(f" {a}" for a in (argv if argv is not None
                                                                   else sys.argv[1:]))
    metric = {"lm": "; bits/char = val loss / ln 2; acc = next-byte accuracy",
              "recall": "; val loss and acc at the query positions only (acc = fraction of "
                        "held-out queries answered with the right value)"}.get(
        data.kind, f"; acc = classification accuracy (majority class "
                   f"{100 * getattr(data, 'majority', 0.0):.1f}%)")
    notes = ["val loss: mean cross-entropy (nats) on the fixed validation set after the last "
             "step" + metric,
             "ms/step: median wall time of a training step (forward, backward, AdamW); "
             "tokens/s = batch·N / step time; warm-up s = step 0 (Numba compile or cache "
             "load)",
             "peak MiB: tracemalloc peak of one training step above the memory held before "
             "it (NumPy arrays; parameters and optimizer state not counted)"]
    runs, sweep = [], []
    result = {"command": command, "title": title, "machine": machine, "task": task,
              "data": data.source, "config": cfg, "complete": False, "total_s": None,
              "runs": runs, "sweep": sweep, "notes": notes}
    todo = [n for n in names if data.kind == "classify" or VARIANTS[n].SUPPORTS_CAUSAL]
    done_steps, done_s = 0, 0.0                # for the time-left estimate
    for name in names:
        mod = VARIANTS[name]
        if data.kind != "classify" and not mod.SUPPORTS_CAUSAL:
            runs.append({"variant": name, "status": "skipped: not causal (cannot be a "
                         "language model; try --task listops)"})
            print(f"{name:<13}skipped: {name} does not support causal attention")
            continue
        ckpt = os.path.join(args.out, "checkpoints", f"{name}.npz")
        os.makedirs(os.path.dirname(ckpt), exist_ok=True)
        t_variant = time.perf_counter()
        try:
            record = train_one(name, data, cfg, overrides.get(name, {}),
                               progress=not args.no_progress, checkpoint=ckpt,
                               resume=args.resume)
            print(f"{name:<13}val loss {record['val_loss']:.3f}"
                  + (f" ({record['bits_per_char']:.3f} bits/char)" if data.kind == "lm"
                     else f", accuracy {100 * record['val_acc']:.1f}%")
                  + f", {record['ms_per_step']:.0f} ms/step, {record['status']}")
        except (TypeError, ValueError) as e:
            record = {"variant": name, "status": f"failed: {type(e).__name__}: {e}"}
            print(f"{name:<13}{record['status']}", file=sys.stderr)
        runs.append(record)
        done_steps += cfg["steps"]
        done_s += time.perf_counter() - t_variant
        left = len(todo) - todo.index(name) - 1
        if left:
            print(f"# {len(todo) - left}/{len(todo)} variants done in {_hms(done_s)}; about "
                  f"{_hms(done_s / done_steps * cfg['steps'] * left)} left at this pace")
        sys.stdout.flush()
        write_outputs(args.out, result)       # partial results survive an interrupted run

    if sweep_ns:
        ok = [r["variant"] for r in runs if "val_loss" in r]
        bar = Progress(len(ok) * len(sweep_ns), "sweep", enabled=not args.no_progress)
        for name in ok:
            for n in sweep_ns:
                try:
                    sweep.append(sweep_one(name, data, cfg, overrides.get(name, {}), n,
                                           args.sweep_repeat))
                except (TypeError, ValueError, MemoryError) as e:
                    sweep.append({"variant": name, "n": n,
                                  "note": f"{type(e).__name__}: {str(e)[:120]}"})
                bar.update(at=f"{name} N={n}")
        bar.close()

    total = time.perf_counter() - t_start
    print()
    print(f"## {title}")
    print(format_table(runs, data.kind))
    print()
    for note in notes:
        print(f"- {note}")
    print("- options: " + "; ".join(f"{r['variant']} {r['options']}" for r in runs
                                     if r.get("options")))
    if sweep:
        print("\nsweep (batch 1, forward+backward ms / tracemalloc peak MiB):")
        head = f"{'variant':<13}" + "".join(f"{'N=' + str(n):>18}" for n in sweep_ns)
        print(head)
        for name in dict.fromkeys(s["variant"] for s in sweep):
            cells = []
            for n in sweep_ns:
                s = next(s for s in sweep if s["variant"] == name and s["n"] == n)
                cells.append(f"{s['ms']:.0f} / {s['peak_bytes'] / 2**20:.1f}" if "ms" in s
                             else "failed")
            print(f"{name:<13}" + "".join(f"{c:>18}" for c in cells))
    print(f"\ntotal time {total:.0f} s ({machine['cores']} cores, {machine['date'][:10]})")

    result.update(complete=True, total_s=total)
    written = write_outputs(args.out, result)
    try:
        written += plot(args.out, result)
    except ImportError:
        print("plots: matplotlib is not installed; `pip install matplotlib` (or "
              "`pip install -e \".[plots]\"`) to get curves.png and scaling.png")
    print("wrote " + ", ".join(written))
    return 0 if any("val_loss" in r for r in runs) else 1
