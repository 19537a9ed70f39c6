"""Multi-host initialisation: one JAX process per host, all devices of all hosts in one mesh.

``initialize(...)`` is called by the training command before anything touches devices:
- explicit: ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (any cluster, tests);
- ``--multihost``: ``jax.distributed.initialize()`` auto-detects Cloud TPU pods, GKE and Slurm.
On CPU, collectives across processes go through gloo.
"""
from __future__ import annotations

import logging

import jax

log = logging.getLogger(__name__)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False) -> None:
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    if not explicit and not auto:
        return
    if explicit and None in (coordinator_address, num_processes, process_id):
        raise ValueError("multi-host needs all of --coordinator_address, --num_processes and --process_id "
                         f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r}); or pass "
                         "--multihost to let JAX detect a TPU pod / GKE / Slurm cluster")
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # option renamed or removed in this JAX: its default already works
        pass
    if explicit:
        jax.distributed.initialize(coordinator_address, int(num_processes), int(process_id))
    else:
        jax.distributed.initialize()
    log.info("process %d of %d: %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
