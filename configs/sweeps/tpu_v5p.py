"""TPU v5p IsoFLOP sweep: 4 budgets 1e18-1e21 FLOPs x 5 sizes (~40M-3B parameters), cooldown forks.

    python tools/sweep.py plan --config=configs/sweeps/tpu_v5p.py --out=gs://BUCKET/sweeps/v5p
    python tools/sweep.py run --plan=gs://BUCKET/sweeps/v5p     # or through launch/ (one job per plan job)
    python tools/sweep.py report --plan=gs://BUCKET/sweeps/v5p

Cost: the sweep trains ~2.7e21 FLOPs (forks: the main runs plus 20% cooldowns); on a v5p-64 (32 chips,
459 TFLOP/s bf16 each) at 40% MFU that is ~110 chip-hours... ~3.5 days of the slice. Check the plan's
FLOPs (plan.csv) before paying for it. Rules (docs/scaling.md): budgets 10x apart centre their 5 sizes on
sqrt(C / (6 * 20)); sizes a factor 10**0.25 apart on a global ladder (budgets 10**0.5 apart would share
shapes); width in multiples of 128, depth round(d / 64), heads d / 128, SwiGLU mlp 8/3 d; batch 256 x 2048
tokens; lr 3e-3 * (N / 1e8)^(-1/3) (at most 3e-3); wsd, 1-sqrt cooldown over 20%, one constant run per shape.
"""
import ml_collections

from glmjax.config import base_config


def get_config():
    base = base_config()
    base.seed = 0
    base.batch_size = 256
    base.seq_len = 2048
    base.log_every = 50
    base.eval_steps = 50
    base.model.vocab_size = 151552  # the GLM-4 tokenizer's size; set data.tokenizer to its SentencePiece model
    base.model.norm = "rmsnorm_pre"
    base.model.mlp = "swiglu"
    base.model.qkv_bias = False
    base.model.dtype = "bfloat16"
    base.model.attention_impl = "auto"
    base.model.remat = "dots_with_no_batch_dims"
    base.optimizer.weight_decay = 0.1
    base.optimizer.min_lr_ratio = 0.0
    base.optimizer.cooldown_fraction = 0.2
    base.optimizer.cooldown_shape = "1-sqrt"
    base.mesh.fsdp = -1
    base.mesh.data = 1
    base.checkpoint.keep = 2

    s = ml_collections.ConfigDict()
    s.name = "tpu_v5p"
    s.base = base
    s.budgets = (1e18, 1e19, 1e20, 1e21)
    s.sizes_per_budget = 5

    s.tokens_per_param = 20.0
    s.mode = "forks"
    s.min_steps = 200
    s.warmup_fraction = 0.05
    s.warmup_max_steps = 1000
    s.checkpoints_per_run = 20
    s.shape = ml_collections.ConfigDict(dict(head_dim=128, aspect=64, mlp_ratio=8 / 3, multiple_of=128,
                                             max_width=8192))
    s.lr = ml_collections.ConfigDict(dict(base=3e-3, base_params=1e8, exponent=1 / 3, max=3e-3))
    return s
