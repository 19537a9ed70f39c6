"""AdamW with warmup + cosine / linear / constant / wsd decay and global-norm clipping (``cfg.optimizer``).

``wsd`` (warmup-stable-decay): warmup, the peak learning rate held constant, then a cooldown over the
last ``round(cooldown_fraction * steps)`` steps down to ``lr * min_lr_ratio``, shaped ``linear`` or
``1-sqrt`` (``cooldown_shape``). Before its cooldown a wsd run has exactly the learning rates of a
``constant`` run, so cooldowns forked from one constant run equal straight wsd runs (docs/scaling.md).
"""
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
        elif o.schedule == "wsd":
            cool = cooldown_start(cfg)
            x = jnp.clip((step - cool) / max(total - cool, 1), 0.0, 1.0)
            shape = x if o.cooldown_shape == "linear" else 1.0 - jnp.sqrt(1.0 - x)
            decayed = jnp.where(step < cool, peak, peak + (floor - peak) * shape)
        else:
            decayed = jnp.asarray(peak, jnp.float32)
        return jnp.where(step < warmup, warm, decayed)

    return schedule


def cooldown_start(cfg) -> int:
    """First step of a wsd run's cooldown: ``steps - round(cooldown_fraction * steps)``."""
    return int(cfg.steps) - int(round(float(cfg.optimizer.cooldown_fraction) * int(cfg.steps)))


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
