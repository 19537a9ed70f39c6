"""Checkpoint integrity: a fingerprint of every array leaf, written at save time and checked on restore.

The array chunks are zstd-compressed without checksums, so flipped bytes can decode into wrong numbers
without any read error. A fingerprint per leaf (see :func:`leaf_fingerprint`) is kept in
``WORKDIR/checkpoint_fingerprints/<step>.json`` and compared with the restored values, on whatever mesh
they land.

The reduction is dispatched when the save starts and its result is written by a background thread, so it
never blocks the loop (integer reductions are slow on CPU: ~1 s for a 100M-parameter state on 2 cores).
The file is deleted before a step is saved and written only after the values are known: a step without
one (a crash in between) restores unverified, with a log line; a step with one always matches it unless
its files were damaged.
"""
from __future__ import annotations

import json
import logging
import threading

import jax
import jax.numpy as jnp
from etils import epath

log = logging.getLogger("glmjax.checkpoint")


def leaf_fingerprint(x) -> jax.Array:
    """uint32 sum of each element's bits times an odd weight of its flat index (mod 2**32).

    Integer addition is associative, so the value does not depend on the sharding: a checkpoint saved on
    one mesh verifies on another. Any single changed element changes it (odd weights are invertible).
    """
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    bits = jnp.dtype(x.dtype).itemsize * 8
    if x.dtype == jnp.bool_:
        u = x.astype(jnp.uint32)
    elif bits <= 32:
        u = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)
    else:
        u = jax.lax.bitcast_convert_type(x, jnp.uint32)  # adds a trailing dimension of 64 // 32
    index, stride = jnp.zeros(u.shape, jnp.uint32), 1
    for dim in reversed(range(u.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, u.shape, dim) * jnp.uint32(stride % 2**32)
        stride *= u.shape[dim]
    weight = (index * jnp.uint32(0x9E3779B1)) | jnp.uint32(1)  # odd: invertible mod 2**32
    return jnp.sum(u * weight, dtype=jnp.uint32)


@jax.jit
def _fingerprint_leaves(leaves):
    return [leaf_fingerprint(x) for x in leaves]


def _dispatch(state) -> dict[str, jax.Array]:
    """``{leaf path: uint32 scalar}`` of every array leaf, dispatched (not waited for)."""
    flat = [(jax.tree_util.keystr(path), x) for path, x in jax.tree_util.tree_leaves_with_path(state)
            if isinstance(x, jax.Array)]
    groups: dict[frozenset, list[int]] = {}  # one jitted call per device set (leaves may live apart)
    for i, (_, x) in enumerate(flat):
        groups.setdefault(frozenset(x.sharding.device_set), []).append(i)
    values = [None] * len(flat)
    for members in groups.values():
        for i, v in zip(members, _fingerprint_leaves([flat[i][1] for i in members])):
            values[i] = v
    return {name: v for (name, _), v in zip(flat, values)}


def _to_hex(values: dict[str, jax.Array]) -> dict[str, str]:
    return {name: f"{local_int(v):08x}" for name, v in values.items()}


def fingerprints(state) -> dict[str, str]:
    """``{leaf path: hex fingerprint}`` of every array leaf of ``state`` (one jitted reduction)."""
    return _to_hex(_dispatch(state))


def verify(state, saved: dict[str, str]) -> None:
    """Raise ValueError naming the leaves of ``state`` whose fingerprint differs from ``saved``."""
    now = fingerprints(state)
    bad = [name for name in saved if now.get(name) != saved[name]]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(f"the data read for {', '.join(bad[:3])}{more} does not match the fingerprint written "
                         f"at save time: the checkpoint's array files are corrupted")


def local_int(x) -> int:
    """An integer scalar's value, read from this host's first shard (works for multi-host arrays)."""
    if isinstance(x, jax.Array):
        x = x.addressable_shards[0].data
    return int(jax.device_get(x))


class FingerprintStore:
    """The fingerprint files of one workdir's checkpoints; only process 0 writes."""

    def __init__(self, directory: epath.Path, enabled: bool = True):
        self.directory, self.enabled = directory, enabled
        self._threads: list[threading.Thread] = []
        self._primary = jax.process_index() == 0

    def path(self, step: int) -> epath.Path:
        return self.directory / f"{step}.json"

    def start(self, step: int, state) -> None:
        """Forget any old fingerprint of ``step``; dispatch the new one and write it in the background."""
        if self._primary and self.path(step).exists():
            self.path(step).unlink()
        if not self.enabled:
            return
        values = _dispatch(state)  # enqueued before the next train step can donate the buffers
        thread = threading.Thread(target=self._write, args=(step, values), daemon=True,
                                  name=f"glmjax-fingerprint-{step}")
        thread.start()
        self._threads.append(thread)

    def _write(self, step: int, values) -> None:
        try:
            text = json.dumps({"state": _to_hex(values)})
            if self._primary:
                self.directory.mkdir(parents=True, exist_ok=True)
                tmp = self.directory / f".{step}.json.tmp"
                tmp.write_text(text)
                tmp.replace(self.path(step))
        except Exception as e:  # noqa: BLE001 -- a missing fingerprint only skips verification
            log.warning("could not write the fingerprints of checkpoint step %d (%s: %s); it will restore "
                        "unverified", step, type(e).__name__, e)

    def wait(self) -> None:
        for thread in self._threads:
            thread.join()
        self._threads.clear()

    def check(self, step: int, state) -> None:
        """Raise ValueError if ``state`` differs from the fingerprints saved for ``step`` (if there are any)."""
        path = self.path(step)
        if not self.enabled:
            return
        if not path.exists():
            log.info("checkpoint step %d has no fingerprints (%s): restored without verification", step, path)
            return
        verify(state, json.loads(path.read_text())["state"])

    def prune(self, steps) -> None:
        """Delete the fingerprints of steps that are no longer checkpoints."""
        if not self._primary or not self.directory.exists():
            return
        keep = {str(s) for s in steps}
        for path in self.directory.glob("*.json"):
            if path.stem not in keep:
                path.unlink()
