"""A resized job continues its data: ``python -m glmjax.train`` checkpointed on 2 local processes x 4 CPU
devices, resumed on 4 processes x 2 devices (2 -> 4), checkpointed there and resumed on 2 x 4 again
(4 -> 2), trains with the losses of one uninterrupted 1-process 8-device run (same global batches;
float32, rtol 1e-5).

Mesh data=2, fsdp=2, tensor=2 throughout: on 2 hosts each host holds 4 rows of the batch of 8, on 4
hosts 2 rows. The first phase fixes data.streams (auto: one per row group = 2). On 4 hosts two hosts
share each stream (each computes its 4 rows and keeps 2; processes 2 and 3 find no file of their own
and read the positions other hosts saved); back on 2 hosts each reads the stream saved by its owner
(processes 0 and 2 of the 4-host phase).
"""
import json
import os
import re
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from glmjax.config import load_config
from glmjax.data import testing
from glmjax.train.loop import train

REPO = Path(__file__).resolve().parents[1]
PHASES = ((2, 2), (4, 4), (2, 6))  # (processes, steps at the end of the phase): 2 -> 4 -> 2 hosts


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(tmp, steps):
    return [f"--config.steps={steps}", "--config.seq_len=32", "--config.batch_size=8", "--config.model.num_layers=1",
            "--config.model.vocab_size=512", "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
            "--config.eval_every=0", "--config.log_every=1", "--config.checkpoint.every=2",
            "--config.checkpoint.async_save=false", "--config.optimizer.warmup_steps=2",
            "--config.optimizer.schedule=constant",  # a decay would depend on each phase's --config.steps
            f"--config.data.task=text:{tmp}/docs/*.txt", f"--config.data.cache_dir={tmp}/cache",
            "--config.data.tokenizer_sample_chars=300000", "--config.data.shuffle_buffer=16",
            "--config.data.prefetch=1", "--config.data.snapshot_every=1"]


def losses(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def run_phase(tmp, workdir, processes, steps):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // processes}",
           "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(tmp / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    addr = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, "-m", "glmjax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
                               f"--coordinator_address={addr}", f"--num_processes={processes}", f"--process_id={i}",
                               *overrides(tmp, steps)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(processes)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return logs


def test_checkpoint_on_2_hosts_resumes_on_4_and_back_with_the_uninterrupted_losses(tmp_path):
    testing.write_corpus(str(tmp_path / "docs"), 16, seed=21)
    # the uninterrupted run: one process driving all 8 devices, the same 2 streams (pinned: auto gives 1 here)
    t0 = time.perf_counter()
    cfg = load_config(str(REPO / "configs/tiny.py"), [*overrides(tmp_path, PHASES[-1][1]), "--config.data.streams=2"])
    train(cfg, str(tmp_path / "straight"))
    want = losses(tmp_path / "straight")
    assert sorted(want) == list(range(1, 7))
    times = [time.perf_counter() - t0]

    workdir = tmp_path / "resized"
    all_logs = []
    for n, steps in PHASES:
        t0 = time.perf_counter()
        all_logs.append(run_phase(tmp_path, workdir, n, steps))
        times.append(time.perf_counter() - t0)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"wall seconds: reference {times[0]:.1f}, phases {[round(t, 1) for t in times[1:]]}; "
          f"CPU seconds of the {sum(n for n, _ in PHASES)} processes: {children.ru_utime + children.ru_stime:.1f}")
    got = losses(workdir)
    assert sorted(got) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], rtol=1e-5)

    for step in (4, 6):
        saved = json.loads((workdir / "checkpoints" / str(step) / "config" / "config.json").read_text())
        assert saved["data"]["streams"] == 2  # fixed by the first (2-host) phase, kept by the 4-host one
    # the 4-host checkpoint: each stream saved once, by its owner (process 0: stream 0, process 2: stream 1)
    owned = []
    for i in range(4):
        state = json.loads((workdir / "checkpoints" / "4" / "data" / f"process_{i}.json").read_text())
        assert state["batches"] == 4 and state["streams"] == 2
        assert all(s is not None for s in state["stream_states"].values())  # resumed through snapshots
        owned.append(sorted(map(int, state["stream_states"])))
    assert owned == [[0], [], [1], []], owned
    resumed = [re.findall(r"data train: resumed at global batch (\d+) \((.+)\)$", log, re.M) for log in sum(all_logs[1:], [])]
    assert resumed == [*[[("2", f"stream {i // 2} of 2, rows [{2 * i}, {2 * i + 2}) of 8")] for i in range(4)],
                       *[[("4", f"stream {i} of 2, rows [{4 * i}, {4 * i + 4}) of 8")] for i in range(2)]], resumed
