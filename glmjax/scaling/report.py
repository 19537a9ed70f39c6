"""``report``: fit a plan's ``results.csv``, draw the plots and write ``report.md`` beside them."""
from __future__ import annotations

import os

from glmjax.scaling.fit import fit_all, summary, write_fit
from glmjax.scaling.plots import write_plots
from glmjax.scaling.table import read_table


def fit_and_plot(results: str, out_dir: str, target_flops=None, *, loss_column=None, bootstrap: int = 200,
                 grid=None, plots: bool = True) -> tuple[dict, list[str]]:
    table = read_table(results, loss_column)
    fit = fit_all(table, target_flops, bootstrap=bootstrap, grid=grid)
    write_fit(fit, out_dir)
    return fit, (write_plots(fit, table, out_dir) if plots else [])


def write_report(plan_dir: str, target_flops=None, *, bootstrap: int = 200, grid=None) -> str:
    results = os.path.join(plan_dir, "results.csv")
    fit, plots = fit_and_plot(results, plan_dir, target_flops, bootstrap=bootstrap, grid=grid)
    lines = [f"# Scaling-law sweep report: {os.path.abspath(plan_dir)}", "",
             f"{fit['n_points']} runs over {len(fit['budgets'])} budgets "
             f"({', '.join(f'{c:.3g}' for c in fit['budgets'])} FLOPs); fits in fit.json.", ""]
    lines += [f"- {s}" for s in summary(fit)]
    f2 = fit["approach2"]
    if "error" not in f2:
        lines += ["", "## IsoFLOP minima (approach 2)", "", "| C (FLOPs) | N* | D* | loss* | runs | inside the sizes |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {m['flops']:.3g} | {m['params']:.4g} | {m['tokens']:.4g} | {m['loss']:.4f} | {m['n_points']} | "
                  f"{'yes' if m['inside'] else 'no (extrapolated)'} |" for m in f2["minima"]]
    lines += ["", "## Runs", "", "| run | N | D | FLOPs budget | loss | approach 3 | ln residual |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['params']:.4g} | {r['tokens']:.4g} | {r['flops']:.3g} | {r['loss']:.4f} | "
              + ("not fitted | |" if r["predicted"] is None else f"{r['predicted']:.4f} | {r['log_residual']:+.4f} |")
              for r in fit["residuals"]]
    lines += ["", "## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    path = os.path.join(plan_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
