"""Plain-XLA attention with the GLM mask: the reference every kernel is checked against.

Mask (DESIGN.md §3): query ``i`` sees key ``j`` iff ``segment_ids[i] == segment_ids[j] != 0`` and
(``j <= i`` or ``bidirectional[j]``). With ``causal=False`` the ``j <= i`` condition is dropped.
Rows that see nothing (padding) return 0, never NaN. Softmax is computed in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def glm_mask(
    segment_ids_BT: jax.Array | None,
    bidirectional_BT: jax.Array | None,
    *,
    batch: int,
    q_len: int,
    kv_len: int,
    causal: bool = True,
) -> jax.Array:
    """Boolean mask ``[B, T, S]``: True where query ``t`` may attend to key ``s``."""
    mask = jnp.ones((batch, q_len, kv_len), dtype=bool)
    if segment_ids_BT is not None:
        seg_q = segment_ids_BT[:, :q_len, None]
        seg_k = segment_ids_BT[:, None, :kv_len]
        mask &= (seg_q == seg_k) & (seg_k != 0)
    if causal:
        visible = jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None]
        visible = jnp.broadcast_to(visible[None], (batch, q_len, kv_len))
        if bidirectional_BT is not None:
            visible = visible | bidirectional_BT[:, None, :kv_len].astype(bool)
        mask &= visible
    return mask


_MASKED = -1e30  # masked logits: far below any real one, finite so that no inf-inf NaN appears


def attention_xla(
    q_BTHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    segment_ids_BT: jax.Array | None = None,
    bidirectional_BT: jax.Array | None = None,
    *,
    causal: bool = True,
    scale: float | None = None,
) -> jax.Array:
    """Reference attention. q: [B,T,H,D]; k, v: [B,S,Hkv,D] with H % Hkv == 0. Returns [B,T,H,D]."""
    B, T, H, D = q_BTHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    if H % K:
        raise ValueError(f"num query heads {H} is not divisible by num kv heads {K}")
    G = H // K
    scale = D**-0.5 if scale is None else scale
    q = q_BTHD.reshape(B, T, K, G, D)
    logits_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q, k_BSKD, preferred_element_type=jnp.float32)
    logits_BKGTS = logits_BKGTS.astype(jnp.float32) * scale
    mask_BTS = glm_mask(segment_ids_BT, bidirectional_BT, batch=B, q_len=T, kv_len=S, causal=causal)
    # One select with a large finite negative (exp underflows to exactly 0 in any row with a visible
    # key); the max is only a shift, so it carries no gradient (as in jax.nn.softmax). Rows without a
    # visible key would average v: a [B,T] flag zeroes them (finite, zero gradients).
    logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, _MASKED)
    row_max = jax.lax.stop_gradient(jnp.max(logits_BKGTS, axis=-1, keepdims=True))
    p = jnp.exp(logits_BKGTS - row_max)
    p = p / jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bkgts,bskd->btkgd", p.astype(v_BSKD.dtype), v_BSKD, preferred_element_type=jnp.float32)
    seen_BT = jnp.any(mask_BTS, axis=-1)
    out = jnp.where(seen_BT[:, :, None, None, None], out, 0.0)
    return out.reshape(B, T, H, D).astype(q_BTHD.dtype)
