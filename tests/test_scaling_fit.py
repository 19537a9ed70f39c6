"""Chinchilla fits on synthetic tables with known answers: approach 3 (recovery, intervals, optimiser
against scipy), approach 2 (exponent), predictions against the closed form, holdout, bad inputs."""
import csv
import math

import numpy as np
import pytest

from glmjax.scaling import approach2, approach3
from glmjax.scaling.fit import fit_all
from glmjax.scaling.table import FitError, read_table, table_from_rows

TRUTH = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al. 2022's fit


def isoflop_rows(truth, budgets, spread=1.5, sizes=5, noise=0.0, rng=None, six_nd=True):
    rows = []
    for c in budgets:
        n0 = math.sqrt(c / (6 * 20))
        for k in np.linspace(-spread, spread, sizes):
            n = n0 * math.exp(float(k))
            d = c / (6 * n)
            loss = float(approach3.predict_loss(truth, n, d))
            if noise:
                loss *= math.exp(rng.normal(0, noise))
            row = {"params": repr(n), "tokens": repr(d), "loss": repr(loss)}
            if not six_nd:
                row["flops"] = repr(c)
            rows.append(row)
    return rows


def arrays(rows):
    return (np.array([float(r[k]) for r in rows]) for k in ("params", "tokens", "loss"))


def test_noise_free_recovery_to_1e_3():
    p, t, l = arrays(isoflop_rows(TRUTH, [1e18, 1e19, 1e20, 1e21]))
    f = approach3.fit_approach3(p, t, l, bootstrap=0)  # the default grid of starts
    for k in approach3.NAMES:
        assert f[k] == pytest.approx(TRUTH[k], rel=1e-3), k
    assert f["objective"] < 1e-12 and f["n_starts"] == 243


def test_batched_lbfgs_matches_scipy():
    scipy_optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(1)
    p, t, l = arrays(isoflop_rows(TRUTH, [1e18, 1e19, 1e20], noise=0.01, rng=rng))
    data = (np.log(p), np.log(t), np.log(l))
    start = np.array([[5.0, 5.0, 0.5, 0.3, 0.3]])
    ours, obj = approach3.minimise(start, data)

    def f(theta):  # the same objective, scaled the same way, one problem
        v, g = approach3.objective(theta[None], *data)
        return v[0] * 1e6, g[0] * 1e6

    ref = scipy_optimize.minimize(f, start[0], jac=True, method="L-BFGS-B",
                                  options=dict(maxiter=20000, ftol=1e-15, gtol=1e-11))
    assert obj[0] == pytest.approx(ref.fun / 1e6, rel=1e-7)
    np.testing.assert_allclose(ours[0], ref.x, rtol=2e-4)  # a flat valley: parameters agree less than f


def test_bootstrap_intervals_cover_the_truth_in_most_seeds():
    start = {k: (v,) for k, v in dict(a=5.0, b=5.0, e=0.5, alpha=0.3, beta=0.3).items()}
    seeds, covered = 12, {k: 0 for k in approach3.NAMES}
    for seed in range(seeds):
        rng = np.random.default_rng(100 + seed)
        p, t, l = arrays(isoflop_rows(TRUTH, [1e18, 1e19, 1e20, 1e21], noise=0.01, rng=rng))
        f = approach3.fit_approach3(p, t, l, grid=start, bootstrap=100, seed=seed)
        for k in approach3.NAMES:
            lo, hi = f["ci95"][k]
            assert lo <= f[k] <= hi
            covered[k] += lo <= TRUTH[k] <= hi
    print("covered of", seeds, covered)
    for k in approach3.NAMES:
        assert covered[k] >= 0.7 * seeds, (k, covered)


