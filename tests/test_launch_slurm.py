"""launch/slurm.py for real: its sbatch script runs here with a fake `srun` that starts one task per "node"
the way Slurm does (SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS / SLURM_STEP_NODELIST set per task, the
job's SLURM_JOB_ID giving the coordinator port), 2 tasks x 4 fake CPU devices over localhost, each
task initialising jax.distributed from the Slurm environment (--multihost).

The job is preempted mid-run (SIGTERM to both tasks, as Slurm does before a preemption or the time
limit): training saves, exits 75 and the script requeues the job (a fake `scontrol` records it). The
requeued job (the same script again) resumes from that checkpoint and finishes 12 steps. The losses of
all 12 steps equal those of one process driving 8 devices on the same (data=2, fsdp=2, tensor=2) mesh
fed the same two host shards (relative 1e-4: float32 sums in a different order across processes); the
two host shards are disjoint, and each host's saved data-iterator state names its own shard.
"""
import json
import os
import random
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STEPS = 12
JAX_PORT_BASE = 65535 - 2**12 + 1  # JAX's Slurm rule: port = SLURM_JOB_ID % 4096 + this

FAKE_SRUN = r"""#!{python}
import os, signal, subprocess, sys
args = sys.argv[1:]
while args and args[0].startswith("--"):  # srun's own options
    args.pop(0)
n, logs = int(os.environ["SLURM_NNODES"]), os.environ["FAKE_SRUN_LOGS"]
procs = []
for i in range(n):  # --ntasks-per-node=1: task i on "node" i; all nodes are 127.0.0.1 here
    env = dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID="0", SLURM_NTASKS=str(n),
               SLURM_STEP_NODELIST="127.0.0.1", SLURM_STEP_NUM_NODES=str(n))
    procs.append(subprocess.Popen(args, env=env, stdout=open(f"{{logs}}/task{{i}}.log", "a"), stderr=subprocess.STDOUT))
open(f"{{logs}}/pids", "w").write(" ".join(str(p.pid) for p in procs))
signal.signal(signal.SIGTERM, lambda *_: [p.send_signal(signal.SIGTERM) for p in procs])
codes = [p.wait() for p in procs]
sys.exit(next((c for c in codes if c), 0))
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$@" >> "$FAKE_SRUN_LOGS/scontrol"
"""


def overrides(tmp):
    return ["--config.steps=12", "--config.seq_len=32", "--config.batch_size=8", "--config.eval_every=0",
            "--config.log_every=1", "--config.checkpoint.every=0", "--config.mesh.data=2", "--config.mesh.fsdp=2",
            "--config.mesh.tensor=2", "--config.model.vocab_size=512", f"--config.data.cache_dir={tmp / 'cache'}",
            "--config.data.tokenizer_sample_chars=300000", "--config.data.prefetch=1",
            "--config.data.shuffle_buffer=64", "--config.optimizer.warmup_steps=3"]


class TwoHostShards:
    """One process feeding the global batch the 2-host run assembles: host 0's rows, then host 1's."""

    def __init__(self, cfg):
        from glmjax.data.pipeline import make_pipeline

        self.hosts = [make_pipeline(cfg, "train", process_index=i, process_count=2) for i in range(2)]
        self.seen = [[], []]

    def __iter__(self):
        return self

    def __next__(self):
        batches = [next(h) for h in self.hosts]
        for seen, b in zip(self.seen, batches):
            seen.append(b["tokens"].copy())
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def get_state(self):
        return {"hosts": [h.get_state() for h in self.hosts]}

    def close(self):
        for h in self.hosts:
            h.close()


