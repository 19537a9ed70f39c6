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

from glmjax.moe_config import moe_layer_count
from glmjax.sharding import activation_mesh, batch_axes, batch_sharding, replicated
from glmjax.train.loss import chunked_cross_entropy_sums
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


def loss_sums(params, batch, graphdef, mesh, *, with_aux: bool = False):
    """(loss sum, weight sum); with ``with_aux`` also the MoE routing statistics (glmjax/train/moe_step.py)."""
    model = nnx.merge(graphdef, params)
    chunk = int(getattr(model.cfg, "loss_chunk", 0) or 0)
    if chunk:  # model.loss_chunk: never materialise [B, T, vocab] (glmjax/train/loss.py)
        h = model.hidden(batch, mesh, with_aux=with_aux)
        h, aux = h if with_aux else (h, None)
        sums = chunked_cross_entropy_sums(h, model.head(), batch["targets"], batch["loss_weights"], chunk)
    else:
        logits = model(batch, mesh, with_aux=with_aux)
        logits, aux = logits if with_aux else (logits, None)
        sums = cross_entropy_sums(logits, batch["targets"], batch["loss_weights"])
    return (*sums, aux) if with_aux else sums


def accumulated_grads(params, batch, graphdef, mesh: Mesh, accum: int):
    """``(loss_sum, weight_sum, grads)``: gradients of the *summed* weighted token loss over ``accum``
    micro-batches (rows ``i*accum+m`` form micro-batch ``m``), added up in float32. Dividing by the
    global ``weight_sum`` afterwards gives exactly the full-batch mean-loss gradient (up to float32
    summation order)."""
    def grads_of(b):
        return jax.value_and_grad(lambda p: loss_sums(p, b, graphdef, mesh), has_aux=True)(params)

    if accum == 1:
        (loss_sum, weight), grads = grads_of(batch)
        return loss_sum, weight, grads
    micro = jax.tree.map(lambda x: split_micro(x, accum, mesh), batch)

    def body(carry, mb):
        (s, w), g = grads_of(mb)
        acc_s, acc_w, acc_g = carry
        return (acc_s + s, acc_w + w, jax.tree.map(jnp.add, acc_g, g)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (loss_sum, weight, grads), _ = jax.lax.scan(body, (0.0, 0.0, zeros), micro)
    return loss_sum, weight, grads


def make_train_step(cfg, spec: ModelSpec, mesh: Mesh):
    """``train_step(state, batch) -> (state, metrics)``, jitted with donated state. MoE models also
    move the routers' correction biases after the update and log routing metrics (moe_step.py)."""
    accum = int(cfg.optimizer.grad_accum_steps)
    schedule = learning_rate_schedule(cfg)
    moe = moe_layer_count(cfg.model) > 0
    if moe:
        from glmjax.train import moe_step

    def train_step(state: TrainState, batch):
        with activation_mesh(mesh):
            if moe:
                loss_sum, weight, grads, stats = moe_step.accumulated_grads(
                    state.params, batch, spec.graphdef, mesh, accum, cfg.model.moe.aux_loss_weight)
            else:
                loss_sum, weight, grads = accumulated_grads(state.params, batch, spec.graphdef, mesh, accum)
        denom = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
        updates, opt_state = spec.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss_sum / denom, "grad_norm": _global_norm(grads),
                   "learning_rate": schedule(state.step), "target_tokens": weight}
        if moe:  # aux-loss-free balancing, outside the gradient; the bias lives in params (checkpointed)
            params, moe_metrics = moe_step.after_update(params, stats, cfg.model.moe)
            metrics.update(moe_metrics)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    feats = {k: batch_sharding(mesh) for k in FEATURES}
    return jax.jit(train_step, donate_argnums=(0,), in_shardings=(spec.shardings, feats),
                   out_shardings=(spec.shardings, replicated(mesh)))


def make_eval_step(cfg, spec: ModelSpec, mesh: Mesh):
    """``eval_step(params, batch) -> (loss_sum, weight_sum)``, over the same micro-batches as the train
    step (``optimizer.grad_accum_steps``), so evaluating a batch needs no more activation memory than
    training on it (a large-batch MoE run would otherwise fit to train but not to evaluate)."""
    accum = int(cfg.optimizer.grad_accum_steps)

    def eval_step(params, batch):
        with activation_mesh(mesh):
            if accum == 1:
                return loss_sums(params, batch, spec.graphdef, mesh)
            micro = jax.tree.map(lambda x: split_micro(x, accum, mesh), batch)

            def body(carry, mb):
                s, w = loss_sums(params, mb, spec.graphdef, mesh)
                return (carry[0] + s, carry[1] + w), None

            zero = jnp.zeros((), jnp.float32)
            return jax.lax.scan(body, (zero, zero), micro)[0]

    feats = {k: batch_sharding(mesh) for k in FEATURES}
    return jax.jit(eval_step, in_shardings=(spec.shardings.params, feats), out_shardings=replicated(mesh))


def split_micro(x, accum: int, mesh: Mesh):
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
