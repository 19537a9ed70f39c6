"""Chinchilla approach 3: ``L(N, D) = E + A / N^alpha + B / D^beta`` fitted to every run's final loss.

Parameters ``theta = (a, b, e, alpha, beta)`` with ``A = exp(a), B = exp(b), E = exp(e)``. The objective
(Hoffmann et al. 2022, as replicated by Besiroglu et al. 2024) is

    sum_i Huber_delta( LSE(a - alpha ln N_i, b - beta ln D_i, e) - ln L_i ),   delta = 1e-3,

minimised with L-BFGS (:mod:`glmjax.scaling.lbfgs`: numpy, float64, analytic gradient, all starts in
one batch) from every point of a grid of starts; the lowest objective is kept. The optimiser sees the
objective divided by ``delta^2`` (the same minimiser; a stopping test relative to ``max(|f|, 1)`` would
otherwise end an objective of order ``n * delta^2`` before convergence).

Only optima with ``alpha >= 0`` and ``beta >= 0`` count (the law's domain: loss that does not rise
with N or D). On a table whose losses barely depend on N (runs too short or evaluations too noisy to
tell the sizes apart) the unconstrained optimum can run off to a negative exponent with ``A`` underflowing
to 0, a step function that predicts nothing; the best optimum inside the domain is kept instead (there,
typically ``A / N^alpha`` negligible: "no measurable N dependence"), and a table with none is a
:class:`FitError`.

95% intervals: a bootstrap over points. Each replicate refits a resample (with replacement) of the
rows (as integer weights), starting from the full fit's optimum and the ``bootstrap_starts`` next best
distinct grid optima (rerunning the whole grid per replicate would cost the grid size times more for
the same answer in practice); the interval is the 2.5-97.5 percentile of the replicates' values.
"""
from __future__ import annotations

import itertools

import numpy as np

from glmjax.scaling.lbfgs import minimize_batch
from glmjax.scaling.table import FitError

NAMES = ("E", "A", "B", "alpha", "beta")
N_PARAMS = 5
DELTA = 1e-3
# Grid of starts (theta = a, b, e, alpha, beta): 3^5 = 243 points, spanning Chinchilla's fit (a=6.0,
# b=6.9, e=0.52, alpha=0.34, beta=0.28) and small-model fits (losses of 2-8 nats). Hoffmann et al.'s
# 4,500-point grid costs 20x more; on every table tried the optimum was the same.
GRID = dict(a=(0.0, 6.0, 15.0), b=(0.0, 6.0, 15.0), e=(-1.0, 0.5, 1.5), alpha=(0.2, 0.5, 1.0),
            beta=(0.2, 0.5, 1.0))
SMALL_GRID = dict(a=(2.0, 8.0), b=(2.0, 8.0), e=(0.0, 1.0), alpha=(0.3, 0.8), beta=(0.3, 0.8))


def huber(r: np.ndarray, delta: float = DELTA):
    """Huber loss and its derivative."""
    a = np.abs(r)
    quad = a <= delta
    value = np.where(quad, 0.5 * r * r, delta * (a - 0.5 * delta))
    grad = np.where(quad, r, delta * np.sign(r))
    return value, grad


def objective(theta, ln_n, ln_d, ln_l, weights=None, delta: float = DELTA):
    """The Huber objective and its gradient for a batch: ``theta [K, 5]`` -> ``f [K]``, ``g [K, 5]``.

    ``weights [K, n]`` (or None: all 1) weight each point per problem (bootstrap resamples as counts)."""
    theta = np.atleast_2d(theta)
    a, b, e, alpha, beta = (theta[:, i:i + 1] for i in range(5))
    t = np.stack([a - alpha * ln_n, b - beta * ln_d, np.broadcast_to(e, (len(theta), len(ln_n)))])
    m = t.max(axis=0)
    ex = np.exp(t - m)
    s = ex.sum(axis=0)
    r = m + np.log(s) - ln_l
    h, dh = huber(r, delta)
    w = np.ones_like(r) if weights is None else weights
    soft = ex / s  # d LSE / d (a, b, e)
    gw = w * dh
    grad = np.stack([(gw * soft[0]).sum(1), (gw * soft[1]).sum(1), (gw * soft[2]).sum(1),
                     -(gw * soft[0] * ln_n).sum(1), -(gw * soft[1] * ln_d).sum(1)], axis=1)
    return (w * h).sum(1), grad


