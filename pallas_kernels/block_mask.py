"""Key-range form of the GLM mask and the per-block classification every kernel schedules from.

The mask (DESIGN.md §3): query ``i`` sees key ``j`` iff ``seg[i] == seg[j] != 0`` and
(``j <= i`` or ``bid[j]``); with ``causal=False`` the second condition is dropped.

For each query row we derive two key ranges (``[B, T]`` int32 each):

* the *outer* range ``[lo, hi)``: every visible key lies inside it (used to skip empty blocks);
* the *full* range ``[full_lo, full_hi)``: every key inside it is visible (used to skip the mask
  arithmetic on full blocks).

When segments are contiguous and ``bid`` is a prefix of each segment (GLM Part A), the two ranges
coincide and equal the exact visible set ``[segment_start, max(i + 1, part_a_end))``. For any
other input the ranges stay conservative: a non-prefix ``bid`` makes them looser, and a batch row
whose non-zero segment ids do not increase along it (an id reused after a gap, ids out of order)
gets the whole row as outer range and nothing FULL. Blocks are then classified *partial* more
often and the kernels apply the exact element mask there, so results stay exact. Empty rows
(padding, segment id 0) get ``lo == hi == full_lo == full_hi == 0``.

The ranges are computed without a sort: a segment is a run of equal ids, its bounds and Part A
bounds come from running max / min scans over positions (:func:`_running_max`, a blocked masked
reduction), so the schedule compiles quickly for XLA:TPU at long T (docs/benchmarks.md).

A (query block, key block) pair is EMPTY when no row's outer range meets the key block, FULL when
every row's full range covers it, else PARTIAL. ``block_kind`` is written with plain ``jnp`` max /
min reductions so the GPU kernel calls the very same function inside its loop.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import idiv

EMPTY, PARTIAL, FULL = 0, 1, 2


_SCAN_TILE = 128
_LOW = jnp.iinfo(jnp.int32).min


def _running_max(x):
    """Inclusive running max along the last axis of an int32 ``[N, T]`` array, blocked: a masked
    reduction inside each tile of 128 (``[N, T/128, 128, 128]``, fused by XLA), the same recursively
    over the tiles' maxima, then combined. No sort and no scan primitive: ``lax.cummax`` lowers to
    a window-T reduce-window and ``lax.associative_scan`` to strided slices, which XLA:TPU takes
    minutes to compile at T = 262,144 (docs/benchmarks.md)."""
    N, T = x.shape
    c = min(_SCAN_TILE, T)
    n = -(-T // c)
    tiles = jnp.pad(x, ((0, 0), (0, n * c - T)), constant_values=_LOW).reshape(N, n, c)
    upto = lax.broadcasted_iota(jnp.int32, (c, c), 1) <= lax.broadcasted_iota(jnp.int32, (c, c), 0)
    out = jnp.max(jnp.where(upto, tiles[:, :, None, :], _LOW), axis=-1)  # within each tile
    if n > 1:
        totals = _running_max(out[:, :, -1])  # over whole tiles
        before = jnp.concatenate([jnp.full((N, 1), _LOW, x.dtype), totals[:, :-1]], axis=1)
        out = jnp.maximum(out, before[:, :, None])
    return out.reshape(N, n * c)[:, :T]


def _scans(*specs):
    """Several running scans of ``[B, T]`` int32 arrays as one :func:`_running_max` (one program
    piece to compile, not one per scan). ``specs``: ``(x, op, reverse)`` with ``op`` "max" or
    "min" (a min is the max of ``-x``: the values here are positions, far from int32's limits)."""
    B = specs[0][0].shape[0]
    rows = []
    for x, op, reverse in specs:
        x = -x if op == "min" else x
        rows.append(x[:, ::-1] if reverse else x)
    out = _running_max(jnp.concatenate(rows, axis=0))
    res = []
    for k, (_, op, reverse) in enumerate(specs):
        y = out[k * B:(k + 1) * B]
        y = y[:, ::-1] if reverse else y
        res.append(-y if op == "min" else y)
    return res


def _ranges_2d(seg: jax.Array, bid: jax.Array, causal: bool):
    """Ranges of ``[B, T]`` rows: (lo, hi, full_lo, full_hi, q_lo, q_hi, full_q_lo, full_q_hi).

    Sort-free: a segment is a *run* of equal ids; its bounds are running max / min scans of the
    run starts and ends, its Part A bounds scans of ``bid``, carried to the whole run by one more
    scan each.
    """
    B, T = seg.shape
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    new = seg[:, 1:] != seg[:, :-1]
    true = jnp.ones((B, 1), bool)
    start = jnp.concatenate([true, new], axis=1)  # a run begins at i
    end = jnp.concatenate([new, true], axis=1)  # a run ends at i
    nz = seg != 0
    seg_lo, seg_hi, last_bid, next_causal, seen = _scans(
        (jnp.where(start, idx, 0), "max", False),  # the run's first position
        (jnp.where(end, idx + 1, T), "min", True),  # 1 + its last
        (jnp.where(bid, idx + 1, 0), "max", False),  # 1 + the last bid key up to i
        (jnp.where(bid, T, idx), "min", True),  # the first causal key from i on
        (jnp.where(nz, seg, _LOW), "max", False))  # the largest non-zero id up to i
    bid_hi, first_causal = _scans(
        (jnp.where(end, last_bid, T), "min", True),  # last_bid at the run's end
        # next_causal at the run's start (non-decreasing over run starts: the latest start wins)
        (jnp.where(start, next_causal, 0), "max", False))
    bid_hi = jnp.where(bid_hi > seg_lo, bid_hi, 0)  # 1 + the run's last bid key, 0 if none
    prefix_end = jnp.minimum(first_causal, seg_hi)  # end of the bid run that starts the segment

    if causal:
        lo, hi = seg_lo, jnp.maximum(idx + 1, bid_hi)
        full_hi = jnp.maximum(idx + 1, prefix_end)
        # Queries that may see key j: the whole segment if bid[j], else [j, seg_hi).
        q_lo = jnp.where(bid, seg_lo, idx)
    else:
        lo, hi, full_hi = seg_lo, seg_hi, seg_hi
        q_lo = seg_lo
    out = (lo, hi, seg_lo, full_hi, q_lo, seg_hi, q_lo, seg_hi)

    # Runs are whole segments iff no non-zero id comes back after a gap; ids that increase along
    # the row (what packing writes: 1, 2, ...; padding 0 anywhere) guarantee it. Other rows get
    # the trivially conservative ranges: every key, nothing FULL (exact, no block skipping).
    # (A row whose first id is int32's minimum also counts as not increasing: conservative.)
    bad = start[:, 1:] & nz[:, 1:] & (seg[:, 1:] <= seen[:, :-1])
    increasing = ~jnp.any(bad, axis=1, keepdims=True)
    zero, whole = jnp.zeros_like(idx), jnp.full_like(idx, T)
    fallback = (zero, whole, zero, zero, zero, whole, zero, zero)
    return tuple(jnp.where(nz, jnp.where(increasing, r, f), zero) for r, f in zip(out, fallback))


def key_ranges(segment_ids_BT: jax.Array, bidirectional_BT: jax.Array, *, causal: bool):
    """Per-row key ranges of the GLM mask.

    Returns a dict of ``[B, T]`` int32 arrays: ``lo, hi`` (outer key range per query),
    ``full_lo, full_hi`` (fully visible key range per query), and the same per key for the
    backward kernels that walk query blocks for a fixed key block: ``q_lo, q_hi`` (outer query
    range) and ``full_q_lo, full_q_hi`` (queries that all see the key).
    """
    seg = segment_ids_BT.astype(jnp.int32)
    bid = bidirectional_BT.astype(bool)
    out = _ranges_2d(seg, bid, causal)
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
