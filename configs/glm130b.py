"""The released GLM-130B (Zeng et al. 2022; THUDM/GLM-130B with SwissArmyTransformer 0.2.x), exactly.

70 layers, hidden 12288, 96 heads of 128, GeGLU 32768 (erf GELU, fused ``[value; gate]``), vocab 150528,
tied output layer, DeepNorm post-LN (alpha = (2N)^0.5 = 11.83) with LayerNorm on the embeddings and a final
LayerNorm (glmjax: ``embedding_norm=True``, ``final_norm=False``, see config.py), biases on qkv, attention
output and both MLP matrices, 1D rotary over all of head_dim with split halves (``rope_style=half``,
``partial_rotary_factor=1.0``), the paper's DeepNorm init (Xavier normal, gain (2N)^-0.5 on v, attention
output and both MLP matrices), embedding gradient shrink 0.1, seq 2048, and the paper's objective mix:
30% [MASK] (Poisson spans, Part B at the mask position) and 70% [gMASK] with GLM-130B positions
(``objective.gmask_positions=continue``: positions run on 0..n, no block positions). 128.7B parameters
(the sum of the released checkpoint's tensors; tests/test_glm_originals.py).

    python -m glmjax.train --config=configs/glm130b.py --workdir=gs://BUCKET/glm130b \\
        --config.data.task=my_task --config.data.tokenizer=/path/tokenizer.model
    # continue from the released weights (mp_rank_XX_model_states.pt):
    python tools/import_hf.py --model=/models/glm-130b --layout=glm130b --config=configs/glm130b.py \\
        --workdir=gs://BUCKET/glm130b_cont

What differs from the release: the tokenizer (GLM-130B used icetk; set ``data.tokenizer``), the data,
the multi-task instruction pre-training share (MIP, 5% of tokens) and the mixed-precision details
(fp16 with its loss scaling there; bf16 compute with float32 master weights here). For glmjax's earlier
GLM-130B-like model (2D interleaved rotary on half of head_dim, no output / MLP biases, no embedding norm,
extra final norm, gate-first GeGLU, std 0.02 init) see docs/models.md; GLM-4 style: configs/glm4_9b.py.

Cost: GLM-130B trained 400B tokens, about 3.1e23 FLOPs: ~60 days on 768 A100s at the paper's
~33% utilisation; on a TPU v5p-1024 at 50% MFU about 14 days. Parallelism: fsdp over all chips
with tensor=8 inside a host (heads 96 divide by 8), and sequence parallelism over tensor
(``model.sequence_parallel``). Slice: v5p-1024 (512 chips, mesh 1 x 64 x 8, 66 sequences per fsdp shard of 8 chips):
the TPU compiler puts the train step at 97.3 GB per chip (fits, 5.5 GB = 5.4% of HBM free; without
sequence parallelism 271.7 GB, refused); measured for this released architecture with
``tools/aot_compile.py --config=configs/glm130b.py --topology=v5p-1024 --no_eval`` (docs/tpu_aot.md,
docs/aot/glm130b_v5p-1024*.json). About 1.4 GB per extra sequence per shard: the largest batch that
fits is 4416 (69 per shard, 101.6 GB), little headroom above the paper's 4224.
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
    m.norm_eps = 1e-5
    m.mlp = "geglu"
    m.gelu = "erf"
    m.glu_order = "value_first"
    m.rope_2d = False
    m.rope_style = "half"
    m.partial_rotary_factor = 1.0
    m.qkv_bias = True
    m.attn_out_bias = True
    m.mlp_bias = True
    m.embedding_norm = True
    m.final_norm = False
    m.tie_embeddings = True
    m.init = "deepnorm"
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
    c.objective.gmask_positions = "continue"
    return c
