"""``flash_attention`` under a device mesh: ``jax.shard_map`` over batch and head axes.

Pallas kernels (and cuDNN custom calls) are opaque to XLA's SPMD partitioner, so on a mesh with
more than one device each device runs the kernel on its own rows and heads. Attention never mixes
batch rows or heads, so no communication is needed. The kv heads are split along with the query
heads only when the kv head count divides the head axis; otherwise heads stay replicated (correct,
the head axis then repeats the work), because a query-head shard must hold its own kv heads.
"""
from __future__ import annotations

import math

import jax
from jax.sharding import Mesh, PartitionSpec as P

from pallas_kernels.api import flash_attention


def _axes_for(size: int, axes: tuple[str, ...], mesh: Mesh):
    """Mesh axes (of ``axes`` with size > 1) that split a dim of ``size``, or None."""
    live = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
    n = math.prod(mesh.shape[a] for a in live)
    if not live or size % n:
        return None
    return live[0] if len(live) == 1 else live


def sharded_flash_attention(q_BTHD, k_BSKD, v_BSKD, segment_ids_BT, bidirectional_BT, *,
                            mesh: Mesh | None, batch_axes=("data", "fsdp"), head_axes=("tensor",),
                            **kwargs):
    """``flash_attention`` (same kwargs) run per device on ``mesh``; plain call without a mesh."""
    if mesh is None or mesh.size == 1:
        return flash_attention(q_BTHD, k_BSKD, v_BSKD, segment_ids_BT, bidirectional_BT, **kwargs)
    batch = _axes_for(q_BTHD.shape[0], tuple(batch_axes), mesh)
    heads = _axes_for(k_BSKD.shape[2], tuple(head_axes), mesh)
    qkv, rows = P(batch, None, heads, None), P(batch, None)
    masks = [m for m in (segment_ids_BT, bidirectional_BT) if m is not None]
    has = (segment_ids_BT is not None, bidirectional_BT is not None)

    def local(q, k, v, *local_masks):
        it = iter(local_masks)
        seg, bid = (next(it) if present else None for present in has)
        return flash_attention(q, k, v, seg, bid, **kwargs)

    fn = jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, *[rows] * len(masks)),
                       out_specs=qkv, check_vma=False)
    return fn(q_BTHD, k_BSKD, v_BSKD, *masks)
