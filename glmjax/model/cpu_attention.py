"""GLM-masked attention for XLA:CPU with a hand-written (FlashAttention-style) backward.

Same mask and forward as ``pallas_kernels.reference.attention_xla`` (DESIGN.md §3: float32 softmax,
masked logits at a finite -1e30, rows without a visible key return 0), computed in a batch-major
layout (``[B, K, G*T, D]``: the score matmuls are plain batched GEMMs with no transposes of the
``[.., T, S]`` scores). The custom VJP saves q, k, v, the output and the per-row max / sum (``[B, K,
G*T]``), recomputes ``p`` in the backward and uses ``rowsum(dO * O)`` (over head_dim) in place of
``rowsum(p * dp)`` (over keys), the FlashAttention identity: the scanned layers no longer stack the
``[B, H, T, S]`` probabilities as residuals and the backward has one reduction over head_dim instead
of one over keys. The mask enters as an additive 0 / -1e30 bias (the same logits as the reference's
select) and the softmax scale multiplies dq / dk rather than the scores' gradient. Values equal the
reference up to summation order, gradients equal autodiff's through it to float32 rounding
(``tests/test_cpu_attention.py``). Used by ``attention_impl=xla``/``auto`` on CPU only (docs/benchmarks.md).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.reference import glm_mask

_MASKED = -1e30


def _to_bkqd(q_BTHD, K):
    B, T, H, D = q_BTHD.shape
    G = H // K
    return q_BTHD.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, D)


def _from_bkqd(o_BKQD, T, dtype):
    B, K, Q, D = o_BKQD.shape
    G = Q // T
    return o_BKQD.reshape(B, K, G, T, D).transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, D).astype(dtype)


def _scores(q_BKQD, k_BKSD, bias_BTS, G, scale):
    """Masked float32 logits ``[B, K, G*T, S]``: ``bias`` is 0 where visible, -1e30 where masked, so
    ``s + bias`` is exactly ``where(mask, s, -1e30)`` (|s| << ulp(1e30)) without a broadcast select
    (XLA:CPU hoisted the broadcast -1e30 of the select out of the layer loop as a [B,H,T,S] buffer)."""
    s = jnp.einsum("bkqd,bksd->bkqs", q_BKQD, k_BKSD, preferred_element_type=jnp.float32)
    s = s.astype(jnp.float32) * scale
    B, K, Q, S = s.shape
    s = s.reshape(B, K, G, Q // G, S) + bias_BTS[:, None, None]
    return s.reshape(B, K, Q, S)


def _forward(q_BKQD, k_BKSD, v_BKSD, bias_BTS, seen_BQ, G, scale):
    s = _scores(q_BKQD, k_BKSD, bias_BTS, G, scale)
    row_max = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - row_max)
    row_sum = jnp.sum(p, axis=-1, keepdims=True)
    p = p / row_sum
    out = jnp.einsum("bkqs,bksd->bkqd", p.astype(v_BKSD.dtype), v_BKSD, preferred_element_type=jnp.float32)
    out = out * seen_BQ[:, None, :, None]  # 1 or 0: rows without a visible key return exactly 0
    return out, row_max, row_sum


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attend(q_BKQD, k_BKSD, v_BKSD, bias_BTS, seen_BQ, G, scale):
    return _forward(q_BKQD, k_BKSD, v_BKSD, bias_BTS, seen_BQ, G, scale)[0].astype(q_BKQD.dtype)


def _attend_fwd(q, k, v, bias, seen, G, scale):
    out, row_max, row_sum = _forward(q, k, v, bias, seen, G, scale)
    out = out.astype(q.dtype)
    return out, (q, k, v, bias, seen, out, row_max, row_sum)


def _attend_bwd(G, scale, res, g_BKQD):
    q, k, v, bias, seen, out, row_max, row_sum = res
    s = _scores(q, k, bias, G, scale)
    p = jnp.exp(s - row_max) / row_sum  # the forward's probabilities, recomputed
    g = g_BKQD.astype(jnp.float32) * seen[:, None, :, None]
    dv = jnp.einsum("bkqs,bkqd->bksd", p.astype(v.dtype), g.astype(v.dtype), preferred_element_type=jnp.float32)
    dp = jnp.einsum("bkqd,bksd->bkqs", g.astype(v.dtype), v, preferred_element_type=jnp.float32)
    delta = jnp.sum(g * out.astype(jnp.float32), axis=-1, keepdims=True)  # = rowsum(p * dp)
    ds = (p * (dp - delta)).astype(q.dtype)  # the softmax scale goes on the [.., D] results, not on [.., S]
    dq = jnp.einsum("bkqs,bksd->bkqd", ds, k, preferred_element_type=jnp.float32) * scale
    dk = jnp.einsum("bkqs,bkqd->bksd", ds, q, preferred_element_type=jnp.float32) * scale
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def attention_cpu(q_BTHD, k_BSKD, v_BSKD, segment_ids_BT=None, bidirectional_BT=None, *, causal: bool = True,
                  scale: float | None = None):
    """GLM-masked attention; q ``[B,T,H,D]``, k/v ``[B,S,K,D]`` (H % K == 0) -> ``[B,T,H,D]``."""
    B, T, H, D = q_BTHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    if H % K:
        raise ValueError(f"num query heads {H} is not divisible by num kv heads {K}")
    G = H // K
    scale = D**-0.5 if scale is None else float(scale)
    mask_BTS = glm_mask(segment_ids_BT, bidirectional_BT, batch=B, q_len=T, kv_len=S, causal=causal)
    seen_BQ = jnp.tile(jnp.any(mask_BTS, axis=-1), (1, G)).astype(jnp.float32)  # [B, G*T], row g*T + t
    bias_BTS = jnp.where(mask_BTS, 0.0, _MASKED).astype(jnp.float32)
    q = _to_bkqd(q_BTHD, K)
    k = k_BSKD.transpose(0, 2, 1, 3)
    v = v_BSKD.transpose(0, 2, 1, 3)
    return _from_bkqd(_attend(q, k, v, bias_BTS, seen_BQ, G, scale), T, q_BTHD.dtype)
