"""GLM-4.5-Air shape (zai-org/GLM-4.5-Air, ``Glm4MoeForCausalLM``): 106B total / 12B active parameters.

    python -m glmjax.train --config=configs/glm45_air.py --workdir=gs://BUCKET/glm45_air \
        --config.data.task=my_task --config.data.tokenizer=/path/tokenizer.model

46 layers (the first dense, SwiGLU 10944), hidden 4096, 96 heads of 128 (8 kv heads), qkv bias, no
qk-norm, half-split rotary on half of head_dim (theta 1e6), 128 routed experts of width 1408, top 8,
1 shared expert, sigmoid router with the aux-loss-free correction bias, vocab 151552, untied head.
Counts: 106.9B parameters (published 106B, without the multi-token-prediction layer), 12.2B active parameters
in the blocks per token (published 12B; embedding and head excluded).

Chips: parameters + AdamW state in float32 are 16 bytes/parameter = 1.7 TB, so a TPU v5p-128 (64 chips,
95 GB HBM each, 6 TB) with ``mesh.expert=16 mesh.fsdp=4`` holds ~27 GB of state per chip, leaving the rest
for activations (remat on). Cost: 6 * 12.2e9 active * 1e12 tokens = 7.3e22 FLOPs per trillion tokens:
~25 days on that v5p-128 at 40% MFU (estimate, not measured).
"""
from glmjax.config import base_config


def get_config():
    c = base_config()
    c.steps = 250_000
    c.batch_size = 512
    c.seq_len = 4096
    c.log_every = 10
    c.eval_every = 1000
    c.eval_steps = 10
    m = c.model
    m.num_layers = 46
    m.hidden_size = 4096
    m.num_heads = 96
    m.num_kv_heads = 8
    m.head_dim = 128
    m.mlp_dim = 10944
    m.vocab_size = 151552
    m.norm = "rmsnorm_pre"
    m.norm_eps = 1e-5
    m.mlp = "swiglu"
    m.rope_2d = False
    m.rope_theta = 1e6
    if "rope_style" in m:  # half-split rotary (knob of the rotary issue; glmjax's interleaved default is
        m.rope_style = "half"  # the same function up to a column permutation that export applies)
    m.qkv_bias = True
    m.qk_norm = False
    m.dtype = "bfloat16"
    m.param_dtype = "float32"
    m.remat = "dots_with_no_batch_dims"
    m.attention_impl = "auto"
    e = m.moe
    e.num_experts = 128
    e.experts_per_token = 8
    e.expert_mlp_dim = 1408
    e.num_shared_experts = 1
    e.first_dense_layers = 1
    e.n_group = 1
    e.topk_group = 1
    e.norm_topk_prob = True
    e.routed_scaling_factor = 1.0
    c.optimizer.lr = 3e-4
    c.optimizer.warmup_steps = 2000
    c.mesh.data = -1
    c.mesh.fsdp = 4
    c.mesh.expert = 16
    return c
