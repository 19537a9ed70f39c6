"""Config keys of the GLM-4.5-style Mixture of Experts (``model.moe.*``, ``mesh.expert``) and their checks.

Kept apart from :mod:`glmjax.config` (which calls :func:`validate_moe` from its ``validate``) so the MoE
knobs live in one place. Every check here runs before anything compiles.
"""
from __future__ import annotations

import ml_collections

MOE_IMPLS = ("ragged", "dense")


def moe_config() -> ml_collections.ConfigDict:
    """Mixture of Experts (GLM-4.5 / transformers ``glm4_moe``); ``num_experts=0`` keeps the model dense."""
    e = ml_collections.ConfigDict()
    e.num_experts = 0  # routed experts per MoE layer (n_routed_experts); 0 = dense model
    e.experts_per_token = 2  # top-k (num_experts_per_tok)
    e.expert_mlp_dim = 256  # width of each gate / up half of one expert (moe_intermediate_size)
    e.num_shared_experts = 1  # always-on experts, one SwiGLU of width expert_mlp_dim * this (n_shared_experts)
    e.first_dense_layers = 1  # the first layers keep the dense MLP of width model.mlp_dim (first_k_dense_replace)
    e.n_group = 1  # expert groups; a token chooses among its topk_group best groups (group-limited routing)
    e.topk_group = 1
    e.norm_topk_prob = True  # normalise the chosen sigmoid scores to sum to 1
    e.routed_scaling_factor = 1.0  # routed output scale (GLM-4.5: 2.5, Air: 1.0)
    e.bias_update_rate = 1e-3  # aux-loss-free balancing: bias += rate * sign(mean load - load) per step
    e.aux_loss_weight = 0.0  # sequence-level balance loss weight (0 = off)
    e.impl = "ragged"  # ragged (dropless grouped matmuls) | dense (every expert on every token: reference)
    return e


def moe_layer_count(m) -> int:
    """Number of MoE layers of model config ``m`` (0 for a dense model)."""
    moe = m.get("moe") if hasattr(m, "get") else None
    if moe is None or int(moe.num_experts) == 0:
        return 0
    return int(m.num_layers) - int(moe.first_dense_layers)


def mesh_expert(cfg) -> int:
    """``mesh.expert`` (1 when the config has no such key)."""
    from glmjax.config import ConfigError

    ep = cfg.mesh.get("expert", 1)
    if not isinstance(ep, int) or isinstance(ep, bool) or ep < 1:
        raise ConfigError(f"mesh.expert={ep!r} must be a positive integer (1 = no expert parallelism): set "
                          f"--config.mesh.expert to a divisor of model.moe.num_experts")
    return ep


