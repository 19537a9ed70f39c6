"""The run configuration: defaults, loading a config file, ``--config.a.b=value`` overrides, validation.

The config is the single source of truth of a run. Config files under ``configs/`` are Python files with
a ``get_config()`` returning an ``ml_collections.ConfigDict`` built on :func:`base_config`. Every dotted
name in :func:`base_config` is a public contract (docs, tests and users rely on it).

:func:`validate` checks everything that can be checked without compiling and raises :class:`ConfigError`
with what is wrong, why, and how to fix it.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import math
import os

import ml_collections

from glmjax.data.defaults import data_config, objective_config
from glmjax.moe_config import mesh_expert, moe_config, validate_moe

NORMS = ("deepnorm", "rmsnorm_pre")
MLPS = ("geglu", "swiglu", "gelu")
GELUS = ("erf", "tanh")
GLU_ORDERS = ("gate_first", "value_first")
INITS = ("normal", "deepnorm")
GMASK_POSITIONS = ("mask", "continue")
ROPE_STYLES = ("interleaved", "half")
ATTENTION_IMPLS = ("xla", "pallas", "cudnn", "auto")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
SCHEDULES = ("cosine", "linear", "constant", "wsd")
COOLDOWN_SHAPES = ("linear", "1-sqrt")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config value is wrong. The message names the key, the problem and the fix."""


def model_config() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.num_layers = 2
    m.hidden_size = 128
    m.num_heads = 4
    m.num_kv_heads = 4  # < num_heads: grouped-query attention
    m.head_dim = 32
    m.mlp_dim = 512  # width of each of the gate / up halves of the gated MLP
    m.vocab_size = 2048
    m.norm = "rmsnorm_pre"  # deepnorm (GLM-130B post-LN) | rmsnorm_pre (GLM-4)
    m.norm_eps = 1e-5
    m.mlp = "swiglu"  # geglu | swiglu (gated, wi [embed, 2, mlp]) | gelu (plain: wi [embed, mlp], ChatGLM-6B)
    m.gelu = "erf"  # GELU of geglu / gelu: erf (exact; GLM-130B) | tanh (approximation; ChatGLM-6B)
    m.glu_order = "gate_first"  # gated MLP halves: gate_first (wi[:, 0] is the gate; HF glm) | value_first
    # (wi[:, 0] is the value, wi[:, 1] the gate: GLM-130B's fused dense_h_to_4h [value; gate])
    m.rope_2d = False  # 2D rotary: second half of the rotary dims rotates by block positions
    m.rope_theta = 10000.0
    m.rope_style = "interleaved"  # interleaved (HF glm: pairs x[2i], x[2i+1]) | half (rotate_half: GLM-130B)
    m.partial_rotary_factor = 0.5  # fraction of head_dim each position stream rotates (2D: <= 0.5)
    m.qkv_bias = True
    m.attn_out_bias = False  # bias of the attention output projection (GLM-130B, ChatGLM-6B)
    m.mlp_bias = False  # biases of both MLP projections (GLM-130B, ChatGLM-6B)
    m.embedding_norm = False  # a norm (model.norm's kind) on the embeddings before the first layer
    m.final_norm = True  # the norm after the last layer (off: the DeepNorm block already ends in one)
    # The released GLM-130B / ChatGLM-6B block a = LN_in(h); m = LN_post(alpha*a + attn(a)); h = alpha*m + mlp(m)
    # with a final LN is exactly glmjax's deepnorm block with embedding_norm=True, final_norm=False: layer i's
    # attn_norm is LN_post_i, its mlp_norm is LN_in_(i+1) (the last one: the final LN), embed_norm is LN_in_0.
    m.attention_impl = "xla"  # xla | pallas | cudnn | auto
    m.dtype = "float32"  # compute dtype
    m.param_dtype = "float32"  # master weights
    m.remat = "none"  # none | full | dots | dots_with_no_batch_dims
    m.sequence_parallel = False  # residual stream between blocks sharded over mesh.tensor along length
    m.scan_layers = True  # one compiled layer, scanned: compile time does not grow with depth
    m.embedding_grad_shrink = 1.0  # GLM-130B: 0.1 (the embedding gradient is scaled by this)
    m.tie_embeddings = False
    m.init_std = 0.02
    # normal: N(0, init_std), v / attention output / MLP output scaled by DeepNorm's beta=(2N)^-0.5 (deepnorm)
    # | deepnorm: the DeepNet paper / GLM-130B init: Xavier normal per matrix, gain beta=(2N)^-0.5 on both
    # MLP matrices, v and the attention output, gain 1 on q and k (embeddings and head: N(0, init_std))
    m.init = "normal"
    m.loss_chunk = 0  # > 0: cross-entropy over this many positions at a time (no [B, T, vocab] logits)
    m.qk_norm = False  # RMSNorm on q and k per head, before rotary (GLM-4.5: use_qk_norm)
    m.moe = moe_config()  # Mixture of Experts (glmjax/moe_config.py); num_experts=0: dense
    return m


