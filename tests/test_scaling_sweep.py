"""The CPU sweep scaled down, end to end through tools/sweep.py: plan, run (killed mid-way, rerun: it
resumes and skips what finished), report (fit.json, plots, report.md), and a bad CSV's one-line error.

2 budgets x 3 sizes of the configs/sweeps/cpu.py models (12k-80k parameters, batch 4 x 32 tokens,
50-700 steps) as independent wsd runs (forks are covered by test_scaling_fork.py and
test_scaling_runner.py), trained one after another in one process (``--backend=inprocess``).
"""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
PLAN_ARGS = ["--config.budgets=(3.2e9,6.4e9)", "--config.sizes_per_budget=3", "--config.mode=independent",
             "--config.base.batch_size=4", "--config.base.seq_len=32", "--config.min_steps=50",
             "--config.tokens_per_param=200", "--config.base.eval_steps=1", "--config.base.log_every=10",
             "--config.checkpoints_per_run=2", "--config.warmup_max_steps=10"]


def sweep(*args, check=True, timeout=600):
    r = subprocess.run([sys.executable, "tools/sweep.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def committed(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def test_cpu_sweep_scaled_down_end_to_end(tmp_path):
    plan_dir = tmp_path / "sweep"
    out = sweep("plan", "--config=configs/sweeps/cpu.py", f"--out={plan_dir}", *PLAN_ARGS).stdout
    assert "6 runs, 6 jobs (independent)" in out
    plan = json.loads((plan_dir / "plan.json").read_text())
    jobs = {j["name"]: j for j in plan["jobs"]}

    # 1. run, SIGKILL the whole sweep once a job has a checkpoint before its last step
    proc = subprocess.Popen([sys.executable, "tools/sweep.py", "run", f"--plan={plan_dir}", "--backend=inprocess",
                             "--no_progress"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    killed, deadline = None, time.monotonic() + 400
    while killed is None:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint before a job's last step appeared"
        for name, j in jobs.items():
            steps = committed(plan_dir / j["workdir"])
            if steps and max(steps) < j["steps"]:
                killed = name
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished_before = [n for n, j in jobs.items() if j["steps"] in committed(plan_dir / j["workdir"])]
    assert killed not in finished_before

    # 2. rerun: the finished jobs are skipped, the killed one resumes from its checkpoint, all finish
    out = sweep("run", f"--plan={plan_dir}", "--backend=inprocess", "--no_progress").stdout
    if finished_before:
        assert f"{len(finished_before)} of 6 jobs finished already (skipped)" in out, out
    assert "6 of 6 jobs finished; 6 result rows" in out, out
    assert "restored checkpoint step" in (plan_dir / "logs" / f"{killed}.log").read_text()
    with open(plan_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and all(float(r["eval_loss"]) > 0 and float(r["loss"]) > 0 for r in rows)
    for r in rows:  # the loss logged at the last step is a real number (vocab 512: below ln 512 + slack)
        assert 1.0 < float(r["eval_loss"]) < 7.0

    # 3. report: fit.json with both approaches, the holdout, non-empty plots, report.md
    out = sweep("report", f"--plan={plan_dir}", "--bootstrap=20", "--target_flops=1e11").stdout
    fit = json.loads((plan_dir / "fit.json").read_text())
    assert fit["approach3"]["n_points"] == 6 and set(fit["approach3"]["ci95"]) == {"E", "A", "B", "alpha", "beta"}
    assert fit["prediction"]["flops"] == 1e11 and fit["prediction"]["params"] > 0
    assert "approach2" in fit and "holdout" in fit and fit["holdout"]["budget"] == max(fit["budgets"])
    for name in ("isoflop.png", "optimal_scaling.png", "loss_vs_compute.png", "residuals.png"):
        data = (plan_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert "approach 3" in (plan_dir / "report.md").read_text()

    # 4. a results CSV without a tokens column: one line, exit status 2
    bad = tmp_path / "bad.csv"
    bad.write_text("params,loss\n1e6,3.0\n")
    r = sweep("fit", f"--results={bad}", f"--out={tmp_path / 'fit'}", check=False)
    assert r.returncode == 2 and "no column 'tokens'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
