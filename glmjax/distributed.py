"""Multi-host initialisation: one JAX process per host, all devices of all hosts in one mesh.

``initialize(...)`` is called by the training command before anything touches devices:
- explicit: ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (any cluster, tests);
- ``--multihost``: ``jax.distributed.initialize()`` auto-detects Cloud TPU pods, GKE and Slurm
  (Slurm: ``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``, ``SLURM_NTASKS``, ``SLURM_PROCID``, ``SLURM_LOCALID``;
  the coordinator is the first node of the step, port derived from the job id).
On CPU, collectives across processes go through gloo.

Start-up robustness. Every process logs who it is (host name, pid, process index) before and after
connecting. JAX itself aborts the process with a C++ ``DEADLINE_EXCEEDED`` check failure when the
coordinator cannot be reached in time; instead, a watchdog owns the deadline (``timeout_s``, the
``--distributed_timeout`` flag): when it passes, the process prints what it was waiting for, whether the
coordinator's address accepts TCP connections at all, and the fix, then exits with
:data:`INIT_FAILED_EXIT_CODE`. JAX's own deadline is set a little later so the watchdog always speaks first.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import threading

import jax

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300  # JAX's default; large pods whose hosts boot minutes apart need more
INIT_FAILED_EXIT_CODE = 3
_JAX_GRACE_S = 15  # JAX's own deadline = ours + this, so our message comes first


def _identity() -> str:
    return f"host {socket.gethostname()} (pid {os.getpid()})"


def _tcp_reachable(address: str, timeout: float = 2.0) -> str:
    """'' if ``HOST:PORT`` accepts a TCP connection, else the reason (e.g. 'connection refused')."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return ""
    except (OSError, ValueError) as e:
        return e.strerror or str(e) or type(e).__name__


def _failure_message(timeout_s: float) -> str:
    """What the process was waiting for, read from JAX's distributed state at the deadline."""
    try:
        from jax._src import distributed as jax_distributed

        state = jax_distributed.global_state
        address, pid, count = state.coordinator_address, state.process_id, state.num_processes
    except Exception:  # noqa: BLE001 - private API moved: fall back to a message without the details
        address, pid, count = None, None, None
    who = f"process {pid} of {count}" if pid is not None and count else "this process"
    if address is None:
        return (f"jax.distributed did not initialise within {timeout_s:g} s on {_identity()}: the cluster "
                "environment (TPU metadata / Slurm variables) did not yield a coordinator address. Fix: pass "
                "--coordinator_address=HOST:PORT --num_processes=N --process_id=I explicitly.")
    reason = _tcp_reachable(address)
    if reason:
        return (f"{who} on {_identity()} could not reach the coordinator at {address} within {timeout_s:g} s "
                f"({reason}). The coordinator is process 0: check that it is running, that {address} is "
                f"its address as seen from this host, and that the port is open between hosts (firewall). "
                f"If hosts start minutes apart, raise --distributed_timeout.")
    return (f"{who} on {_identity()}: the coordinator at {address} accepts connections but not all "
            f"{count if count else 'N'} processes joined within {timeout_s:g} s. A process is missing, started "
            f"late or with a different --num_processes. Check every host's log (each prints its process "
            f"index when it starts), or raise --distributed_timeout for slow pods.")


class _Watchdog:
    """Exits the process with a clear message if ``jax.distributed.initialize`` is still running at the deadline."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="glmjax-distributed-watchdog")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()

    def _run(self):
        if self._done.wait(self.timeout_s):
            return
        print(f"error: {_failure_message(self.timeout_s)}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(INIT_FAILED_EXIT_CODE)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Start ``jax.distributed`` (explicit or auto-detected); a no-op for a single-process run."""
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    if not explicit and not auto:
        return
    if explicit and None in (coordinator_address, num_processes, process_id):
        raise ValueError("multi-host needs all of --coordinator_address, --num_processes and --process_id "
                         f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r}); or pass "
                         "--multihost to let JAX detect a TPU pod / GKE / Slurm cluster")
    if not timeout_s > 0:
        raise ValueError(f"--distributed_timeout={timeout_s} must be > 0 seconds (JAX's default is "
                         f"{DEFAULT_TIMEOUT_S})")
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # option renamed or removed in this JAX: its default already works
        pass
    jax_timeout = int(timeout_s) + _JAX_GRACE_S
    if explicit:
        log.info("%s: joining jax.distributed as process %d of %d, coordinator %s (timeout %g s)", _identity(),
                 int(process_id), int(num_processes), coordinator_address, timeout_s)
        with _Watchdog(timeout_s):
            jax.distributed.initialize(coordinator_address, int(num_processes), int(process_id),
                                       initialization_timeout=jax_timeout)
    else:
        log.info("%s: joining jax.distributed, cluster auto-detected (timeout %g s)", _identity(), timeout_s)
        with _Watchdog(timeout_s):
            jax.distributed.initialize(initialization_timeout=jax_timeout)
    log.info("%s is process %d of %d: %d local / %d global devices (%s)", _identity(), jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)


_barrier_count = 0


def sync_processes(name: str, timeout_s: float = 1800) -> None:
    """Blocks until every process reaches this point; a no-op for a single-process run.

    Uses the coordination service's barrier, not a device collective, so no gloo / NCCL context is
    created and no device time is spent. ``timeout_s`` bounds how far apart hosts may arrive (their
    compile times can differ by minutes on a busy cluster).
    """
    global _barrier_count
    if jax.process_count() == 1:
        return
    from jax._src import distributed as _dist  # the client has no public accessor in this JAX
    _barrier_count += 1
    _dist.global_state.client.wait_at_barrier(f"glmjax:{_barrier_count}:{name}", int(timeout_s * 1000))


def compiled_in_step(fn, name: str):
    """``fn`` (a jitted function), compiled ahead of its first call on every process, then synchronised.

    On CPU, gloo sets up its connections for a set of devices at the first collective that uses them
    and gives peers only 30 s to arrive; a process that compiles faster than another (a busy host)
    would fail with ``Gloo context initialization failed``. Compiling first and meeting at a
    coordination barrier (:func:`sync_processes`) before the first execution removes that race on any
    platform. Single-process runs get ``fn`` unchanged.
    """
    if jax.process_count() == 1:
        return fn
    compiled = {}

    def call(*args):
        if "fn" not in compiled:
            compiled["fn"] = fn.lower(*args).compile()
            sync_processes(f"{name} compiled")
        return compiled["fn"](*args)
    return call
