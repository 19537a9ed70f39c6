"""Host rows and global batches, without TensorFlow (cheap to import in every process).

The batch sharding (``sharding.batch_sharding``) splits a ``[batch_size, ...]`` batch into
``data * fsdp`` equal row slices. A process holds the slices of its devices: :func:`host_rows` gives
them as one contiguous range ``[lo, hi)``; processes whose devices share a slice (a tensor or fsdp
group that spans hosts) get the same range. :func:`row_group` numbers those ranges, so the input
pipeline can shard its data by row group rather than by process. :func:`to_global` assembles each
process's rows into global arrays with ``jax.make_array_from_process_local_data(..., global_shape)``.
"""
from __future__ import annotations

import jax
import numpy as np


def host_rows(sharding: jax.sharding.Sharding, batch_size: int) -> tuple[int, int]:
    """``[lo, hi)``: the rows of a ``[batch_size, ...]`` batch that this process's devices hold.

    Raises ValueError if they are not one contiguous range of equal-sized slices (a mesh whose device
    order gives a process scattered rows), naming the fix.
    """
    index_map = sharding.addressable_devices_indices_map((batch_size, 1))
    slices = sorted({(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop) for s in index_map.values()})
    lo, hi = slices[0][0], slices[-1][1]
    covered = sum(b - a for a, b in slices)
    if covered != hi - lo or batch_size % (hi - lo) or lo % (hi - lo):
        raise ValueError(
            f"this process's devices hold the batch rows {slices} of {batch_size}: not one aligned contiguous "
            "range, so hosts cannot read disjoint row groups. Fix: order the mesh so that each host's devices "
            "are adjacent along (data, fsdp) (the default make_mesh does), or change mesh.* so that the "
            "data-parallel size divides evenly between the hosts.")
    return lo, hi


def row_group(sharding: jax.sharding.Sharding, batch_size: int) -> tuple[int, int]:
    """``(index, count)`` of this process's row group (see the module docstring)."""
    lo, hi = host_rows(sharding, batch_size)
    return lo // (hi - lo), batch_size // (hi - lo)


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding,
              batch_size: int | None = None) -> dict[str, jax.Array]:
    """Assembles every host's rows (:func:`host_rows`) into global ``[batch_size, ...]`` arrays.

    ``batch_size`` defaults to this host's rows times the row-group count the sharding implies.
    A local batch whose row count is not the host's ``hi - lo`` is an error (before any transfer).
    """
    first = np.asarray(next(iter(batch.values())))
    if batch_size is None:  # rows per slice x number of row slices of the whole batch
        n = sharding.num_devices  # a batch of num_devices rows splits evenly along any mesh axes
        slices = {(s[0].start, s[0].stop) for s in sharding.devices_indices_map((n, 1)).values()}
        mine = {(s[0].start, s[0].stop) for s in sharding.addressable_devices_indices_map((n, 1)).values()}
        batch_size = first.shape[0] * len(slices) // len(mine)
    lo, hi = host_rows(sharding, batch_size)
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.shape[0] != hi - lo:
            raise ValueError(f"feature {k!r} has {v.shape[0]} rows but this process holds rows [{lo}, {hi}) of the "
                             f"global batch of {batch_size}: build the pipeline with make_pipeline(cfg, split) "
                             "(or the same sharding) so the local batch matches the mesh")
        out[k] = jax.make_array_from_process_local_data(sharding, v, (batch_size, *v.shape[1:]))
    return out
