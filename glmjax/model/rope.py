"""Rotary position embedding exactly as Hugging Face ``glm`` does it, with GLM's 2D extension.

``r = head_dim / 2`` rotary dims; frequencies ``1 / theta^(2i / r)``; the rotation acts on interleaved
pairs ``(x[2i], x[2i+1])`` of the first ``r`` dims by ``positions``. With 2D on, the second ``r`` dims
rotate the same way by ``block_positions``; with 2D off they pass through. A block position of 0 is the
identity, so a 2D model fed zero block positions computes exactly what the 1D model computes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _rotate(x_BTHR, pos_BT, theta: float):
    r = x_BTHR.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, r, 2, dtype=jnp.float32) / r))  # [r/2]
    angle_BTF = pos_BT.astype(jnp.float32)[..., None] * inv_freq
    cos, sin = jnp.cos(angle_BTF)[:, :, None], jnp.sin(angle_BTF)[:, :, None]
    x = x_BTHR.astype(jnp.float32)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    return out.reshape(x_BTHR.shape)


def apply_rope(x_BTHD: jax.Array, positions_BT, block_positions_BT=None, *, theta: float = 10000.0,
               rope_2d: bool = False) -> jax.Array:
    """Rotate queries or keys ``[B, T, H, D]``; ``block_positions`` are used only when ``rope_2d``."""
    r = x_BTHD.shape[-1] // 2
    first = _rotate(x_BTHD[..., :r], positions_BT, theta)
    if rope_2d and block_positions_BT is not None:
        second = _rotate(x_BTHD[..., r:], block_positions_BT, theta)
    else:
        second = x_BTHD[..., r:].astype(jnp.float32)
    return jnp.concatenate([first, second], axis=-1).astype(x_BTHD.dtype)
