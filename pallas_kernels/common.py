"""Pieces shared by the TPU and GPU kernel bodies: constants, the element mask, the matmul."""
from __future__ import annotations

import contextlib
import threading

import jax
import jax.numpy as jnp
from jax import lax

NEG = -1e30  # finite "minus infinity": keeps fully masked rows free of inf - inf
EMPTY_LSE = 1e30  # log-sum-exp stored for rows that see nothing: exp(s - EMPTY_LSE) == 0

NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b


def idiv(x, n):
    """Integer ``x / n`` truncated (``lax.div``) with ``n`` cast to ``x``'s dtype: a Python int is int64
    under ``jax_enable_x64`` and ``lax.div`` refuses mixed dtypes."""
    x = jnp.asarray(x)
    return lax.div(x, jnp.asarray(n, x.dtype))


def irem(x, n):
    """``lax.rem(x, n)`` with ``n`` cast to ``x``'s dtype (see :func:`idiv`)."""
    x = jnp.asarray(x)
    return lax.rem(x, jnp.asarray(n, x.dtype))


def dot(a, b, dims):
    """Matmul accumulating in float32; float32 operands multiply in full precision (no TF32 /
    bf16 passes), so float32 results match the reference to ~1e-6."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def element_mask(seg_q, seg_k, bid_k, q_pos, k_pos, causal):
    """Exact GLM mask (DESIGN.md §3) for a tile; all operands broadcast to the tile shape."""
    m = (seg_q == seg_k) & (seg_q != 0)
    if causal:
        m = m & ((k_pos <= q_pos) | (bid_k != 0))
    return m


_TARGET = threading.local()


def target_platform() -> str:
    """The platform programs are being built for: ``jax.default_backend()``, unless inside
    :func:`compile_for` (ahead-of-time compilation for TPU from a CPU host)."""
    return getattr(_TARGET, "platform", None) or jax.default_backend()


@contextlib.contextmanager
def compile_for(platform: str):
    """Trace code for ``platform`` (e.g. ``"tpu"``) although the host's backend differs: kernels
    dispatch as on that platform (no interpret mode). For ``jit(...).lower(...)`` against abstract
    TPU devices (``jax.experimental.topologies``)."""
    prev = getattr(_TARGET, "platform", None)
    _TARGET.platform = platform
    try:
        yield
    finally:
        _TARGET.platform = prev