def validate_moe(cfg, expert: int | None = None) -> None:
    """``model.moe.*`` checks; with ``expert`` (the resolved mesh size) also the expert-parallel ones."""
    from glmjax.config import ConfigError

    def require(ok, message):
        if not ok:
            raise ConfigError(message)

    m = cfg.model
    require(isinstance(m.get("qk_norm", False), bool),
            f"model.qk_norm={m.get('qk_norm')!r} must be true or false: set --config.model.qk_norm=true or =false")
    e = m.get("moe")
    E = 0 if e is None else e.num_experts
    require(isinstance(E, int) and E >= 0,
            f"model.moe.num_experts={E!r} must be an integer >= 0 (0 = dense model)")
    if expert is not None and expert > 1:
        require(E > 0, f"mesh.expert={expert} but the model has no experts (model.moe.num_experts=0): expert "
                       f"parallelism splits experts; set mesh.expert=1 or configure model.moe")
        require(E % expert == 0,
                f"model.moe.num_experts={E} is not divisible by mesh.expert={expert}: every expert device holds "
                f"the same number of whole experts; use a mesh.expert that divides {E}")
    if E == 0:
        return
    for key in ("experts_per_token", "expert_mlp_dim", "n_group", "topk_group"):
        value = e[key]
        require(isinstance(value, int) and value > 0,
                f"model.moe.{key}={value!r} must be a positive integer: set --config.model.moe.{key}")
    require(e.experts_per_token <= E,
            f"model.moe.experts_per_token={e.experts_per_token} is larger than model.moe.num_experts={E}: a "
            f"token cannot choose more experts than exist; use experts_per_token <= {E}")
    require(E % e.n_group == 0,
            f"model.moe.n_group={e.n_group} does not divide model.moe.num_experts={E}: experts are split into "
            f"equal groups; choose n_group among the divisors of {E}")
    require(e.n_group == 1 or E // e.n_group >= 2,
            f"model.moe.n_group={e.n_group} leaves {E // e.n_group} expert per group: a group is scored by "
            f"its two best experts (as glm4_moe does); use n_group <= {E // 2}")
    require(e.topk_group <= e.n_group,
            f"model.moe.topk_group={e.topk_group} is larger than model.moe.n_group={e.n_group}: a token "
            f"chooses among at most all groups; use topk_group <= {e.n_group}")
    require(e.topk_group * (E // e.n_group) >= e.experts_per_token,
            f"model.moe.topk_group={e.topk_group} groups of {E // e.n_group} experts hold fewer than "
            f"experts_per_token={e.experts_per_token}: raise topk_group or lower experts_per_token")
    require(isinstance(e.num_shared_experts, int) and e.num_shared_experts >= 0,
            f"model.moe.num_shared_experts={e.num_shared_experts!r} must be an integer >= 0")
    require(isinstance(e.first_dense_layers, int) and 0 <= e.first_dense_layers < m.num_layers,
            f"model.moe.first_dense_layers={e.first_dense_layers!r} must lie in [0, model.num_layers="
            f"{m.num_layers}): at least one layer must be MoE")
    require(e.routed_scaling_factor > 0 and e.bias_update_rate >= 0 and e.aux_loss_weight >= 0,
            f"model.moe.routed_scaling_factor={e.routed_scaling_factor} must be > 0, bias_update_rate="
            f"{e.bias_update_rate} and aux_loss_weight={e.aux_loss_weight} >= 0")
    require(e.impl in MOE_IMPLS, f"model.moe.impl={e.impl!r} is not one of {', '.join(MOE_IMPLS)}: pick "
                                 f"one of those with --config.model.moe.impl=...")
    require(m.mlp in ("swiglu", "geglu"),
            f"model.mlp={m.mlp!r} with model.moe.num_experts={E}: experts are gated MLPs; use "
            f"--config.model.mlp=swiglu (GLM-4.5)")


def glm45_config(*, num_layers: int, hidden_size: int, mlp_dim: int, num_experts: int, expert_mlp_dim: int,
                 first_dense_layers: int, qk_norm: bool, routed_scaling_factor: float, fsdp: int,
                 mesh_expert: int, grad_accum_steps: int) -> ml_collections.ConfigDict:
    """The preset of a released GLM-4.5-family model (configs/glm45.py, configs/glm45_air.py): what they
    share (96 heads of 128 with 8 kv heads, qkv bias, half-split rotary on half of head_dim with theta 1e6,
    vocab 151552, SwiGLU, top-8 sigmoid routing in one group with 1 shared expert, RMSNorm 1e-5) and the
    training settings their fit check on the TPU compiler chose (batch 512 x 4096 in ``grad_accum_steps``
    micro-batches of one sequence per chip, full remat, chunked loss, mesh ``fsdp`` x ``mesh_expert``)."""
    from glmjax.config import base_config

    c = base_config()
    c.steps = 250_000
    c.batch_size = 512
    c.seq_len = 4096
    c.log_every = 10
    c.eval_every = 1000
    c.eval_steps = 10
    m = c.model
    m.num_layers, m.hidden_size, m.mlp_dim = num_layers, hidden_size, mlp_dim
    m.num_heads, m.num_kv_heads, m.head_dim = 96, 8, 128
    m.vocab_size = 151552
    m.norm, m.norm_eps, m.mlp = "rmsnorm_pre", 1e-5, "swiglu"
    m.rope_2d, m.rope_theta = False, 1e6
    m.rope_style = "half"  # glmjax's interleaved default is the same function up to a column permutation
    m.qkv_bias, m.qk_norm = True, qk_norm
    m.dtype, m.param_dtype = "bfloat16", "float32"
    m.remat = "full"  # dots_with_no_batch_dims also keeps the experts' intermediates (fit check: 1.3x the memory)
    m.loss_chunk = 512
    m.attention_impl = "auto"
    e = m.moe
    e.num_experts, e.experts_per_token, e.expert_mlp_dim = num_experts, 8, expert_mlp_dim
    e.num_shared_experts, e.first_dense_layers = 1, first_dense_layers
    e.n_group, e.topk_group = 1, 1
    e.norm_topk_prob, e.routed_scaling_factor = True, routed_scaling_factor
    c.optimizer.lr = 3e-4
    c.optimizer.warmup_steps = 2000
    c.optimizer.grad_accum_steps = grad_accum_steps
    c.mesh.data, c.mesh.fsdp, c.mesh.expert = -1, fsdp, mesh_expert
    return c
