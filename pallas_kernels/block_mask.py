"""Key-range form of the GLM mask and the per-block classification every kernel schedules from.

The mask (DESIGN.md §3): query ``i`` sees key ``j`` iff ``seg[i] == seg[j] != 0`` and
(``j <= i`` or ``bid[j]``); with ``causal=False`` the second condition is dropped.

For each query row we derive two key ranges (``[B, T]`` int32 each):

* the *outer* range ``[lo, hi)``: every visible key lies inside it (used to skip empty blocks);
* the *full* range ``[full_lo, full_hi)``: every key inside it is visible (used to skip the mask
  arithmetic on full blocks).

When segments are contiguous and ``bid`` is a prefix of each segment (GLM Part A), the two ranges
coincide and equal the exact visible set ``[segment_start, max(i + 1, part_a_end))``. For any
other input (non-prefix ``bid``, non-contiguous segment ids) the ranges stay conservative: blocks
are classified *partial* more often and the kernels apply the exact element mask there, so results
stay exact. Empty rows (padding, segment id 0) get ``lo == hi == full_lo == full_hi == 0``.

A (query block, key block) pair is EMPTY when no row's outer range meets the key block, FULL when
every row's full range covers it, else PARTIAL. ``block_kind`` is written with plain ``jnp`` max /
min reductions so the GPU kernel calls the very same function inside its loop.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import idiv

EMPTY, PARTIAL, FULL = 0, 1, 2


def _row_ranges_1d(seg_T: jax.Array, bid_T: jax.Array, causal: bool):
    """Ranges for one batch row: returns (lo, hi, full_lo, full_hi, q_lo, q_hi), each ``[T]``."""
    T = seg_T.shape[0]
    idx = jnp.arange(T, dtype=jnp.int32)
    # Dense id per distinct segment value: position of its first occurrence in sorted order.
    perm = jnp.argsort(seg_T, stable=True)
    rank = jnp.searchsorted(seg_T[perm], seg_T, side="left").astype(jnp.int32)

    def per_seg(op, data):
        return op(data, rank, num_segments=T)[rank]

    seg_lo = per_seg(jax.ops.segment_min, idx)
    seg_hi = per_seg(jax.ops.segment_max, idx) + 1
    count = per_seg(jax.ops.segment_sum, jnp.ones_like(idx))
    contiguous = (seg_hi - seg_lo) == count
    bid_hi = per_seg(jax.ops.segment_max, jnp.where(bid_T, idx + 1, 0))  # 1 + last bid key
    first_causal = per_seg(jax.ops.segment_min, jnp.where(bid_T, T, idx))
    prefix_end = jnp.minimum(first_causal, seg_hi)  # end of the bid run that starts the segment

    if causal:
        lo, hi = seg_lo, jnp.maximum(idx + 1, bid_hi)
        full_hi = jnp.maximum(idx + 1, prefix_end)
        # Queries that may see key j: the whole segment if bid[j], else [j, seg_hi).
        q_lo = jnp.where(bid_T, seg_lo, idx)
    else:
        lo, hi, full_hi = seg_lo, seg_hi, seg_hi
        q_lo = seg_lo
    q_hi = seg_hi
    full_lo = jnp.where(contiguous, seg_lo, 0)
    full_hi = jnp.where(contiguous, full_hi, 0)
    # Within a contiguous segment the queries seeing key j are exactly [q_lo, q_hi).
    full_q_lo = jnp.where(contiguous, q_lo, 0)
    full_q_hi = jnp.where(contiguous, q_hi, 0)

    valid = seg_T != 0
    zero = jnp.zeros_like(idx)
    return tuple(jnp.where(valid, r, zero)
                 for r in (lo, hi, full_lo, full_hi, q_lo, q_hi, full_q_lo, full_q_hi))


def key_ranges(segment_ids_BT: jax.Array, bidirectional_BT: jax.Array, *, causal: bool):
    """Per-row key ranges of the GLM mask.

    Returns a dict of ``[B, T]`` int32 arrays: ``lo, hi`` (outer key range per query),
    ``full_lo, full_hi`` (fully visible key range per query), and the same per key for the
    backward kernels that walk query blocks for a fixed key block: ``q_lo, q_hi`` (outer query
    range) and ``full_q_lo, full_q_hi`` (queries that all see the key).
    """
    seg = segment_ids_BT.astype(jnp.int32)
    bid = bidirectional_BT.astype(bool)
    out = jax.vmap(lambda s, b: _row_ranges_1d(s, b, causal))(seg, bid)
    names = ("lo", "hi", "full_lo", "full_hi", "q_lo", "q_hi", "full_q_lo", "full_q_hi")
    return dict(zip(names, out))


def block_kind(lo, hi, full_lo, full_hi, k_start, k_end):
    """EMPTY / PARTIAL / FULL for query rows (last axis) against keys ``[k_start, k_end)``."""
    touches = (jnp.maximum(lo, k_start) < jnp.minimum(hi, k_end)).astype(jnp.int32)
    covers = ((full_lo <= k_start) & (full_hi >= k_end)).astype(jnp.int32)
    nonempty = jnp.max(touches, axis=-1)
    full = jnp.min(covers, axis=-1)
    return jnp.where(full > 0, FULL, nonempty).astype(jnp.int32)


def full_interval(full_lo, full_hi, block):
    """Blocks ``[first, end)`` that every row's full range covers (an interval: a block is full
    iff ``max(full_lo) <= start`` and ``min(full_hi) >= end``); empty when ``first >= end``."""
    first = idiv(jnp.max(full_lo) + block - 1, block)
    return first, idiv(jnp.min(full_hi), block)


def block_kinds(ranges: dict, block_q: int, block_k: int) -> jax.Array:
    """``[B, num_q_blocks, num_k_blocks]`` int32 kinds from ``key_ranges`` (T divisible by blocks)."""
    B, T = ranges["lo"].shape
    nq, nk = T // block_q, T // block_k
    rows = [ranges[n].reshape(B, nq, 1, block_q) for n in ("lo", "hi", "full_lo", "full_hi")]
    k_start = (jnp.arange(nk, dtype=jnp.int32) * block_k)[None, None, :, None]
    return block_kind(*rows, k_start, k_start + block_k)


def block_ranges(lo, hi, full_lo, full_hi, row_block: int, col_block: int):
    """Per row block, the column blocks its rows can see as one range, and the FULL ones in it.

    ``lo, hi, full_lo, full_hi``: ``[B, T]`` per-row ranges (``key_ranges``: the key ranges of each
    query, or ``q_lo, q_hi, full_q_lo, full_q_hi`` for the transposed walk of dk/dv). Returns
    ``(first, count, full_first, full_end)``, int32 ``[B, T // row_block]``: the row block's
    non-empty column blocks all lie in ``[first, first + count)`` (the hull of its rows' outer
    ranges; ``count == 0`` when no row sees anything, then ``first == 0``), and the column blocks in
    ``[full_first, full_end)`` are FULL (the same classification as :func:`block_kind`).
    For GLM data the hull holds no EMPTY block except where padding separates two segments inside
    one row block. This is what the TPU kernels scalar-prefetch: 4 ints per row block,
    O(T / row_block) SMEM whatever the length.
    """
    B, T = lo.shape
    n = T // row_block
    lo, hi, full_lo, full_hi = (x.reshape(B, n, row_block) for x in (lo, hi, full_lo, full_hi))
    live = lo < hi
    start = jnp.min(jnp.where(live, lo, T), axis=-1)
    stop = jnp.max(jnp.where(live, hi, 0), axis=-1)
    first = idiv(start, col_block)
    end = idiv(stop + col_block - 1, col_block)
    count = jnp.maximum(end - first, 0)
    first = jnp.where(count > 0, first, 0)
    full_first = idiv(jnp.max(full_lo, axis=-1) + col_block - 1, col_block)
    full_end = idiv(jnp.min(full_hi, axis=-1), col_block)
    return tuple(x.astype(jnp.int32) for x in (first, count, full_first, full_end))


def padded_length(seq_len: int, block_q: int, block_k: int) -> int:
    """Smallest length >= seq_len divisible by both block sizes."""
    m = max(block_q, block_k)
    if m % block_q or m % block_k:
        raise ValueError(f"block sizes {block_q} and {block_k} must divide each other "
                         "(use powers of two)")
    return -(-seq_len // m) * m


def pad_mask_inputs(segment_ids_BT, bidirectional_BT, *, batch: int, seq_len: int, padded: int):
    """Fill in defaults (one segment, no bidirectional keys) and zero-pad to ``padded``."""
    if segment_ids_BT is None:
        segment_ids_BT = jnp.ones((batch, seq_len), jnp.int32)
    if bidirectional_BT is None:
        bidirectional_BT = jnp.zeros((batch, seq_len), jnp.int32)
    pad = ((0, 0), (0, padded - seq_len))
    seg = jnp.pad(segment_ids_BT.astype(jnp.int32), pad)
    bid = jnp.pad(bidirectional_BT.astype(jnp.int32), pad)
    return seg, bid


def block_counts(segment_ids, bidirectional, causal: bool = True, seq_len: int | None = None,
                 block_q: int = 128, block_k: int = 128, *, batch: int | None = None) -> dict:
    """How many (query block, key block) pairs are empty / partial / full, summed over the batch.

    This is the classification the Pallas kernels schedule from (after padding ``seq_len`` up to
    the block sizes): EMPTY blocks are neither loaded nor computed, FULL blocks skip the mask.
    Counts are per head; multiply ``partial + full`` by the number of heads for total work.
    """
    if segment_ids is not None:
        batch, seq_len = segment_ids.shape
    elif seq_len is None:
        raise ValueError("block_counts needs seq_len when segment_ids is None")
    batch = batch or 1
    padded = padded_length(seq_len, block_q, block_k)
    seg, bid = pad_mask_inputs(segment_ids, bidirectional, batch=batch, seq_len=seq_len,
                               padded=padded)
    kinds = block_kinds(key_ranges(seg, bid, causal=causal), block_q, block_k)
    return {
        "total": kinds.size,
        "empty": jnp.sum(kinds == EMPTY),
        "partial": jnp.sum(kinds == PARTIAL),
        "full": jnp.sum(kinds == FULL),
    }
