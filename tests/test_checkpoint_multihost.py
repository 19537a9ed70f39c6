"""Multi-host checkpoints: 2 local JAX processes (2 CPU devices each, one data=2 x fsdp=2 mesh) save the tiny
GLM's state with each host's own data-iterator state at steps 0 and 1; step 1 is damaged; both hosts
fall back to step 0 together, and every host gets back its own iterator state and the shards it owns,
bit for bit, with the fingerprints checked."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys
from glmjax import distributed
addr, index, workdir, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
distributed.initialize(addr, 2, index)
import jax, numpy as np
from glmjax.checkpoint import Checkpointer
from glmjax.config import load_config
from glmjax.sharding import make_mesh
from glmjax.train.state import init_state, model_spec

cfg = load_config("configs/tiny.py", ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.seq_len=32",
                                      "--config.batch_size=8", "--config.checkpoint.every=1"])
spec = model_spec(cfg, make_mesh(cfg))
state = init_state(cfg, spec)
ckpt = Checkpointer(workdir, cfg)
assert ckpt.save(0, state, {"host": index, "batches": 10 + index})
assert ckpt.save(1, state.replace(step=state.step + 1), {"host": index, "batches": 20 + index})
ckpt.close()
if index == 0:  # damage the newest step: both hosts must agree to fall back to step 0
    open(f"{workdir}/checkpoints/1/state/_METADATA", "w").write("{")
from jax.experimental import multihost_utils
multihost_utils.sync_global_devices("damaged")

ckpt = Checkpointer(workdir, cfg)
restored, data_state, step = ckpt.restore(spec.abstract_state)
assert ckpt.all_steps() == [0], ckpt.all_steps()
ckpt.close()
equal = all(np.array_equal(np.asarray(a.data), np.asarray(b.data))
            for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored))
            for a, b in zip(x.addressable_shards, y.addressable_shards))
json.dump({"step": step, "data": data_state, "equal": equal, "process_count": jax.process_count()},
          open(out, "w"))
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_hosts_save_and_restore_their_own_state(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    addr = f"127.0.0.1:{free_port()}"
    workdir = tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, addr, str(i), str(workdir), str(tmp_path / f"{i}.json")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=400)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    for i in range(2):
        got = json.loads((tmp_path / f"{i}.json").read_text())
        assert got == {"step": 0, "data": {"host": i, "batches": 10 + i}, "equal": True, "process_count": 2}
    data_dir = workdir / "checkpoints" / "0" / "data"
    assert sorted(p.name for p in data_dir.glob("process_*.json")) == ["process_0.json", "process_1.json"]
    assert (workdir / "checkpoint_fingerprints" / "0.json").exists()
    assert len(list((workdir / "checkpoints_damaged").iterdir())) == 1