def optimizer_config() -> ml_collections.ConfigDict:
    o = ml_collections.ConfigDict()
    o.lr = 3e-4  # peak learning rate
    o.warmup_steps = 100
    o.schedule = "cosine"  # cosine | linear | constant | wsd (after warmup)
    o.min_lr_ratio = 0.1  # final lr = lr * min_lr_ratio for cosine / linear / wsd
    o.cooldown_fraction = 0.2  # wsd: share of the steps spent cooling down (the last ones)
    o.cooldown_shape = "1-sqrt"  # wsd: linear | 1-sqrt (Hagele et al. 2024)
    o.weight_decay = 0.1  # decoupled (AdamW); applied to matrices only, not to norms and biases
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.grad_clip = 1.0  # global-norm clipping; 0 disables
    o.grad_accum_steps = 1  # micro-batches per step; batch_size must divide by data-parallel size * this
    return o


def mesh_config() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.data = -1  # -1 = all devices not used by the other axes
    m.fsdp = 1
    m.tensor = 1
    # multi-slice: how many slices (data-centre network) the data / fsdp axes span; their product must
    # equal the slice count of the devices; data and fsdp above stay the whole axis sizes
    m.dcn_data = 1
    m.dcn_fsdp = 1
    m.expert = 1  # expert parallelism (MoE): experts split over this axis, tokens move by all-to-all
    return m


def checkpoint_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.every = 500  # steps between saves; 0 = only the final save
    c.keep = 3  # latest checkpoints kept (the best by eval loss is kept as well)
    c.async_save = True  # write in the background; the loop waits only for the device-to-host copy
    c.verify = True  # fingerprint every state leaf at save, check on restore (detects corrupted files)
    c.init_from = ""  # another run's workdir: a run with no checkpoint yet starts from its step init_step (forks)
    c.init_step = -1  # the step of init_from to start from; -1 = its newest
    return c


def base_config() -> ml_collections.ConfigDict:
    """Every key a run understands, with its default. Config files start from this."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.steps = 1000
    c.batch_size = 32  # global, in sequences
    c.seq_len = 512
    c.log_every = 10
    c.eval_every = 100  # 0 = no eval
    c.eval_steps = 10
    c.mesh = mesh_config()
    c.model = model_config()
    c.optimizer = optimizer_config()
    c.checkpoint = checkpoint_config()
    c.data = data_config()
    c.objective = objective_config()
    return c


def load_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """Load ``path`` (a Python file with ``get_config()``) and apply ``--config.a.b=value`` overrides."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist: pass --config=configs/<name>.py "
                          f"(see the configs/ folder for the presets)")
    spec = importlib.util.spec_from_file_location("_glmjax_user_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} has no get_config(): define `def get_config():` "
                          f"returning glmjax.config.base_config() with your changes")
    cfg = module.get_config()
    for item in overrides:
        apply_override(cfg, item)
    return cfg


