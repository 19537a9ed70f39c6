"""Block-sparse flash attention for TPU (Pallas / Mosaic): forward, dq and dk/dv kernels.

Layout inside the kernels is ``[B, H, T, D]`` (T padded to the block sizes). The schedule is
*bounded per query block*: ``block_mask.block_ranges`` gives each query block (of each batch
row) the range of key blocks its rows can see, ``[first, first + count)``, and the FULL
interval inside it -- 4 int32 per query block, scalar-prefetched into SMEM, so the SMEM use is
O(B * T / block_q) whatever the length (the earlier flat list of all block pairs held
O(B * (T/bq) * (T/bk)) entries and ran out of SMEM at T = 131,072).

Grid ``(B, heads, query blocks, span)`` with ``span = max(count)`` over all query blocks (a
dynamic grid extent). Step ``t`` of query block ``i`` visits key block ``first + t``; steps past
``count`` repeat the last block index (so the pipeline fetches nothing) and compute nothing.
EMPTY blocks outside the range are never loaded; FULL blocks run without mask arithmetic; the
rest (PARTIAL, and the rare EMPTY block inside the hull between two padded segments) apply the
exact element mask of DESIGN.md §3. A query block that sees nothing gets its output written
(zeros) at step 0. The price of the rectangular grid is idle steps: a row block with fewer blocks
than the longest waits out the difference (no DMA, no compute, ~0.35 us each on TPU).

The log-sum-exp and ``delta`` are kept lane-dense, ``[B, H, 1, T]`` float32 (a ``[B, H, T, 1]``
array is tiled ``T(8,128)`` by XLA: 128-fold padding); the kernels that need them per row turn
the ``(1, bq)`` row into a ``(bq, 1)`` column with a diagonal select + lane reduction (exact,
once per query block).

The dk/dv kernel runs per *kv* head: the grid is ``(B, kv heads, key blocks, span)`` over the
transposed ranges (query blocks per key block), each step loads the query blocks of all ``G``
query heads of the group (``[G, bq, D]``) and accumulates their contributions into one float32
dk/dv scratch, so dk/dv are written once, in the input dtype, ``[B, K, T, D]``. Every matmul is
NN or NT (key-major form ``s^T = k q^T``).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import block_mask as bm
from pallas_kernels.common import EMPTY_LSE, NEG, NN, NT, dot, element_mask, idiv


def _col_to_row(x_N1):
    """``(n, 1) -> (1, n)`` exactly (diagonal select + sublane sum; no relayout needed)."""
    n = x_N1.shape[0]
    eye = lax.broadcasted_iota(jnp.int32, (n, n), 0) == lax.broadcasted_iota(jnp.int32, (n, n), 1)
    return jnp.sum(jnp.where(eye, jnp.broadcast_to(x_N1, (n, n)), 0.0), axis=0, keepdims=True)


def _row_to_col(x_1N):
    """``(1, n) -> (n, 1)`` exactly (diagonal select + lane sum)."""
    n = x_1N.shape[1]
    eye = lax.broadcasted_iota(jnp.int32, (n, n), 0) == lax.broadcasted_iota(jnp.int32, (n, n), 1)
    return jnp.sum(jnp.where(eye, jnp.broadcast_to(x_1N, (n, n)), 0.0), axis=1, keepdims=True)


class _Walk:
    """Scalar schedule of a ``(B, heads, rows, span)`` grid: ``sched`` holds ``(first, count,
    full_first, full_end)`` per row block, flattened as ``4 * (b * n_rows + r) + field``."""

    def __init__(self, n_rows: int):
        self.n = n_rows

    def fields(self, b, r, sched_ref):
        base = 4 * (b * self.n + r)
        return sched_ref[base], sched_ref[base + 1], sched_ref[base + 2], sched_ref[base + 3]

    def col(self, b, r, t, sched_ref):
        """Column block of step ``t``: ``first + t``, held at the last valid block past ``count``."""
        first, count = self.fields(b, r, sched_ref)[:2]
        return first + jnp.minimum(t, jnp.maximum(count - 1, 0))


def _schedule(lo, hi, full_lo, full_hi, row_block, col_block):
    first, count, ffirst, fend = bm.block_ranges(lo, hi, full_lo, full_hi, row_block, col_block)
    sched = jnp.stack([first, count, ffirst, fend], axis=-1).reshape(-1)
    return sched, jnp.maximum(jnp.max(count), 1)


def _call(kernel, sched, grid, in_specs, out_specs, out_shape, scratch, interpret, *args):
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=grid, in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=scratch)
    return pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=out_shape, interpret=interpret,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
    )(sched, *args)


def _step_info(walk, sched_ref):
    """(row block, column block, count, is-full, t) of the current grid step."""
    b, r, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    first, count, ffirst, fend = walk.fields(b, r, sched_ref)
    c = first + jnp.minimum(t, jnp.maximum(count - 1, 0))
    return r, c, count, (ffirst <= c) & (c < fend), t


def _run_visit(t, count, full, step):
    """``step(masked)`` on the visits ``t < count``: unmasked on FULL blocks, masked otherwise."""
    live = t < count
    pl.when(live & full)(lambda: step(False))
    pl.when(live & jnp.logical_not(full))(lambda: step(True))


def _fwd_kernel(sched_ref, q_ref, k_ref, v_ref, segq_ref, segk_ref, bidk_ref, o_ref, lse_ref,
                m_sc, l_sc, acc_sc, *, walk, scale, causal, bq, bk):
    i, j, count, full, t = _step_info(walk, sched_ref)

    @pl.when(t == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def step(masked):
        sc = dot(q_ref[...], k_ref[...], NT) * scale
        if masked:
            q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
            k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
            mask = element_mask(segq_ref[...], segk_ref[...], bidk_ref[...], q_pos, k_pos, causal)
            sc = jnp.where(mask, sc, NEG)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(sc, axis=1, keepdims=True))
        p = jnp.exp(sc - m_new)
        if masked:
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + dot(p.astype(v_ref.dtype), v_ref[...], NN)
        m_sc[...] = m_new

    _run_visit(t, count, full, step)

    @pl.when(t == jnp.maximum(count, 1) - 1)
    def _finish():
        l = l_sc[...]
        seen = l > 0.0
        o_ref[...] = (acc_sc[...] / jnp.where(seen, l, 1.0)).astype(o_ref.dtype)
        lse = jnp.where(seen, m_sc[...] + jnp.log(jnp.where(seen, l, 1.0)), EMPTY_LSE)
        lse_ref[...] = _col_to_row(lse)


def _dq_kernel(sched_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, segq_ref, segk_ref,
               bidk_ref, dq_ref, dq_sc, lse_sc, delta_sc, *, walk, scale, causal, bq, bk):
    i, j, count, full, t = _step_info(walk, sched_ref)

    @pl.when(t == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)
        lse_sc[...] = _row_to_col(lse_ref[...])
        delta_sc[...] = _row_to_col(delta_ref[...])

    def step(masked):
        k = k_ref[...]
        p = jnp.exp(dot(q_ref[...], k, NT) * scale - lse_sc[...])
        if masked:
            q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
            k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
            mask = element_mask(segq_ref[...], segk_ref[...], bidk_ref[...], q_pos, k_pos, causal)
            p = jnp.where(mask, p, 0.0)
        dp = dot(do_ref[...], v_ref[...], NT)
        ds = p * (dp - delta_sc[...])
        dq_sc[...] += dot(ds.astype(k.dtype), k, NN)

    _run_visit(t, count, full, step)

    @pl.when(t == jnp.maximum(count, 1) - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(sched_ref, q_ref, do_ref, lse_ref, delta_ref, segq_ref, k_ref, v_ref, segk_ref,
                bidk_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, walk, scale, causal, bq, bk, G):
    j, i, count, full, t = _step_info(walk, sched_ref)  # rows: key blocks; columns: query blocks

    @pl.when(t == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def step(masked):
        k, v = k_ref[...], v_ref[...]
        if masked:
            k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bk, bq), 0)
            q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bk, bq), 1)
            mask = element_mask(segq_ref[...], segk_ref[...], bidk_ref[...], q_pos, k_pos, causal)
        dk, dv = dk_sc[...], dv_sc[...]
        for g in range(G):  # the query heads of this kv head
            q, do = q_ref[g], do_ref[g]
            p_t = jnp.exp(dot(k, q, NT) * scale - lse_ref[g])  # [bk, bq]
            if masked:
                p_t = jnp.where(mask, p_t, 0.0)
            dv = dv + dot(p_t.astype(do.dtype), do, NN)
            ds_t = p_t * (dot(v, do, NT) - delta_ref[g])
            dk = dk + dot(ds_t.astype(q.dtype), q, NN)
        dk_sc[...], dv_sc[...] = dk, dv

    _run_visit(t, count, full, step)

    @pl.when(t == jnp.maximum(count, 1) - 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _ranges(seg_BT, bid_BT, causal):
    return bm.key_ranges(seg_BT, bid_BT, causal=causal)


def _meta(seg_BT, bid_BT):
    B, T = seg_BT.shape
    return seg_BT.reshape(B, T, 1), seg_BT.reshape(B, 1, T), bid_BT.reshape(B, 1, T), bid_BT.reshape(B, T, 1)


def _query_walk_specs(nq, G, bq, bk, D):
    """BlockSpecs of the forward / dq walk (rows = query blocks of head ``h``)."""
    w = _Walk(nq)
    own = pl.BlockSpec((None, None, bq, D), lambda b, h, i, t, s: (b, h, i, 0))
    stat = pl.BlockSpec((None, None, 1, bq), lambda b, h, i, t, s: (b, h, 0, i))
    kv = pl.BlockSpec((None, None, bk, D), lambda b, h, i, t, s: (b, idiv(h, G), w.col(b, i, t, s), 0))
    q_col = pl.BlockSpec((None, bq, 1), lambda b, h, i, t, s: (b, i, 0))
    k_row = pl.BlockSpec((None, 1, bk), lambda b, h, i, t, s: (b, 0, w.col(b, i, t, s)))
    return w, own, stat, kv, q_col, k_row


def forward(q, k, v, seg_BT, bid_BT, *, causal, bq, bk, interpret):
    """q: [B,H,T,D], k/v: [B,K,T,D] (T divisible by bq, bk). Returns o [B,H,T,D] and the
    lane-dense lse [B,H,1,T] float32."""
    B, H, T, D = q.shape
    G, nq = H // k.shape[1], T // bq
    r = _ranges(seg_BT, bid_BT, causal)
    sched, span = _schedule(r["lo"], r["hi"], r["full_lo"], r["full_hi"], bq, bk)
    w, own, stat, kv, q_col, k_row = _query_walk_specs(nq, G, bq, bk, D)
    seg_col, seg_row, bid_row, _ = _meta(seg_BT, bid_BT)
    return _call(
        functools.partial(_fwd_kernel, walk=w, scale=D**-0.5, causal=causal, bq=bq, bk=bk),
        sched, (B, H, nq, span),
        [own, kv, kv, q_col, k_row, k_row], [own, stat],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, 1, T), jnp.float32)],
        [pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
         pltpu.VMEM((bq, D), jnp.float32)],
        interpret, q, k, v, seg_col, seg_row, bid_row)


def backward(q, k, v, seg_BT, bid_BT, o, lse, do, *, causal, bq, bk, interpret):
    """Gradients (dq, dk, dv) of ``forward``; lse ``[B,H,1,T]`` as returned by it."""
    B, H, T, D = q.shape
    K = k.shape[1]
    G, nq, nk = H // K, T // bq, T // bk
    scale = D**-0.5
    r = _ranges(seg_BT, bid_BT, causal)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)[:, :, None, :]
    seg_col, seg_row, bid_row, bid_col = _meta(seg_BT, bid_BT)

    # dq: the forward walk (rows = query blocks).
    sched, span = _schedule(r["lo"], r["hi"], r["full_lo"], r["full_hi"], bq, bk)
    w, own, stat, kv, q_col, k_row = _query_walk_specs(nq, G, bq, bk, D)
    dq = _call(
        functools.partial(_dq_kernel, walk=w, scale=scale, causal=causal, bq=bq, bk=bk),
        sched, (B, H, nq, span),
        [own, kv, kv, own, stat, stat, q_col, k_row, k_row],
        own, jax.ShapeDtypeStruct(q.shape, q.dtype),
        [pltpu.VMEM((bq, D), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
         pltpu.VMEM((bq, 1), jnp.float32)],
        interpret, q, k, v, do, lse, delta, seg_col, seg_row, bid_row)

    # dk, dv per kv head: the transposed walk (rows = key blocks, columns = query blocks), the G
    # query heads of the kv head in one block [G, bq, D].
    sched, span = _schedule(r["q_lo"], r["q_hi"], r["full_q_lo"], r["full_q_hi"], bk, bq)
    w = _Walk(nk)
    q_grp = pl.BlockSpec((None, G, bq, D), lambda b, h, j, t, s: (b, h, w.col(b, j, t, s), 0))
    stat_grp = pl.BlockSpec((None, G, 1, bq), lambda b, h, j, t, s: (b, h, 0, w.col(b, j, t, s)))
    q_row = pl.BlockSpec((None, 1, bq), lambda b, h, j, t, s: (b, 0, w.col(b, j, t, s)))
    k_own = pl.BlockSpec((None, None, bk, D), lambda b, h, j, t, s: (b, h, j, 0))
    k_col = pl.BlockSpec((None, bk, 1), lambda b, h, j, t, s: (b, j, 0))
    dk, dv = _call(
        functools.partial(_dkv_kernel, walk=w, scale=scale, causal=causal, bq=bq, bk=bk, G=G),
        sched, (B, K, nk, span),
        [q_grp, q_grp, stat_grp, stat_grp, q_row, k_own, k_own, k_col, k_col],
        [k_own, k_own], [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        [pltpu.VMEM((bk, D), jnp.float32), pltpu.VMEM((bk, D), jnp.float32)],
        interpret, q, do, lse, delta, seg_row, k, v, seg_col, bid_col)
    return dq, dk, dv
