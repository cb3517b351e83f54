"""What ``python -m tinyeff demo`` prints and writes: the comparison table, the notes on how
each column is measured, the sweep table, and the files in ``--out`` (results.json,
results.csv, curves.csv, sweep.csv, and with matplotlib curves.png and scaling.png).

``result`` is the dict that results.json holds: command, title, machine, task, data,
config, ``runs`` (one record per variant, from :func:`tinyeff.cli._demo_train.train_one`),
``sweep`` (from :func:`tinyeff.cli._demo_train.sweep_one`) and ``notes``.
"""

from __future__ import annotations

import json
import math
import os

from .report import plot_scaling, write_csv, write_json

_COLUMNS = ("variant", "params", "val loss", "bits/char", "acc", "ms/step", "tokens/s",
            "peak MiB", "warm-up s")


def notes(data) -> list[str]:
    """How the table's columns are measured, for the task ``data``."""
    metric = {"lm": "; bits/char = val loss / ln 2; acc = next-byte accuracy",
              "recall": "; val loss and acc at the query positions only (acc = fraction of "
                        "held-out queries answered with the right value)"}.get(
        data.kind, f"; acc = classification accuracy (majority class "
                   f"{100 * getattr(data, 'majority', 0.0):.1f}%)")
    return ["val loss: mean cross-entropy (nats) on the fixed validation set after the last "
            "step" + metric,
            "ms/step: median wall time of a training step (forward, backward, AdamW); "
            "tokens/s = batch·N / step time; warm-up s = step 0 (Numba compile or cache "
            "load)",
            "peak MiB: tracemalloc peak of one training step above the memory held before "
            "it (NumPy arrays; parameters and optimizer state not counted)"]


def table_rows(records: list, kind: str) -> list[list[str]]:
    """One row of cells per record; a run with no result is its name and its status."""
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


def format_sweep(sweep: list, sweep_ns: list[int]) -> str:
    """The sweep as a table: one row per variant, ``ms / peak MiB`` per sequence length."""
    lines = ["sweep (batch 1, forward+backward ms / tracemalloc peak MiB):",
             f"{'variant':<13}" + "".join(f"{'N=' + str(n):>18}" for n in sweep_ns)]
    for name in dict.fromkeys(s["variant"] for s in sweep):
        cells = []
        for n in sweep_ns:
            s = next(s for s in sweep if s["variant"] == name and s["n"] == n)
            cells.append(f"{s['ms']:.0f} / {s['peak_bytes'] / 2**20:.1f}" if "ms" in s
                         else "failed")
        lines.append(f"{name:<13}" + "".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)


def print_summary(result: dict, sweep_ns: list[int]) -> None:
    """The final report on stdout: table, notes, options, sweep and total time."""
    runs, machine = result["runs"], result["machine"]
    print()
    print(f"## {result['title']}")
    print(format_table(runs, result["config"]["kind"]))
    print()
    for note in result["notes"]:
        print(f"- {note}")
    print("- options: " + "; ".join(f"{r['variant']} {r['options']}" for r in runs
                                     if r.get("options")))
    if result["sweep"]:
        print("\n" + format_sweep(result["sweep"], sweep_ns))
    print(f"\ntotal time {result['total_s']:.0f} s ({machine['cores']} cores, "
          f"{machine['date'][:10]})")


def write_outputs(out: str, result: dict) -> list[str]:
    """results.json, results.csv, curves.csv and (with a sweep) sweep.csv; their paths."""
    os.makedirs(out, exist_ok=True)
    kind = result["config"]["kind"]
    written = [write_json(os.path.join(out, "results.json"), result)]
    rows = []
    for r in result["runs"]:
        ok = "val_loss" in r
        rows.append([r["variant"], r["status"], r.get("params", ""),
                     f"{r['val_loss']:.6f}" if ok else "",
                     f"{r['bits_per_char']:.6f}" if ok and kind == "lm" else "",
                     f"{r['val_acc']:.6f}" if ok else "",
                     f"{r['ms_per_step']:.3f}" if ok else "",
                     f"{r['tokens_per_s']:.1f}" if ok else "",
                     f"{r['peak_bytes'] / 2**20:.3f}" if "peak_bytes" in r else "",
                     f"{r['warmup_s']:.3f}" if "warmup_s" in r else "",
                     r.get("steps", ""), json.dumps(r.get("options", {}))])
    written.append(write_csv(os.path.join(out, "results.csv"),
                             ["variant", "status", "params", "val_loss", "bits_per_char",
                              "val_acc", "ms_per_step", "tokens_per_s", "peak_mib",
                              "warmup_s", "steps", "options"], rows))
    rows = [[r["variant"], p["step"], f"{p['train_time_s']:.4f}", f"{p['val_loss']:.6f}",
             f"{p['val_acc']:.6f}"] for r in result["runs"] for p in r.get("curve", [])]
    written.append(write_csv(os.path.join(out, "curves.csv"),
                             ["variant", "step", "train_time_s", "val_loss", "val_acc"], rows))
    if result["sweep"]:
        rows = [[s["variant"], s["n"], f"{s['ms']:.3f}" if "ms" in s else "",
                 f"{s['ms_min']:.3f}" if "ms_min" in s else "",
                 f"{s['peak_bytes'] / 2**20:.3f}" if "peak_bytes" in s else "",
                 s.get("note", "")] for s in result["sweep"]]
        written.append(write_csv(os.path.join(out, "sweep.csv"),
                                 ["variant", "n", "ms_median", "ms_min", "peak_mib", "note"],
                                 rows))
    return written


def plot(out: str, result: dict) -> list[str]:
    """curves.png and (with a sweep) scaling.png; ImportError without matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    written = [os.path.join(out, "curves.png")]
    fig.savefig(written[0], dpi=110)
    plt.close(fig)
    sweep = [s for s in result["sweep"] if "ms" in s]
    series = {}
    for s in sweep:
        ns, ms, mib = series.setdefault(s["variant"], ([], [], []))
        ns.append(s["n"])
        ms.append(s["ms"])
        mib.append(max(s["peak_bytes"], 1) / 2**20)
    if series:
        written.append(plot_scaling(os.path.join(out, "scaling.png"), series,
                                    ("forward+backward ms (batch 1)",
                                     "tracemalloc peak MiB (batch 1)"), result["title"],
                                    xlabel="sequence length N", dpi=110))
    return written
