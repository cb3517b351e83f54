"""Generate text from a character-level checkpoint written by demos/train_char_lm.py.

Run:  python demos/generate.py char_lm.npz --prompt "import " --n 300 --top-k 10

The checkpoint stores the model's config, so the model is rebuilt from the file alone
(``tinyeff.nn.checkpoint.load_transformer``).  Sampling is seeded (``--seed``).
"""

import argparse

import numpy as np

from tinyeff.nn import checkpoint


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--n", type=int, default=300, help="bytes to generate")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    model = checkpoint.load_transformer(args.checkpoint)
    cfg = model.config
    print(f"# {cfg['attention']} {cfg['attention_options']}, {model.num_parameters():,} "
          f"parameters, context {cfg['max_len']}")
    prompt = np.frombuffer(args.prompt.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    out = model.generate(prompt, args.n, rng=np.random.default_rng(args.seed),
                         temperature=args.temperature, top_k=args.top_k)
    print(bytes(out.astype(np.uint8)).decode("utf-8", errors="replace"))


if __name__ == "__main__":
    main()
