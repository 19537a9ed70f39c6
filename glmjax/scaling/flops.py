"""FLOPs per token of the GLM model, counted from its shapes (matmuls + attention), beside 6N.

Forward FLOPs per token: ``2 * (matmul weights touched per token)`` plus attention ``4 * L * H * hd *
S_vis`` where ``S_vis`` is the mean number of keys a query sees (``seq_len / 2`` for causal masks, the
convention for MFU here). MoE layers count the parameters a token touches (top-k + shared experts and
the router), not all experts. Training = 3x forward (backward is twice the forward). Rematerialised
recompute is not counted: MFU measures useful work.
"""
from __future__ import annotations

import dataclasses

from glmjax.moe_config import moe_layer_count


@dataclasses.dataclass(frozen=True)
class FlopsPerToken:
    matmul_forward: float
    attention_forward: float
    non_embedding_params: int
    params: int
    active_non_embedding_params: int | None = None  # MoE: the parameters one token touches (k + shared experts)

    @property
    def forward(self) -> float:
        return self.matmul_forward + self.attention_forward

    @property
    def train(self) -> float:
        return 3.0 * self.forward

    @property
    def six_n(self) -> float:
        active = self.active_non_embedding_params
        return 6.0 * (self.non_embedding_params if active is None else active)


def param_count(m) -> tuple[int, int]:
    """(total parameters, non-embedding parameters) of model config ``m`` without allocating."""
    D, H, K, hd, F, V, L = (m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim,
                            m.vocab_size, m.num_layers)
    attn = _attention_matmul_params(m) + (H * hd + 2 * K * hd if m.qkv_bias else 0) + (D if m.attn_out_bias else 0)
    gated = m.mlp != "gelu"  # geglu / swiglu: wi [embed, 2, mlp]; gelu: wi [embed, mlp]
    mlp = _mlp_matmul_params(m) + (((2 if gated else 1) * F + D) if m.mlp_bias else 0)
    norm = D * (2 if m.norm == "deepnorm" else 1)  # LayerNorm: scale + bias; RMSNorm: scale
    layer = attn + mlp + 2 * norm + (2 * hd if m.get("qk_norm", False) else 0)
    head = 0 if m.tie_embeddings else D * V
    non_embedding = L * layer + norm * (int(m.final_norm) + int(m.embedding_norm)) + head
    non_embedding += moe_layer_count(m) * (moe_mlp_params(m)[0] - mlp)  # MoE layers: experts, not the MLP
    return non_embedding + V * D, non_embedding


def moe_mlp_params(m) -> tuple[int, int]:
    """(total, active per token) parameters of one MoE MLP: routed + shared experts, router (+ its bias)."""
    e = m.moe
    D, E, Fe = m.hidden_size, e.num_experts, e.expert_mlp_dim
    expert, router = 3 * D * Fe, D * E
    return (E * expert + e.num_shared_experts * expert + router + E,
            (e.experts_per_token + e.num_shared_experts) * expert + router)


def active_params(m) -> int:
    """Non-embedding parameters one token touches (= the non-embedding parameters of a dense model)."""
    _, non_embedding = param_count(m)
    if not moe_layer_count(m):
        return non_embedding
    total, active = moe_mlp_params(m)
    return non_embedding - moe_layer_count(m) * (total - active)


def _attention_matmul_params(m) -> int:
    D, H, K, hd = m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim
    return D * H * hd + 2 * D * K * hd + H * hd * D


def _mlp_matmul_params(m) -> int:
    return (2 if m.mlp != "gelu" else 1) * m.hidden_size * m.mlp_dim + m.mlp_dim * m.hidden_size


def flops_per_token(m, seq_len: int, *, visible_fraction: float = 0.5) -> FlopsPerToken:
    D, H, K, hd, F, V, L = (m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim,
                            m.vocab_size, m.num_layers)
    per_layer = _attention_matmul_params(m) + _mlp_matmul_params(m)
    n_moe = moe_layer_count(m)
    moe_extra = 0
    if n_moe:  # MoE layers: top-k + shared experts and the router instead of the dense MLP
        e = m.moe
        moe_extra = n_moe * (3 * D * e.expert_mlp_dim * (e.experts_per_token + e.num_shared_experts)
                             + D * e.num_experts - _mlp_matmul_params(m))
    matmul = 2.0 * (L * per_layer + moe_extra + D * V)
    attention = 4.0 * L * H * hd * seq_len * visible_fraction
    total, non_embedding = param_count(m)
    return FlopsPerToken(matmul, attention, non_embedding, total, active_params(m) if n_moe else None)
