"""Tiny GLM for CPU: trains on the embedded default corpus (the Python standard library) in minutes.

    python -m glmjax.train --config=configs/tiny.py --workdir=/tmp/glm_tiny

Cost: about 2-4 minutes for 300 steps on a 2-core CPU (no accelerator needed); 0.95M parameters.
GLM-130B style blocks (DeepNorm post-LN, GeGLU, 2D rotary) at toy width, so the full GLM path is
exercised on every run. The tokenizer (SentencePiece, vocab_size entries) is trained on first use.
On a TPU (smoke runs): v5litepod-4, data parallel over the 4 chips, 9.8 MB per chip at the default
batch; up to 2600 sequences per chip fit its 16 GiB (batch 10400: 17.15 GB; docs/tpu_aot.md).
"""
from glmjax.config import base_config


def get_config():
    c = base_config()
    c.seed = 0
    c.steps = 300
    c.batch_size = 16
    c.seq_len = 128
    c.log_every = 10
    c.eval_every = 100
    c.eval_steps = 4
    m = c.model
    m.num_layers = 2
    m.hidden_size = 128
    m.num_heads = 4
    m.num_kv_heads = 4
    m.head_dim = 32
    m.mlp_dim = 384
    m.vocab_size = 2048
    m.norm = "deepnorm"
    m.mlp = "geglu"
    m.rope_2d = True
    m.qkv_bias = True
    m.embedding_grad_shrink = 1.0
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 20
    c.optimizer.weight_decay = 0.01
    c.objective.causal = 0.0  # the GLM-130B objective mix: 30% [MASK] spans, 70% [gMASK] suffixes
    c.objective.mask = 0.3
    c.objective.gmask = 0.7
    c.checkpoint.every = 100
    c.checkpoint.keep = 2
    return c
