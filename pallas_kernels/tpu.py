"""Block-sparse flash attention for TPU (Pallas / Mosaic): forward, dq and dk/dv kernels.

Layout inside the kernels is ``[B, H, T, D]`` (T padded to the block sizes). Per-block metadata
(``block_mask.schedule``) is scalar-prefetched into SMEM: for every query block the list of its
non-empty key blocks, their kinds and their count. The innermost grid axis walks that list, so the
``index_map`` of k/v returns the n-th *non-empty* key block; steps past the count repeat the last
index (Pallas does not re-fetch an unchanged block) and compute nothing. EMPTY blocks are thus
never loaded; FULL blocks run without any mask arithmetic; PARTIAL blocks apply the exact element
mask of DESIGN.md §3. The dk/dv kernel uses the transposed schedule (query blocks per key block)
and computes in key-major form (``s^T = k q^T``) so every matmul is NN or NT.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import block_mask as bm
from pallas_kernels.common import EMPTY_LSE, NEG, NN, NT, dot, element_mask


def _fwd_kernel(kv_idx, kv_kind, q_ref, k_ref, v_ref, segq_ref, segk_ref, bidk_ref,
                o_ref, lse_ref, m_sc, l_sc, acc_sc, *, scale, causal, nq, nk, bq, bk):
    b, i, n = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    flat = (b * nq + i) * nk + n

    @pl.when(n == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def step(masked):
        s = dot(q_ref[...], k_ref[...], NT) * scale
        if masked:
            q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
            k_pos = kv_idx[flat] * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
            mask = element_mask(segq_ref[...], segk_ref[...], bidk_ref[...], q_pos, k_pos, causal)
            s = jnp.where(mask, s, NEG)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        if masked:
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + dot(p.astype(v_ref.dtype), v_ref[...], NN)
        m_sc[...] = m_new

    kind = kv_kind[flat]
    pl.when(kind == bm.FULL)(lambda: step(False))
    pl.when(kind == bm.PARTIAL)(lambda: step(True))

    @pl.when(n == nk - 1)
    def _finish():
        l = l_sc[...]
        seen = l > 0.0
        o_ref[...] = (acc_sc[...] / jnp.where(seen, l, 1.0)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(jnp.where(seen, l, 1.0)), EMPTY_LSE)


def _dq_kernel(kv_idx, kv_kind, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, segq_ref,
               segk_ref, bidk_ref, dq_ref, dq_sc, *, scale, causal, nq, nk, bq, bk):
    b, i, n = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    flat = (b * nq + i) * nk + n

    @pl.when(n == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def step(masked):
        k = k_ref[...]
        s = dot(q_ref[...], k, NT) * scale
        p = jnp.exp(s - lse_ref[...])
        if masked:
            q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
            k_pos = kv_idx[flat] * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
            mask = element_mask(segq_ref[...], segk_ref[...], bidk_ref[...], q_pos, k_pos, causal)
            p = jnp.where(mask, p, 0.0)
        dp = dot(do_ref[...], v_ref[...], NT)
        ds = p * (dp - delta_ref[...])
        dq_sc[...] += dot(ds.astype(k.dtype), k, NN)

    kind = kv_kind[flat]
    pl.when(kind == bm.FULL)(lambda: step(False))
    pl.when(kind == bm.PARTIAL)(lambda: step(True))

    @pl.when(n == nk - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_idx, q_kind, q_ref, do_ref, lse_ref, delta_ref, segq_ref, k_ref, v_ref,
                segk_ref, bidk_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, scale, causal, nq, nk,
                bq, bk, groups):
    b, j, g, n = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    flat = (b * nk + j) * nq + n

    @pl.when((g == 0) & (n == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def step(masked):
        q, do = q_ref[...], do_ref[...]
        s_t = dot(k_ref[...], q, NT) * scale  # [bk, bq]
        p_t = jnp.exp(s_t - lse_ref[...])
        if masked:
            k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bk, bq), 0)
            q_pos = q_idx[flat] * bq + lax.broadcasted_iota(jnp.int32, (bk, bq), 1)
            mask = element_mask(segq_ref[...], segk_ref[...], bidk_ref[...], q_pos, k_pos, causal)
            p_t = jnp.where(mask, p_t, 0.0)
        dv_sc[...] += dot(p_t.astype(do.dtype), do, NN)
        dp_t = dot(v_ref[...], do, NT)
        ds_t = p_t * (dp_t - delta_ref[...])
        dk_sc[...] += dot(ds_t.astype(q.dtype), q, NN)

    kind = q_kind[flat]
    pl.when(kind == bm.FULL)(lambda: step(False))
    pl.when(kind == bm.PARTIAL)(lambda: step(True))

    @pl.when((g == groups - 1) & (n == nq - 1))
    def _finish():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _params(n_parallel, n_arbitrary):
    return pltpu.CompilerParams(
        dimension_semantics=("parallel",) * n_parallel + ("arbitrary",) * n_arbitrary)


def _col(B, T):
    return lambda x: x.reshape(B, T, 1)


def _row(B, T):
    return lambda x: x.reshape(B, 1, T)


def _key_walk_specs(G, nq, nk, bk, D):
    """Specs for k/v and per-key metadata on the (b, h, q block, n) grid: the n-th non-empty block."""
    def kv_block(b, h, i, n, idx, kind):
        return (b, lax.div(h, G), idx[(b * nq + i) * nk + n], 0)

    def k_meta(b, h, i, n, idx, kind):
        return (b, 0, idx[(b * nq + i) * nk + n])

    return pl.BlockSpec((None, None, bk, D), kv_block), pl.BlockSpec((None, 1, bk), k_meta)


def _row_schedule(seg_BT, bid_BT, causal, bq, bk):
    kinds = bm.block_kinds(bm.key_ranges(seg_BT, bid_BT, causal=causal), bq, bk)
    return kinds, bm.schedule(kinds)


def forward(q, k, v, seg_BT, bid_BT, *, causal, bq, bk, interpret):
    """q: [B,H,T,D], k/v: [B,K,T,D] (T divisible by bq, bk). Returns o [B,H,T,D], lse [B,H,T,1]."""
    B, H, T, D = q.shape
    K = k.shape[1]
    G, nq, nk = H // K, T // bq, T // bk
    _, (kv_idx, kv_kind, _) = _row_schedule(seg_BT, bid_BT, causal, bq, bk)
    col, row = _col(B, T), _row(B, T)
    kv_spec, k_meta_spec = _key_walk_specs(G, nq, nk, bk, D)
    kernel = functools.partial(_fwd_kernel, scale=D**-0.5, causal=causal, nq=nq, nk=nk,
                               bq=bq, bk=bk)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(B, H, nq, nk),
        in_specs=[
            pl.BlockSpec((None, None, bq, D), lambda b, h, i, n, *_: (b, h, i, 0)),
            kv_spec, kv_spec,
            pl.BlockSpec((None, bq, 1), lambda b, h, i, n, *_: (b, i, 0)),
            k_meta_spec, k_meta_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, None, bq, D), lambda b, h, i, n, *_: (b, h, i, 0)),
            pl.BlockSpec((None, None, bq, 1), lambda b, h, i, n, *_: (b, h, i, 0)),
        ],
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, D), jnp.float32)],
    )
    o, lse = pl.pallas_call(
        kernel, grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, H, T, 1), jnp.float32)],
        compiler_params=_params(3, 1), interpret=interpret,
    )(kv_idx.reshape(-1), kv_kind.reshape(-1), q, k, v, col(seg_BT), row(seg_BT), row(bid_BT))
    return o, lse


def backward(q, k, v, seg_BT, bid_BT, o, lse, do, *, causal, bq, bk, interpret):
    """Gradients (dq, dk, dv) of ``forward``; lse as returned by it."""
    B, H, T, D = q.shape
    K = k.shape[1]
    G, nq, nk = H // K, T // bq, T // bk
    scale = D**-0.5
    kinds, (kv_idx, kv_kind, _) = _row_schedule(seg_BT, bid_BT, causal, bq, bk)
    q_idx, q_kind, _ = bm.schedule(jnp.swapaxes(kinds, 1, 2))
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
    col, row = _col(B, T), _row(B, T)

    # dq: same walk as the forward pass.
    kv_spec, k_meta_spec = _key_walk_specs(G, nq, nk, bk, D)
    q_spec = pl.BlockSpec((None, None, bq, D), lambda b, h, i, n, *_: (b, h, i, 0))
    stat_spec = pl.BlockSpec((None, None, bq, 1), lambda b, h, i, n, *_: (b, h, i, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, causal=causal, nq=nq, nk=nk, bq=bq, bk=bk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(B, H, nq, nk),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec,
                      pl.BlockSpec((None, bq, 1), lambda b, h, i, n, *_: (b, i, 0)),
                      k_meta_spec, k_meta_spec],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bq, D), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(3, 1), interpret=interpret,
    )(kv_idx.reshape(-1), kv_kind.reshape(-1), q, k, v, do, lse, delta, col(seg_BT),
      row(seg_BT), row(bid_BT))

    # dk, dv: per key block, walk (query head in group) x (non-empty query blocks).
    def q_block(b, kh, j, g, n, idx, kind):
        return (b, kh * G + g, idx[(b * nk + j) * nq + n], 0)

    def q_stat(b, kh, j, g, n, idx, kind):
        return (b, kh * G + g, 0, idx[(b * nk + j) * nq + n])

    def q_meta(b, kh, j, g, n, idx, kind):
        return (b, 0, idx[(b * nk + j) * nq + n])

    k_spec = pl.BlockSpec((None, None, bk, D), lambda b, kh, j, g, n, *_: (b, kh, j, 0))
    k_col = pl.BlockSpec((None, bk, 1), lambda b, kh, j, g, n, *_: (b, j, 0))
    row_stat = lambda x: x.reshape(B, H, 1, T)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, causal=causal, nq=nq, nk=nk, bq=bq, bk=bk,
                          groups=G),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(B, K, nk, G, nq),
            in_specs=[pl.BlockSpec((None, None, bq, D), q_block),
                      pl.BlockSpec((None, None, bq, D), q_block),
                      pl.BlockSpec((None, None, 1, bq), q_stat),
                      pl.BlockSpec((None, None, 1, bq), q_stat),
                      pl.BlockSpec((None, 1, bq), q_meta), k_spec, k_spec, k_col, k_col],
            out_specs=[k_spec, k_spec],
            scratch_shapes=[pltpu.VMEM((bk, D), jnp.float32), pltpu.VMEM((bk, D), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(3, 2), interpret=interpret,
    )(q_idx.reshape(-1), q_kind.reshape(-1), q, do, row_stat(lse), row_stat(delta), row(seg_BT),
      k, v, col(seg_BT), col(bid_BT))
    return dq, dk, dv
