"""Block-sparse flash attention for GPU (Pallas, Triton lowering): forward, dq and dk/dv kernels.

Layout inside the kernels is ``[B, H, T, D]`` (T padded to the block sizes). One program handles
one query block (forward, dq) or one key block (dk/dv) and loops only over the hull of the blocks
its rows can see, taken from the key-range form (``block_mask.key_ranges``): a query block walks
key blocks ``[min lo // bk, ceil(max hi / bk))``; a key block walks query blocks from the per-key
query ranges. The FULL blocks inside that hull form one interval (``block_mask.full_interval``),
walked by a branch-free loop without any mask arithmetic (so Triton can pipeline its loads). The
blocks before and after it are classified by ``block_mask.block_kind`` -- the function
``block_counts`` uses -- EMPTY ones skipped under ``lax.cond`` (never loaded), PARTIAL ones computed
with the exact element mask of DESIGN.md §3. GQA: a kv head's dk/dv program loops over its query
heads.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import block_mask as bm
from pallas_kernels.common import EMPTY_LSE, NEG, NN, NT, dot, element_mask, idiv


def _hull(lo, hi, block, length):
    """Blocks ``[first, end)`` covering the union of the non-empty ranges ``[lo, hi)``."""
    valid = lo < hi
    first = idiv(jnp.min(jnp.where(valid, lo, length)), block)
    end = idiv(jnp.max(jnp.where(valid, hi, 0)) + block - 1, block)
    return first, end


def _skip(n, carry):
    return carry


def _walk(hull, full, masked_visit, full_visit, kind_of, carry):
    """Visit blocks ``hull = [first, end)``: the FULL interval ``full`` in a branch-free loop
    without mask; the blocks before and after it masked, skipping those ``kind_of`` calls EMPTY."""
    first, end = hull
    has_full = full[0] < full[1]
    f0, f1 = jnp.where(has_full, full[0], end), jnp.where(has_full, full[1], end)

    def masked(n, c):
        return lax.cond(kind_of(n) != bm.EMPTY, masked_visit, _skip, n, c)

    carry = lax.fori_loop(first, f0, masked, carry)
    carry = lax.fori_loop(f0, f1, full_visit, carry)
    return lax.fori_loop(f1, end, masked, carry)


def _fwd_kernel(q_ref, k_ref, v_ref, lo_ref, hi_ref, flo_ref, fhi_ref, segq_ref, segk_ref,
                bidk_ref, o_ref, lse_ref, *, scale, causal, bq, bk, T, D):
    i = pl.program_id(2)
    q = q_ref[...]
    rows = (lo_ref[...], hi_ref[...], flo_ref[...], fhi_ref[...])
    seg_q = segq_ref[...]
    q_pos = i * bq + jnp.arange(bq, dtype=jnp.int32)

    def visit(j, carry, masked):
        m, l, acc = carry
        ks = pl.multiple_of(j * bk, bk)
        s = dot(q, k_ref[pl.ds(ks, bk), :], NT) * scale
        if masked:
            k_pos = ks + jnp.arange(bk, dtype=jnp.int32)
            mask = element_mask(seg_q[:, None], segk_ref[pl.ds(ks, bk)][None, :],
                         bidk_ref[pl.ds(ks, bk)][None, :], q_pos[:, None], k_pos[None, :], causal)
            s = jnp.where(mask, s, NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp(s - m_new[:, None])
        if masked:
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(m - m_new)
        v = v_ref[pl.ds(ks, bk), :]
        acc = alpha[:, None] * acc + dot(p.astype(v.dtype), v, NN)
        return m_new, alpha * l + jnp.sum(p, axis=1), acc

    init = (jnp.full((bq,), NEG, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros((bq, D), jnp.float32))
    m, l, acc = _walk(_hull(rows[0], rows[1], bk, T), bm.full_interval(rows[2], rows[3], bk),
                      functools.partial(visit, masked=True), functools.partial(visit, masked=False),
                      lambda j: bm.block_kind(*rows, j * bk, j * bk + bk), init)
    seen = l > 0.0
    safe_l = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / safe_l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe_l), EMPTY_LSE)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, lo_ref, hi_ref, flo_ref, fhi_ref,
               segq_ref, segk_ref, bidk_ref, dq_ref, *, scale, causal, bq, bk, T, D):
    i = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    rows = (lo_ref[...], hi_ref[...], flo_ref[...], fhi_ref[...])
    seg_q = segq_ref[...]
    q_pos = i * bq + jnp.arange(bq, dtype=jnp.int32)

    def visit(j, dq, masked):
        ks = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(ks, bk), :]
        p = jnp.exp(dot(q, k, NT) * scale - lse[:, None])
        if masked:
            k_pos = ks + jnp.arange(bk, dtype=jnp.int32)
            mask = element_mask(seg_q[:, None], segk_ref[pl.ds(ks, bk)][None, :],
                         bidk_ref[pl.ds(ks, bk)][None, :], q_pos[:, None], k_pos[None, :], causal)
            p = jnp.where(mask, p, 0.0)
        dp = dot(do, v_ref[pl.ds(ks, bk), :], NT)
        ds = p * (dp - delta[:, None])
        return dq + dot(ds.astype(k.dtype), k, NN)

    dq = _walk(_hull(rows[0], rows[1], bk, T), bm.full_interval(rows[2], rows[3], bk),
               functools.partial(visit, masked=True), functools.partial(visit, masked=False),
               lambda j: bm.block_kind(*rows, j * bk, j * bk + bk),
               jnp.zeros((bq, D), jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, do_ref, lse_ref, delta_ref, lo_ref, hi_ref, flo_ref, fhi_ref, segq_ref,
                k_ref, v_ref, qlo_ref, qhi_ref, fqlo_ref, fqhi_ref, segk_ref, bidk_ref, dk_ref,
                dv_ref, *, scale, causal, bq, bk, T, D, groups):
    j = pl.program_id(2)
    ks = j * bk
    k, v = k_ref[...], v_ref[...]
    seg_k, bid_k = segk_ref[...], bidk_ref[...]
    k_pos = ks + jnp.arange(bk, dtype=jnp.int32)
    hull = _hull(qlo_ref[...], qhi_ref[...], bq, T)
    full = bm.full_interval(fqlo_ref[...], fqhi_ref[...], bq)

    def visit(n, carry, g, masked):
        dk, dv = carry
        qs = pl.multiple_of(n * bq, bq)
        q, do = q_ref[g, pl.ds(qs, bq), :], do_ref[g, pl.ds(qs, bq), :]
        p_t = jnp.exp(dot(k, q, NT) * scale - lse_ref[g, pl.ds(qs, bq)][None, :])  # [bk, bq]
        if masked:
            q_pos = qs + jnp.arange(bq, dtype=jnp.int32)
            mask = element_mask(segq_ref[pl.ds(qs, bq)][None, :], seg_k[:, None], bid_k[:, None],
                         q_pos[None, :], k_pos[:, None], causal)
            p_t = jnp.where(mask, p_t, 0.0)
        dv = dv + dot(p_t.astype(do.dtype), do, NN)
        ds_t = p_t * (dot(v, do, NT) - delta_ref[g, pl.ds(qs, bq)][None, :])
        return dk + dot(ds_t.astype(q.dtype), q, NN), dv

    def kind_of(n):
        rows = tuple(r[pl.ds(n * bq, bq)] for r in (lo_ref, hi_ref, flo_ref, fhi_ref))
        return bm.block_kind(*rows, ks, ks + bk)

    def head(g, carry):
        return _walk(hull, full, functools.partial(visit, g=g, masked=True),
                     functools.partial(visit, g=g, masked=False), kind_of, carry)

    zeros = jnp.zeros((bk, D), jnp.float32)
    dk, dv = lax.fori_loop(0, groups, head, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _params(D):
    return plt.CompilerParams(num_warps=4 if D <= 64 else 8, num_stages=2)


def _meta(seg_BT, bid_BT, causal):
    r = bm.key_ranges(seg_BT, bid_BT, causal=causal)
    return r, (r["lo"], r["hi"], r["full_lo"], r["full_hi"])


def forward(q, k, v, seg_BT, bid_BT, *, causal, bq, bk, interpret):
    """q: [B,H,T,D], k/v: [B,K,T,D] (T divisible by bq, bk). Returns o [B,H,T,D], lse [B,H,T]."""
    B, H, T, D = q.shape
    G = H // k.shape[1]
    _, rows = _meta(seg_BT, bid_BT, causal)
    q_spec = pl.BlockSpec((None, None, bq, D), lambda b, h, i: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, T, D), lambda b, h, i: (b, idiv(h, G), 0, 0))
    row_spec = pl.BlockSpec((None, bq), lambda b, h, i: (b, i))
    key_spec = pl.BlockSpec((None, T), lambda b, h, i: (b, 0))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, scale=D**-0.5, causal=causal, bq=bq, bk=bk, T=T, D=D),
        grid=(B, H, T // bq),
        in_specs=[q_spec, kv_spec, kv_spec] + [row_spec] * 5 + [key_spec] * 2,
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, H, T), jnp.float32)],
        compiler_params=_params(D), interpret=interpret,
    )(q, k, v, *rows, seg_BT, seg_BT, bid_BT)


def backward(q, k, v, seg_BT, bid_BT, o, lse, do, *, causal, bq, bk, interpret):
    """Gradients (dq, dk, dv) of ``forward``; lse as returned by it."""
    B, H, T, D = q.shape
    K = k.shape[1]
    G = H // K
    scale = D**-0.5
    r, rows = _meta(seg_BT, bid_BT, causal)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)

    q_spec = pl.BlockSpec((None, None, bq, D), lambda b, h, i: (b, h, i, 0))
    stat_spec = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
    kv_spec = pl.BlockSpec((None, None, T, D), lambda b, h, i: (b, idiv(h, G), 0, 0))
    row_spec = pl.BlockSpec((None, bq), lambda b, h, i: (b, i))
    key_spec = pl.BlockSpec((None, T), lambda b, h, i: (b, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, causal=causal, bq=bq, bk=bk, T=T, D=D),
        grid=(B, H, T // bq),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec] + [row_spec] * 5
        + [key_spec] * 2,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(D), interpret=interpret,
    )(q, k, v, do, lse, delta, *rows, seg_BT, seg_BT, bid_BT)

    group_spec = pl.BlockSpec((None, G, T, D), lambda b, kh, j: (b, kh, 0, 0))
    group_stat = pl.BlockSpec((None, G, T), lambda b, kh, j: (b, kh, 0))
    full_row = pl.BlockSpec((None, T), lambda b, kh, j: (b, 0))
    k_spec = pl.BlockSpec((None, None, bk, D), lambda b, kh, j: (b, kh, j, 0))
    key_block = pl.BlockSpec((None, bk), lambda b, kh, j: (b, j))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, causal=causal, bq=bq, bk=bk, T=T, D=D,
                          groups=G),
        grid=(B, K, T // bk),
        in_specs=[group_spec, group_spec, group_stat, group_stat] + [full_row] * 5
        + [k_spec, k_spec] + [key_block] * 6,
        out_specs=[k_spec, k_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(D), interpret=interpret,
    )(q, do, lse, delta, *rows, seg_BT, k, v, r["q_lo"], r["q_hi"], r["full_q_lo"], r["full_q_hi"],
      seg_BT, bid_BT)
    return dq, dk, dv
