"""Seeded task generators for training runs; all data is present on any machine.

* :func:`stdlib_corpus` — character-level language modelling on the source text of the Python
  standard library that the running interpreter ships (byte-level: one token per UTF-8
  byte, vocabulary 256), deterministically ordered, split into train/validation.
* :func:`text_file_corpus` — the same for a user's own text file.
* :func:`listops` — ListOps as in the Long Range Arena (Tay et al. 2021): nested
  ``[MAX``, ``[MIN``, ``[MED``, ``[SM`` expressions over digits 0–9, label = value 0–9.
* :func:`associative_recall` — key/value pairs followed by a query key; label = its value.
* :func:`mqar` — multi-query associative recall as in Zoology (Arora et al. 2023): key/value
  pairs, then every key queried once at a random later position; targets only there.

Every generator takes a ``numpy.random.Generator``; nothing reads global random state.
"""

from __future__ import annotations

import dataclasses
import os
import sysconfig
from pathlib import Path

import numpy as np

from . import _checks

# --------------------------------------------------------------------------- text


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Byte-level corpus: ``train`` and ``valid`` are uint8 token arrays, vocabulary 256."""

    train: np.ndarray
    valid: np.ndarray
    source: str
    vocab_size: int = 256


def _split(data: np.ndarray, valid_fraction: float, source: str) -> Corpus:
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    cut = int(round(len(data) * (1 - valid_fraction)))
    return Corpus(train=data[:cut], valid=data[cut:], source=source)


def stdlib_corpus(max_bytes: int = 4_000_000, valid_fraction: float = 0.1) -> Corpus:
    """The ``.py`` files under ``sysconfig.get_paths()["stdlib"]``, sorted by relative path.

    Test suites and ``site-packages`` are skipped; files are concatenated (each followed by
    a newline) until ``max_bytes``; the last ``valid_fraction`` of the bytes is validation.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames
                             if d not in ("site-packages", "test", "tests", "__pycache__",
                                          "idle_test", "lib2to3"))
        files.extend(rel / f for f in sorted(filenames) if f.endswith(".py"))
    chunks, total = [], 0
    for rel in sorted(files, key=lambda p: p.as_posix()):
        try:
            raw = (root / rel).read_bytes() + b"\n"
        except OSError:
            continue
        chunks.append(raw)
        total += len(raw)
        if total >= max_bytes:
            break
    if not chunks:
        raise FileNotFoundError(f"no .py files found under the standard library at {root}")
    data = np.frombuffer(b"".join(chunks)[:max_bytes], dtype=np.uint8).copy()
    return _split(data, valid_fraction, f"Python {sysconfig.get_python_version()} stdlib "
                                        f"({len(chunks)} files, {len(data)} bytes)")


def text_file_corpus(path, valid_fraction: float = 0.1) -> Corpus:
    """A user's text file as a byte-level corpus (the last ``valid_fraction`` is validation)."""
    raw = Path(path).read_bytes()
    if len(raw) < 100:
        raise ValueError(f"{path}: need at least 100 bytes of text, got {len(raw)}")
    return _split(np.frombuffer(raw, dtype=np.uint8).copy(), valid_fraction, str(path))


def lm_batch(data: np.ndarray, batch: int, seq_len: int, rng: np.random.Generator):
    """Random windows: tokens (batch, seq_len) and next-token targets (batch, seq_len)."""
    if len(data) <= seq_len + 1:
        raise ValueError(f"corpus of {len(data)} tokens is too short for seq_len {seq_len}")
    starts = rng.integers(0, len(data) - seq_len - 1, size=batch)     # (batch,)
    idx = starts[:, None] + np.arange(seq_len + 1)                      # (batch, seq_len + 1)
    window = data[idx].astype(np.int64)
    return window[:, :-1], window[:, 1:]


# --------------------------------------------------------------------------- ListOps

LISTOPS_OPS = ("[MAX", "[MIN", "[MED", "[SM")
LISTOPS_VOCAB = ("<pad>", "<cls>", *[str(i) for i in range(10)], *LISTOPS_OPS, "]")
LISTOPS_INDEX = {t: i for i, t in enumerate(LISTOPS_VOCAB)}


def listops_apply(op: str, args: list[int]) -> int:
    """Value of one operator node: MAX, MIN, MED = int(median) (mean of the two middle values,
    truncated, for an even count), SM = sum mod 10."""
    if op == "[MAX":
        return max(args)
    if op == "[MIN":
        return min(args)
    if op == "[MED":
        s = sorted(args)
        mid = len(s) // 2
        return s[mid] if len(s) % 2 else int((s[mid - 1] + s[mid]) / 2)
    if op == "[SM":
        return sum(args) % 10
    raise ValueError(f"unknown ListOps operator {op!r}; valid: {LISTOPS_OPS}")


