"""Block-sparse flash attention for TPU (Pallas / Mosaic): forward, dq and dk/dv kernels.

Layout inside the kernels is ``[B, H, T, D]`` (T padded to the block sizes). The grid is
``(heads, steps)`` where the step axis walks one flat list of the *non-empty* (query block, key
block) pairs of the whole batch (``block_mask.visit_list``), scalar-prefetched into SMEM; its
length is the number of non-empty pairs, so the grid extent is dynamic. Each step's ``index_map``
looks up its blocks, so EMPTY blocks are never loaded and cost no grid step; FULL blocks run
without mask arithmetic; PARTIAL blocks apply the exact element mask of DESIGN.md §3. A row
without any non-empty block gets one EMPTY step, so its output is still written (as zeros).

The dk/dv kernel walks the transposed list (query blocks per key block) per *query* head and
computes in key-major form (``s^T = k q^T``) so every matmul is NN or NT; for GQA the per-head
dk/dv are summed over the group afterwards.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import block_mask as bm
from pallas_kernels.common import EMPTY_LSE, NEG, NN, NT, dot, element_mask, idiv, irem


def _fwd_kernel(row_ref, code_ref, q_ref, k_ref, v_ref, segq_ref, segk_ref, bidk_ref,
                o_ref, lse_ref, m_sc, l_sc, acc_sc, *, scale, causal, nq, bq, bk):
    s = pl.program_id(1)
    i = irem(row_ref[s], nq)
    j, kind, first, last = bm.decode_visit(code_ref[s])

    @pl.when(first)
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

    pl.when(kind == bm.FULL)(lambda: step(False))
    pl.when(kind == bm.PARTIAL)(lambda: step(True))

    @pl.when(last)
    def _finish():
        l = l_sc[...]
        seen = l > 0.0
        o_ref[...] = (acc_sc[...] / jnp.where(seen, l, 1.0)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(jnp.where(seen, l, 1.0)), EMPTY_LSE)


def _dq_kernel(row_ref, code_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, segq_ref,
               segk_ref, bidk_ref, dq_ref, dq_sc, *, scale, causal, nq, bq, bk):
    s = pl.program_id(1)
    i = irem(row_ref[s], nq)
    j, kind, first, last = bm.decode_visit(code_ref[s])

    @pl.when(first)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def step(masked):
        k = k_ref[...]
        p = jnp.exp(dot(q_ref[...], k, NT) * scale - lse_ref[...])
        if masked:
            q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
            k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
            mask = element_mask(segq_ref[...], segk_ref[...], bidk_ref[...], q_pos, k_pos, causal)
            p = jnp.where(mask, p, 0.0)
        dp = dot(do_ref[...], v_ref[...], NT)
        ds = p * (dp - delta_ref[...])
        dq_sc[...] += dot(ds.astype(k.dtype), k, NN)

    pl.when(kind == bm.FULL)(lambda: step(False))
    pl.when(kind == bm.PARTIAL)(lambda: step(True))

    @pl.when(last)
    def _finish():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(row_ref, code_ref, q_ref, do_ref, lse_ref, delta_ref, segq_ref, k_ref, v_ref,
                segk_ref, bidk_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, scale, causal, nk, bq, bk):
    s = pl.program_id(1)
    j = irem(row_ref[s], nk)  # key block; the visit's "column" is the query block
    i, kind, first, last = bm.decode_visit(code_ref[s])

    @pl.when(first)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def step(masked):
        q, do = q_ref[...], do_ref[...]
        p_t = jnp.exp(dot(k_ref[...], q, NT) * scale - lse_ref[...])  # [bk, bq]
        if masked:
            k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bk, bq), 0)
            q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bk, bq), 1)
            mask = element_mask(segq_ref[...], segk_ref[...], bidk_ref[...], q_pos, k_pos, causal)
            p_t = jnp.where(mask, p_t, 0.0)
        dv_sc[...] += dot(p_t.astype(do.dtype), do, NN)
        ds_t = p_t * (dot(v_ref[...], do, NT) - delta_ref[...])
        dk_sc[...] += dot(ds_t.astype(q.dtype), q, NN)

    pl.when(kind == bm.FULL)(lambda: step(False))
    pl.when(kind == bm.PARTIAL)(lambda: step(True))

    @pl.when(last)
    def _finish():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


class _Walk:
    """Index maps for a ``(heads, steps)`` grid over a ``visit_list``: ``own`` blocks belong to the
    list's rows (query blocks, or key blocks for dk/dv), ``other`` blocks to its columns."""

    def __init__(self, n_rows_per_batch, kv_group):
        self.n, self.G = n_rows_per_batch, kv_group

    def _row(self, s, row_ref):
        r = row_ref[s]
        return idiv(r, self.n), irem(r, self.n)

    def own(self, h, s, row_ref, code_ref):  # [B, H, T, X] arrays, query-head indexed
        b, r = self._row(s, row_ref)
        return b, h, r, 0

    def own_kv(self, h, s, row_ref, code_ref):  # [B, K, T, X] arrays
        b, r = self._row(s, row_ref)
        return b, idiv(h, self.G), r, 0

    def own_col(self, h, s, row_ref, code_ref):  # [B, T, 1] per-position metadata
        b, r = self._row(s, row_ref)
        return b, r, 0

    def other(self, h, s, row_ref, code_ref):  # [B, H, T, X], block = the visit's column
        return self._row(s, row_ref)[0], h, idiv(code_ref[s], 16), 0

    def other_kv(self, h, s, row_ref, code_ref):
        return self._row(s, row_ref)[0], idiv(h, self.G), idiv(code_ref[s], 16), 0

    def other_row(self, h, s, row_ref, code_ref):  # [B, 1, T] per-position metadata
        return self._row(s, row_ref)[0], 0, idiv(code_ref[s], 16)

    def other_stat_row(self, h, s, row_ref, code_ref):  # [B, H, 1, T] per-row statistics
        return self._row(s, row_ref)[0], h, 0, idiv(code_ref[s], 16)


