"""GLM-4.5-Air shape (zai-org/GLM-4.5-Air, ``Glm4MoeForCausalLM``): 106B total / 12B active parameters.

    python -m glmjax.train --config=configs/glm45_air.py --workdir=gs://BUCKET/glm45_air \
        --config.data.task=my_task --config.data.tokenizer=/path/tokenizer.model

46 layers (the first dense, SwiGLU 10944), hidden 4096, 96 heads of 128 (8 kv heads), qkv bias, no
qk-norm, half-split rotary on half of head_dim (theta 1e6), 128 routed experts of width 1408, top 8,
1 shared expert, sigmoid router with the aux-loss-free correction bias, vocab 151552, untied head.
Counts: 106.9B parameters (published 106B, without the multi-token-prediction layer), 12.2B active parameters
in the blocks per token (published 12B; embedding and head excluded).

Chips: a TPU v5p-128 (64 chips, 95.74 GiB HBM each), mesh fsdp=4 x expert=16; batch 512 x 4096 in 8
micro-batches (one sequence per chip each), full remat, loss chunks of 512. Measured with the TPU compiler
(``python tools/aot_compile.py --config=configs/glm45_air.py --topology=v5p-128``, docs/tpu_aot.md): train
step 72.24 GB per chip (arguments 20.05 GB, temporaries 52.20 GB), eval step fits too: margin 30.6 GB.
Cost: 1.90e17 model FLOPs per step (glmjax.scaling.flops: active parameters + attention), 9.1e22 per
trillion tokens: ~89 days on that v5p-128 at 40% MFU of 459 TFLOP/s bf16 per chip (estimate, not measured).
"""
from glmjax.moe_config import glm45_config


def get_config():
    return glm45_config(num_layers=46, hidden_size=4096, mlp_dim=10944, num_experts=128, expert_mlp_dim=1408,
                        first_dense_layers=1, qk_norm=False, routed_scaling_factor=1.0, fsdp=4, mesh_expert=16,
                        grad_accum_steps=8)
