"""``flash_attention``: the one entry point; validates inputs and dispatches to an implementation."""
from __future__ import annotations

import dataclasses


from pallas_kernels.block_mask import padded_length
from pallas_kernels.common import target_platform
from pallas_kernels.cudnn import attention_cudnn
from pallas_kernels.flash import KernelConfig, flash
from pallas_kernels.reference import attention_xla

IMPLEMENTATIONS = ("auto", "xla", "pallas_tpu", "pallas_gpu", "cudnn", "cudnn_dense")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query / key block sizes of the Pallas kernels (powers of two, >= 16; shared by fwd and bwd).

    On TPU prefer multiples of 128 (lane width); on GPU 64..128 (32 for head_dim 256).
    """

    block_q: int
    block_k: int


def default_block_sizes(implementation: str, head_dim: int) -> BlockSizes:
    """Defaults per implementation and head dim."""
    if implementation == "pallas_tpu":
        return BlockSizes(256, 256)  # untuned: no TPU was available when this was written
    return BlockSizes(128, 64) if head_dim <= 128 else BlockSizes(64, 32)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _block_sizes(block_sizes, implementation: str, head_dim: int, seq_len: int) -> BlockSizes:
    if block_sizes is None:
        bs = default_block_sizes(implementation, head_dim)
    elif isinstance(block_sizes, BlockSizes):
        bs = block_sizes
    elif isinstance(block_sizes, dict):
        bs = BlockSizes(**block_sizes)
    else:
        bs = BlockSizes(*block_sizes)
    for name, b in (("block_q", bs.block_q), ("block_k", bs.block_k)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"block_sizes.{name}={b} must be a power of two >= 16 (the kernels "
                             "tile by it and Triton needs powers of two); e.g. block_sizes=(128, 128)")
    # Short sequences: do not pad a 40-token input up to 128.
    cap = max(16, _next_pow2(seq_len))
    return BlockSizes(min(bs.block_q, cap), min(bs.block_k, cap))


def _check_tpu_tiling(bs: BlockSizes, seq_len: int):
    """Mosaic tiles the last dim by 128 lanes; row statistics use blocks of (1, block)."""
    padded = padded_length(seq_len, bs.block_q, bs.block_k)
    for name, b in (("block_q", bs.block_q), ("block_k", bs.block_k)):
        if b % 128 and b != padded:
            raise ValueError(f"pallas_tpu needs block sizes that are multiples of 128 (TPU lane "
                             f"width), got {name}={b} for length {seq_len}; use e.g. "
                             "block_sizes=(256, 256)")


def resolve_implementation(implementation: str) -> str:
    """Map ``"auto"`` to a concrete one: TPU -> pallas_tpu, GPU -> pallas_gpu, else xla."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; choose one of "
                         f"{IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    platform = target_platform()
    if platform == "tpu":
        return "pallas_tpu"
    if platform in ("gpu", "cuda", "rocm"):
        return "pallas_gpu"
    return "xla"


def _validate(q, k, v, segment_ids, bidirectional):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [batch, length, heads, head_dim]; got q{q.shape} "
                         f"k{k.shape} v{v.shape}")
    B, T, H, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k{k.shape} and v{v.shape} must have the same shape")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k/v {k.shape} must share batch and head_dim with q {q.shape}")
    if k.shape[1] != T:
        raise ValueError(f"self-attention only: key length {k.shape[1]} != query length {T}; "
                         "pass k and v over the same positions as q")
    if H % k.shape[2]:
        raise ValueError(f"num query heads {H} is not divisible by num kv heads {k.shape[2]}; "
                         "GQA needs heads % kv_heads == 0 (MQA: kv_heads=1)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to "
                         "one dtype (e.g. bfloat16)")
    for name, x in (("segment_ids", segment_ids), ("bidirectional", bidirectional)):
        if x is not None and tuple(x.shape) != (B, T):
            raise ValueError(f"{name} must be [batch, length] = {(B, T)}, got {tuple(x.shape)}")


def flash_attention(q, k, v, segment_ids=None, bidirectional=None, *, causal=True,
                    implementation="auto", interpret=False, block_sizes=None):
    """Attention with the GLM mask (DESIGN.md §3), differentiable.

    Args:
      q: ``[B, T, H, D]``; k, v: ``[B, T, Hkv, D]`` with ``H % Hkv == 0`` (GQA / MQA).
      segment_ids: ``[B, T]`` int, 0 = padding (None: one segment, no padding).
      bidirectional: ``[B, T]`` bool/int, keys every query of the segment sees (GLM Part A).
      causal: False drops the ``j <= i`` condition (segments still apply).
      implementation: ``auto | xla | pallas_tpu | pallas_gpu | cudnn | cudnn_dense``.
      interpret: run Pallas kernels in interpret mode (needed on CPU). ``True`` is the generic
        interpreter; ``pltpu.InterpretParams()`` runs "pallas_tpu" under the TPU-semantics one.
      block_sizes: ``BlockSizes``, ``(block_q, block_k)`` or a dict; None picks defaults.

    Returns ``[B, T, H, D]``; rows that see no key (padding) are 0.
    """
    _validate(q, k, v, segment_ids, bidirectional)
    impl = resolve_implementation(implementation)
    if impl == "xla":
        return attention_xla(q, k, v, segment_ids, bidirectional, causal=causal)
    if impl in ("cudnn", "cudnn_dense"):
        if target_platform() not in ("gpu", "cuda"):
            raise ValueError(f"implementation={impl!r} needs an NVIDIA GPU, but the default "
                             f"backend is {target_platform()!r}; use 'xla' or a Pallas "
                             "implementation with interpret=True")
        return attention_cudnn(q, k, v, segment_ids, bidirectional, causal=causal,
                               dense_mask=impl == "cudnn_dense")
    platform = target_platform()
    wanted = "tpu" if impl == "pallas_tpu" else "gpu"
    if not interpret and platform != wanted:
        raise ValueError(f"implementation={impl!r} compiles for {wanted.upper()}, but the default "
                         f"backend is {platform!r}; pass interpret=True to run it in interpret "
                         "mode (slow, for tests) or pick implementation='xla'")
    D = q.shape[-1]
    if impl == "pallas_gpu" and (D < 16 or D & (D - 1)):
        raise ValueError(f"pallas_gpu needs a power-of-two head_dim >= 16 (Triton tiles), got {D}")
    bs = _block_sizes(block_sizes, impl, D, q.shape[1])
    if impl == "pallas_tpu" and not interpret:
        _check_tpu_tiling(bs, q.shape[1])
    if isinstance(interpret, bool) or not interpret:  # else: an interpreter config object
        interpret = bool(interpret)
    cfg = KernelConfig(impl, bool(causal), bs.block_q, bs.block_k, interpret)
    return flash(q, k, v, segment_ids, bidirectional, cfg)