def reference_losses(tmp):
    from glmjax.config import load_config
    from glmjax.data.pipeline import to_global
    from glmjax.train.loop import train

    cfg = load_config(str(REPO / "configs/tiny.py"), overrides(tmp))
    shards = TwoHostShards(cfg)
    train(cfg, str(tmp / "reference"), restart=False, pipelines=(shards, None, to_global))
    records = [json.loads(line) for line in (tmp / "reference" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}, shards.seen


def free_slurm_job_id():
    """A job id whose JAX coordinator port is free on this machine."""
    for _ in range(200):
        port = random.randint(JAX_PORT_BASE, 65535)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        return 2**12 * 100 + port - JAX_PORT_BASE
    raise RuntimeError("no free port in JAX's Slurm port range")


def losses_of(workdir):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_sbatch_script_trains_on_two_processes_is_preempted_requeued_and_resumes(tmp_path):
    workdir, logs, fakebin = tmp_path / "run", tmp_path / "logs", tmp_path / "bin"
    logs.mkdir()
    fakebin.mkdir()
    script = tmp_path / "job.sbatch"
    r = subprocess.run([sys.executable, "launch/slurm.py", "--job_name=glm-test", "--nodes=2", "--gpus_per_node=4",
                        f"--python={sys.executable}", f"--script={script}", f"--log_dir={logs}", "--no_submit", "--",
                        "python", "-m", "glmjax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
                        *overrides(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    text = script.read_text()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --requeue" in text
    srun = [line for line in text.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1 and shlex.split(srun[0])[3:6] == [sys.executable, "-m", "glmjax.train"]
    assert "--multihost" in srun[0] and "--preempted_exit_code=75" in srun[0]

    (fakebin / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (fakebin / "scontrol").write_text(FAKE_SCONTROL)
    for f in fakebin.iterdir():
        f.chmod(0o755)

    want, seen = reference_losses(tmp_path)  # first: it also builds the tokenizer both tasks then read
    assert sorted(want) == list(range(1, STEPS + 1))
    host0, host1 = ({row.tobytes() for batch in rows for row in batch} for rows in seen)
    assert len(host0) == len(host1) == STEPS * 4 and not host0 & host1, "the two host shards overlap"

    job_id = free_slurm_job_id()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "XLA_FLAGS"))}
    env.update(PATH=f"{fakebin}{os.pathsep}{env['PATH']}", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", SLURM_JOB_ID=str(job_id), SLURM_NNODES="2", SLURM_JOB_NODELIST="127.0.0.1",
               FAKE_SRUN_LOGS=str(logs), JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")

    def task_logs(tail=3000):
        texts = [(logs / f"task{i}.log").read_text(errors="replace") for i in range(2)]
        return "\n".join(t[-tail:] if tail else t for t in texts)

    # 1. the job starts; once training is under way, both tasks get SIGTERM (preemption)
    job = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while not (workdir / "metrics.jsonl").exists() or not losses_of(workdir):
        assert job.poll() is None, f"the job ended before training started:\n{job.stdout.read()}\n{task_logs()}"
        assert time.time() < deadline, "training did not start within 10 minutes"
        time.sleep(0.05)
    for pid in (logs / "pids").read_text().split():
        os.kill(int(pid), 15)
    out = job.communicate(timeout=300)[0]
    assert job.returncode == 0, f"{out}\n{task_logs()}"
    first = losses_of(workdir)
    assert max(first) < STEPS, "the run finished before the preemption reached it"
    assert "requeueing job" in out
    assert (logs / "scontrol").read_text().split() == ["requeue", str(job_id)]
    log_text = task_logs(tail=None)
    assert "is process 0 of 2: 4 local / 8 global devices" in log_text
    assert "is process 1 of 2: 4 local / 8 global devices" in log_text

    # 2. the requeued job: the same script again resumes from the preemption checkpoint
    job = subprocess.run(["bash", str(script)], env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True,
                         text=True, timeout=600)
    assert job.returncode == 0, f"{job.stdout}\n{task_logs()}"
    saved = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == STEPS
    assert f"restored checkpoint step {max(first)} " in task_logs(tail=None)
    got = losses_of(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert abs(got[step] - want[step]) <= 1e-4 * abs(want[step]), (step, got[step], want[step])
    for i in range(2):  # each host saved the position of its own data stream (one stream per host)
        state = json.loads((workdir / "checkpoints" / str(STEPS) / "data" / f"process_{i}.json").read_text())
        assert (state["streams"], list(state["stream_states"]), state["batches"]) == (2, [str(i)], STEPS)
    assert (logs / "scontrol").read_text().split() == ["requeue", str(job_id)]  # not requeued again