def minimise(starts, data, weights=None):
    """L-BFGS from every row of ``starts [K, 5]`` (problem k weighted by ``weights[k]``), batched.

    Works in centred logs (``ln N - mean``, ``ln D - mean``: a and alpha decorrelate, ~3x fewer
    iterations) on the objective divided by ``delta^2`` (the same minimiser, a well-scaled stopping
    test); maps the optima back. Returns (theta [K, 5], objective [K]) in the original terms."""
    ln_n, ln_d, ln_l = data
    mn, md = float(ln_n.mean()), float(ln_d.mean())
    centred = (ln_n - mn, ln_d - md, ln_l)
    scale = 1.0 / DELTA ** 2
    t0 = np.array(starts, float, copy=True)
    t0[:, 0] -= t0[:, 3] * mn
    t0[:, 1] -= t0[:, 4] * md

    def f(theta, idx):
        v, g = objective(theta, *centred, None if weights is None else weights[idx])
        return v * scale, g * scale

    with np.errstate(over="ignore", invalid="ignore"):  # wild trial steps: rejected by the line search
        x, fx, _ = minimize_batch(f, t0)
    x[:, 0] += x[:, 3] * mn
    x[:, 1] += x[:, 4] * md
    return x, fx / scale


def admissible(thetas, objs) -> np.ndarray:
    """Which optima are in the law's domain: a finite objective, ``alpha >= 0`` and ``beta >= 0``."""
    thetas, objs = np.atleast_2d(thetas), np.asarray(objs)
    return np.isfinite(objs) & np.isfinite(thetas).all(1) & (thetas[:, 3] >= 0) & (thetas[:, 4] >= 0)


def grid_points(grid: dict) -> np.ndarray:
    return np.array(list(itertools.product(grid["a"], grid["b"], grid["e"], grid["alpha"], grid["beta"])), float)


def to_named(theta) -> dict:
    a, b, e, alpha, beta = (float(x) for x in theta)
    return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)), "alpha": alpha, "beta": beta}


def predict_loss(fit: dict, params, tokens):
    """``E + A / N^alpha + B / D^beta`` of a fit (a dict with those names)."""
    params, tokens = np.asarray(params, float), np.asarray(tokens, float)
    with np.errstate(over="ignore", divide="ignore"):  # in logs: A = 0 (underflowed) gives 0, never 0/0
        return (fit["E"] + np.exp(np.log(fit["A"]) - fit["alpha"] * np.log(params))
                + np.exp(np.log(fit["B"]) - fit["beta"] * np.log(tokens)))


