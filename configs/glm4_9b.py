"""GLM-4-9B shape: 40 layers, hidden 4096, 32 heads (2 kv heads), SwiGLU 13696, vocab 151552.

    python -m glmjax.train --config=configs/glm4_9b.py --workdir=gs://BUCKET/glm4_9b \
        --config.data.task=my_task --config.data.tokenizer=/path/tokenizer.model

Cost: 6 * 9.4e9 * 1e12 tokens = 5.6e22 FLOPs per trillion tokens: ~20 days on a TPU v5p-256 at 50%
MFU. Same architecture as Hugging Face `GlmForCausalLM` (RMSNorm pre-norm, partial rotary on half
of head_dim, qkv bias, no output bias, untied lm_head), so it exports natively.

Parallelism on a v5p-256: fsdp 16 x tensor 8 (the 2 kv heads are repeated to 8 so q stays split by
head), sequence parallelism over tensor, vocab-chunked loss, 2 micro-batches per step: the TPU
compiler puts the train step at 71.2 GB per chip (fits, 31.6 GB free; re-measured in issue 11); the
largest batch that fits at 2 micro-batches is 736 (101.5 GB; memory follows batch / grad_accum_steps);
all-fsdp without these needed 128.8 GB (refused; docs/benchmarks.md, docs/tpu_aot.md, docs/aot/).
"""
from glmjax.config import base_config


def get_config():
    c = base_config()
    c.steps = 250_000
    c.batch_size = 512
    c.seq_len = 8192
    c.log_every = 10
    c.eval_every = 1000
    c.eval_steps = 10
    m = c.model
    m.num_layers = 40
    m.hidden_size = 4096
    m.num_heads = 32
    m.num_kv_heads = 2
    m.head_dim = 128
    m.mlp_dim = 13696
    m.vocab_size = 151552
    m.norm = "rmsnorm_pre"
    m.norm_eps = 1.5625e-07
    m.mlp = "swiglu"
    m.rope_2d = False
    m.qkv_bias = True
    m.dtype = "bfloat16"
    m.param_dtype = "float32"
    m.remat = "dots_with_no_batch_dims"
    m.attention_impl = "auto"
    c.optimizer.lr = 3e-4
    c.optimizer.warmup_steps = 2000
    m.sequence_parallel = True
    m.loss_chunk = 512
    c.optimizer.grad_accum_steps = 2
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 8
    return c
