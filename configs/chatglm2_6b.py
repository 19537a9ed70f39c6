"""ChatGLM2-6B (THUDM/chatglm2-6b; ChatGLM3-6B has the same architecture), exactly as its modelling file computes.

28 layers, hidden 4096, 32 query heads of 128 with 2 multi-query kv groups (``num_kv_heads=2``), SwiGLU 13696
(fused ``[gate; up]``: ``silu(x[0]) * x[1]``), padded vocab 65024, untied output layer (6.24B parameters: the
sum of the released tensor shapes, the ``rotary_pos_emb.inv_freq`` buffer aside), RMSNorm pre-norm
(eps 1e-5) with a final RMSNorm and no embedding norm, a bias on the fused qkv only, rotary on the first half
of head_dim with interleaved pairs (theta 10000; ChatGLM3-6B-32k: ``rope_theta = 10000 * rope_ratio``).
Causal LM: ChatGLM2 is no longer trained by blank infilling. This is glmjax's GLM-4-style block (the
defaults), so the model also exports natively as ``GlmForCausalLM`` (``--format=hf``).

    python tools/import_hf.py --model=/models/chatglm2-6b --config=configs/chatglm2_6b.py --workdir=/tmp/chatglm2
    python -m glmjax.train --config=/tmp/chatglm2/imported_config.py --workdir=/tmp/chatglm2 \
        --config.data.task=my_task --config.data.tokenizer=/path/tokenizer.model
    python tools/export_hf.py --workdir=/tmp/chatglm2 --out=/tmp/chatglm2_back --format=chatglm2

Cost: 6 * 6.24e9 * 1e12 tokens = 3.7e22 FLOPs per trillion tokens (~13 days on a TPU v5p-256 at 50% MFU;
ChatGLM2-6B saw 1.4T tokens). Context: the released model trained at 32768 (``seq_length``); the run below
uses 8192 (set ``--config.seq_len``), which changes no parameter.

What differs: the tokenizer (ChatGLM2's SentencePiece ``tokenizer.model`` with its own special ids) is not
wired in (set ``data.tokenizer``); the data and the SFT / RLHF stages are not part of this pretraining setup.
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
    m.num_layers = 28
    m.hidden_size = 4096
    m.num_heads = 32
    m.num_kv_heads = 2
    m.head_dim = 128
    m.mlp_dim = 13696
    m.vocab_size = 65024
    m.norm = "rmsnorm_pre"
    m.norm_eps = 1e-5
    m.mlp = "swiglu"
    m.glu_order = "gate_first"
    m.rope_2d = False
    m.rope_style = "interleaved"
    m.partial_rotary_factor = 0.5
    m.rope_theta = 10000.0
    m.qkv_bias = True
    m.attn_out_bias = False
    m.mlp_bias = False
    m.embedding_norm = False
    m.final_norm = True
    m.tie_embeddings = False
    m.dtype = "bfloat16"
    m.param_dtype = "float32"
    m.remat = "dots_with_no_batch_dims"
    m.attention_impl = "auto"
    m.sequence_parallel = True
    m.loss_chunk = 512
    c.optimizer.lr = 3e-4
    c.optimizer.warmup_steps = 2000
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 8
    c.objective.causal = 1.0
    c.objective.mask = 0.0
    c.objective.smask = 0.0
    c.objective.gmask = 0.0
    return c
