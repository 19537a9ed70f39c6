"""GLM-4.5 shape (zai-org/GLM-4.5, ``Glm4MoeForCausalLM``): 355B total / 32B active parameters.

    python -m glmjax.train --config=configs/glm45.py --workdir=gs://BUCKET/glm45 \
        --config.data.task=my_task --config.data.tokenizer=/path/tokenizer.model

92 layers (the first 3 dense, SwiGLU 12288), hidden 5120, 96 heads of 128 (8 kv heads), qkv bias,
qk-norm, half-split rotary on half of head_dim (theta 1e6), 160 routed experts of width 1536, top 8,
1 shared expert, routed scaling 2.5, sigmoid router with the aux-loss-free correction bias, vocab
151552, untied head. Counts: 352.8B parameters (published 355B, without the multi-token-prediction
layer), 32.1B active parameters in the blocks per token (published 32B; embedding and head excluded).

Chips: a TPU v5p-512 (256 chips, 95.74 GiB HBM each), mesh fsdp=16 x expert=16; batch 512 x 4096 in 2
micro-batches (one sequence per chip each), full remat, loss chunks of 512. Measured with the TPU compiler
(``python tools/aot_compile.py --config=configs/glm45.py --topology=v5p-512``, docs/tpu_aot.md): train step
73.51 GB per chip (arguments 16.59 GB, temporaries 56.92 GB), eval step fits too: margin 29.3 GB. A v5p-256
(fsdp 8 x expert 16, 4 micro-batches) needs 111.82 GB per chip: 9.0 GB over.
Cost: 4.72e17 model FLOPs per step (glmjax.scaling.flops: active parameters + attention), 2.2e23 per
trillion tokens: ~55 days on that v5p-512 at 40% MFU of 459 TFLOP/s bf16 per chip (estimate, not measured).
"""
from glmjax.moe_config import glm45_config


def get_config():
    return glm45_config(num_layers=92, hidden_size=5120, mlp_dim=12288, num_experts=160, expert_mlp_dim=1536,
                        first_dense_layers=3, qk_norm=True, routed_scaling_factor=2.5, fsdp=16, mesh_expert=16,
                        grad_accum_steps=2)
