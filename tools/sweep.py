"""Scaling-law sweeps: plan an IsoFLOP grid, run it resumably, fit Chinchilla approaches 2 and 3, report.

    python tools/sweep.py plan --config=configs/sweeps/cpu.py --out=DIR   # DIR/plan.csv, plan.json, configs/
    python tools/sweep.py run --plan=DIR [--parallel=K]                   # trains every job, DIR/results.csv
    python tools/sweep.py fit --results=FILE.csv --out=DIR [--target_flops=C]   # fit.json + PNG plots
    python tools/sweep.py report --plan=DIR [--target_flops=C]            # fit + plots + DIR/report.md

The library behind each subcommand: glmjax/scaling/plan.py, runner.py, fit.py (+ approach2.py,
approach3.py), plots.py, report.py. docs/scaling.md explains the rules and the fits.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _float(text):
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; write e.g. 1e21") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/sweep.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="{plan,run,fit,report}")
    s = sub.add_parser("plan", help="write DIR/plan.csv, plan.json and one config per job",
                       description="Plan an IsoFLOP sweep. Overrides: --config.KEY=VALUE (e.g. --config.budgets=(1e12,3e12)).")
    s.add_argument("--config", required=True, help="sweep config file, e.g. configs/sweeps/cpu.py")
    s.add_argument("--out", required=True, help="plan directory (created)")
    s = sub.add_parser("run", help="train every job of a plan (resumable)",
                       description="Train every planned job in its own workdir under the plan directory. Finished "
                                   "jobs are skipped, interrupted ones resume, failed ones are reported and the rest "
                                   "go on. Then DIR/results.csv is collected.")
    s.add_argument("--plan", required=True, help="plan directory written by `plan`")
    s.add_argument("--parallel", type=int, default=1, help="jobs running at once (default 1)")
    s.add_argument("--backend", default="local", choices=["local", "inprocess"],
                   help="where jobs run: local (one subprocess per job, default) or inprocess (one after another in "
                        "this process: no start-up per job, for small CPU sweeps; --parallel=1 only)")
    s.add_argument("--no_progress", action="store_true", help="no progress bar (log lines only)")
    for name, what in (("fit", "fit a results CSV"), ("report", "fit + plots + DIR/report.md for a plan")):
        s = sub.add_parser(name, help=what, description=what + ". The CSV needs params,tokens,loss (optional "
                           "flops, budget); fit.json holds approach3, approach2, prediction, prediction_approach2, holdout.")
        if name == "fit":
            s.add_argument("--results", required=True, help="CSV with columns params,tokens,loss (optional flops)")
            s.add_argument("--out", required=True, help="output directory for fit.json and the PNG plots")
            s.add_argument("--loss_column", default=None,
                           help="the column to fit (default: eval_loss if the file has it, else loss)")
            s.add_argument("--no_plots", action="store_true", help="fit.json only")
        else:
            s.add_argument("--plan", required=True, help="plan directory with results.csv (after `run`)")
        s.add_argument("--target_flops", type=_float, default=None,
                       help="compute of the prediction (default: 10x the largest budget)")
        s.add_argument("--bootstrap", type=int, default=200, help="bootstrap replicates for the 95%% intervals")
    return p


def main(argv=None) -> int:
    args, rest = parser().parse_known_args(argv)
    bad = [a for a in rest if not (args.command == "plan" and a.startswith("--config."))]
    if bad:
        parser().error(f"unrecognised arguments {bad}" + ("; sweep config overrides are --config.KEY=VALUE"
                                                          if args.command == "plan" else ""))
    from glmjax.config import ConfigError
    from glmjax.scaling.table import FitError

    try:
        if args.command == "plan":
            from glmjax.scaling.plan import load_sweep, plan_sweep, write_plan

            plan = plan_sweep(load_sweep(args.config, rest))
            write_plan(plan, args.out)
            for r in plan["runs"]:
                print(f"{r['run']:<22} N={r['params']:>10,} D={r['tokens']:>12,} steps={r['steps']:>6} "
                      f"lr={r['lr']:.3g} FLOPs {r['flops_error']:+.2%} of budget")
            print(f"plan: {len(plan['runs'])} runs, {len(plan['jobs'])} jobs ({plan['mode']}) in {args.out}; "
                  f"next: python tools/sweep.py run --plan={args.out}")
        elif args.command == "run":
            from glmjax.console import setup_logging
            from glmjax.scaling.backends import BACKENDS

            setup_logging("INFO")
            from glmjax.scaling.runner import run_plan

            states = run_plan(args.plan, BACKENDS[args.backend](), parallel=args.parallel,
                              progress=not args.no_progress)
            return 0 if all(s in ("done", "skipped") for s in states.values()) else 1
        elif args.command == "fit":
            from glmjax.scaling.fit import summary
            from glmjax.scaling.report import fit_and_plot

            fit, plots = fit_and_plot(args.results, args.out, args.target_flops, loss_column=args.loss_column,
                                      bootstrap=args.bootstrap, plots=not args.no_plots)
            print("\n".join(summary(fit)))
            print(f"wrote {os.path.join(args.out, 'fit.json')}" + (f" and {len(plots)} plots" if plots else ""))
        else:
            from glmjax.scaling.report import write_report

            print(f"wrote {write_report(args.plan, args.target_flops, bootstrap=args.bootstrap)}")
    except (ConfigError, FitError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
