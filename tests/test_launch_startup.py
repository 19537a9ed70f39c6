"""Start-up robustness of the training command: a process that cannot reach the jax.distributed coordinator
(or whose peers never come) exits with status 3 and a message naming the coordinator address, within
--distributed_timeout, instead of JAX's abort or a hang; it says which host/process it is."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("process_id,expect", [(1, "could not reach the coordinator at 127.0.0.1:{port}"),
                                               (0, "the coordinator at 127.0.0.1:{port} accepts connections but "
                                                   "not all 2 processes joined")], ids=["unreachable", "peer_missing"])
def test_unreachable_coordinator_fails_with_its_address(process_id, expect, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}

    r = subprocess.run([sys.executable, "-m", "glmjax.train", "--config=configs/tiny.py", f"--workdir={tmp_path}",
                        f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={process_id}",
                        "--distributed_timeout=3"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr[-2000:]
    assert expect.format(port=port) in r.stderr and f"process {process_id} of 2" in r.stderr
    assert "joining jax.distributed as process" in r.stderr and "--distributed_timeout" in r.stderr
