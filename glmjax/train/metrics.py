"""Metrics output of a run: ``WORKDIR/metrics.jsonl``, TensorBoard event files, MFU.

MFU = achieved model FLOP/s over peak FLOP/s of the devices. Peaks come from a table of known
accelerators (bf16 dense); on CPU (or an unknown device) the peak is the matmul rate measured in the
same process with a large ``jnp.dot``, so MFU there is a ratio to what this machine's BLAS delivers.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp

# bf16 dense peak FLOP/s per device
PEAK_FLOPS = {
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v5": 459e12,
    "tpu v6 lite": 918e12, "tpu v6e": 918e12, "h100": 989e12, "h200": 989e12, "h800": 989e12,
    "a100": 312e12, "b200": 2250e12, "gh200": 989e12,
}


def measured_matmul_flops(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
    """FLOP/s of an ``n x n`` matmul on the default device, best of ``repeats`` (after a warm-up)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def peak_flops_per_device() -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    kind = jax.devices()[0].device_kind.lower()
    for name, flops in PEAK_FLOPS.items():
        if name in kind:
            return flops, f"table ({kind})"
    return measured_matmul_flops(), f"measured jnp.dot on {kind}"


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl``; mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # TensorBoard is optional; metrics.jsonl is always written
                self._tb = None

    def truncate_after(self, step: int) -> None:
        """Drop records with ``step > step`` (a resumed run rewrites them): no duplicate steps."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [line for line in f if line.strip() and _step_of(line) is not None and _step_of(line) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _step_of(line: str):
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _plain(v):
    try:
        return float(v) if not isinstance(v, (int, str)) else v
    except TypeError:
        return v
