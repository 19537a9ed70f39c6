"""Shared wrapper around the Pallas kernels: padding, layout and the custom VJP.

The public layout ``[B, T, H, D]`` is transposed to the kernels' ``[B, H, T, D]`` and T is padded
up to the block sizes (padded positions get segment id 0, so they are invisible and return 0).
The custom VJP saves the output and the per-row log-sum-exp from the forward kernel; the backward
kernels recompute probabilities from them (FlashAttention-2 style).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import block_mask as bm


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static (hashable) settings of one kernel call."""

    backend: str  # "pallas_tpu" | "pallas_gpu"
    causal: bool
    block_q: int
    block_k: int
    interpret: object  # False, True, or a hashable interpreter config (pltpu.InterpretParams)


def _module(backend: str):
    if backend == "pallas_tpu":
        from pallas_kernels import tpu
        return tpu
    from pallas_kernels import gpu
    return gpu


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _core(q, k, v, seg, bid, cfg: KernelConfig):
    return _core_fwd(q, k, v, seg, bid, cfg)[0]


def _core_fwd(q, k, v, seg, bid, cfg: KernelConfig):
    o, lse = _module(cfg.backend).forward(
        q, k, v, seg, bid, causal=cfg.causal, bq=cfg.block_q, bk=cfg.block_k,
        interpret=cfg.interpret)
    return o, (q, k, v, seg, bid, o, lse)


def _core_bwd(cfg: KernelConfig, res, do):
    q, k, v, seg, bid, o, lse = res
    dq, dk, dv = _module(cfg.backend).backward(
        q, k, v, seg, bid, o, lse, do, causal=cfg.causal, bq=cfg.block_q, bk=cfg.block_k,
        interpret=cfg.interpret)
    return dq, dk, dv, None, None


_core.defvjp(_core_fwd, _core_bwd)


def flash(q_BTHD, k_BSKD, v_BSKD, segment_ids_BT, bidirectional_BT, cfg: KernelConfig):
    """Pallas attention in the public layout; inputs already validated by ``api``."""
    B, T, H, D = q_BTHD.shape
    Tp = bm.padded_length(T, cfg.block_q, cfg.block_k)
    seg, bid = bm.pad_mask_inputs(segment_ids_BT, bidirectional_BT, batch=B, seq_len=T, padded=Tp)

    def to_kernel(x):
        x = jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
        return jnp.swapaxes(x, 1, 2)

    o = _core(to_kernel(q_BTHD), to_kernel(k_BSKD), to_kernel(v_BSKD), seg, bid, cfg)
    return jnp.swapaxes(o, 1, 2)[:, :T]
