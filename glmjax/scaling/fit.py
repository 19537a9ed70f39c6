"""Both Chinchilla fits of a results table, predictions at a target compute, and the holdout check.

``fit_all(table, target_flops)`` returns what ``fit.json`` holds:

* ``approach3``: ``E, A, B, alpha, beta, objective, ci95, n_points`` (:mod:`glmjax.scaling.approach3`);
* ``approach2``: ``a, b, minima, ci95`` (:mod:`glmjax.scaling.approach2`), or ``{"error": ...}`` when the
  table has no two budgets with an IsoFLOP minimum (published data without budgets);
* ``approach3`` is ``{"error": ...}`` too when no fit with exponents >= 0 exists (losses that do not fall
  with N and D); then ``prediction`` is None and the ``residuals`` rows carry ``predicted: None``;
* ``prediction`` (approach 3) and ``prediction_approach2``: ``flops, params, tokens, tokens_per_param,
  loss`` at ``target_flops`` (default: 10x the largest budget, marked ``target_flops_default``);
* ``holdout``: both fits refitted without the largest budget, their error predicting that budget's
  losses (approach 3) and its optimum (both; the optimum "measured" is the held-out budget's own parabola
  minimum). This is how far an extrapolation by one budget step can be trusted.
* ``flops_per_token``: the table's FLOPs per token as ``c * N^g`` (least squares on ln(flops / tokens));
  exactly ``6 N`` for a table without a ``flops`` column. Approach 3's prediction spends C as
  ``D = C / (c N^g)``, the same FLOP count the table was planned and measured with.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from glmjax.scaling import approach2, approach3
from glmjax.scaling.table import FitError, Table


def flops_per_token_model(table: Table) -> dict:
    x, y = np.log(table.params), np.log(table.flops / table.tokens)
    if np.ptp(x) < 1e-12:
        g, c = 1.0, float(np.mean(y - x))
    else:
        g, c = (float(v) for v in np.polyfit(x, y, 1))
    return {"c": float(math.exp(c)), "g": g}


def _fpt(model):
    return lambda n: model["c"] * np.asarray(n, float) ** model["g"]


def fit_all(table: Table, target_flops: float | None = None, *, grid=None, bootstrap: int = 200,
            seed: int = 0, holdout: bool = True) -> dict:
    if len(table) < approach3.N_PARAMS:
        raise FitError(f"{table.source}: {len(table)} point(s), fewer than the {approach3.N_PARAMS} parameters of "
                       f"approach 3 (E, A, B, alpha, beta): fit at least {approach3.N_PARAMS} finished runs")
    out = {"source": table.source, "n_points": len(table), "budgets": table.budgets}
    fpt = flops_per_token_model(table)
    out["flops_per_token"] = fpt
    default = target_flops is None
    target = float(10.0 * max(table.budgets) if default else target_flops)
    if not target > 0:
        raise FitError(f"--target_flops={target_flops} must be a positive FLOP count, e.g. 1e21")
    out["target_flops"] = target
    try:
        out["approach3"] = approach3.fit_approach3(table.params, table.tokens, table.loss, grid=grid,
                                                   bootstrap=bootstrap, seed=seed)
        out["prediction"] = approach3.optimal_allocation(out["approach3"], target, _fpt(fpt))
        out["prediction"]["target_flops_default"] = default
    except FitError as e:  # no admissible fit: report it, the rest (approach 2, plots of the runs) goes on
        out["approach3"] = {"error": str(e), "n_points": len(table)}
        out["prediction"] = None
    try:
        fit2 = approach2.fit_approach2(table)
        out["approach2"] = fit2
        out["prediction_approach2"] = approach2.predict(fit2, target)
    except FitError as e:
        out["approach2"] = {"error": str(e)}
        out["prediction_approach2"] = None
    out["residuals"] = residuals(out["approach3"], table)
    if holdout:
        out["holdout"] = holdout_check(table, grid=grid, fpt=fpt)
    return out


def residuals(fit3: dict, table: Table) -> list[dict]:
    """Every run with approach 3's prediction and ln residual (both None when approach 3 is not fitted)."""
    fitted = "error" not in fit3
    pred = approach3.predict_loss(fit3, table.params, table.tokens) if fitted else [None] * len(table)
    return [{"run": r, "flops": float(c), "params": float(n), "tokens": float(d), "loss": float(l),
             "predicted": None if p is None else float(p), "log_residual": None if p is None else float(math.log(l / p))}
            for r, c, n, d, l, p in zip(table.run, table.budget, table.params, table.tokens, table.loss, pred)]


def _rel(pred, true):
    return float(pred / true - 1.0)


