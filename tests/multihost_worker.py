"""Child process of tests/test_multihost.py: one of N JAX processes training the tiny model for a few
steps on a global batch that every process builds from the same seed, each feeding only its rows."""
import json
import sys

import jax


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


def late_first_collective(coordinator, num_processes, process_id, out_path, late_s):
    """The last process reaches its first cross-process collective ``late_s`` seconds after the others
    (as a host whose compile is slower would); ``compiled_in_step`` must make the others wait."""
    import time

    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from glmjax import distributed

    distributed.initialize(coordinator, num_processes, process_id)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sh = NamedSharding(mesh, P("data"))
    n = jax.device_count()
    x = jax.make_array_from_callback((n, 3), sh, lambda idx: np.arange(n * 3, dtype=np.float32).reshape(n, 3)[idx])
    total = distributed.compiled_in_step(jax.jit(lambda a: a.sum(0), out_shardings=NamedSharding(mesh, P())),
                                         "sum")
    if process_id == num_processes - 1:
        time.sleep(late_s)
    got = np.asarray(jax.device_get(total(x)))
    want = np.arange(n * 3, dtype=np.float64).reshape(n, 3).sum(0)
    with open(f"{out_path}.{process_id}", "w") as f:
        json.dump({"got": got.tolist(), "want": want.tolist()}, f)


if __name__ == "__main__":
    if sys.argv[1] == "late":
        late_first_collective(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], float(sys.argv[6]))
    else:
        main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
