"""Train a small character-level language model with one attention variant, save it, sample.

The data is the Python standard library's own source (byte-level, 256 symbols), or your
text file.  Everything is seeded: the same command gives the same losses.

Run:  python demos/train_char_lm.py --variant window --steps 500 --out lm.npz
      python demos/generate.py lm.npz --prompt "def " --n 300

Options worth knowing: --variant (any name in tinyeff.attention.VARIANTS that supports
causal attention), --opt KEY=VALUE for the variant's own options (defaults: demo_options in
tinyeff/attention/<variant>.py), --text-file for your own data.
"""

import argparse
import ast
import math
import time

import numpy as np

from tinyeff import tasks
from tinyeff.cli.demo import variant_options
from tinyeff.nn import AdamW, Transformer, checkpoint, clip_grad_norm, cross_entropy, warmup_cosine


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="window")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--text-file", default=None)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="char_lm.npz", help="checkpoint path")
    p.add_argument("--sample", type=int, default=200, help="bytes to sample at the end")
    args = p.parse_args()

    # 1. data: a byte-level corpus split into train / validation
    corpus = (tasks.text_file_corpus(args.text_file) if args.text_file
              else tasks.stdlib_corpus())
    print(f"data: {corpus.source}")

    # 2. the model: the variant's demo options (its demo_options) plus --opt overrides
    overrides = {k: ast.literal_eval(v) for k, _, v in (o.partition("=") for o in args.opt)}
    options, model_options = variant_options(args.variant, args.seq_len, overrides)
    if "chunk_len" in options:         # generation feeds shorter windows: pad to whole chunks
        model_options.setdefault("pad_to_multiple", options["chunk_len"])
    model = Transformer(corpus.vocab_size, args.d_model, args.heads, args.layers,
                        max_len=args.seq_len, attention=args.variant,
                        attention_options=options, task="lm", seed=args.seed,
                        **model_options)
    print(f"model: {args.variant} {options}, {model.num_parameters():,} parameters")

    # 3. training: AdamW, linear warm-up then cosine decay, gradient clipping
    opt = AdamW(model, lr=args.lr, weight_decay=0.01)
    rng = np.random.default_rng(args.seed)
    valid = [tasks.lm_batch(corpus.valid, args.batch, args.seq_len,
                            np.random.default_rng([args.seed, 2])) for _ in range(4)]
    t0 = time.perf_counter()
    for step in range(args.steps):
        x, y = tasks.lm_batch(corpus.train, args.batch, args.seq_len, rng)
        loss, grads = model.loss_and_grads(x, y)
        clip_grad_norm(grads, 1.0)
        opt.step(warmup_cosine(step, base_lr=args.lr, warmup_steps=max(1, args.steps // 10),
                               total_steps=args.steps))
        if (step + 1) % max(1, args.steps // 10) == 0 or step + 1 == args.steps:
            model.eval()
            val = np.mean([cross_entropy(model.logits(vx), vy)[0] for vx, vy in valid])
            model.train()
            print(f"step {step + 1:5d}  train {loss:.3f}  valid {val:.3f} nats = "
                  f"{val / math.log(2):.3f} bits/char  ({time.perf_counter() - t0:.0f} s)")

    # 4. save (the config is stored, so generate.py rebuilds the model from the file alone)
    try:
        checkpoint.save(args.out, model, optimizer=opt, step=args.steps)
        print(f"saved {args.out}")
    except TypeError as e:             # an array-valued option (sparse's mask) has no config
        print(f"not saved: {e}")

    # 5. a sample
    prompt = np.frombuffer(b"def ", dtype=np.uint8).astype(np.int64)
    out = model.generate(prompt, args.sample, rng=np.random.default_rng(args.seed), top_k=10)
    print("sample:\n" + bytes(out.astype(np.uint8)).decode("utf-8", errors="replace"))


if __name__ == "__main__":
    main()
