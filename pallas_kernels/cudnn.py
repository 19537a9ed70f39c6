"""cuDNN flash attention through ``jax.nn.dot_product_attention``, where the GLM mask allows it.

cuDNN masks natively only "causal" or "nothing" (plus per-row lengths): plain causal or plain
bidirectional attention without ``segment_ids``/``bidirectional`` is expressible. Packed segments or
a bidirectional prefix are not; ``implementation="cudnn"`` raises a ValueError for them, and
``implementation="cudnn_dense"`` instead passes the whole GLM mask as a dense ``[B, 1, T, T]``
additive bias (O(B*T^2) memory; meant for benchmarks, where it is the baseline to beat).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.reference import glm_mask

_MASKED_BIAS = -1e9  # large but finite: fully masked rows give a uniform average, zeroed after


def attention_cudnn(q_BTHD, k_BSKD, v_BSKD, segment_ids_BT=None, bidirectional_BT=None, *,
                    causal: bool = True, dense_mask: bool = False,
                    sdpa_implementation: str = "cudnn") -> jax.Array:
    """cuDNN attention; ``sdpa_implementation="xla"`` runs the same call on any platform (tests)."""
    if segment_ids_BT is None and bidirectional_BT is None:
        return jax.nn.dot_product_attention(q_BTHD, k_BSKD, v_BSKD, is_causal=causal,
                                            implementation=sdpa_implementation)
    if not dense_mask:
        raise ValueError(
            "implementation='cudnn' cannot express this mask: cuDNN only knows causal / no mask, "
            "while segment_ids or bidirectional (packed documents, GLM Part A) were given. Use "
            "implementation='pallas_gpu' (block-sparse, exact), or 'cudnn_dense' to pass the mask "
            "as a dense [B,1,T,T] bias (O(B*T^2) memory).")
    B, T = q_BTHD.shape[:2]
    mask_BTS = glm_mask(segment_ids_BT, bidirectional_BT, batch=B, q_len=T,
                        kv_len=k_BSKD.shape[1], causal=causal)
    bias = jnp.where(mask_BTS, 0.0, _MASKED_BIAS).astype(q_BTHD.dtype)[:, None]
    out = jax.nn.dot_product_attention(q_BTHD, k_BSKD, v_BSKD, bias=bias,
                                       implementation=sdpa_implementation)
    sees_any = jnp.any(mask_BTS, axis=-1)[:, :, None, None]
    return jnp.where(sees_any, out, jnp.zeros_like(out))
