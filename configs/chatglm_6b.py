"""ChatGLM-6B (THUDM/chatglm-6b, the first version), exactly as its modelling file computes.

28 layers, hidden 4096, 32 heads of 128, plain GELU MLP 16384 (tanh GELU, ``mlp=gelu``), vocab 130528,
output layer tied to the embeddings (6.2B parameters: the sum of the checkpoint's distinct tensors; the
stored ``lm_head.weight`` is the tied copy), DeepNorm post-LN (alpha = (2N)^0.5) with a LayerNorm on the
embeddings and a final LayerNorm (``embedding_norm=True``, ``final_norm=False``), biases on qkv, attention
output and the MLP, 2D rotary with split halves (``rope_style=half``): the first half of head_dim by
position, the second by block position. Objective: GLM blank infilling with ChatGLM's positions ([gMASK]:
Part B at the mask position, block positions 1..; ``objective.gmask_positions=mask``).

    python tools/import_hf.py --model=/models/chatglm-6b --config=configs/chatglm_6b.py --workdir=/tmp/chatglm
    python -m glmjax.train --config=/tmp/chatglm/imported_config.py --workdir=/tmp/chatglm

What differs: ChatGLM-6B's tokenizer (ice_text.model, with its own special ids) is not wired in (set
``data.tokenizer``), and its supervised fine-tuning / RLHF stages are not part of this pretraining setup;
the objective mix below is GLM-130B's (ChatGLM-6B's pre-training mix is not published).

Cost: 6 * 6.2e9 * 1e12 tokens = 3.7e22 FLOPs per trillion tokens (ChatGLM-6B saw ~1T): ~29 days on a
TPU v5p-128 at 50% MFU. Slice: v5p-128 (64 chips, all-fsdp, ``remat=full``, 16 sequences per chip):
the TPU compiler puts the train step at 46.4 GB per chip (fits, 56.4 GB free); the largest batch that
fits is 2368 (37 per chip, 101.3 GB; docs/tpu_aot.md, docs/aot/chatglm_6b_v5p-128*.json).
"""
from glmjax.config import base_config


def get_config():
    c = base_config()
    c.steps = 50_000
    c.batch_size = 1024
    c.seq_len = 2048
    c.log_every = 10
    c.eval_every = 1000
    c.eval_steps = 10
    m = c.model
    m.num_layers = 28
    m.hidden_size = 4096
    m.num_heads = 32
    m.num_kv_heads = 32
    m.head_dim = 128
    m.mlp_dim = 16384
    m.vocab_size = 130528
    m.norm = "deepnorm"
    m.norm_eps = 1e-5
    m.mlp = "gelu"
    m.gelu = "tanh"
    m.rope_2d = True
    m.rope_style = "half"
    m.partial_rotary_factor = 0.5
    m.qkv_bias = True
    m.attn_out_bias = True
    m.mlp_bias = True
    m.embedding_norm = True
    m.final_norm = False
    m.tie_embeddings = True
    m.init = "deepnorm"
    m.dtype = "bfloat16"
    m.param_dtype = "float32"
    m.remat = "full"
    m.attention_impl = "auto"
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 500
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.objective.causal = 0.0
    c.objective.mask = 0.3
    c.objective.gmask = 0.7
    c.objective.gmask_positions = "mask"
    return c