def apply_override(cfg: ml_collections.ConfigDict, item: str) -> None:
    """Apply one ``--config.a.b=value`` (or ``a.b=value``) override in place, typed like the default."""
    text = item[2:] if item.startswith("--") else item
    if text.startswith("config."):
        text = text[len("config."):]
    if "=" not in text:
        raise ConfigError(f"override {item!r} has no value: write it as --config.{text}=VALUE")
    key, raw = text.split("=", 1)
    parent, name = _lookup_parent(cfg, key)
    old = parent[name]
    parent[name] = _coerce(key, raw, old)


def _lookup_parent(cfg, key: str):
    parts = key.split(".")
    node = cfg
    for depth, part in enumerate(parts):
        keys = list(node.keys())
        if part not in keys:
            prefix = ".".join(parts[:depth])
            hint = difflib.get_close_matches(part, keys, n=1)
            fix = f"did you mean {'.'.join(filter(None, [prefix, hint[0]]))!r}?" if hint else (
                f"valid keys{' under ' + prefix if prefix else ''}: {', '.join(sorted(keys))}")
            raise ConfigError(f"unknown config key {key!r}: {part!r} is not a field of the config; {fix}")
        if depth < len(parts) - 1:
            node = node[part]
            if not isinstance(node, ml_collections.ConfigDict):
                raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[:depth + 1])!r} is a value, "
                                  f"not a section")
    return node, parts[-1]


def _coerce(key: str, raw: str, old):
    if isinstance(old, bool):
        low = raw.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"config key {key!r} is a bool but got {raw!r}: use true or false")
    if isinstance(old, int):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"config key {key!r} is an integer but got {raw!r}: pass a whole number")
        return value
    if isinstance(old, float):
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"config key {key!r} is a number but got {raw!r}: pass e.g. 3e-4") from None
    if isinstance(old, (tuple, list)):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = tuple(v for v in raw.split(",") if v)
        return tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if isinstance(old, ml_collections.ConfigDict):
        raise ConfigError(f"config key {key!r} is a section, not a value: set one of its fields, "
                          f"e.g. --config.{key}.{next(iter(old.keys()))}=...")
    return raw


