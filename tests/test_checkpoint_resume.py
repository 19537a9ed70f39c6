"""End to end, through ``python -m glmjax.train`` on the tiny config: interrupted runs resume exactly.

One run is killed with SIGKILL at a random point (while a checkpoint is being written, or between saves),
resumed, stopped with SIGTERM at a random step (exit status 0, a checkpoint of the step reached), and resumed to the end. Every step's
``loss`` in its ``metrics.jsonl`` must equal, bitwise, that of an uninterrupted run with the same seed
(run at the same time, in parallel). About two minutes on a 2-core CPU.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 10, 2  # saves at 2, 4, 6, 8, 10
ARGS = ["--config=configs/tiny.py", f"--config.steps={STEPS}", f"--config.checkpoint.every={EVERY}",
        "--config.checkpoint.keep=2", "--config.log_every=1", "--config.eval_every=0", "--config.seq_len=64",
        "--config.batch_size=8", "--config.optimizer.warmup_steps=4"]


def start(workdir: Path, log_name: str) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    log = open(workdir.parent / f"{workdir.name}.{log_name}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "glmjax.train", f"--workdir={workdir}", *ARGS], cwd=ROOT,
                            env=env, stdout=log, stderr=subprocess.STDOUT)


def metrics(workdir: Path) -> dict[int, dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        assert record["step"] not in out, f"duplicate step {record['step']} in {path}"
        out[record["step"]] = record
    return out


def committed_steps(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def wait_until(proc: subprocess.Popen, condition, what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}; see its log in {proc.args}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def log_text(workdir: Path, name: str) -> str:
    return (workdir.parent / f"{workdir.name}.{name}.log").read_text()


def test_sigkill_and_sigterm_resume_exactly(tmp_path):
    seed = int(os.environ.get("GLMJAX_TEST_SEED", time.time_ns() % 2**32))
    print(f"GLMJAX_TEST_SEED={seed}")  # rerun with this to repeat the same interruptions
    rng = random.Random(seed)
    reference, run = tmp_path / "reference", tmp_path / "run"
    reference.mkdir()
    run.mkdir()
    ref_proc = start(reference, "uninterrupted")

    # 1. SIGKILL at a random point: while a save is in flight (orbax's tmp directory exists, the step is
    #    not committed yet) or between saves (at a random step that is not a save step).
    proc = start(run, "killed")
    if rng.random() < 0.5:
        kill_in = rng.choice([EVERY * 2, EVERY * 3])
        tmp_name = f"{kill_in}.orbax-checkpoint-tmp"
        wait_until(proc, lambda: any(p.name.startswith(tmp_name) for p in (run / "checkpoints").glob("*"))
                   or kill_in in committed_steps(run), f"the save of step {kill_in}")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        where = f"at the save of step {kill_in}, {'during' if kill_in not in committed_steps(run) else 'after'} it"
    else:
        kill_at = rng.choice([s for s in range(EVERY + 1, EVERY * 3) if s % EVERY])
        wait_until(proc, lambda: max(metrics(run), default=0) >= kill_at, f"step {kill_at}")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        where = f"between saves, after step {max(metrics(run))} was logged"
    print(f"SIGKILL {where}; committed: {committed_steps(run)}")

    # 2. Resume, then SIGTERM at a random later step: exit 0 with a checkpoint of the step reached.
    stale_inode = (run / "metrics.jsonl").stat().st_ino  # the resumed run rewrites the file (new inode)
    proc = start(run, "resumed")
    resumed_from = max(committed_steps(run), default=0)  # 0: killed before the first commit
    term_at = rng.randint(resumed_from + 2, STEPS - 2)
    wait_until(proc, lambda: (run / "metrics.jsonl").stat().st_ino != stale_inode
               and max(metrics(run), default=0) >= term_at, f"step {term_at}")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, log_text(run, "resumed")
    reached = max(metrics(run))
    assert term_at <= reached < STEPS
    assert max(committed_steps(run)) == reached, (committed_steps(run), reached)
    assert "preempted: checkpoint of step" in log_text(run, "resumed")
    assert (f"restored checkpoint step {resumed_from}" in log_text(run, "resumed")) == (resumed_from > 0)

    # 3. Resume to the end.
    proc = start(run, "finished")
    assert proc.wait(timeout=300) == 0, log_text(run, "finished")
    assert f"restored checkpoint step {reached}" in log_text(run, "finished")
    assert ref_proc.wait(timeout=300) == 0, log_text(reference, "uninterrupted")

    got, want = metrics(run), metrics(reference)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:  # bitwise: JSON keeps every digit of the float
        assert got[step]["loss"] == want[step]["loss"], (step, got[step]["loss"], want[step]["loss"])
    saves = set(range(EVERY, STEPS + 1, EVERY)) | {STEPS}
    # checkpoint.keep=2: the last two saves; the interrupted run also saved at the SIGTERM step
    assert committed_steps(reference) == sorted(saves)[-2:]
    assert committed_steps(run) == sorted(saves | {reached})[-2:], (committed_steps(run), reached)
