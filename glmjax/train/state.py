"""Train state and how it is created: abstract shapes, shardings from logical axes, sharded init.

Parameters and optimizer state are created directly sharded (``jit`` with ``out_shardings``), never on
one device first, so a model larger than one device's memory initialises fine.
"""
from __future__ import annotations

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from glmjax.model.glm import GLM, param_axes, pure_dict
from glmjax.sharding import replicated, sharding_for
from glmjax.train.optimizer import make_optimizer


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: dict  # nested dict of arrays (Flax NNX pure dict)
    opt_state: optax.OptState


@dataclasses.dataclass
class ModelSpec:
    """Everything static about the model of a run: graph, optimizer, abstract state and shardings."""
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
    shardings: TrainState
    param_axes: dict


def abstract_params(model_cfg):
    """(graphdef, pure-dict ShapeDtypeStructs, logical axes) of the model, without allocating."""
    model = nnx.eval_shape(lambda: GLM(model_cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, pure_dict(state), pure_dict(param_axes(state))


def model_spec(cfg, mesh: Mesh) -> ModelSpec:
    graphdef, abs_params, axes = abstract_params(cfg.model)
    tx = make_optimizer(cfg)
    param_sh = jax.tree.map(lambda x, ax: sharding_for(ax, x.shape, mesh), abs_params, axes)
    abs_opt = jax.eval_shape(tx.init, abs_params)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abs_opt, param_sh,
                                   transform_non_params=lambda _: replicated(mesh))
    shardings = TrainState(step=replicated(mesh), params=param_sh, opt_state=opt_sh)
    abs_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abs_params, opt_state=abs_opt)
    abs_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abs_state, shardings)
    return ModelSpec(graphdef, tx, abs_state, shardings, axes)


def init_state(cfg, spec: ModelSpec) -> TrainState:
    """Initialise parameters from ``cfg.seed`` and the optimizer state, directly into their shardings."""

    def init(seed):
        params = pure_dict(nnx.state(GLM(cfg.model, nnx.Rngs(seed)), nnx.Param))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=spec.tx.init(params))

    return jax.jit(functools.partial(init, int(cfg.seed)), out_shardings=spec.shardings)()
