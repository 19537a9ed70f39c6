"""The jitted train and eval steps: pure functions of (state, batch), sharded over the mesh.

Loss: float32 cross-entropy weighted by ``loss_weights`` and normalised by their sum over the whole
global batch, so gradient accumulation over micro-batches gives exactly the full-batch gradient.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from glmjax.config import moe_layer_count
from glmjax.model.moe import moe_metrics, update_correction_bias
from glmjax.sharding import activation_mesh, batch_axes, batch_sharding, replicated
from glmjax.train.optimizer import learning_rate_schedule
from glmjax.train.state import ModelSpec, TrainState

FEATURES = ("tokens", "targets", "loss_weights", "segment_ids", "positions", "block_positions", "bidirectional")


def cross_entropy_sums(logits_BTV, targets_BT, weights_BT):
    """(sum of weighted token losses, sum of weights), in float32."""
    logits = logits_BTV.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    w = weights_BT.astype(jnp.float32)
    return jnp.sum((logz - picked) * w), jnp.sum(w)


def loss_sums(params, batch, graphdef, mesh):
    model = nnx.merge(graphdef, params)
    logits = model(batch, mesh)
    return cross_entropy_sums(logits, batch["targets"], batch["loss_weights"])


def loss_sums_with_moe(params, batch, graphdef, mesh):
    """(loss sum, weight sum, MoE routing stats or None): the stats drive the bias update and metrics."""
    logits, stats = nnx.merge(graphdef, params)(batch, mesh, with_aux=True)
    return (*cross_entropy_sums(logits, batch["targets"], batch["loss_weights"]), stats)


def make_train_step(cfg, spec: ModelSpec, mesh: Mesh):
    """``train_step(state, batch) -> (state, metrics)``, jitted with donated state."""
    accum = int(cfg.optimizer.grad_accum_steps)
    schedule = learning_rate_schedule(cfg)
    moe = moe_layer_count(cfg.model) > 0
    aux_weight = float(cfg.model.moe.aux_loss_weight) if moe else 0.0

    def grads_of(params, batch):
        def f(p, b):
            s, w, stats = loss_sums_with_moe(p, b, spec.graphdef, mesh)
            if not moe:
                return s, (w, None)
            # the balance loss enters the gradient as aux_weight * mean over layers, per target token
            total = s + aux_weight * jnp.mean(stats["aux_loss"]) * w if aux_weight else s
            return total, (w, {**stats, "ce": s})

        (total, (w, stats)), g = jax.value_and_grad(f, has_aux=True)(params, batch)
        return ((stats["ce"] if moe else total), w, stats), g

    def train_step(state: TrainState, batch):
        with activation_mesh(mesh):
            if accum == 1:
                (loss_sum, weight, stats), grads = grads_of(state.params, batch)
            else:
                micro = jax.tree.map(lambda x: _split_micro(x, accum, mesh), batch)

                def body(carry, mb):
                    (s, w, st), g = grads_of(state.params, mb)
                    acc_s, acc_w, acc_g = carry
                    return (acc_s + s, acc_w + w, jax.tree.map(jnp.add, acc_g, g)), st

                zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
                (loss_sum, weight, grads), stats = jax.lax.scan(body, (0.0, 0.0, zeros), micro)
                if moe:  # loads add up over micro-batches; entropy and balance loss average
                    stats = {"load": jnp.sum(stats["load"], 0), "entropy": jnp.mean(stats["entropy"], 0),
                             "aux_loss": jnp.mean(stats["aux_loss"], 0)}
        denom = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
        updates, opt_state = spec.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss_sum / denom, "grad_norm": _global_norm(grads),
                   "learning_rate": schedule(state.step), "target_tokens": weight}
        if moe:  # aux-loss-free balancing: outside the gradient, the bias lives in params (checkpointed)
            params = update_correction_bias(params, stats["load"], float(cfg.model.moe.bias_update_rate))
            metrics.update(moe_metrics(stats))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    feats = {k: batch_sharding(mesh) for k in FEATURES}
    return jax.jit(train_step, donate_argnums=(0,), in_shardings=(spec.shardings, feats),
                   out_shardings=(spec.shardings, replicated(mesh)))


def make_eval_step(cfg, spec: ModelSpec, mesh: Mesh):
    """``eval_step(params, batch) -> (loss_sum, weight_sum)``."""

    def eval_step(params, batch):
        with activation_mesh(mesh):
            return loss_sums(params, batch, spec.graphdef, mesh)

    feats = {k: batch_sharding(mesh) for k in FEATURES}
    return jax.jit(eval_step, in_shardings=(spec.shardings.params, feats), out_shardings=replicated(mesh))


def _split_micro(x, accum: int, mesh: Mesh):
    """[B, ...] -> [accum, B/accum, ...] taking rows i*accum+m for micro-batch m (stays device-local)."""
    b = x.shape[0]
    y = x.reshape(b // accum, accum, *x.shape[1:]).swapaxes(0, 1)
    if mesh.size > 1:
        spec = P(None, batch_axes(mesh), *([None] * (x.ndim - 1)))
        y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))
    return y


def _global_norm(tree):
    norm = getattr(getattr(optax, "tree", None), "norm", None)  # optax >= 0.2.5
    return norm(tree) if norm is not None else optax.global_norm(tree)