def listops_eval(tokens: list[str]) -> int:
    """Evaluate a token list such as ``["[MAX", "2", "[MIN", "4", "7", "]", "0", "]"]``."""
    stack: list[tuple[str, list[int]]] = []
    value = None
    for t in tokens:
        if t in LISTOPS_OPS:
            stack.append((t, []))
        elif t == "]":
            if not stack:
                raise ValueError("unbalanced ']' in ListOps expression")
            op, args = stack.pop()
            if not args:
                raise ValueError(f"operator {op} has no arguments")
            v = listops_apply(op, args)
            if stack:
                stack[-1][1].append(v)
            else:
                value = v
        elif t.isdigit() and len(t) == 1:
            if stack:
                stack[-1][1].append(int(t))
            else:
                value = int(t)
        else:
            raise ValueError(f"unknown ListOps token {t!r}")
    if stack or value is None:
        raise ValueError("incomplete ListOps expression")
    return value


def _listops_tree(rng: np.random.Generator, depth: int, max_depth: int, max_args: int,
                  out: list[str], limit: int) -> None:
    # LRA: below max_depth a node is a digit with probability 0.75, else an operator;
    # the root is always an operator here (a lone digit is never long enough to be kept)
    r = rng.random() if 1 < depth < max_depth else (0.0 if depth == 1 else 1.0)
    if r > 0.25:
        out.append(str(int(rng.integers(10))))
        return
    out.append(LISTOPS_OPS[int(rng.integers(len(LISTOPS_OPS)))])
    for _ in range(int(rng.integers(2, max_args + 1))):
        if len(out) > limit:                       # already too long: it will be rejected
            return
        _listops_tree(rng, depth + 1, max_depth, max_args, out, limit)
    out.append("]")


@dataclasses.dataclass(frozen=True)
class ClassificationData:
    """Token ids (n, seq_len) with ``<cls>`` first and ``<pad>`` = 0 after the end, lengths
    (n,), labels (n,)."""

    tokens: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray
    vocab: tuple
    n_classes: int


def listops(rng: np.random.Generator, n: int, *, min_len: int = 64, max_len: int = 512,
            max_depth: int = 10, max_args: int = 10, max_tries: int = 1_000_000
            ) -> ClassificationData:
    """``n`` distinct ListOps expressions with min_len <= #tokens <= max_len - 1.

    Trees follow LRA's generator (digit with probability 0.75 below ``max_depth``,
    otherwise an operator with 2..max_args children), except that the root is always an
    operator (LRA draws it like any node and rejects the lone digits by length).  Brackets
    count as tokens; there are no parentheses.  Sequences are ``<cls>`` + expression, padded
    with ``<pad>`` to max_len.
    Duplicates are dropped; the result is sorted by expression text, so it depends only on
    the seed.
    """
    if not 1 <= min_len < max_len:
        raise ValueError(f"need 1 <= min_len < max_len, got {min_len}, {max_len}")
    found: dict[str, list[str]] = {}
    for _ in range(max_tries):
        if len(found) == n:
            break
        toks: list[str] = []
        _listops_tree(rng, 1, max_depth, max_args, toks, max_len)
        if min_len <= len(toks) <= max_len - 1:
            found.setdefault(" ".join(toks), toks)
    else:
        raise RuntimeError(f"found only {len(found)} of {n} expressions in {max_tries} tries; "
                           "widen [min_len, max_len]")
    keys = sorted(found)
    tokens = np.zeros((n, max_len), dtype=np.int64)
    lengths = np.zeros(n, dtype=np.int64)
    labels = np.zeros(n, dtype=np.int64)
    for r, key in enumerate(keys):
        toks = found[key]
        ids = [LISTOPS_INDEX["<cls>"]] + [LISTOPS_INDEX[t] for t in toks]
        tokens[r, :len(ids)] = ids
        lengths[r] = len(ids)
        labels[r] = listops_eval(toks)
    perm = rng.permutation(n)                       # shuffle deterministically from the seed
    return ClassificationData(tokens[perm], lengths[perm], labels[perm], LISTOPS_VOCAB, 10)


# --------------------------------------------------------------------------- recall


def associative_recall(rng: np.random.Generator, n: int, *, seq_len: int = 512,
                       n_keys: int = 26, n_values: int = 10) -> ClassificationData:
    """Key/value pairs then a query: ``<cls> k1 v1 k2 v2 … <q> k`` -> the value paired with k.

    Keys are distinct within a sequence when possible (``n_keys`` >= number of pairs;
    otherwise a key may repeat and its *last* value counts).  The number of pairs is
    (seq_len − 3) // 2, so the answer may lie anywhere up to the far end of the sequence.
    Vocabulary: <pad>, <cls>, <q>, the keys, then the values; labels are 0..n_values − 1.
    """
    pairs = (seq_len - 3) // 2
    if pairs < 1:
        raise ValueError(f"seq_len must be >= 5, got {seq_len}")
    key0, val0 = 3, 3 + n_keys
    vocab = ("<pad>", "<cls>", "<q>", *[f"k{i}" for i in range(n_keys)],
             *[f"v{i}" for i in range(n_values)])
    tokens = np.zeros((n, seq_len), dtype=np.int64)
    labels = np.zeros(n, dtype=np.int64)
    for r in range(n):
        if pairs <= n_keys:
            keys = rng.permutation(n_keys)[:pairs]
        else:
            keys = rng.integers(n_keys, size=pairs)
        values = rng.integers(n_values, size=pairs)
        query = keys[int(rng.integers(pairs))]
        seq = [1]
        for kk, vv in zip(keys, values):
            seq += [key0 + int(kk), val0 + int(vv)]
        seq += [2, key0 + int(query)]
        tokens[r, :len(seq)] = seq
        labels[r] = int(values[np.nonzero(keys == query)[0][-1]])
    lengths = np.full(n, 2 * pairs + 3, dtype=np.int64)
    return ClassificationData(tokens, lengths, labels, vocab, n_values)


