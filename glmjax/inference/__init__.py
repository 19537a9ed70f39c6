"""Inference on glmjax checkpoints: ``load``, ``logits``, ``generate`` (KV cache, GLM blank filling).

Used by the tools (``tools/generate.py``, ``tools/export_hf.py``) and tests; training never imports it.
"""
from glmjax.inference.generate import fill_blanks_ids, generate, generate_ids
from glmjax.inference.model import InferenceModel, from_params, load, logits

__all__ = ["InferenceModel", "fill_blanks_ids", "from_params", "generate", "generate_ids", "load", "logits"]
