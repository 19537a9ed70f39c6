"""Multi-host path: 2 local JAX processes (CPU collectives through jax.distributed), 2 devices each,
train on a (data=2, fsdp=2) mesh and produce the losses of one process driving 4 devices."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from test_train import run_losses, tiny

HERE = Path(__file__).resolve().parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    steps = 5
    out = tmp_path / "losses.json"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    addr = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, str(HERE / "multihost_worker.py"), addr, "2", str(i), str(out),
                               str(steps)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-2000:] for log in logs)
    got = json.loads(out.read_text())
    assert got["process_count"] == 2 and got["device_count"] == 4
    want, _ = run_losses(tiny("--config.mesh.data=2", "--config.mesh.fsdp=2"), jax.devices()[:4], steps)
    np.testing.assert_allclose(got["losses"], want, rtol=1e-5)


def test_a_late_process_is_waited_for_at_the_first_collective(tmp_path):
    """gloo gives peers 30 s to join a new device group's first collective; a host 40 s late (a slower
    compile) must be waited for at the coordination barrier of ``compiled_in_step``, not fail with
    ``Gloo context initialization failed`` (seen on a loaded 2-core CI box)."""
    out = tmp_path / "sum.json"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    addr = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, str(HERE / "multihost_worker.py"), "late", addr, "2", str(i),
                               str(out), "40"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-2000:] for log in logs)
    for i in range(2):
        got = json.loads(Path(f"{out}.{i}").read_text())
        np.testing.assert_allclose(got["got"], got["want"], rtol=1e-6)