def _call(kernel, walk_lists, H, in_specs, out_specs, out_shape, scratch, interpret, *args):
    row, code, total = walk_lists
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(H, total), in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=scratch)
    return pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=out_shape, interpret=interpret,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
    )(row, code, *args)


def _kinds(seg_BT, bid_BT, causal, bq, bk):
    return bm.block_kinds(bm.key_ranges(seg_BT, bid_BT, causal=causal), bq, bk)


def forward(q, k, v, seg_BT, bid_BT, *, causal, bq, bk, interpret):
    """q: [B,H,T,D], k/v: [B,K,T,D] (T divisible by bq, bk). Returns o [B,H,T,D], lse [B,H,T,1]."""
    B, H, T, D = q.shape
    G, nq = H // k.shape[1], T // bq
    w = _Walk(nq, G)
    lists = bm.visit_list(_kinds(seg_BT, bid_BT, causal, bq, bk))
    q_spec = pl.BlockSpec((None, None, bq, D), w.own)
    kv_spec = pl.BlockSpec((None, None, bk, D), w.other_kv)
    k_meta = pl.BlockSpec((None, 1, bk), w.other_row)
    return _call(
        functools.partial(_fwd_kernel, scale=D**-0.5, causal=causal, nq=nq, bq=bq, bk=bk),
        lists, H,
        [q_spec, kv_spec, kv_spec, pl.BlockSpec((None, bq, 1), w.own_col), k_meta, k_meta],
        [q_spec, pl.BlockSpec((None, None, bq, 1), w.own)],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, T, 1), jnp.float32)],
        [pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
         pltpu.VMEM((bq, D), jnp.float32)],
        interpret, q, k, v, seg_BT.reshape(B, T, 1), seg_BT.reshape(B, 1, T),
        bid_BT.reshape(B, 1, T))


def backward(q, k, v, seg_BT, bid_BT, o, lse, do, *, causal, bq, bk, interpret):
    """Gradients (dq, dk, dv) of ``forward``; lse as returned by it."""
    B, H, T, D = q.shape
    K = k.shape[1]
    G, nq, nk = H // K, T // bq, T // bk
    scale = D**-0.5
    kinds = _kinds(seg_BT, bid_BT, causal, bq, bk)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
    seg_col, seg_row, bid_row = seg_BT.reshape(B, T, 1), seg_BT.reshape(B, 1, T), bid_BT.reshape(B, 1, T)

    # dq: the forward walk (rows = query blocks).
    w = _Walk(nq, G)
    q_spec = pl.BlockSpec((None, None, bq, D), w.own)
    stat = pl.BlockSpec((None, None, bq, 1), w.own)
    kv_spec = pl.BlockSpec((None, None, bk, D), w.other_kv)
    k_meta = pl.BlockSpec((None, 1, bk), w.other_row)
    dq = _call(
        functools.partial(_dq_kernel, scale=scale, causal=causal, nq=nq, bq=bq, bk=bk),
        bm.visit_list(kinds), H,
        [q_spec, kv_spec, kv_spec, q_spec, stat, stat, pl.BlockSpec((None, bq, 1), w.own_col),
         k_meta, k_meta],
        q_spec, jax.ShapeDtypeStruct(q.shape, q.dtype), [pltpu.VMEM((bq, D), jnp.float32)],
        interpret, q, k, v, do, lse, delta, seg_col, seg_row, bid_row)

    # dk, dv per query head: the transposed walk (rows = key blocks, columns = query blocks).
    w = _Walk(nk, G)
    q_blk = pl.BlockSpec((None, None, bq, D), w.other)
    q_stat = pl.BlockSpec((None, None, 1, bq), w.other_stat_row)
    k_spec = pl.BlockSpec((None, None, bk, D), w.own_kv)
    k_col = pl.BlockSpec((None, bk, 1), w.own_col)
    out_dtype = k.dtype if G == 1 else jnp.float32  # per-head partials are summed below
    dk_spec = pl.BlockSpec((None, None, bk, D), w.own)
    dk, dv = _call(
        functools.partial(_dkv_kernel, scale=scale, causal=causal, nk=nk, bq=bq, bk=bk),
        bm.visit_list(jnp.swapaxes(kinds, 1, 2)), H,
        [q_blk, q_blk, q_stat, q_stat, pl.BlockSpec((None, 1, bq), w.other_row), k_spec, k_spec,
         k_col, k_col],
        [dk_spec, dk_spec], [jax.ShapeDtypeStruct((B, H, T, D), out_dtype)] * 2,
        [pltpu.VMEM((bk, D), jnp.float32), pltpu.VMEM((bk, D), jnp.float32)],
        interpret, q, do, lse.reshape(B, H, 1, T), delta.reshape(B, H, 1, T), seg_row, k, v,
        seg_col, bid_BT.reshape(B, T, 1))
    if G > 1:
        dk = dk.reshape(B, K, G, T, D).sum(2).astype(k.dtype)
        dv = dv.reshape(B, K, G, T, D).sum(2).astype(v.dtype)
    return dq, dk, dv