def holdout_check(table: Table, *, grid=None, fpt=None) -> dict:
    budgets = table.budgets
    if len(budgets) < 2:
        return {"error": "one budget only: nothing to hold out"}
    last = budgets[-1]
    train, test = table.subset(table.budget < last), table.subset(table.budget == last)
    out = {"budget": last, "n_fit_points": len(train), "n_heldout": len(test)}
    try:
        measured = approach2.parabola_minimum(test.params, test.tokens, test.loss)
        measured = {k: measured[k] for k in ("params", "tokens", "loss")}
    except FitError as e:
        measured = None
        out["optimum_note"] = f"the held-out budget has no parabola minimum of its own ({e})"
    out["measured_optimum"] = measured
    try:
        if len(train) < approach3.N_PARAMS:
            raise FitError(f"{len(train)} points without the largest budget, fewer than 5")
        f3 = approach3.fit_approach3(train.params, train.tokens, train.loss, grid=grid, bootstrap=0)
    except FitError as e:
        f3, out["approach3"] = None, {"error": str(e)}
    if f3 is not None:
        pred = approach3.predict_loss(f3, test.params, test.tokens)
        err = pred / test.loss - 1.0
        a3 = {"fit": {k: f3[k] for k in approach3.NAMES},
              "loss_mean_abs_rel_error": float(np.mean(np.abs(err))),
              "loss_max_abs_rel_error": float(np.max(np.abs(err)))}
        opt = approach3.optimal_allocation(f3, last, _fpt(fpt or flops_per_token_model(table)))
        a3["optimum"] = opt
        if measured:
            a3["optimum_rel_error"] = {k: _rel(opt[k], measured[k]) for k in ("params", "tokens", "loss")}
        out["approach3"] = a3
    try:
        f2 = approach2.fit_approach2(train)
        opt = approach2.predict(f2, last)
        a2 = {"a": f2["a"], "b": f2["b"], "optimum": opt}
        if measured:
            a2["optimum_rel_error"] = {k: _rel(opt[k], measured[k]) for k in ("params", "tokens", "loss")}
        out["approach2"] = a2
    except FitError as e:
        out["approach2"] = {"error": str(e)}
    return out


def write_fit(fit: dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "fit.json")
    with open(path, "w") as f:
        json.dump(fit, f, indent=1, default=float)
    return path


def summary(fit: dict) -> list[str]:
    """A few lines for the console and report.md."""
    f3, lines = fit["approach3"], []
    ci = f3.get("ci95", {})

    def band(k):
        if k not in ci:
            return ""
        lo, hi = ci[k]
        return f" [{'?' if lo is None else f'{lo:.4g}'}, {'unbounded' if hi is None else f'{hi:.4g}'}]"

    if "error" in f3:
        lines.append(f"approach 3: not fitted ({f3['error']})")
    else:
        lines.append("approach 3: L = E + A/N^alpha + B/D^beta with " + ", ".join(
            f"{k}={f3[k]:.4g}{band(k)}" for k in approach3.NAMES) + f" ({f3['n_points']} points)")
    f2 = fit["approach2"]
    if "error" in f2:
        lines.append(f"approach 2: not fitted ({f2['error']})")
    else:
        cia, cib = f2["ci95"]["a"], f2["ci95"]["b"]
        lines.append(f"approach 2: N* ~ C^{f2['a']:.3f}" + (f" [{cia[0]:.3f}, {cia[1]:.3f}]" if cia else "") +
                     f", D* ~ C^{f2['b']:.3f}" + (f" [{cib[0]:.3f}, {cib[1]:.3f}]" if cib else "") +
                     f" over {f2['n_budgets']} budgets")
    for key, label in (("prediction", "approach 3"), ("prediction_approach2", "approach 2")):
        p = fit.get(key)
        if p:
            lines.append(f"at C={p['flops']:.3g} ({label}): N={p['params']:.4g}, D={p['tokens']:.4g} "
                         f"({p['tokens_per_param']:.1f} tokens/param), loss {p['loss']:.4f}")
    h = fit.get("holdout", {})
    if "approach3" in h and "loss_mean_abs_rel_error" in h["approach3"]:
        lines.append(f"holdout (largest budget C={h['budget']:.3g} left out): approach 3 predicts its losses to "
                     f"{h['approach3']['loss_mean_abs_rel_error']:.2%} mean / "
                     f"{h['approach3']['loss_max_abs_rel_error']:.2%} max relative error")
        for key in ("approach3", "approach2"):
            e = h.get(key, {}).get("optimum_rel_error")
            if e:
                lines.append(f"  {key} optimum vs the held-out parabola minimum: N {e['params']:+.1%}, "
                             f"D {e['tokens']:+.1%}, loss {e['loss']:+.2%}")
    return lines