def resolve_mesh_shape(cfg, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with a -1 entry filled so that ``data*fsdp*expert*tensor`` is ``num_devices``
    (``mesh.expert``, default 1, is the MoE expert axis: :func:`resolve_mesh_axes` gives all four)."""
    names = ("data", "fsdp", "tensor")
    sizes = [int(cfg.mesh[n]) for n in names]
    for n in ("dcn_data", "dcn_fsdp"):
        value = cfg.mesh.get(n, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"mesh.{n}={value!r} must be a positive integer: the number of slices the "
                              f"{n[4:]} axis spans (1 = one slice)")
    expert = mesh_expert(cfg)
    for n, s in zip(names, sizes):
        if s == 0 or s < -1:
            raise ConfigError(f"mesh.{n}={s} is not a valid mesh size: use a positive integer, "
                              f"or -1 for 'all remaining devices'")
    if sizes.count(-1) > 1:
        raise ConfigError(f"mesh has more than one -1 ({dict(zip(names, sizes))}): only one axis can take "
                          f"'all remaining devices'; give the others explicit sizes")
    known = math.prod(s for s in sizes if s != -1) * expert
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"mesh {dict(zip(names, sizes))}{_expert_note(expert)} cannot fill {num_devices} "
                              f"devices: the fixed axes multiply to {known}, which does not divide {num_devices}; "
                              f"choose sizes whose product divides the device count")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) * expert != num_devices:
        axes, shown = ("data*fsdp*tensor", sizes) if expert == 1 else (
            "data*fsdp*expert*tensor", [sizes[0], sizes[1], expert, sizes[2]])
        raise ConfigError(f"mesh {axes} = {'*'.join(map(str, shown))} = {math.prod(shown)} but there "
                          f"are {num_devices} devices: the mesh must use every device exactly once; set one "
                          f"axis to -1 or make the product {num_devices}")
    return tuple(sizes)


def resolve_mesh_axes(cfg, num_devices: int) -> tuple[int, int, int, int]:
    """(data, fsdp, expert, tensor): the sizes of the four mesh axes (``glmjax.sharding.MESH_AXES``)."""
    data, fsdp, tensor = resolve_mesh_shape(cfg, num_devices)
    return data, fsdp, mesh_expert(cfg), tensor


def _expert_note(expert: int) -> str:
    return f" with mesh.expert={expert}" if expert > 1 else ""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg, num_devices: int | None = None) -> None:
    """Check the config before anything compiles. ``num_devices`` enables the mesh / batch checks."""
    m, o = cfg.model, cfg.optimizer
    positive = {
        "steps": cfg.steps, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "log_every": cfg.log_every,
        "model.num_layers": m.num_layers, "model.hidden_size": m.hidden_size, "model.num_heads": m.num_heads,
        "model.num_kv_heads": m.num_kv_heads, "model.head_dim": m.head_dim, "model.mlp_dim": m.mlp_dim,
        "model.vocab_size": m.vocab_size, "optimizer.grad_accum_steps": o.grad_accum_steps,
    }
    for key, value in positive.items():
        _require(isinstance(value, int) and value > 0,
                 f"{key}={value!r} must be a positive integer: set --config.{key} to a value >= 1")
    non_negative = {"eval_every": cfg.eval_every, "eval_steps": cfg.eval_steps,
                    "optimizer.warmup_steps": o.warmup_steps, "checkpoint.every": cfg.checkpoint.every,
                    "checkpoint.keep": cfg.checkpoint.keep}
    for key, value in non_negative.items():
        _require(isinstance(value, int) and value >= 0,
                 f"{key}={value!r} must be an integer >= 0: set --config.{key}=0 to disable")
    _require(o.lr > 0, f"optimizer.lr={o.lr} must be > 0: a typical value is 3e-4")
    _require(0 <= o.b1 < 1 and 0 <= o.b2 < 1,
             f"optimizer.b1={o.b1}, optimizer.b2={o.b2} must lie in [0, 1): typical values are 0.9 and 0.95")
    _require(o.grad_clip >= 0 and o.weight_decay >= 0,
             "optimizer.grad_clip and optimizer.weight_decay must be >= 0 (0 disables them)")
    _require(0 <= o.min_lr_ratio <= 1, f"optimizer.min_lr_ratio={o.min_lr_ratio} must lie in [0, 1]")
    _require(0 <= o.cooldown_fraction <= 1, f"optimizer.cooldown_fraction={o.cooldown_fraction} must lie in "
                                            f"[0, 1]: it is the share of the steps spent cooling down (wsd)")
    choices = {"model.norm": (m.norm, NORMS), "model.mlp": (m.mlp, MLPS),
               "model.attention_impl": (m.attention_impl, ATTENTION_IMPLS),
               "model.remat": (m.remat, REMAT_POLICIES), "model.rope_style": (m.rope_style, ROPE_STYLES),
               "model.gelu": (m.gelu, GELUS), "model.glu_order": (m.glu_order, GLU_ORDERS),
               "model.init": (m.init, INITS),
               "objective.gmask_positions": (cfg.objective.gmask_positions, GMASK_POSITIONS),
               "optimizer.schedule": (o.schedule, SCHEDULES),
               "optimizer.cooldown_shape": (o.cooldown_shape, COOLDOWN_SHAPES),
               "model.dtype": (m.dtype, DTYPES), "model.param_dtype": (m.param_dtype, DTYPES)}
    for key, (value, allowed) in choices.items():
        _require(value in allowed, f"{key}={value!r} is not one of {', '.join(allowed)}: "
                                   f"pick one of those with --config.{key}=...")
    for key in ("attn_out_bias", "mlp_bias", "embedding_norm", "final_norm"):
        _require(isinstance(m[key], bool), f"model.{key}={m[key]!r} must be true or false: "
                                           f"set --config.model.{key}=true or =false")
    _require(m.init != "deepnorm" or m.norm == "deepnorm",
             f"model.init='deepnorm' needs model.norm='deepnorm' (got {m.norm!r}): the DeepNorm init scales "
             f"by beta=(2N)^-0.5, made for the DeepNorm residual alpha; use --config.model.init=normal")
    _require(m.num_heads % m.num_kv_heads == 0,
             f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}: each kv "
             f"head serves a whole group of query heads; choose num_kv_heads among the divisors of num_heads")
    _require(m.head_dim % 4 == 0,
             f"model.head_dim={m.head_dim} must be divisible by 4: rotary acts on pairs within each half")
    streams = 2 if m.rope_2d else 1
    rot = m.head_dim * m.partial_rotary_factor
    _require(0 < m.partial_rotary_factor <= 1 / streams and rot == int(rot) and int(rot) % 2 == 0,
             f"model.partial_rotary_factor={m.partial_rotary_factor} with head_dim={m.head_dim} and "
             f"rope_2d={m.rope_2d}: each of the {streams} position stream(s) rotates head_dim * factor dims, "
             f"which must be an even whole number and fit ({streams} * factor <= 1); e.g. 0.5 "
             f"(GLM-4, 2D GLM) or 1.0 (GLM-130B, 1D)")
    _require(m.loss_chunk >= 0 and (m.loss_chunk == 0 or cfg.seq_len % m.loss_chunk == 0),
             f"model.loss_chunk={m.loss_chunk} must be 0 (off) or a positive divisor of seq_len={cfg.seq_len}: "
             f"the loss runs over seq_len/loss_chunk equal chunks; e.g. --config.model.loss_chunk=512")
    _require(0 < m.embedding_grad_shrink <= 1,
             f"model.embedding_grad_shrink={m.embedding_grad_shrink} must lie in (0, 1]: 1 disables it")
    on_reshard = str(cfg.data.get("on_reshard", "error"))
    _require(on_reshard in ("error", "restart"),
             f"data.on_reshard={on_reshard!r} is not 'error' or 'restart': it says what a resume does when "
             f"the saved data position does not fit the new host / mesh layout; use one of those two")
    streams = cfg.data.get("streams", 0)
    _require(isinstance(streams, int) and not isinstance(streams, bool) and streams >= 0
             and (streams == 0 or cfg.batch_size % streams == 0),
             f"data.streams={streams!r} must be 0 (auto) or a positive divisor of batch_size={cfg.batch_size}: "
             f"the global batch is made of that many equal streams; e.g. --config.data.streams=0, or a "
             f"multiple of the largest host count the job may run on that divides batch_size")
    validate_moe(cfg)
    if num_devices is None:
        return
    data, fsdp, expert, tensor = resolve_mesh_axes(cfg, num_devices)
    validate_moe(cfg, expert)
    _require(m.num_heads % tensor == 0,
             f"model.num_heads={m.num_heads} is not divisible by mesh.tensor={tensor}: tensor parallelism "
             f"splits whole heads; use a mesh.tensor that divides {m.num_heads}")
    dp = data * fsdp * expert  # the expert axis splits the batch too, outside the experts
    per_step = dp * o.grad_accum_steps
    _require(cfg.batch_size % per_step == 0,
             f"batch_size={cfg.batch_size} is not divisible by data-parallel size "
             f"mesh.data*mesh.fsdp{'*mesh.expert' if expert > 1 else ''}={dp}"
             f"{' * optimizer.grad_accum_steps=' + str(o.grad_accum_steps) if o.grad_accum_steps > 1 else ''}"
             f" = {per_step}: every device needs the same number of sequences; use a batch_size that is a "
             f"multiple of {per_step}")
