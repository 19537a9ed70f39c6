"""The results table the fits read: any CSV with ``params,tokens,loss`` (optional ``flops``, ``budget``).

Checked before anything is fitted (one-line errors saying what, why and the fix): the columns exist,
every value is a finite positive number. Rows whose loss is empty (a run that has not finished) are
dropped with a note.

* ``flops`` missing: ``6 * params * tokens`` (Kaplan/Chinchilla's count; glmjax's sweeps write the exact
  count of :mod:`glmjax.scaling.flops`).
* Budgets (the IsoFLOP groups of approach 2): the ``budget`` column when present, else rows whose
  ``flops`` lie within ``BUDGET_TOLERANCE`` (10%) of each other, walking up the sorted values, form one
  budget, named by their geometric mean.
"""
from __future__ import annotations

import csv
import dataclasses
import math

import numpy as np

REQUIRED = ("params", "tokens")
BUDGET_TOLERANCE = 0.10


class FitError(ValueError):
    """The input of a fit is unusable; the message says what, why and how to fix it."""


@dataclasses.dataclass
class Table:
    params: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    flops: np.ndarray
    budget: np.ndarray  # the IsoFLOP group of each row (FLOPs)
    run: list
    source: str = ""

    def __len__(self) -> int:
        return len(self.loss)

    def subset(self, mask) -> "Table":
        mask = np.asarray(mask)
        idx = np.flatnonzero(mask) if mask.dtype == bool else mask
        return Table(self.params[idx], self.tokens[idx], self.loss[idx], self.flops[idx], self.budget[idx],
                     [self.run[i] for i in idx], self.source)

    @property
    def budgets(self) -> list[float]:
        return sorted(set(float(b) for b in self.budget))


def group_budgets(flops: np.ndarray, tolerance: float = BUDGET_TOLERANCE) -> np.ndarray:
    """The budget of each row: runs whose FLOPs lie within ``tolerance`` of the group's first share one."""
    order = np.argsort(flops)
    out = np.empty_like(flops, dtype=float)
    group: list[int] = []

    def close(g):
        out[g] = math.exp(float(np.mean(np.log(flops[g]))))

    for i in order:
        if group and flops[i] > flops[group[0]] * (1 + tolerance):
            close(group)
            group = []
        group.append(i)
    if group:
        close(group)
    return out


def read_table(path: str, loss_column: str | None = None) -> Table:
    """Read and check a results CSV. ``loss_column`` None: ``eval_loss`` if the file has it, else ``loss``."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): v for k, v in r.items()} for r in reader]
    except FileNotFoundError:
        raise FitError(f"{path} does not exist: pass --results=FILE.csv (a sweep writes PLAN_DIR/results.csv "
                       f"when `tools/sweep.py run` collects it)") from None
    if loss_column is None:
        loss_column = "eval_loss" if "eval_loss" in columns else "loss"
    missing = [c for c in (*REQUIRED, loss_column) if c not in columns]
    if missing:
        raise FitError(f"{path} has no column {', '.join(repr(m) for m in missing)} (it has: {', '.join(columns)}): "
                       f"the fit needs params,tokens,loss per run (optional flops); rename the columns or pass "
                       f"--loss_column=NAME")
    return table_from_rows(rows, loss_column, source=path)


def _number(row, key, where):
    raw = (row.get(key) or "").strip()
    try:
        value = float(raw)
    except ValueError:
        raise FitError(f"{where}: {key}={raw!r} is not a number: every row needs numeric params, tokens and "
                       f"loss (fix or delete that row)") from None
    if not math.isfinite(value) or value <= 0:
        raise FitError(f"{where}: {key}={raw} is not a positive finite number: parameters, tokens, FLOPs and "
                       f"losses enter the fit through their logarithms; fix or delete that row")
    return value


def table_from_rows(rows: list[dict], loss_column: str = "loss", source: str = "<rows>") -> Table:
    p, t, l, c, b, names, skipped = [], [], [], [], [], [], 0
    has_flops = bool(rows) and all((r.get("flops") or "").strip() for r in rows)
    has_budget = bool(rows) and all((r.get("budget") or "").strip() for r in rows)
    for i, row in enumerate(rows):
        where = f"{source} row {i + 2}"  # 1-based, after the header line
        if not str(row.get(loss_column, "") or "").strip():
            skipped += 1
            continue
        p.append(_number(row, "params", where))
        t.append(_number(row, "tokens", where))
        l.append(_number(row, loss_column, where))
        c.append(_number(row, "flops", where) if has_flops else 6.0 * p[-1] * t[-1])
        if has_budget:
            b.append(_number(row, "budget", where))
        names.append(str(row.get("run") or f"row{i + 2}"))
    if skipped:
        print(f"{source}: {skipped} row(s) without a {loss_column} (unfinished runs) left out")
    flops = np.asarray(c, float)
    budget = np.asarray(b, float) if has_budget else group_budgets(flops)
    return Table(np.asarray(p, float), np.asarray(t, float), np.asarray(l, float), flops, budget, names, source)
