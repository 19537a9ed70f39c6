"""Plot training curves from one or more runs' ``metrics.jsonl``.

    python tools/plot_metrics.py runs/tiny runs/other --out=loss.png

Draws train loss and eval loss against step (one colour per run), and tokens/s on a second panel.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def read_metrics(path: str) -> list[dict]:
    """Records of ``path`` (a workdir or a metrics.jsonl file); bad lines are skipped with a count."""
    file = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file} does not exist: pass a run's --workdir or its metrics.jsonl")
    records, bad = [], 0
    with open(file) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    if bad:
        print(f"{file}: skipped {bad} unreadable line(s)", file=sys.stderr)
    return records


def plot(runs: dict[str, list[dict]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_tps) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, recs) in enumerate(runs.items()):
        color = f"C{i}"
        train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r]
        tps = [(r["step"], r["tokens_per_second"]) for r in recs if r.get("tokens_per_second")]
        if train:
            ax_loss.plot(*zip(*train), color=color, alpha=0.6, label=f"{name} train")
        if evals:
            ax_loss.plot(*zip(*evals), "o--", color=color, label=f"{name} eval")
        if tps:
            ax_tps.plot(*zip(*tps), color=color, label=name)
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax_tps.set(xlabel="step", ylabel="tokens / s", title="throughput")
    for ax in (ax_loss, ax_tps):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Plot loss / eval loss / tokens/s of runs from metrics.jsonl.")
    p.add_argument("runs", nargs="+", help="run workdirs or metrics.jsonl files")
    p.add_argument("--out", default="metrics.png", help="output image (PNG/SVG/PDF by extension)")
    args = p.parse_args(argv)
    runs = {os.path.basename(os.path.normpath(r)) or r: read_metrics(r) for r in args.runs}
    plot(runs, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
