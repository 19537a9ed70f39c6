"""CPU IsoFLOP sweep: 3 budgets x 4 sizes of tiny causal-LM GLMs (12k-300k parameters), cooldown forks.

    python tools/sweep.py plan --config=configs/sweeps/cpu.py --out=/tmp/sweep_cpu
    python tools/sweep.py run --plan=/tmp/sweep_cpu --backend=inprocess   # resumable: rerun the same command
    python tools/sweep.py report --plan=/tmp/sweep_cpu       # fit.json, PNG plots, report.md

Cost: measured 56 min wall on a 2-core AMD EPYC shared by five sessions (load ~10), peak RSS 2.0 GB; an idle
2-core CPU is several times faster (docs/benchmarks.md, results and fit in docs/scaling.md).
Rules (glmjax/scaling/plan.py, docs/scaling.md): budget C centres its 4 sizes on sqrt(C / (6 * 20));
sizes a factor sqrt(3) apart on a global ladder, budgets 3x apart, so neighbouring budgets share 3 of
their 4 shapes; width d in multiples of 16, depth round(d / 32), heads d / 16, SwiGLU mlp 8/3 d; batch
16 x 128 tokens for every run; lr 3e-3 * (N / 1e5)^(-1/3) (at most 1e-2); wsd with a 1-sqrt cooldown of
20% of each run, forked from one constant-LR run per shape. vocab 512 (SentencePiece on the stdlib corpus,
trained once and cached).
"""
import ml_collections

from glmjax.config import base_config


def get_config():
    base = base_config()
    base.seed = 0
    base.batch_size = 16
    base.seq_len = 128
    base.log_every = 25
    base.eval_steps = 8
    base.model.vocab_size = 512
    base.model.norm = "rmsnorm_pre"
    base.model.mlp = "swiglu"
    base.model.qkv_bias = False
    base.optimizer.weight_decay = 0.1
    base.optimizer.min_lr_ratio = 0.0
    base.optimizer.cooldown_fraction = 0.2
    base.optimizer.cooldown_shape = "1-sqrt"
    base.checkpoint.keep = 2

    s = ml_collections.ConfigDict()
    s.name = "cpu"
    s.base = base
    s.budgets = (3e11, 9e11, 2.7e12)
    s.sizes_per_budget = 4

    s.tokens_per_param = 20.0  # centres each budget's sizes (Chinchilla's rule of thumb)
    s.mode = "forks"  # forks | independent
    s.min_steps = 100
    s.warmup_fraction = 0.1
    s.warmup_max_steps = 50
    s.checkpoints_per_run = 4
    s.shape = ml_collections.ConfigDict(dict(head_dim=16, aspect=32, mlp_ratio=8 / 3, multiple_of=16,
                                             max_width=1024))
    s.lr = ml_collections.ConfigDict(dict(base=3e-3, base_params=1e5, exponent=1 / 3, max=1e-2))
    return s
