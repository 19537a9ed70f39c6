"""GLM-4-architecture model of about 1.1B non-embedding parameters (1.4B with embeddings).

    python -m glmjax.train --config=configs/glm_1b.py --workdir=gs://BUCKET/glm_1b \
        --config.data.task=my_task --config.data.tokenizer=/path/tokenizer.model

Cost: 20B tokens (Chinchilla-optimal, 20 tokens/parameter) at 50% MFU is about 1.7e20 FLOPs:
~45 hours on one H100, ~6 hours on a v5p-16 (8 chips). Slice: v5p-16 (8 chips, all-fsdp, 12
sequences per chip): the TPU compiler puts the train step at 44.3 GB per chip (fits, 58.5 GB free);
the largest batch that fits is 224 (28 per chip, 99.4 GB; docs/tpu_aot.md, docs/aot/glm_1b_v5p-16*.json).
On GPU: fits one 80 GB device with this remat policy and batch 16 x 2048 per device. Learning-rate rule: 3e-4 peak, as for GLM-4-9B scaled by
(4096/2048)^0.5 ~ 1.4 would suggest; kept conservative with 2000 warmup steps.
"""
from glmjax.config import base_config


def get_config():
    c = base_config()
    c.steps = 100_000
    c.batch_size = 96
    c.seq_len = 2048
    c.log_every = 20
    c.eval_every = 1000
    c.eval_steps = 20
    m = c.model
    m.num_layers = 24
    m.hidden_size = 2048
    m.num_heads = 16
    m.num_kv_heads = 4
    m.head_dim = 128
    m.mlp_dim = 5632
    m.vocab_size = 65536
    m.norm = "rmsnorm_pre"
    m.norm_eps = 1e-5
    m.mlp = "swiglu"
    m.rope_2d = False
    m.qkv_bias = True
    m.dtype = "bfloat16"
    m.param_dtype = "float32"
    m.remat = "dots_with_no_batch_dims"
    m.attention_impl = "auto"
    c.optimizer.lr = 3e-4
    c.optimizer.warmup_steps = 2000
    c.optimizer.weight_decay = 0.1
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.checkpoint.every = 1000
    return c
