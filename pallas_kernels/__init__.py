"""Attention kernels for GLM masks (packed segments, bidirectional prefix, causal, GQA). JAX only."""
from pallas_kernels.reference import attention_xla, glm_mask


def flash_attention(q, k, v, segment_ids=None, bidirectional=None, *, causal=True,
                    implementation="auto", interpret=False, block_sizes=None):
    """Attention over ``[B, T, H, D]`` with the GLM mask. Only ``xla`` exists so far."""
    if implementation in ("auto", "xla"):
        return attention_xla(q, k, v, segment_ids, bidirectional, causal=causal)
    raise NotImplementedError(f"attention implementation {implementation!r} is not built yet")


__all__ = ["flash_attention", "attention_xla", "glm_mask"]