def test_approach2_recovers_the_exponent_and_the_prediction_matches_the_closed_form():
    rows = isoflop_rows(TRUTH, [1e18, 1e19, 1e20, 1e21, 1e22], spread=0.4, sizes=7)
    table = table_from_rows(rows)
    assert len(table.budgets) == 5
    fit2 = approach2.fit_approach2(table)
    a_true = TRUTH["beta"] / (TRUTH["alpha"] + TRUTH["beta"])  # N* ~ C^(beta / (alpha + beta)) for C = 6ND
    assert fit2["a"] == pytest.approx(a_true, abs=2e-3)
    assert fit2["b"] == pytest.approx(1 - a_true, abs=2e-3)
    assert fit2["a"] + fit2["b"] == pytest.approx(1.0, abs=1e-9)  # D* = C / (6 N*) exactly
    # exact parabolas with a known vertex law: recovered exactly
    exact = []
    for c in (1e10, 1e11, 1e12):
        xs = math.log(3e-2 * c ** 0.6)
        for x in np.linspace(xs - 1, xs + 1, 4):
            x = float(x)
            exact.append({"params": repr(math.exp(x)), "tokens": repr(c / 6 / math.exp(x)),
                          "loss": repr(2.0 + 0.1 * (x - xs) ** 2 + 0.3 / math.log(c))})
    assert approach2.fit_approach2(table_from_rows(exact))["a"] == pytest.approx(0.6, abs=1e-9)
    # approach 3's compute-optimal allocation at C against Chinchilla's closed form (C = 6 N D)
    fit = fit_all(table, 1e23, bootstrap=0, holdout=False)
    g = (TRUTH["alpha"] * TRUTH["A"] / (TRUTH["beta"] * TRUTH["B"])) ** (1 / (TRUTH["alpha"] + TRUTH["beta"]))
    n_opt = g * (1e23 / 6) ** a_true
    assert fit["flops_per_token"]["c"] == pytest.approx(6.0) and fit["flops_per_token"]["g"] == pytest.approx(1.0)
    assert fit["prediction"]["params"] == pytest.approx(n_opt, rel=1e-3)
    assert fit["prediction"]["tokens"] == pytest.approx(1e23 / 6 / n_opt, rel=1e-3)
    assert fit["prediction_approach2"]["params"] == pytest.approx(n_opt, rel=0.03)


def test_holdout_on_noise_free_data_is_exact():
    table = table_from_rows(isoflop_rows(TRUTH, [1e18, 1e19, 1e20, 1e21], six_nd=False))
    fit = fit_all(table, None, bootstrap=0, grid=approach3.SMALL_GRID)
    h = fit["holdout"]
    assert h["budget"] == pytest.approx(1e21) and h["n_heldout"] == 5 and h["n_fit_points"] == 15
    assert h["approach3"]["loss_max_abs_rel_error"] < 1e-6
    assert abs(h["approach3"]["optimum_rel_error"]["loss"]) < 1e-3  # against the held-out parabola's minimum
    assert fit["prediction"]["target_flops_default"] and fit["prediction"]["flops"] == pytest.approx(1e22)


def write_csv(path, rows, columns):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return str(path)


def test_bad_inputs_are_clear_errors(tmp_path):
    rows = isoflop_rows(TRUTH, [1e18, 1e19])
    with pytest.raises(FitError, match=r"no column 'tokens'.*params,tokens,loss"):
        read_table(write_csv(tmp_path / "a.csv", rows, ["params", "loss"]))
    bad = [dict(r) for r in rows]
    bad[3]["params"] = "0"
    with pytest.raises(FitError, match=r"row 5: params=0 is not a positive finite number"):
        read_table(write_csv(tmp_path / "b.csv", bad, ["params", "tokens", "loss"]))
    bad[3]["params"] = "abc"
    with pytest.raises(FitError, match=r"params='abc' is not a number"):
        read_table(write_csv(tmp_path / "c.csv", bad, ["params", "tokens", "loss"]))
    few = read_table(write_csv(tmp_path / "d.csv", rows[:4], ["params", "tokens", "loss"]))
    with pytest.raises(FitError, match=r"4 point\(s\), fewer than the 5 parameters"):
        fit_all(few)
    with pytest.raises(FitError, match="approach 3 has 5 parameters"):
        approach3.fit_approach3(*arrays(rows[:3]))
    with pytest.raises(FitError, match=r"no column 'loss'"):
        read_table(write_csv(tmp_path / "e.csv", rows, ["params", "tokens"]))
    with pytest.raises(FitError, match="does not exist"):
        read_table(str(tmp_path / "missing.csv"))
    one_budget = table_from_rows(isoflop_rows(TRUTH, [1e18]))
    with pytest.raises(FitError, match="approach 2 needs IsoFLOP minima at >= 2 budgets"):
        approach2.fit_approach2(one_budget)


