"""Child process of tests/test_multihost.py: one of N JAX processes training the tiny model for a few
steps on a global batch that every process builds from the same seed, each feeding only its rows."""
import json
import sys

import jax
import numpy as np


def main(coordinator, num_processes, process_id, out_path, steps):
    from glmjax import distributed

    distributed.initialize(coordinator, num_processes, process_id)
    from test_train import run_losses, tiny

    cfg = tiny("--config.mesh.data=2", "--config.mesh.fsdp=2")
    losses, _ = run_losses(cfg, jax.devices(), steps)
    if jax.process_index() == 0:
        with open(out_path, "w") as f:
            json.dump({"losses": losses.tolist(), "process_count": jax.process_count(),
                       "device_count": jax.device_count()}, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
