"""Rotary position embedding: Hugging Face ``glm`` (interleaved), GLM-130B / ChatGLM / ``glm4_moe``
(split halves, ``rotate_half``) and GLM's 2D extension.

Each position stream rotates ``r = head_dim * partial_rotary_factor`` dims with frequencies
``1 / theta^(2i / r)``, ``i < r/2``. The pairing is ``model.rope_style``:

* ``interleaved``: pairs ``(x[2i], x[2i+1])`` (Hugging Face ``GlmForCausalLM``, ChatGLM2/3);
* ``half``: pairs ``(x[i], x[i + r/2])`` (``rotate_half``: GLM-130B, ChatGLM-6B, ``glm4_moe``).

Both are the same function up to a fixed permutation of the rotated q/k columns
(:func:`half_to_interleaved`), which checkpoint import applies.

1D: dims ``[0, r)`` rotate by ``positions``, the rest pass through. 2D (``model.rope_2d``): dims
``[0, r)`` rotate by ``positions`` and ``[r, 2r)`` by ``block_positions`` (so ``2r <= head_dim``), the
rest pass through. A block position of 0 is the identity, so a 2D model fed zero block positions
computes exactly what the 1D model computes. Defaults (``interleaved``, factor 0.5) are glmjax's
original rotary: half of head_dim per stream, interleaved pairs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import target_platform


def rotary_dim(head_dim: int, partial_rotary_factor: float) -> int:
    """Dims rotated by one position stream."""
    return int(round(head_dim * partial_rotary_factor))


def _rotate(x_BTHR, pos_BT, theta: float, style: str):
    r = x_BTHR.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, r, 2, dtype=jnp.float32) / r))  # [r/2]
    angle_BTF = pos_BT.astype(jnp.float32)[..., None] * inv_freq
    cos, sin = jnp.cos(angle_BTF), jnp.sin(angle_BTF)
    if target_platform() == "cpu":
        # materialise the [B, T, r/2] tables: XLA:CPU otherwise fuses cos/sin into every consumer and
        # evaluates them once per head (forward and backward); as buffers they depend only on the
        # positions and are hoisted out of the scanned layers (same values)
        cos, sin = jax.lax.optimization_barrier((cos, sin))
    cos, sin = cos[:, :, None], sin[:, :, None]
    x = x_BTHR.astype(jnp.float32)
    if style == "half":
        x1, x2 = x[..., :r // 2], x[..., r // 2:]
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    return out.reshape(x_BTHR.shape)


def apply_rope(x_BTHD: jax.Array, positions_BT, block_positions_BT=None, *, theta: float = 10000.0,
               rope_2d: bool = False, style: str = "interleaved",
               partial_rotary_factor: float = 0.5) -> jax.Array:
    """Rotate queries or keys ``[B, T, H, D]``; ``block_positions`` are used only when ``rope_2d``."""
    D = x_BTHD.shape[-1]
    r = rotary_dim(D, partial_rotary_factor)
    parts = [_rotate(x_BTHD[..., :r], positions_BT, theta, style)]
    end = r
    if rope_2d and block_positions_BT is not None:
        parts.append(_rotate(x_BTHD[..., r:2 * r], block_positions_BT, theta, style))
        end = 2 * r
    if end < D:
        parts.append(x_BTHD[..., end:].astype(jnp.float32))
    out = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)
    return out.astype(x_BTHD.dtype)


def half_to_interleaved(head_dim: int, partial_rotary_factor: float, rope_2d: bool) -> np.ndarray:
    """Permutation ``p`` of head_dim with ``x_interleaved = x_half[..., p]``: a model with ``half`` rotary
    and q/k weights ``W`` computes what an ``interleaved`` model with ``W[..., p]`` computes. Within each
    rotated stream of ``r`` dims, interleaved slot ``2i`` takes half-slot ``i`` and ``2i+1`` takes
    ``i + r/2``; pass-through dims stay."""
    r = rotary_dim(head_dim, partial_rotary_factor)
    perm = np.arange(head_dim)
    for start in ((0, r) if rope_2d else (0,)):
        block = np.empty(r, np.int64)
        block[0::2] = start + np.arange(r // 2)
        block[1::2] = start + r // 2 + np.arange(r // 2)
        perm[start:start + r] = block
    return perm


def interleaved_to_half(head_dim: int, partial_rotary_factor: float, rope_2d: bool) -> np.ndarray:
    """The inverse permutation of :func:`half_to_interleaved`."""
    return np.argsort(half_to_interleaved(head_dim, partial_rotary_factor, rope_2d))
