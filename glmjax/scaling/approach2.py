"""Chinchilla approach 2: a parabola in ln N per IsoFLOP budget, then power laws N*(C), D*(C), L*(C).

Per budget C (rows grouped by :mod:`glmjax.scaling.table`): least squares ``loss = p0 + p1 x + p2 x^2``,
``x = ln N``; the minimum ``x* = -p1 / (2 p2)`` gives ``N*``; ``D*`` comes from the budget's own rows,
``ln D`` fitted linear in ``ln N`` and read at ``x*`` (exactly ``C / (6 N*)`` when FLOPs are 6ND, and
the table's own FLOP count otherwise); ``L*`` is the parabola at ``x*``. A budget with fewer than 3
distinct sizes, or whose parabola opens downwards (no minimum: the sizes do not bracket the optimum),
is left out and listed under ``skipped`` with the reason.

Then ``ln N* = ln k_N + a ln C``, ``ln D* = ln k_D + b ln C`` and ``ln L* = ln k_L + l ln C`` by least
squares over the budgets. ``ci95`` of a, b (and of the predictions, the plot's bands) are Student-t
intervals of that regression with ``n_budgets - 2`` degrees of freedom: honest and wide for 3 budgets
(t = 12.7 at 1 dof); with 2 budgets there is no interval (null).
"""
from __future__ import annotations

import math

import numpy as np

from glmjax.scaling.table import FitError, Table

T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t95(dof: int) -> float:
    """Two-sided 95% Student-t quantile (table; 1.96 beyond 30 dof)."""
    if dof <= 0:
        return math.nan
    keys = [k for k in sorted(T95) if k <= dof]
    return T95[keys[-1]] if dof <= 30 else 1.96


def parabola_minimum(params, tokens, loss) -> dict:
    """The vertex of ``loss ~ parabola(ln N)``; raises FitError when there is none."""
    x = np.log(params)
    if len(set(np.round(x, 12))) < 3:
        raise FitError(f"{len(set(params))} distinct size(s): a parabola needs 3")
    p2, p1, p0 = np.polyfit(x, loss, 2)
    if not p2 > 0:
        raise FitError(f"the parabola opens downwards (curvature {p2:.3g}): the sizes do not bracket the optimum")
    xs = -p1 / (2 * p2)
    slope, icpt = np.polyfit(x, np.log(tokens), 1)
    return {"params": float(math.exp(xs)), "tokens": float(math.exp(icpt + slope * xs)),
            "loss": float(p0 + p1 * xs + p2 * xs * xs), "coefficients": [float(p2), float(p1), float(p0)],
            "inside": bool(x.min() <= xs <= x.max())}


def power_law(ln_c: np.ndarray, ln_y: np.ndarray) -> dict:
    """Least squares ``ln y = icpt + slope ln C`` with what the t-intervals need."""
    n = len(ln_c)
    slope, icpt = np.polyfit(ln_c, ln_y, 1)
    resid = ln_y - (icpt + slope * ln_c)
    dof = n - 2
    sxx = float(((ln_c - ln_c.mean()) ** 2).sum())
    s2 = float((resid ** 2).sum() / dof) if dof > 0 else math.nan
    se = math.sqrt(s2 / sxx) if dof > 0 and sxx > 0 else math.nan
    return {"slope": float(slope), "intercept": float(icpt), "s2": s2, "sxx": sxx, "mean_ln_c": float(ln_c.mean()),
            "n": n, "se_slope": se}


def evaluate_law(law: dict, flops, interval: bool = False):
    """The law at ``flops`` (array); with ``interval``, also the 95% band of the fitted mean line."""
    ln_c = np.log(np.asarray(flops, float))
    y = np.exp(law["intercept"] + law["slope"] * ln_c)
    if not interval:
        return y
    dof = law["n"] - 2
    if dof <= 0:
        return y, np.full_like(y, np.nan), np.full_like(y, np.nan)
    half = t95(dof) * np.sqrt(law["s2"] * (1 / law["n"] + (ln_c - law["mean_ln_c"]) ** 2 / law["sxx"]))
    return y, y * np.exp(-half), y * np.exp(half)


def fit_approach2(table: Table) -> dict:
    """Minima per budget and the power laws; raises FitError when fewer than 2 budgets have a minimum."""
    minima, skipped = [], []
    for c in table.budgets:
        rows = table.subset(table.budget == c)
        try:
            m = parabola_minimum(rows.params, rows.tokens, rows.loss)
        except FitError as e:
            skipped.append({"flops": c, "n_points": len(rows), "reason": str(e)})
            continue
        minima.append({"flops": c, "n_points": len(rows), **m})
    if len(minima) < 2:
        why = "; ".join(f"C={s['flops']:.3g}: {s['reason']}" for s in skipped) or "only one budget in the table"
        raise FitError(f"approach 2 needs IsoFLOP minima at >= 2 budgets, got {len(minima)} ({why}): plan >= 3 "
                       f"sizes per budget that bracket the optimum (tools/sweep.py plan does)")
    ln_c = np.log([m["flops"] for m in minima])
    laws = {k: power_law(ln_c, np.log([m[k] for m in minima])) for k in ("params", "tokens", "loss")}

    def ci(law):
        if not math.isfinite(law["se_slope"]):
            return None
        h = t95(law["n"] - 2) * law["se_slope"]
        return [law["slope"] - h, law["slope"] + h]

    return {"a": laws["params"]["slope"], "b": laws["tokens"]["slope"], "loss_exponent": laws["loss"]["slope"],
            "minima": minima, "skipped": skipped, "laws": laws,
            "ci95": {"a": ci(laws["params"]), "b": ci(laws["tokens"])}, "n_budgets": len(minima)}


def predict(fit2: dict, flops: float) -> dict:
    n = float(evaluate_law(fit2["laws"]["params"], [flops])[0])
    d = float(evaluate_law(fit2["laws"]["tokens"], [flops])[0])
    out = {"flops": float(flops), "params": n, "tokens": d, "tokens_per_param": d / n,
           "loss": float(evaluate_law(fit2["laws"]["loss"], [flops])[0])}
    bands = {}
    for key in ("params", "tokens", "loss"):
        _, lo, hi = evaluate_law(fit2["laws"][key], [flops], interval=True)
        bands[key] = None if not np.isfinite(lo[0]) else [float(lo[0]), float(hi[0])]
    out["ci95"] = bands
    return out
