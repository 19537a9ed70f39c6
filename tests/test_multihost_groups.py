"""Multi-host input: 4 local JAX processes x 2 CPU devices (collectives through jax.distributed) on
meshes whose tensor / fsdp groups span processes train with the losses of one process driving 8
devices; the global batch is (batch_size, T); processes sharing rows are in the same row group."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from multihost_groups_worker import config_for
from test_train import run_losses

HERE = Path(__file__).resolve().parent
LAYOUTS = ("fsdp=2,tensor=4,data=1", "data=2,fsdp=2,tensor=2")
STEPS = 8


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(tmp_path, num_processes, devices_each, layouts, steps):
    out = tmp_path / "result"
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_each}",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    addr = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, str(HERE / "multihost_groups_worker.py"), addr, str(num_processes), str(i),
                               str(out), str(steps), ";".join(layouts)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(num_processes)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-2000:] for log in logs)
    return [json.loads(Path(f"{out}.{i}").read_text()) for i in range(num_processes)]


def test_four_processes_with_groups_spanning_hosts_match_one_process(tmp_path):
    results = run_workers(tmp_path, 4, 2, LAYOUTS, STEPS)
    print("worker CPU seconds:", [r["cpu_seconds"] for r in results])
    assert all(r["process_count"] == 4 and r["device_count"] == 8 for r in results)
    for layout in LAYOUTS:
        cfg = config_for(layout)
        want, _ = run_losses(cfg, jax.devices(), STEPS)
        for r in results:
            got = r["layouts"][layout]
            assert got["shapes"] == [[cfg.batch_size, cfg.seq_len]], got["shapes"]
            np.testing.assert_allclose(got["losses"], want, rtol=1e-5, err_msg=layout)
    # fsdp=2, tensor=4: processes 0,1 hold rows 0-3 (one tensor group), 2,3 rows 4-7 -> 2 row groups
    fsdp_tensor = [r["layouts"][LAYOUTS[0]] for r in results]
    assert [g["rows"] for g in fsdp_tensor] == [[0, 4], [0, 4], [4, 8], [4, 8]]
    assert [g["group"] for g in fsdp_tensor] == [[0, 2], [0, 2], [1, 2], [1, 2]]
    # data=2, fsdp=2, tensor=2: each process holds one tensor pair = its own 2 rows -> 4 row groups
    assert [r["layouts"][LAYOUTS[1]]["group"] for r in results] == [[i, 4] for i in range(4)]
    for r in results:
        assert "not one aligned contiguous range" in r["scattered_error"] and "Fix" in r["scattered_error"]
