"""FLOPs per token of the GLM model, counted from its shapes (matmuls + attention), beside 6N.

Forward FLOPs per token: ``2 * (matmul weights touched per token)`` plus attention ``4 * L * H * hd *
S_vis`` where ``S_vis`` is the mean number of keys a query sees (``seq_len / 2`` for causal masks, the
convention for MFU here). Training = 3x forward (backward is twice the forward). Rematerialised
recompute is not counted: MFU measures useful work.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class FlopsPerToken:
    matmul_forward: float
    attention_forward: float
    non_embedding_params: int
    params: int

    @property
    def forward(self) -> float:
        return self.matmul_forward + self.attention_forward

    @property
    def train(self) -> float:
        return 3.0 * self.forward

    @property
    def six_n(self) -> float:
        return 6.0 * self.non_embedding_params


def param_count(m) -> tuple[int, int]:
    """(total parameters, non-embedding parameters) of model config ``m`` without allocating."""
    D, H, K, hd, F, V, L = (m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim,
                            m.vocab_size, m.num_layers)
    attn = _attention_matmul_params(m) + (H * hd + 2 * K * hd if m.qkv_bias else 0) + (D if m.attn_out_bias else 0)
    gated = m.mlp != "gelu"  # geglu / swiglu: wi [embed, 2, mlp]; gelu: wi [embed, mlp]
    mlp = _mlp_matmul_params(m) + (((2 if gated else 1) * F + D) if m.mlp_bias else 0)
    norm = D * (2 if m.norm == "deepnorm" else 1)  # LayerNorm: scale + bias; RMSNorm: scale
    layer = attn + mlp + 2 * norm
    head = 0 if m.tie_embeddings else D * V
    non_embedding = L * layer + norm * (int(m.final_norm) + int(m.embedding_norm)) + head
    return non_embedding + V * D, non_embedding


def _attention_matmul_params(m) -> int:
    D, H, K, hd = m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim
    return D * H * hd + 2 * D * K * hd + H * hd * D


def _mlp_matmul_params(m) -> int:
    return (2 if m.mlp != "gelu" else 1) * m.hidden_size * m.mlp_dim + m.mlp_dim * m.hidden_size


def flops_per_token(m, seq_len: int, *, visible_fraction: float = 0.5) -> FlopsPerToken:
    D, H, K, hd, F, V, L = (m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim,
                            m.vocab_size, m.num_layers)
    per_layer = _attention_matmul_params(m) + _mlp_matmul_params(m)
    matmul = 2.0 * (L * per_layer + D * V)
    attention = 4.0 * L * H * hd * seq_len * visible_fraction
    total, non_embedding = param_count(m)
    return FlopsPerToken(matmul, attention, non_embedding, total)
