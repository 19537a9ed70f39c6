"""Attention kernels for GLM masks (packed segments, bidirectional prefix, causal, GQA). JAX only.

``flash_attention`` is the entry point; ``block_counts`` reports the block sparsity the Pallas
kernels schedule from. See docs/kernels.md.
"""
from pallas_kernels.api import (IMPLEMENTATIONS, BlockSizes, default_block_sizes, flash_attention,
                                resolve_implementation)
from pallas_kernels.block_mask import block_counts, key_ranges
from pallas_kernels.common import compile_for, target_platform
from pallas_kernels.reference import attention_xla, glm_mask
from pallas_kernels.sharded import sharded_flash_attention

__all__ = [
    "flash_attention", "sharded_flash_attention", "block_counts", "key_ranges", "attention_xla",
    "glm_mask", "compile_for", "target_platform", "BlockSizes", "default_block_sizes", "resolve_implementation", "IMPLEMENTATIONS",
]
