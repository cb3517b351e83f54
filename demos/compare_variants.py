"""How close is each approximate attention to exact (``full``) attention?

Error  ‖out − out_full‖_F / ‖v‖_F  on one (q, k, v), float64 — the output error in units
of the size of the values (dividing by ‖out_full‖ instead would blow up at large N, where
exact attention averages many values and its output shrinks towards 0) — as

1. the sequence length N grows (each method at fixed settings), and, at one N,
2. Performer's feature count m,   3. Linformer's rank k,
4. LSH's number of hash rounds,    5. the sliding window's one-sided width w.

The inputs have the structure real attention has: q = k is a smooth sequence (white noise
averaged over 16 neighbouring positions, rows normalized, softmax temperature ``--beta``),
so a query attends mostly to nearby and similar positions; v is white noise.

What each comparison is against:
* Performer (FAVOR+, softmax kernel, orthogonal features) estimates full softmax attention;
  its error shrinks like 1/√m.
* Linformer's E, F are *learned*; here they are random (its initialization), so the error
  is that of an untrained layer and need not vanish as k grows.  The last row uses
  k = N with E = F = I, where Linformer is exactly full attention.
* LSH is compared with the exact attention it approximates: keys are the normalized
  queries k̂ = q/‖q‖, scale 1, no self-attention (a query never attends itself when it has
  another key), and ``dedup=True`` (each key counted once over the rounds).  More rounds
  cover more of each query's keys.
* The window keeps |i − j| ≤ w exactly, so its error is the attention mass it drops.

Run:  python demos/compare_variants.py            (about a minute)
      python demos/compare_variants.py --quick    (a few seconds)
"""

import argparse

import numpy as np

from tinyeff.attention import full, linformer, lsh, performer, window


def smooth_inputs(rng, n, d, heads=2, width=16, beta=4.0):
    """q = k: a smooth random sequence (B=1, H, N, D), and white-noise values."""
    noise = rng.standard_normal((1, heads, n + width - 1, d))
    kernel = np.ones(width) / width
    z = np.apply_along_axis(lambda s: np.convolve(s, kernel, mode="valid"), 2, noise)
    z /= np.linalg.norm(z, axis=-1, keepdims=True)            # unit rows: (1, H, N, D)
    q = z * np.sqrt(beta * np.sqrt(d))                          # logits q·k/√D = β cos(θ)
    v = rng.standard_normal((1, heads, n, d))
    return q, q.copy(), v


def rel_err(out, ref, v):
    """‖out − ref‖ / ‖v‖ (v has the output's shape here: N = M, Dv = D)."""
    return float(np.linalg.norm(out - ref) / np.linalg.norm(v))


def err_performer(q, k, v, ref, m, rng):
    feats = performer.draw_random_options(rng, q.shape[-1], m=m)
    return rel_err(performer.forward(q, k, v, **feats)[0], ref, v)


def err_linformer(q, k, v, ref, kk, rng):
    proj = linformer.init_layer_params(rng, q.shape[-2], k=kk)
    return rel_err(linformer.forward(q, k, v, **proj)[0], ref, v)


def lsh_reference(q, v):
    """Exact attention with LSH's conventions: normalized keys, scale 1, no self."""
    d = q.shape[-1]
    k_hat = q / np.sqrt(np.sum(q * q, axis=-1, keepdims=True) + d * lsh.NORM_EPS)
    not_self = ~np.eye(q.shape[-2], dtype=bool)
    return full.forward(q, k_hat, v, mask=not_self, scale=1.0)[0]


def err_lsh(q, v, ref, rounds, chunk_len, rng):
    n = q.shape[-2]
    n_buckets = lsh.suggest_n_buckets(n, chunk_len)
    rot = lsh.draw_random_options(rng, q.shape[-1], n_hashes=rounds, n_buckets=n_buckets)
    out = lsh.forward(q, q, v, chunk_len=chunk_len, dedup=True, **rot)[0]
    return rel_err(out, ref, v)


def err_window(q, k, v, ref, w):
    return rel_err(window.forward(q, k, v, window=w)[0], ref, v)


def table(title, header, rows):
    print(f"\n{title}")
    print("  ".join(f"{h:>14}" for h in header))
    for row in rows:
        print("  ".join(f"{c:>14}" if isinstance(c, str) else f"{c:>14.4f}" for c in row))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dim", type=int, default=32, help="head dimension D")
    p.add_argument("--beta", type=float, default=4.0, help="softmax sharpness")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    args = p.parse_args()
    d = args.dim
    ns = (64, 128) if args.quick else (256, 512, 1024, 2048)
    n_fixed = 128 if args.quick else 1024
    chunk = 32

    def rng(*key):
        return np.random.default_rng([args.seed, *key])

    rows = []
    for n in ns:
        q, k, v = smooth_inputs(rng(0, n), n, d, beta=args.beta)
        ref = full.forward(q, k, v)[0]
        rows.append([str(n), err_performer(q, k, v, ref, 64, rng(1, n)),
                     err_linformer(q, k, v, ref, 64, rng(2, n)),
                     err_lsh(q, v, lsh_reference(q, v), 4, chunk, rng(3, n)),
                     err_window(q, k, v, ref, 32)])
    table("1. error vs N", ["N", "performer m=64", "linformer k=64", "lsh 4 rounds",
                                     "window w=32"], rows)

    n = n_fixed
    q, k, v = smooth_inputs(rng(0, n), n, d, beta=args.beta)
    ref = full.forward(q, k, v)[0]
    ms = (16, 64) if args.quick else (16, 64, 256, 1024)
    table(f"2. performer vs m (N={n}; mean of 3 feature draws)", ["m", "error"],
          [[str(m), float(np.mean([err_performer(q, k, v, ref, m, rng(4, m, t))
                                   for t in range(3)]))] for m in ms])
    ks = (16, 64) if args.quick else (16, 64, 256)
    rows = [[str(kk), err_linformer(q, k, v, ref, kk, rng(5, kk))] for kk in ks]
    eye = np.eye(n)
    rows.append([f"{n} (E=F=I)", rel_err(linformer.forward(q, k, v, E=eye, F=eye)[0], ref, v)])
    table(f"3. linformer vs k (N={n}; random E, F = an untrained layer)", ["k", "error"],
          rows)
    lref = lsh_reference(q, v)
    rounds = (1, 2) if args.quick else (1, 2, 4, 8, 16)
    table(f"4. lsh vs rounds (N={n}, chunk {chunk}, {lsh.suggest_n_buckets(n, chunk)} buckets,"
          " dedup)", ["rounds", "error"],
          [[str(r), err_lsh(q, v, lref, r, chunk, rng(6, r))] for r in rounds])
    ws = (8, 32) if args.quick else (8, 32, 128, 512)
    table(f"5. window vs w (N={n})", ["w", "error"],
          [[str(w), err_window(q, k, v, ref, w)] for w in ws] + [[str(n), err_window(
              q, k, v, ref, n)]])


if __name__ == "__main__":
    main()