def fit_approach3(params, tokens, loss, *, grid: dict | None = None, bootstrap: int = 200,
                  bootstrap_starts: int = 1, seed: int = 0) -> dict:
    """Fit ``E, A, B, alpha, beta``; returns them with ``objective``, ``ci95``, ``n_points``, ``theta``."""
    params, tokens, loss = (np.asarray(x, float) for x in (params, tokens, loss))
    n = len(loss)
    if n < N_PARAMS:
        raise FitError(f"approach 3 has {N_PARAMS} parameters (E, A, B, alpha, beta) but the table has only {n} "
                       f"point(s): fit at least {N_PARAMS} runs (a sweep of 3 budgets x 4 sizes gives 12)")
    if len(set(params)) < 2 or len(set(tokens)) < 2:
        raise FitError(f"approach 3 needs runs of at least 2 model sizes and 2 token counts (got {len(set(params))} "
                       f"size(s), {len(set(tokens))} token count(s)): A/N^alpha and B/D^beta cannot be told apart")
    data = (np.log(params), np.log(tokens), np.log(loss))
    thetas, objs = minimise(grid_points(grid or GRID), data)
    ok = admissible(thetas, objs)
    if not ok.any():
        i = int(np.argmin(np.where(np.isfinite(objs), objs, np.inf)))
        raise FitError(f"approach 3 found no fit with exponents >= 0 from any of {len(thetas)} starts (best: "
                       f"alpha={thetas[i, 3]:.4g}, beta={thetas[i, 4]:.4g}): the losses do not fall with N and D "
                       f"across the table; train the runs longer, evaluate on more batches, or plan a wider range "
                       f"of sizes and budgets")
    objs = np.where(ok, objs, np.inf)
    order = np.argsort(objs)
    best_theta, best_obj = thetas[order[0]], objs[order[0]]
    starts = [best_theta]
    for i in order[1:]:  # the next best distinct optima also seed the bootstrap refits
        if len(starts) > bootstrap_starts:
            break
        if np.isfinite(objs[i]) and all(np.max(np.abs(thetas[i] - s)) > 1e-3 for s in starts):
            starts.append(thetas[i])
    out = {**to_named(best_theta), "objective": float(best_obj), "n_points": n,
           "theta": [float(x) for x in best_theta], "n_starts": int(len(thetas))}
    if bootstrap:
        rng = np.random.default_rng(seed)
        counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(int(bootstrap))])
        k = len(starts)  # every replicate from every seed start, all in one batch
        th, ob = minimise(np.tile(np.stack(starts), (int(bootstrap), 1)), data,
                          np.repeat(counts.astype(float), k, axis=0))
        ob = np.where(admissible(th, ob), ob, np.inf).reshape(-1, k)
        kept = np.isfinite(ob).any(1)  # a replicate with no admissible optimum is left out (counted)
        best = th.reshape(int(bootstrap), k, 5)[np.arange(int(bootstrap)), ob.argmin(1)][kept]
        with np.errstate(over="ignore"):  # a replicate that runs off (few points) has A or B = inf
            samples = [to_named(t) for t in best]
        out["ci95"] = {key: ([_finite(np.percentile([s[key] for s in samples], 2.5, method="lower")),
                              _finite(np.percentile([s[key] for s in samples], 97.5, method="higher"))]
                             if samples else [None, None]) for key in NAMES}
        out["bootstrap"] = int(bootstrap)
        out["bootstrap_left_out"] = int(bootstrap - kept.sum())
    return out


def _finite(x):
    """A float, or None where the bootstrap found no bound (JSON has no infinity)."""
    return float(x) if np.isfinite(x) else None


def optimal_allocation(fit: dict, flops: float, flops_per_token) -> dict:
    """The (N, D) that minimise the fitted loss at ``flops`` with ``D = flops / flops_per_token(N)``.

    ``flops_per_token(N)`` is the table's own FLOP count per token as a function of N (see
    :func:`glmjax.scaling.fit.flops_per_token_model`); a dense scan of ln N then a golden-section refine.
    """
    def loss_at(ln_n):
        n = np.exp(ln_n)
        return predict_loss(fit, n, flops / flops_per_token(n))

    grid = np.linspace(np.log(10.0), np.log(max(flops / 6.0, 1e2)) / 1.0, 4001)
    grid = grid[flops / flops_per_token(np.exp(grid)) >= 1.0]
    i = int(np.argmin(loss_at(grid)))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    g = (np.sqrt(5) - 1) / 2
    for _ in range(100):
        x1, x2 = hi - g * (hi - lo), lo + g * (hi - lo)
        if loss_at(x1) < loss_at(x2):
            hi = x2
        else:
            lo = x1
    n = float(np.exp(0.5 * (lo + hi)))
    d = float(flops / flops_per_token(n))
    return {"flops": float(flops), "params": n, "tokens": d, "tokens_per_param": d / n,
            "loss": float(predict_loss(fit, n, d))}
