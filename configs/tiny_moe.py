"""Tiny GLM-4.5-style Mixture of Experts for CPU: trains on the embedded default corpus in minutes.

    python -m glmjax.train --config=configs/tiny_moe.py --workdir=/tmp/glm_tiny_moe

Cost: a few minutes for 300 steps on a 2-core CPU (no accelerator needed); 1.9M parameters, 0.9M active
(non-embedding) per token. The GLM-4.5 block at toy width: RMSNorm pre-norm, qk-norm, the first layer dense, then
8 routed SwiGLU experts (top 2 of the best 1 of 2 groups, sigmoid router with the aux-loss-free
correction bias) + 1 shared expert; causal LM objective. Expert parallelism on 8 devices:
``--config.mesh.expert=4 --config.mesh.data=2``.
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
    m.num_layers = 4
    m.hidden_size = 128
    m.num_heads = 4
    m.num_kv_heads = 2
    m.head_dim = 32
    m.mlp_dim = 384
    m.vocab_size = 2048
    m.norm = "rmsnorm_pre"
    m.mlp = "swiglu"
    m.rope_2d = False
    m.qkv_bias = True
    m.qk_norm = True
    if "rope_style" in m:  # GLM-4.5 rotates half of head_dim in split halves (knob of the rotary issue)
        m.rope_style = "half"
    e = m.moe
    e.num_experts = 8
    e.experts_per_token = 2
    e.expert_mlp_dim = 96
    e.num_shared_experts = 1
    e.first_dense_layers = 1
    e.n_group = 2
    e.topk_group = 1
    e.norm_topk_prob = True
    e.routed_scaling_factor = 1.0
    e.bias_update_rate = 1e-3
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 20
    c.optimizer.weight_decay = 0.01
    c.checkpoint.every = 100
    c.checkpoint.keep = 2
    return c
