"""A resized job continues its data: ``python -m glmjax.train`` checkpointed on 4 local processes x 2 CPU
devices, resumed on 2 processes x 4 devices, then on 4 x 2 again, trains with the losses of one
uninterrupted 1-process 8-device run (same global batches; float32, rtol 1e-5).

Mesh data=2, fsdp=2, tensor=2 throughout: on 4 hosts each host holds 2 rows of the batch of 8 (4 row
groups), on 2 hosts 4 rows. The first phase fixes data.streams (auto: one per row group = 4); on 2
hosts each host runs 2 streams, and on 4 hosts again one each, reading the positions that other hosts
saved (processes 2 and 3 find no file of their own in a checkpoint of the 2-host phase).
"""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from glmjax.config import load_config
from glmjax.data import testing
from glmjax.train.loop import train

REPO = Path(__file__).resolve().parents[1]
PHASES = ((4, 2), (2, 4), (4, 6))  # (processes, steps at the end of the phase): 4 -> 2 -> 4 hosts


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(tmp, steps):
    return [f"--config.steps={steps}", "--config.seq_len=32", "--config.batch_size=8", "--config.model.num_layers=1",
            "--config.model.vocab_size=512", "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
            "--config.eval_every=0", "--config.log_every=1", "--config.checkpoint.every=2",
            "--config.checkpoint.async_save=false", "--config.optimizer.warmup_steps=2",
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


def test_checkpoint_on_4_hosts_resumes_on_2_and_back_with_the_uninterrupted_losses(tmp_path):
    testing.write_corpus(str(tmp_path / "docs"), 16, seed=21)
    # the uninterrupted run: one process driving all 8 devices, the same 4 streams (pinned: auto gives 1 here)
    cfg = load_config(str(REPO / "configs/tiny.py"), [*overrides(tmp_path, PHASES[-1][1]), "--config.data.streams=4"])
    train(cfg, str(tmp_path / "straight"))
    want = losses(tmp_path / "straight")
    assert sorted(want) == list(range(1, 7))

    workdir = tmp_path / "resized"
    all_logs = [run_phase(tmp_path, workdir, n, steps) for n, steps in PHASES]
    got = losses(workdir)
    assert sorted(got) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], rtol=1e-5)

    saved = json.loads((workdir / "checkpoints" / "4" / "config" / "config.json").read_text())
    assert saved["data"]["streams"] == 4  # fixed by the first (4-host) phase, kept by the 2-host one
    # the 2-host checkpoint: each host saved the positions of its own two streams
    for i, streams in enumerate(([0, 1], [2, 3])):
        state = json.loads((workdir / "checkpoints" / "4" / "data" / f"process_{i}.json").read_text())
        assert state["batches"] == 4 and sorted(map(int, state["stream_states"])) == streams
        assert all(s is not None for s in state["stream_states"].values())  # resumed through snapshots
    assert not (workdir / "checkpoints" / "4" / "data" / "process_2.json").exists()
    resumed = [re.findall(r"data train: resumed at global batch (\d+) \((.*?)\)", log) for log in sum(all_logs[1:], [])]
    assert resumed == [[("2", "streams 0-1 of 4, rows [0, 4) of 8")], [("2", "streams 2-3 of 4, rows [4, 8) of 8")],
                       *[[("4", f"stream {i} of 4, rows [{2 * i}, {2 * i + 2}) of 8")] for i in range(4)]], resumed
