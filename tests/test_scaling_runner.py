"""The sweep runner with a stand-in for the training process: order, forks, failures, parallelism, skips.

The local backend starts ``python -m fake_train`` (written below) instead of ``glmjax.train``: it sleeps
a little, writes the checkpoint directory of its last step and a ``metrics.jsonl`` like the real loop,
keeps only its newest checkpoint (so a fork whose starting step the runner did not copy in time fails),
and logs its start and end times for the parallelism check.
"""
import csv
import json
import os
import sys
import textwrap
from pathlib import Path

from glmjax.scaling.backends import LocalBackend
from glmjax.scaling.plan import load_sweep, plan_sweep, write_plan
from glmjax.scaling.runner import run_plan

ROOT = Path(__file__).resolve().parents[1]

FAKE = textwrap.dedent('''
    import json, os, shutil, sys, time
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    plan = json.load(open("plan.json"))
    job = next(j for j in plan["jobs"] if j["config_file"] == args["config"])
    wd = args["workdir"]
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps({"job": job["name"], "event": "start", "t": time.time()}) + "\\n")
    ck = os.path.join(wd, "checkpoints")
    if job["fork_from"] and not os.path.isdir(os.path.join(ck, str(job["fork_from"][1]))):
        sys.exit(3)  # the runner must have copied the fork's starting checkpoint
    time.sleep(0.3)
    if job["name"] in os.environ.get("FAKE_FAIL", "").split(","):
        with open(os.environ["FAKE_LOG"], "a") as f:
            f.write(json.dumps({"job": job["name"], "event": "end", "t": time.time()}) + "\\n")
        sys.exit(7)
    os.makedirs(os.path.join(ck, str(job["steps"])), exist_ok=True)
    for old in os.listdir(ck):  # keep=1: the older steps rotate out
        if old != str(job["steps"]):
            shutil.rmtree(os.path.join(ck, old))
    row = {"step": job["steps"], "loss": 3.0 + 1.0 / job["steps"]}
    if job["run"]:
        row["eval_loss"] = 3.5 + 1.0 / job["steps"]
    with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\\n")
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps({"job": job["name"], "event": "end", "t": time.time()}) + "\\n")
''')


def events(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def max_concurrent(evs):
    live, most = 0, 0
    for e in sorted(evs, key=lambda e: (e["t"], e["event"] == "start")):
        live += 1 if e["event"] == "start" else -1
        most = max(most, live)
    return most


def test_runner_forks_failures_parallel_and_rerun(tmp_path):
    sweep = load_sweep(str(ROOT / "configs" / "sweeps" / "cpu.py"),
                       ["--config.budgets=(4e9,1.2e10)", "--config.sizes_per_budget=3", "--config.base.batch_size=4",
                        "--config.base.seq_len=32", "--config.min_steps=50", "--config.tokens_per_param=200"])
    plan = plan_sweep(sweep)
    plan_dir = tmp_path / "plan"
    write_plan(plan, str(plan_dir))
    (tmp_path / "fake_train.py").write_text(FAKE)
    log = tmp_path / "events.jsonl"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "FAKE_LOG": str(log)}
    forks = [j for j in plan["jobs"] if j["fork_from"]]
    segments = [j for j in plan["jobs"] if not j["fork_from"]]
    assert len(forks) == 6 and len(segments) == 6
    failing = next(s for s in segments if s["after"])  # a second main-run segment: its fork is blocked
    blocked = [j["name"] for j in plan["jobs"] if failing["name"] in j["after"]]
    lines = []
    states = run_plan(str(plan_dir), LocalBackend(env={**env, "FAKE_FAIL": failing["name"]}, module="fake_train"),
                      parallel=2, poll_s=0.05, progress=False, echo=lines.append)
    assert states[failing["name"]] == "failed"
    assert blocked and all(states[b] == "blocked" for b in blocked)
    assert sum(s == "done" for s in states.values()) == len(plan["jobs"]) - 1 - len(blocked)
    assert any(f"FAILED {failing['name']} (exit status 7)" in line for line in lines)
    evs = events(log)
    assert max_concurrent(evs) == 2
    with open(plan_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["params", "tokens", "flops", "loss", "eval_loss", "run", "budget"]
    assert len(rows) == 6 - sum(1 for b in blocked if b in {r["run"] for r in plan["runs"]})
    status = json.loads((plan_dir / "status.json").read_text())
    assert status["states"] == states

    log.unlink()  # rerun without the failure: only the failed job and the blocked ones run
    lines = []
    states = run_plan(str(plan_dir), LocalBackend(env=env, module="fake_train"), parallel=2, poll_s=0.05,
                      progress=False, echo=lines.append)
    assert set(states.values()) <= {"done", "skipped"}
    assert sorted(e["job"] for e in events(log) if e["event"] == "start") == sorted([failing["name"], *blocked])
    with open(plan_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["run"] for r in rows) == sorted(r["run"] for r in plan["runs"])
    want = {r["run"]: r for r in plan["runs"]}
    for r in rows:
        assert float(r["flops"]) == want[r["run"]]["flops"] and int(float(r["tokens"])) == want[r["run"]]["tokens"]
        steps = want[r["run"]]["steps"]
        assert float(r["eval_loss"]) == 3.5 + 1.0 / steps and float(r["loss"]) == 3.0 + 1.0 / steps


def test_parallel_needs_a_concurrent_backend(tmp_path):
    import pytest

    from glmjax.scaling.backends import InProcessBackend

    with pytest.raises(ValueError, match="runs one job at a time"):
        run_plan(str(tmp_path), InProcessBackend(), parallel=2)
    assert sys.executable  # the local backend's default interpreter
