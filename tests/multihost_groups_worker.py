"""Child process of tests/test_multihost_groups.py: one of N JAX processes training the tiny model for a few
steps on meshes given on the command line. Every process builds the same global batches from one seed
and feeds only the rows its devices hold, through the production path (``host_rows`` + ``to_global``)."""
import json
import sys

import jax
import numpy as np


def config_for(layout: str):
    """The tiny config (one layer: compiles are most of this test's cost) on mesh ``layout``."""
    from test_train import tiny

    return tiny("--config.model.num_layers=1", *[f"--config.mesh.{kv}" for kv in layout.split(",")])


def main(coordinator, num_processes, process_id, out_path, steps, layouts):
    import time

    t0 = time.process_time()
    from glmjax import distributed

    distributed.initialize(coordinator, num_processes, process_id)
    from glmjax.data.global_batch import host_rows, row_group, to_global
    from glmjax.sharding import batch_sharding, make_mesh
    from glmjax.train.state import init_state, model_spec
    from glmjax.train.step import make_train_step
    from helpers import random_glm_features

    times = {"import+init": time.process_time() - t0}
    result = {"process_count": jax.process_count(), "device_count": jax.device_count(), "layouts": {}}
    for layout in layouts.split(";"):
        t0 = time.process_time()
        cfg = config_for(layout)
        mesh = make_mesh(cfg)
        spec = model_spec(cfg, mesh)
        state = init_state(cfg, spec)
        step_fn = make_train_step(cfg, spec, mesh)
        sh = batch_sharding(mesh)
        lo, hi = host_rows(sh, cfg.batch_size)
        rng = np.random.default_rng(0)
        losses, shapes = [], set()
        for _ in range(steps):
            b = random_glm_features(rng, cfg.batch_size, cfg.seq_len, cfg.model.vocab_size)
            batch = to_global({k: v[lo:hi] for k, v in b.items()}, sh)  # as the loop calls it
            shapes |= {tuple(v.shape) for v in batch.values()}
            state, m = step_fn(state, batch)
            losses.append(float(m["loss"]))
        times[layout] = time.process_time() - t0
        result["layouts"][layout] = {"losses": losses, "shapes": sorted(shapes), "rows": [lo, hi],
                                     "group": list(row_group(sh, cfg.batch_size))}
    # a mesh whose device order scatters a host's rows is refused before anything compiles
    per_process = [sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
                   for p in range(jax.process_count())]
    devs = [per_process[p][k] for k in range(2) for p in range(jax.process_count())]  # a host's rows 4 apart
    bad = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(devs).reshape(8, 1, 1), ("data", "fsdp", "tensor")),
                                     jax.sharding.PartitionSpec(("data", "fsdp")))
    try:
        host_rows(bad, 8)
        result["scattered_error"] = None
    except ValueError as e:
        result["scattered_error"] = str(e)
    result["cpu_seconds"] = times
    with open(f"{out_path}.{jax.process_index()}", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), sys.argv[6])
