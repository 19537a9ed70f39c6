"""Shared test helpers: random GLM-shaped batches (packed segments with bidirectional prefixes), a small
GLM config, random parameters and a jitted forward."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glmjax.config import base_config
from glmjax.model.glm import GLM, pure_dict


def random_glm_features(rng: np.random.Generator, batch: int, length: int, vocab: int, *,
                        max_segments: int = 3, padding: bool = True) -> dict[str, np.ndarray]:
    """Packed rows: random segment lengths, each with a random bidirectional prefix (Part A) of length
    0..whole segment, trailing padding (segment id 0), random tokens/targets, 2D positions."""
    out = {k: np.zeros((batch, length), np.int32) for k in
           ("tokens", "targets", "segment_ids", "positions", "block_positions", "bidirectional")}
    out["loss_weights"] = np.zeros((batch, length), np.float32)
    for b in range(batch):
        used = int(rng.integers(length // 2, length + 1)) if padding else length
        n = int(rng.integers(1, max_segments + 1))
        cuts = np.sort(rng.choice(np.arange(1, used), size=min(n - 1, used - 1), replace=False)) if used > 1 else []
        bounds = [0, *cuts.tolist(), used]
        for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
            seg_len = hi - lo
            a = int(rng.integers(0, seg_len + 1))
            out["segment_ids"][b, lo:hi] = s
            out["bidirectional"][b, lo:lo + a] = 1
            out["positions"][b, lo:hi] = np.concatenate([np.arange(a), np.full(seg_len - a, max(a - 1, 0))])
            out["block_positions"][b, lo + a:hi] = np.arange(1, seg_len - a + 1)
            out["loss_weights"][b, lo + a:hi] = 1.0
        out["tokens"][b, :used] = rng.integers(1, vocab, used)
        out["targets"][b, :used] = rng.integers(1, vocab, used)
    return out


def causal_features(rng: np.random.Generator, batch: int, length: int, vocab: int) -> dict[str, np.ndarray]:
    """One full-length causal document per row."""
    tokens = rng.integers(1, vocab, (batch, length + 1)).astype(np.int32)
    pos = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy()
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((batch, length), np.int32),
            "positions": pos, "block_positions": np.zeros((batch, length), np.int32),
            "bidirectional": np.zeros((batch, length), np.int32),
            "loss_weights": np.ones((batch, length), np.float32)}


# ---------------------------------------------------------------- a small GLM with random parameters

def small_model_cfg(**overrides):
    m = base_config().model
    m.update(dict(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=48,
                  vocab_size=97))
    m.update(overrides)
    return m


def random_params(model, seed, std=0.3):
    """Replace every parameter by fresh N(0, std) values (norm scales around 1), never zeros/ones."""
    state = pure_dict(nnx.state(model, nnx.Param))
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = str(path[-1].key)
        v = rng.normal(0, std, x.shape)
        return jnp.asarray(1.0 + v if name == "scale" else v, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, state)


def run_model(m, params, feats):
    graphdef, _ = nnx.split(GLM(m, nnx.Rngs(0)), nnx.Param)
    return np.asarray(jax.jit(lambda p, f: nnx.merge(graphdef, p)(f))(params, feats), np.float64)
