"""The sweep's PNG plots (matplotlib, Agg backend): written by ``tools/sweep.py fit`` and ``report``.

* ``isoflop.png``: loss vs N per budget, the approach-2 parabolas and their minima (stars);
* ``optimal_scaling.png``: N*(C) and D*(C) log-log: the minima, approach 2's power laws with their 95%
  bands extrapolated to the target compute, and approach 3's compute-optimal curve;
* ``loss_vs_compute.png``: every run's loss against its FLOPs, and the frontier (approach 3's loss at
  its optimal allocation, across compute);
* ``residuals.png``: ln(loss / approach 3's prediction) per run against N, coloured by budget.
"""
from __future__ import annotations

import os

import numpy as np

from glmjax.scaling import approach2, approach3
from glmjax.scaling.fit import _fpt
from glmjax.scaling.table import Table

FILES = ("isoflop.png", "optimal_scaling.png", "loss_vs_compute.png", "residuals.png")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(fit: dict, table: Table, out_dir: str) -> list[str]:
    plt = _plt()
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    budgets = table.budgets
    colors = {c: plt.cm.viridis(i / max(len(budgets) - 1, 1)) for i, c in enumerate(budgets)}
    f3, f2 = fit["approach3"], fit["approach2"]
    has2 = "error" not in f2

    fig, ax = plt.subplots(figsize=(7, 5))
    for c in budgets:
        rows = table.subset(table.budget == c)
        ax.scatter(rows.params, rows.loss, color=colors[c], label=f"C={c:.2g}")
    if has2:
        for m in f2["minima"]:
            rows = table.subset(table.budget == m["flops"])
            x = np.linspace(np.log(rows.params.min()) - 0.3, np.log(rows.params.max()) + 0.3, 100)
            ax.plot(np.exp(x), np.polyval(m["coefficients"], x), color=colors[m["flops"]], alpha=0.7)
            ax.scatter([m["params"]], [m["loss"]], marker="*", s=180, color=colors[m["flops"]], edgecolor="k", zorder=5)
    ax.set(xscale="log", xlabel="parameters N (non-embedding)", ylabel="loss", title="IsoFLOP curves (approach 2)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir, FILES[0]))

    target = fit["target_flops"]
    has3 = "error" not in f3
    lo_c = min(budgets) / 2
    cs = np.exp(np.linspace(np.log(lo_c), np.log(max(target, max(budgets)) * 2), 60))
    opt3 = [approach3.optimal_allocation(f3, c, _fpt(fit["flops_per_token"])) for c in cs] if has3 else []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label in ((axes[0], "params", "N*"), (axes[1], "tokens", "D*")):
        if has3:
            ax.plot(cs, [o[key] for o in opt3], "C1--", label="approach 3 (optimal allocation)")
        if has2:
            y, lo, hi = approach2.evaluate_law(f2["laws"][key], cs, interval=True)
            slope = f2["a"] if key == "params" else f2["b"]
            ax.plot(cs, y, "C0-", label=f"approach 2: {label} ~ C^{slope:.3f}")
            if np.isfinite(lo).all():
                ax.fill_between(cs, lo, hi, color="C0", alpha=0.15, label="95% band (t)")
            ax.scatter([m["flops"] for m in f2["minima"]], [m[key] for m in f2["minima"]], color="k", zorder=5,
                       label="IsoFLOP minima")
        ax.axvline(target, color="gray", ls=":", label=f"target C={target:.2g}")
        ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel=label, title=f"{label}(C)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir, FILES[1]))

    fig, ax = plt.subplots(figsize=(7, 5))
    for c in budgets:
        rows = table.subset(table.budget == c)
        ax.scatter(rows.flops, rows.loss, color=colors[c], alpha=0.8)
    if has3:
        ax.plot(cs, [o["loss"] for o in opt3], "C1-", label="frontier (approach 3)")
    if has2:
        ax.plot(cs, approach2.evaluate_law(f2["laws"]["loss"], cs), "C0--", label="approach 2 minima law")
    ax.set(xscale="log", xlabel="compute C (FLOPs)", ylabel="loss", title="loss vs compute")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir, FILES[2]))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if has3:
        res = np.log(table.loss / approach3.predict_loss(f3, table.params, table.tokens))
        for c in budgets:
            sel = table.budget == c
            ax.scatter(table.params[sel], res[sel], color=colors[c], label=f"C={c:.2g}")
    else:  # the runs on the N axis, the reason in the title
        for c in budgets:
            sel = table.budget == c
            ax.scatter(table.params[sel], np.zeros(int(sel.sum())), color=colors[c], marker="x", label=f"C={c:.2g}")
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xscale="log", xlabel="parameters N", ylabel="ln(loss / fit)",
           title="approach 3 residuals" if has3 else "approach 3 not fitted (no fit with exponents >= 0)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir, FILES[3]))
    return paths


def _save(fig, out_dir, name):
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path