# A real table (a 6-run CPU sweep with 1-batch evaluations, seen in a suite run): the losses barely depend
# on N, and the unconstrained best optimum is a negative alpha with A underflowed to 0 (A / N^alpha = 0/0
# in the prediction, NaN everywhere downstream).
FLAT_ROWS = [(11568, 44288, 3.2e9, 4.570456), (11568, 88704, 6.4e9, 4.450986), (28256, 18304, 3.2e9, 4.453146),
             (28256, 36608, 6.4e9, 4.513364), (80112, 6400, 3.2e9, 4.703482), (80112, 12800, 6.4e9, 4.533071)]


def flat_table_rows():
    return [{"params": repr(float(n)), "tokens": repr(float(d)), "flops": repr(c), "loss": repr(l)}
            for n, d, c, l in FLAT_ROWS]


def test_a_flat_table_keeps_the_exponents_in_the_domain_and_the_report_is_finite(tmp_path):
    from glmjax.scaling.report import fit_and_plot

    n, d, l = arrays(flat_table_rows())
    thetas, objs = approach3.minimise(approach3.grid_points(approach3.GRID), (np.log(n), np.log(d), np.log(l)))
    assert thetas[np.argmin(objs), 3] < 0  # the unconstrained optimum leaves the law's domain on this table
    path = write_csv(tmp_path / "flat.csv", flat_table_rows(), ["params", "tokens", "flops", "loss"])
    fit, plots = fit_and_plot(path, str(tmp_path / "out"), 1e11, bootstrap=20)
    f3 = fit["approach3"]
    assert f3["alpha"] >= 0 and f3["beta"] >= 0 and f3["objective"] >= objs.min()
    pred = approach3.predict_loss(f3, n, d)
    assert np.all(np.isfinite(pred)) and np.max(np.abs(np.log(l / pred))) < 0.05  # the losses are within 4%
    assert all(np.isfinite(r["predicted"]) and np.isfinite(r["log_residual"]) for r in fit["residuals"])
    p = fit["prediction"]
    assert np.isfinite(p["loss"]) and p["params"] > 0 and p["tokens"] > 0
    assert f3["bootstrap"] == 20 and 0 <= f3["bootstrap_left_out"] < 20
    assert len(plots) == 4 and all((tmp_path / "out" / name).stat().st_size > 5000 for name in
                                   ("isoflop.png", "optimal_scaling.png", "loss_vs_compute.png", "residuals.png"))


def test_a_table_whose_loss_rises_with_n_and_d_is_reported_not_fitted(tmp_path):
    """Loss = 1 + 0.05 N^0.2 + 0.05 D^0.2 rises with both: no fit with exponents >= 0 describes it. Approach
    3 is an error entry with the reason, the rest of the report (approach 2, plots, report.md) is written."""
    from glmjax.scaling.report import write_report

    rising = dict(E=1.0, A=0.05, B=0.05, alpha=-0.2, beta=-0.2)
    rows = isoflop_rows(rising, [1e15, 1e16, 1e17], six_nd=False)
    n, d, l = arrays(rows)
    with pytest.raises(FitError, match=r"no fit with exponents >= 0 .* the losses do not fall with N and D"):
        approach3.fit_approach3(n, d, l, bootstrap=0, grid=approach3.SMALL_GRID)
    write_csv(tmp_path / "results.csv", [{**r, "run": f"r{i}", "budget": r["flops"]} for i, r in enumerate(rows)],
              ["params", "tokens", "flops", "loss", "run", "budget"])
    report = write_report(str(tmp_path), 1e18, bootstrap=0, grid=approach3.SMALL_GRID)
    import json
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert "exponents >= 0" in fit["approach3"]["error"] and fit["prediction"] is None
    assert len(fit["residuals"]) == len(rows) and all(r["predicted"] is None for r in fit["residuals"])
    assert "exponents >= 0" in fit["holdout"]["approach3"]["error"]
    text = open(report).read()
    assert "approach 3: not fitted" in text and text.count("| not fitted |") == len(rows)
    assert all((tmp_path / name).stat().st_size > 5000 for name in
               ("isoflop.png", "optimal_scaling.png", "loss_vs_compute.png", "residuals.png"))