# --------------------------------------------------------------------------- MQAR

#: Target of the positions that are not scored (``cross_entropy``'s default ``ignore_index``).
IGNORE = -100


@dataclasses.dataclass(frozen=True)
class RecallData:
    """Token ids (n, seq_len) and targets (n, seq_len): ``IGNORE`` (-100) everywhere except
    at the query positions, where the target is the value paired with the query key."""

    tokens: np.ndarray
    targets: np.ndarray
    vocab_size: int
    num_kv_pairs: int


def mqar(rng: np.random.Generator, n: int, *, seq_len: int = 256, num_kv_pairs: int = 16,
         vocab_size: int = 1024, power_a: float = 0.01, random_non_queries: bool = True
         ) -> RecallData:
    """Multi-query associative recall (MQAR), the generator of the Zoology study (Arora et al.
    2023, "Zoology: Measuring and Improving Recall in Efficient Language Models";
    HazyResearch/zoology, zoology/data/associative_recall.py, ``multiquery_ar``).

    Each sequence of ``seq_len`` tokens is::

        k₁ v₁ k₂ v₂ … k_P v_P   then, in the remaining seq_len − 2P positions, each key k_i
                                once (in random order) at an even offset 2·g_i, g_i distinct

    Keys are drawn without replacement from ``[1, vocab_size // 2)``, values without
    replacement from ``[vocab_size // 2, vocab_size)``.  The target at the position of a
    queried key is its value (the model predicts it as the next token, so a causal model
    must recall it from the block of pairs); every other target is ``IGNORE``.  The gaps
    g_i follow Zoology's power law, P(g) ∝ (g + 1)^(power_a − 1) over g = 0 … (seq_len −
    2P)/2 − 1 (power_a = 1 is uniform; 0.01 favours queries close to the pairs).  With
    ``random_non_queries`` every other position after the pairs holds a uniformly random
    token of the vocabulary except this sequence's keys, otherwise 0.  (Zoology draws the
    filler from the whole vocabulary; with its 8,192 tokens a filler token rarely equals
    one of the keys, but with the small vocabularies a CPU run uses it often would, and
    such a token is a false earlier occurrence of the key: so the keys are excluded.)
    """
    n = _checks.integer(n, "n", minimum=1)
    seq_len = _checks.integer(seq_len, "seq_len", minimum=4)
    p = _checks.integer(num_kv_pairs, "num_kv_pairs", minimum=1)
    vocab_size = _checks.integer(vocab_size, "vocab_size", minimum=4)
    if seq_len % 2:
        raise ValueError(f"seq_len must be even, got {seq_len}")
    if 4 * p > seq_len:
        raise ValueError(f"num_kv_pairs must be <= seq_len / 4 = {seq_len // 4} (the pairs "
                         f"take 2·num_kv_pairs tokens and the queries need as many even "
                         f"slots after them), got {p}")
    half = vocab_size // 2
    if half - 1 < p:
        raise ValueError(f"vocab_size {vocab_size} gives {half - 1} keys, fewer than "
                         f"num_kv_pairs = {p}")
    if not (isinstance(power_a, (int, float)) and 0 < power_a <= 1):
        raise ValueError(f"power_a must be in (0, 1], got {power_a!r}")
    context = 2 * p
    space = (seq_len - context) // 2                                # query slots
    prob = np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)  # (space,)
    prob /= prob.sum()
    tokens = np.zeros((n, seq_len), dtype=np.int64)
    targets = np.full((n, seq_len), IGNORE, dtype=np.int64)
    for r in range(n):
        keys = 1 + rng.choice(half - 1, size=p, replace=False)        # (P,)
        values = half + rng.choice(vocab_size - half, size=p, replace=False)  # (P,)
        gaps = rng.choice(space, size=p, replace=False, p=prob)       # (P,) slot per key
        tokens[r, 0:context:2] = keys
        tokens[r, 1:context:2] = values
        if random_non_queries:
            # uniform over the vocabulary without this sequence's keys: a filler token
            # equal to a key would be a false earlier occurrence of it
            others = np.setdiff1d(np.arange(vocab_size), keys)      # (V − P,)
            tokens[r, context:] = others[rng.integers(0, len(others), size=seq_len - context)]
        pos = context + 2 * gaps                                      # (P,) query positions
        tokens[r, pos] = keys
        targets[r, pos] = values
    return RecallData(tokens, targets, vocab_size, p)

