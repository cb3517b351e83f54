"""``python -m tinyeff demo``: train one small Transformer per attention variant on the same
task and data, on the CPU, and compare them in one table.

For every variant of ``tinyeff.attention.VARIANTS`` (or ``--variants``) the demo trains the
same model (``tinyeff.nn.Transformer``: pre-LN blocks, float32, AdamW, warm-up + cosine
schedule, gradient clipping at 1.0) on the same batches, in the same order, from the same
seed, and reports variant | parameters | final validation loss | bits/char (char-LM) |
accuracy | ms per training step | tokens/s | peak MiB | warm-up s, then (``--sweep``) the
time and memory of a batch-1 step against sequence length.  How each column is measured:
the docstring of tinyeff/cli/_demo_train.py.

Tasks (``--task``), all with data present on any machine (:mod:`tinyeff.tasks`; sizes in
:data:`tinyeff.cli._demo_data.SIZES`):

* ``charlm`` (default): byte-level language modelling on the Python standard library's
  source that the running interpreter ships (``tinyeff.tasks.stdlib_corpus``: 4 MB of
  ``.py`` files in sorted order, last 10 % for validation); random windows of seq_len + 1
  bytes.  Causal attention, so variants without causal support (Linformer) are listed as
  skipped.
* ``listops``: ListOps as in the Long Range Arena (``tinyeff.tasks.listops``), expressions of
  seq_len/4 … seq_len − 1 tokens, classify the value 0–9; bidirectional attention with key
  padding, mean pooling.  Default: N = 256 (LRA: 2,000), width 128, 9,600 training and 512
  held-out expressions, sinusoidal positions, batch 32, 400 steps, lr 3e-3.
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

Each variant's own options come from its module's ``demo_options(n, causal)`` (completed by
``demo_build`` where the variant has one; the contract in :mod:`tinyeff.attention`): the
sparse patterns give a query about 64 keys from N = 256 on and about N/4 below.  Override
any with ``--opt VARIANT.KEY=VALUE`` (repeatable; VALUE is a Python literal), e.g.
``--opt window.window=32 --opt performer.m=128 --opt full.impl=ref``.  For ``sparse`` the
keys are the BigBird parameters ``window``, ``n_global``, ``n_random`` and ``seed`` (the
pattern is built with ``tinyeff.masks.bigbird`` at the run's sequence length);
``pad_to_multiple`` is a model option that any variant accepts.

First run: Numba compiles each variant's kernels the first time they are called and caches
them on disk.  While the first variants train, a background process (one thread, lower
priority) runs the same command for one step of each later variant, so that their kernels
compile on the other core; ``--no-precompile`` turns it off (:mod:`tinyeff.cli._precompile`).

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
time and peak memory against sequence length): :mod:`tinyeff.cli._demo_report`.

Reproducibility: the data, the batch order, the validation set, the initialisation and
every random option (Performer features, LSH rotations, BigBird random keys) come from
``--seed``; tinyeff's kernels are deterministic, so losses repeat exactly on the same
machine and library versions.  Times do not.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from ..attention import VARIANTS
from ..progress import Progress
from ._demo_data import QUICK, QUICK_MQAR, SIZES, TASKS
from ._demo_report import notes, plot, print_summary, write_outputs
from ._demo_train import printable, sweep_one, train_one, variant_options
from ._precompile import Precompiler
from .report import add_variants_argument, int_list, machine_info, parse_variant_opts

__all__ = ["main", "make_parser", "variant_options"]

#: The config keys that command-line options set (``--seq-len`` sets ``seq_len``).
_SETTABLE = ("seq_len", "steps", "batch", "layers", "d_model", "heads", "lr", "eval_every",
             "eval_batches", "sweep", "kv_pairs", "vocab", "positions", "n_train", "n_valid")
#: The config keys that must be positive integers.
_POSITIVE = ("seq_len", "steps", "batch", "layers", "d_model", "heads", "eval_every",
             "eval_batches", "kv_pairs", "vocab", "n_train", "n_valid")


def _hms(seconds: float) -> str:
    m, sec = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{sec:02d}"


def _default_options(n: int = 256) -> str:
    """Each variant's ``demo_options(n, causal=True)``, one line per variant."""
    lines = []
    for name, mod in VARIANTS.items():
        opts = mod.demo_options(n, True) if hasattr(mod, "demo_options") else {}
        lines.append(f"  {name:<13}{printable(opts)}")
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m tinyeff demo``."""
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(
        prog="python -m tinyeff demo", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(doc[0] + "\n\n" + doc[1]).replace("`", ""),
        epilog="Long-range runs:\n"
               "  python -m tinyeff demo --task mqar\n"
               "  python -m tinyeff demo --task listops\n"
               "  python -m tinyeff demo --task recall --seq-len 2048 --variants "
               "window,lsh,performer,linformer\n\n"
               "Default variant options at N = 256, causal (override with --opt "
               "VARIANT.KEY=VALUE):\n" + _default_options() +
               "\n\nSee the docstring of tinyeff/cli/demo.py for the tasks and outputs.")
    p.add_argument("--task", default="charlm",
                   help="charlm (default: the Python stdlib's source), listops, recall, mqar, "
                        "or file:PATH (your own text)")
    p.add_argument("--text-file", default=None, metavar="PATH",
                   help="same as --task file:PATH")
    add_variants_argument(p, "every registered variant")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length N (charlm, "
                   "mqar and listops 256, recall 512)")
    p.add_argument("--steps", type=int, default=None, help="training steps per variant "
                   "(charlm/recall 300, listops 400, mqar 1000)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (charlm/recall 8, "
                   "listops/mqar 32)")
    p.add_argument("--layers", type=int, default=None, help="Transformer blocks (2)")
    p.add_argument("--d-model", type=int, default=None, help="model width (listops 128, the other "
                   "tasks 64)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (4)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate "
                   "(recall 1e-3, the other tasks 3e-3)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="steps between validations (charlm/listops 50, recall 30, mqar 100)")
    p.add_argument("--eval-batches", type=int, default=None,
                   help="validation batches (charlm, 8; listops/recall/mqar use --n-valid)")
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
                   help="listops/recall training examples (listops 9600, recall 2000)")
    p.add_argument("--n-valid", type=int, default=None,
                   help="held-out examples (listops 512, recall and mqar 256)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the data, batch order, initialisation and random options (0)")
    p.add_argument("--opt", action="append", default=[], metavar="VARIANT.KEY=VALUE",
                   help="a variant option (repeatable), e.g. window.window=32")
    p.add_argument("--sweep", default=None, metavar="N1,N2,...",
                   help="sequence lengths of the time/memory sweep (\"\" to skip; default "
                        "charlm 256,512,1024,2048, recall 512,1024,2048, listops/mqar none)")
    p.add_argument("--sweep-repeat", type=int, default=2, help="timed runs per sweep point (2)")
    p.add_argument("--out", default="tinyeff_demo", help="output folder (tinyeff_demo)")
    p.add_argument("--quick", action="store_true",
                   help="about a minute: seq-len 64, 40 steps, batch 4, d-model 32, 2 heads, "
                        "1 layer, sweep 64,128; with --task mqar: seq-len 64, 4 pairs, "
                        "vocabulary 64, 600 steps, batch 32 (explicit options still win)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-precompile", action="store_true",
                   help="do not compile the later variants' kernels in a background process "
                        "while the first ones train (tinyeff/cli/_precompile.py)")
    return p


def _config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, str, dict]:
    """(task as given, its base name in TASKS, the run's config); bad values are usage
    errors."""
    task = f"file:{args.text_file}" if args.text_file else args.task
    if task.startswith("file:"):
        args.text_file = task[5:]
    base = "file" if task.startswith("file:") else task
    if base not in TASKS:
        parser.error(f"--task must be charlm, listops, recall, mqar or file:PATH, got {task!r}")
    cfg = dict(SIZES["charlm" if base == "file" else base])
    if args.quick:
        cfg.update(QUICK_MQAR if base == "mqar" else QUICK)
    for key in _SETTABLE:
        if key in ("n_train", "n_valid") and base not in ("listops", "recall"):
            continue
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if base != "mqar":
        cfg.pop("kv_pairs", None)
        cfg.pop("vocab", None)
    cfg["seed"] = args.seed
    for key in _POSITIVE:
        if key in cfg and cfg[key] < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    if cfg["d_model"] % cfg["heads"]:
        parser.error(f"--d-model {cfg['d_model']} must be divisible by --heads {cfg['heads']}")
    return task, base, cfg


def _train_all(args, cfg, data, names, todo, overrides, result) -> None:
    """Train every variant of ``names`` in turn (those in ``todo``; the others are listed as
    skipped), appending to ``result["runs"]`` and rewriting the outputs after each one."""
    runs = result["runs"]
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


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    task, base, cfg = _config(parser, args)
    try:
        sweep_ns = int_list(cfg["sweep"], minimum=2) if cfg["sweep"] else []
    except argparse.ArgumentTypeError as e:
        parser.error(f"--sweep: {e}")
    names = args.variants or list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; registered: {', '.join(VARIANTS)}")
    try:
        overrides = parse_variant_opts(args.opt)
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

    argv = list(argv if argv is not None else sys.argv[1:])
    command = "python -m tinyeff demo" + "".join(f" {a}" for a in argv)
    runs, sweep = [], []
    result = {"command": command, "title": title, "machine": machine, "task": task,
              "data": data.source, "config": cfg, "complete": False, "total_s": None,
              "runs": runs, "sweep": sweep, "notes": notes(data)}
    todo = [n for n in names if data.kind == "classify" or VARIANTS[n].SUPPORTS_CAUSAL]
    precompiler = Precompiler(argv, [] if args.no_precompile else todo)
    try:
        _train_all(args, cfg, data, names, todo, overrides, result)
    finally:
        precompiler.stop()

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

    result.update(complete=True, total_s=time.perf_counter() - t_start)
    print_summary(result, sweep_ns)
    written = write_outputs(args.out, result)
    try:
        written += plot(args.out, result)
    except ImportError:
        print("plots: matplotlib is not installed; `pip install matplotlib` (or "
              "`pip install -e \".[plots]\"`) to get curves.png and scaling.png")
    print("wrote " + ", ".join(written))
    return 0 if any("val_loss" in r for r in runs) else 1
