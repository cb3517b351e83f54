"""The tasks of ``python -m tinyeff demo``: their default sizes and the data each run reads.

Each data object has ``kind`` ("lm", "classify" or "recall"), ``vocab_size``,
``n_classes``, ``source`` (one line naming the data), ``batch``, ``valid`` (the fixed
validation batches: (tokens, targets, key_padding or None)) and ``batches(seed)`` (the
endless training batches, the same for every variant).  The data itself comes from
:mod:`tinyeff.tasks`.
"""

from __future__ import annotations

import numpy as np

from .. import tasks

#: Per-task defaults; ``--quick`` updates them with :data:`QUICK` (:data:`QUICK_MQAR` for
#: mqar), then the explicit command-line options win.
SIZES = {
    "charlm":  dict(seq_len=256, steps=300, batch=8, d_model=64, heads=4, layers=2, lr=3e-3,
                    eval_every=50, eval_batches=8, sweep="256,512,1024,2048"),
    "listops": dict(seq_len=256, steps=400, batch=32, d_model=128, heads=4, layers=2, lr=3e-3,
                    eval_every=50, eval_batches=8, sweep="", n_train=9600, n_valid=512,
                    positions="sinusoidal"),
    "recall":  dict(seq_len=512, steps=300, batch=8, d_model=64, heads=4, layers=2, lr=1e-3,
                    eval_every=30, eval_batches=8, sweep="512,1024,2048", n_train=2000,
                    n_valid=256),
    "mqar":    dict(seq_len=256, steps=1000, batch=32, d_model=64, heads=4, layers=2,
                    lr=3e-3, eval_every=100, eval_batches=8, sweep="", kv_pairs=16, vocab=64,
                    positions="rope"),
}
#: ``--task mqar --quick``: the first look at the recall task.
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

