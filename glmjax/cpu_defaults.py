"""Process defaults for training on CPU (no accelerator): keep XLA:CPU's step buffers mapped.

XLA:CPU allocates each execution's temporary buffer (the tiny train step: 107 MB) with ``malloc`` from
a worker thread and frees it at the end of the step. glibc serves a request that large with a fresh
``mmap`` (thread arenas cannot hold it) and unmaps it on ``free``, so every step page-faults its whole
working set again: 26k minor faults and 45-70 ms of kernel time per ~180 ms tiny step on this project's
2-core box (docs/benchmarks.md). :func:`apply_cpu_malloc_defaults` sets ``M_ARENA_MAX=1`` (every thread
allocates from the main arena, which grows with ``brk``), ``M_MMAP_MAX=0`` (no per-allocation maps)
and a 2 GiB ``M_TRIM_THRESHOLD`` (freed memory stays with the process for the next step): 2.6k faults
and ~5 ms kernel time per step. It must run before JAX creates its CPU client (the arena limit only
applies to threads that have not allocated yet); once JAX's backends exist it does nothing.

Applied by ``python -m glmjax.train`` and ``tools/bench_train.py`` when the process will run on CPU
(``JAX_PLATFORMS`` is ``cpu``, or no TPU / GPU device node exists); ``GLMJAX_CPU_MALLOC=0`` turns it
off. Not applied on accelerator hosts: there the step's buffers live in device memory and the host's
threads (input pipeline) are better served by per-thread arenas. The cost on CPU: the process keeps
its peak heap instead of returning freed memory to the system.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_applied = False


def runs_on_cpu_only() -> bool:
    """Whether JAX in this process will use the CPU backend only (decided without initialising JAX)."""
    plats = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if plats:
        return all(p.strip() == "cpu" for p in plats.split(",") if p.strip())
    accel = (glob.glob("/dev/accel[0-9]*") + glob.glob("/dev/vfio/[0-9]*") + glob.glob("/dev/nvidia[0-9]*")
             + glob.glob("/dev/kfd"))
    return not accel


def _jax_started() -> bool:
    """JAX's backends exist already (e.g. a test calling the CLI in-process): too late to help, skip."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
        return bool(getattr(xla_bridge, "_backends", None))
    except Exception:  # private API moved: assume started, change nothing
        return True


def apply_cpu_malloc_defaults() -> bool:
    """Set the glibc malloc options above when running on CPU only; True when applied (idempotent)."""
    global _applied
    if _applied:
        return True
    if os.environ.get("GLMJAX_CPU_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if not runs_on_cpu_only() or _jax_started():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    _applied = bool(ok)
    return _applied
