"""AdamW with warmup + cosine / linear / constant decay and global-norm clipping (``cfg.optimizer``)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(cfg):
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then decay to ``lr * min_lr_ratio`` at ``steps``."""
    o = cfg.optimizer
    peak, warmup, total = float(o.lr), int(o.warmup_steps), int(cfg.steps)
    floor = peak * float(o.min_lr_ratio)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * jnp.minimum(1.0, (step + 1.0) / max(warmup, 1))
        frac = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
        if o.schedule == "cosine":
            decayed = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        elif o.schedule == "linear":
            decayed = peak + (floor - peak) * frac
        else:
            decayed = jnp.asarray(peak, jnp.float32)
        return jnp.where(step < warmup, warm, decayed)

    return schedule


def make_optimizer(cfg) -> optax.GradientTransformation:
    o = cfg.optimizer

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: is_decayed(path), params)

    adamw = optax.adamw(learning_rate_schedule(cfg), b1=o.b1, b2=o.b2, eps=o.eps,
                        weight_decay=o.weight_decay, mask=decay_mask)
    if o.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw)
    return adamw


DECAYED = ("embed", "lm_head", "wq", "wk", "wv", "wo", "wi")


def is_decayed(path) -> bool:
    """Weight decay on weight matrices and embeddings; none on norm scales / biases (by parameter name)."""
    last = path[-1]
    name = getattr(last, "key", getattr(last, "name", last))
    return name in DECAYED
