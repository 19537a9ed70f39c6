"""SwissArmyTransformer model parallelism of the GLM-130B checkpoint: merge ``mp_rank_XX`` files, split into them.

The rule is the released one (THUDM/GLM-130B ``tools/convert_tp.py``): tensors whose name ends in one of
:data:`REPLICATED` (norms, row-parallel biases, the rotary buffer) are the same on every rank;
``attention.dense.weight`` and ``mlp.dense_4h_to_h.weight`` (row-parallel) split along dim 1; everything
else (``word_embeddings`` by vocab, ``query_key_value`` by head — its rows are per head ``[q_h; k_h; v_h]``
— and ``dense_h_to_4h``) along dim 0, the GeGLU ``dense_h_to_4h`` half by half: rank ``r`` holds
``[value_r; gate_r]``.
"""
from __future__ import annotations

import numpy as np

REPLICATED = ("input_layernorm.weight", "input_layernorm.bias", "attention.dense.bias",
              "post_attention_layernorm.weight", "post_attention_layernorm.bias", "mlp.dense_4h_to_h.bias",
              "rotary_emb.inv_freq", "final_layernorm.weight", "final_layernorm.bias")
ROW_PARALLEL = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")
GLU = ("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias")


def _axis(name: str):
    """None (replicated), or the axis a tensor is split along."""
    if name.endswith(REPLICATED):
        return None
    return 1 if name.endswith(ROW_PARALLEL) else 0


def merge(name: str, parts: list, *, glu: bool) -> np.ndarray:
    """One tensor from its ``len(parts)`` model-parallel pieces (rank order)."""
    axis = _axis(name)
    if len(parts) == 1 or axis is None:
        return parts[0]
    if glu and name.endswith(GLU):  # each rank holds [value_r; gate_r]: merge the halves separately
        halves = [np.split(p, 2, axis=0) for p in parts]
        return np.concatenate([h[0] for h in halves] + [h[1] for h in halves], axis=0)
    return np.concatenate(parts, axis=axis)


def split(name: str, x: np.ndarray, n: int, *, glu: bool) -> list[np.ndarray]:
    """The ``n`` model-parallel pieces of one tensor (the inverse of :func:`merge`)."""
    axis = _axis(name)
    if n == 1 or axis is None:
        return [x] * n
    if glu and name.endswith(GLU):
        value, gate = np.split(x, 2, axis=0)
        return [np.concatenate([v, g]) for v, g in zip(np.split(value, n), np.split(gate, n))]
    return np.split(x, n, axis=axis)


def split_state_dict(state_dict: dict, n: int, *, glu: bool) -> list[dict]:
    """``n`` rank state dicts (contiguous copies, so each rank's file holds only its own piece)."""
    ranks = [{} for _ in range(n)]
    for name, x in state_dict.items():
        for r, part in enumerate(split(name, np.asarray(x), n, glu=glu)):
            ranks[r][name] = np.ascontiguousarray(part)
    return ranks


def check_mp(m, n: int) -> None:
    """Raise ``ValueError`` unless ``n`` model-parallel ranks can split model config ``m``."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"--mp={n!r} must be a positive integer (the number of model-parallel ranks)")
    bad = [f"{k}={v}" for k, v in (("model.vocab_size", m.vocab_size), ("model.num_heads", m.num_heads),
                                   ("model.mlp_dim", m.mlp_dim))
           if v % n]
    if bad:
        raise ValueError(f"--mp={n} does not divide {', '.join(bad)}: SwissArmyTransformer splits the vocab, the "
                         f"heads, the MLP width and the hidden size evenly over the ranks; pick an --mp dividing them")
