"""Run a sweep plan: every job in its own workdir, resumable, failures isolated, one progress display.

``run_plan(plan_dir, backend=LocalBackend(), parallel=K)`` walks the plan's jobs (``plan.json``,
dependency order) and keeps up to K of them running:

* a job whose workdir already holds a checkpoint of its last step (and, for a row of the results, the
  final ``eval_loss`` in its ``metrics.jsonl``) is **skipped**;
* a job with earlier checkpoints is started with the same command and **resumes** from them (the
  training loop restores the newest good checkpoint);
* a cooldown **fork** gets its starting checkpoint copied from the main run by the runner itself
  (:func:`glmjax.checkpoint.init_workdir_from`) the moment the main-run segment that reaches the fork
  step finishes, before the next segment of that main run starts (it would otherwise rotate the step
  out: ``checkpoint.keep``);
* a job that exits non-zero, or exits before its last step, is reported as **failed** (with its log
  file), the jobs that depend on it are **blocked**, and every other job goes on. ``run_plan`` returns
  the status of every job; a rerun retries the failed ones.

Then ``DIR/results.csv`` collects one row per finished result job: ``params, tokens, flops, loss,
eval_loss, run, budget`` (``loss``: the training loss of the last step; ``eval_loss``: the final eval
loss, what the fits use by default). ``DIR/status.json`` keeps each job's state and wall seconds.

A backend is what starts one job (:mod:`glmjax.scaling.backends`): ``local`` runs ``python -m
glmjax.train`` as a subprocess on this machine; ``inprocess`` trains the jobs one after another inside
the runner's process (no process start-up per job: the overhead that dominates tiny CPU sweeps); a TPU
or Slurm backend (launch/) implements the same ``start`` method.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import sys
import time

from glmjax.scaling.backends import Backend, LocalBackend
from glmjax.scaling.plan import read_plan

RESULT_COLUMNS = ("params", "tokens", "flops", "loss", "eval_loss", "run", "budget")


def _checkpoint_steps(workdir: str) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(int(p) for p in os.listdir(d) if p.isdigit() and os.path.isdir(os.path.join(d, p)))


def final_metrics(workdir: str, step: int) -> dict:
    """The ``metrics.jsonl`` records of ``step`` merged (the last step logs loss and eval_loss)."""
    out = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if r.get("step") == step:
                    out.update(r)
    return out


def last_logged_step(workdir: str) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def is_done(job: dict, plan_dir: str) -> bool:
    wd = os.path.join(plan_dir, job["workdir"])
    steps = _checkpoint_steps(wd)
    if not steps or max(steps) < job["steps"]:
        return False
    return job["run"] is None or "eval_loss" in final_metrics(wd, job["steps"])


def _start_step(job: dict) -> int:
    return int(job["fork_from"][1]) if job.get("fork_from") else 0


def _prepare_fork(job: dict, plan_dir: str) -> None:
    if not job.get("fork_from"):
        return
    from glmjax.checkpoint import init_workdir_from

    src, step = job["fork_from"]
    init_workdir_from(os.path.join(plan_dir, job["workdir"]), os.path.join(plan_dir, src), int(step))


class Progress:
    """One line for the whole sweep: steps trained of all jobs, jobs done / running / failed."""

    def __init__(self, jobs, plan_dir, enabled=True):
        from tqdm import tqdm

        self.jobs, self.plan_dir = jobs, plan_dir
        self.span = {j["name"]: j["steps"] - self._segment_start(j) for j in jobs}
        self.bar = tqdm(total=sum(self.span.values()), unit="step", desc="sweep", disable=not enabled,
                        dynamic_ncols=True, file=sys.stderr)

    def _segment_start(self, job):
        if job.get("fork_from"):
            return int(job["fork_from"][1])
        prev = [j for j in self.jobs if j["name"] in job["after"]] if job["after"] else []
        return max((p["steps"] for p in prev), default=0)

    def update(self, states: dict) -> None:
        total = 0
        for j in self.jobs:
            s = states[j["name"]]
            if s in ("done", "skipped"):
                total += self.span[j["name"]]
            elif s == "running":
                logged = last_logged_step(os.path.join(self.plan_dir, j["workdir"]))
                total += min(self.span[j["name"]], max(0, logged - self._segment_start(j)))
        self.bar.n = total
        count = {k: sum(1 for v in states.values() if v == k) for k in ("done", "skipped", "running", "failed")}
        self.bar.set_postfix_str(f"jobs {count['done'] + count['skipped']}/{len(self.jobs)} done, "
                                 f"{count['running']} running, {count['failed']} failed", refresh=False)
        self.bar.refresh()

    def close(self):
        self.bar.close()


def run_plan(plan_dir: str, backend: Backend | None = None, parallel: int = 1, *, poll_s: float = 0.5,
             progress: bool = True, echo=print) -> dict:
    """Run every job of the plan in ``plan_dir``; returns ``{job name: state}`` (done/skipped/failed/blocked)."""
    if parallel < 1:
        raise ValueError(f"--parallel={parallel}: run at least 1 job at a time")
    if parallel > 1 and not getattr(backend, "concurrent", True):
        raise ValueError(f"--parallel={parallel} with --backend={backend.name}: that backend runs one job at a "
                         f"time (in this process); use --backend=local for parallel jobs")
    plan_dir = os.path.abspath(plan_dir)
    backend = backend or LocalBackend()
    plan = read_plan(plan_dir)
    jobs = plan["jobs"]
    logs = os.path.join(plan_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    states = {j["name"]: "pending" for j in jobs}
    for j in jobs:
        if is_done(j, plan_dir):
            states[j["name"]] = "skipped"
    for j in jobs:  # forks whose main-run step is there already get their copy now (it may rotate out later)
        if states[j["name"]] == "pending" and j.get("fork_from") and all(states[a] == "skipped" for a in j["after"]):
            _prepare_fork(j, plan_dir)
    skipped = sum(1 for s in states.values() if s == "skipped")
    if skipped:
        echo(f"sweep: {skipped} of {len(jobs)} jobs finished already (skipped)")
    running, wall, info = {}, {}, {}
    bar = Progress(jobs, plan_dir, enabled=progress)
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum
        for h in running.values():
            h.terminate()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            for name, handle in list(running.items()):
                rc = handle.poll()
                if rc is None:
                    continue
                del running[name]
                job = next(j for j in jobs if j["name"] == name)
                wall[name] = time.monotonic() - wall[name]
                log = os.path.join(logs, f"{name}.log")
                if rc == 0 and is_done(job, plan_dir):
                    states[name] = "done"
                    for f in jobs:  # copy the fork step out before the next segment can rotate it away
                        if f.get("fork_from") and name in f["after"]:
                            _prepare_fork(f, plan_dir)
                else:
                    states[name] = "failed"
                    why = f"exit status {rc}" if rc else f"stopped before step {job['steps']}"
                    info[name] = why
                    bar.bar.clear()
                    echo(f"sweep: FAILED {name} ({why}); log: {log}\n" + _tail(log))
            if stop["signal"] is None:
                for j in jobs:
                    name = j["name"]
                    if states[name] != "pending":
                        continue
                    deps = [states[a] for a in j["after"]]
                    if any(d in ("failed", "blocked") for d in deps):
                        states[name] = "blocked"
                        continue
                    if len(running) >= parallel or not all(d in ("done", "skipped") for d in deps):
                        continue
                    try:
                        _prepare_fork(j, plan_dir)
                    except Exception as e:  # noqa: BLE001 -- a bad fork source fails that job only
                        states[name], info[name] = "failed", str(e)
                        echo(f"sweep: FAILED {name}: {e}")
                        continue
                    running[name] = backend.start(j, plan_dir, os.path.join(logs, f"{name}.log"))
                    wall[name] = time.monotonic()
                    states[name] = "running"
            bar.update(states)
            if not running and (stop["signal"] is not None or "pending" not in states.values()):
                break
            time.sleep(poll_s)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        bar.close()
    for name, s in states.items():
        if s == "pending":
            states[name] = "not started"
    with open(os.path.join(plan_dir, "status.json"), "w") as f:
        json.dump({"states": states, "wall_s": {k: v for k, v in wall.items() if isinstance(v, float)
                                                 and states[k] in ("done", "failed")},
                   "errors": info}, f, indent=1)
    n = collect_results(plan_dir, plan)
    bad = {k: v for k, v in states.items() if v not in ("done", "skipped")}
    echo(f"sweep: {len(jobs) - len(bad)} of {len(jobs)} jobs finished; {n} result rows in "
         f"{os.path.join(plan_dir, 'results.csv')}" + (f"; not finished: {', '.join(f'{k} ({v})' for k, v in bad.items())}"
                                                        if bad else ""))
    if stop["signal"] is not None:
        echo("sweep: interrupted; run the same command to resume")
    return states


def _tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.read().splitlines()
    except OSError:
        return ""
    return "\n".join("    " + t[-300:] for t in text[-lines:])


def collect_results(plan_dir: str, plan: dict | None = None) -> int:
    """Write ``results.csv`` from the finished result jobs; returns the number of rows."""
    plan = plan or read_plan(plan_dir)
    runs = {r["run"]: r for r in plan["runs"]}
    rows = []
    for job in plan["jobs"]:
        if job["run"] is None or not is_done(job, plan_dir):
            continue
        m = final_metrics(os.path.join(plan_dir, job["workdir"]), job["steps"])
        r = runs[job["run"]]
        rows.append({"params": r["params"], "tokens": r["tokens"], "flops": r["flops"], "loss": m.get("loss", ""),
                     "eval_loss": m["eval_loss"], "run": job["run"], "budget": r["budget"]})
    with open(os.path.join(plan_dir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    return len(rows)
