"""The MoE parts of the train step: gradients with routing statistics, the optional balance loss, and
the aux-loss-free correction-bias update after the optimizer step (glmjax/train/step.py calls these
only for models with ``model.moe.num_experts > 0``; dense models never reach this file)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from glmjax.model.moe import moe_metrics, update_correction_bias
from glmjax.train.step import loss_sums, split_micro


def accumulated_grads(params, batch, graphdef, mesh, accum: int, aux_loss_weight: float):
    """``(loss_sum, weight_sum, grads, stats)`` as :func:`glmjax.train.step.accumulated_grads`, plus the
    routing statistics of the whole batch (loads added over micro-batches, entropy and balance loss
    averaged). The balance loss enters the gradient as ``aux_loss_weight * mean over layers`` per
    target token; ``loss_sum`` stays the cross-entropy."""
    w_aux = float(aux_loss_weight)

    def grads_of(b):
        def f(p):
            s, w, stats = loss_sums(p, b, graphdef, mesh, with_aux=True)
            total = s + w_aux * jnp.mean(stats["aux_loss"]) * w if w_aux else s
            return total, (s, w, stats)

        (_, (s, w, stats)), g = jax.value_and_grad(f, has_aux=True)(params)
        return s, w, g, stats

    if accum == 1:
        return grads_of(batch)
    micro = jax.tree.map(lambda x: split_micro(x, accum, mesh), batch)

    def body(carry, mb):
        s, w, g, st = grads_of(mb)
        acc_s, acc_w, acc_g = carry
        return (acc_s + s, acc_w + w, jax.tree.map(jnp.add, acc_g, g)), st

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (loss_sum, weight, grads), stats = jax.lax.scan(body, (0.0, 0.0, zeros), micro)
    stats = {"load": jnp.sum(stats["load"], 0), "entropy": jnp.mean(stats["entropy"], 0),
             "aux_loss": jnp.mean(stats["aux_loss"], 0)}
    return loss_sum, weight, grads, stats


def after_update(params, stats, moe_cfg):
    """(params with the correction biases moved by the batch's expert loads, routing metrics)."""
    return update_correction_bias(params, stats["load"], float(moe_cfg.bias_update_rate)), moe_metrics(stats)
