"""GLM-130B: 70 layers, hidden 12288, 96 heads, GeGLU 32768, vocab 150528, seq 2048, DeepNorm, 2D rotary.

    python -m glmjax.train --config=configs/glm130b.py --workdir=gs://BUCKET/glm130b \
        --config.data.task=my_task --config.data.tokenizer=/path/tokenizer.model

Cost: GLM-130B trained 400B tokens, about 3.1e23 FLOPs: ~60 days on 768 A100s at the paper's
~33% utilisation; on a TPU v5p-1024 at 50% MFU about 14 days. Parallelism: fsdp over all chips
with tensor=8 inside a host (heads 96 divide by 8), and sequence parallelism over tensor
(``model.sequence_parallel``): the TPU compiler puts the train step at 91.7 GB per chip on a
v5p-1024 (fits, 11.1 GB free; without it 271.7 GB, refused; docs/benchmarks.md). Objective as in
the paper: 30% [MASK] (Poisson spans), 70% [gMASK] (suffix); embedding gradient shrink 0.1; DeepNorm alpha=(2N)^0.5; tied embeddings.
"""
from glmjax.config import base_config


def get_config():
    c = base_config()
    c.steps = 100_000
    c.batch_size = 4224
    c.seq_len = 2048
    c.log_every = 10
    c.eval_every = 1000
    c.eval_steps = 10
    m = c.model
    m.num_layers = 70
    m.hidden_size = 12288
    m.num_heads = 96
    m.num_kv_heads = 96
    m.head_dim = 128
    m.mlp_dim = 32768
    m.vocab_size = 150528
    m.norm = "deepnorm"
    m.mlp = "geglu"
    m.rope_2d = True
    m.qkv_bias = True
    m.tie_embeddings = True
    m.embedding_grad_shrink = 0.1
    m.dtype = "bfloat16"
    m.param_dtype = "float32"
    m.remat = "full"
    m.sequence_parallel = True  # residual stream split over tensor along length between blocks
    m.attention_impl = "auto"
    c.optimizer.lr = 8e-5
    c.optimizer.warmup_steps = 500
    c.optimizer.min_lr_ratio = 0.1
    c.optimizer.weight_decay = 0.1
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 8
    c.objective.causal = 0.0
    c.objective.mask = 0.3
    c.objective.gmask = 0.7
    return c
