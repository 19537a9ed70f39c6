"""Checkpoint integrity: a fingerprint of every array leaf, written at save time and checked on restore.

The array files are zstd-compressed without checksums, so flipped bytes can decode into wrong numbers
without any read error. A fingerprint per leaf (see :func:`leaf_fingerprint`) is stored in the
checkpoint's ``integrity`` item and compared with the restored values, on whatever mesh they land.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


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


def fingerprints(state) -> dict[str, str]:
    """``{leaf path: hex fingerprint}`` of every array leaf of ``state`` (one jitted reduction)."""
    flat = [(jax.tree_util.keystr(path), x) for path, x in jax.tree_util.tree_leaves_with_path(state)
            if isinstance(x, jax.Array)]
    groups: dict[frozenset, list[int]] = {}  # one jitted call per device set (leaves may live apart)
    for i, (_, x) in enumerate(flat):
        groups.setdefault(frozenset(x.sharding.device_set), []).append(i)
    values = [None] * len(flat)
    for members in groups.values():
        for i, v in zip(members, _fingerprint_leaves([flat[i][1] for i in members])):
            values[i] = v
    return {name: f"{local_int(v):08x}" for (name, _), v in zip(flat, values)}


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

