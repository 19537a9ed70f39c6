"""Loading a trained model for inference and computing its logits.

``load(workdir, step=None)`` reads only the parameters of a checkpoint (never the optimizer state),
places them on ``mesh`` (default: one device, replicated) and returns ``(model, cfg)``: ``model`` is an
:class:`InferenceModel` holding the Flax module and the run's tokenizer (loaded on first use).
``logits(model, tokens, ...)`` runs the full forward pass (the training code path) on a batch.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glmjax.export.reader import CheckpointReader
from glmjax.model.glm import GLM, pure_dict


@dataclasses.dataclass
class InferenceModel:
    module: GLM  # the Flax NNX model with the checkpoint's parameters
    cfg: object  # the run config (ConfigDict)
    step: int | None = None
    tokenizer: object = None  # glmjax.inference.text.Tokenizer, loaded on first use
    mesh: object = None

    @property
    def model_cfg(self):
        return self.cfg.model

    def get_tokenizer(self):
        if self.tokenizer is None:
            from glmjax.inference.text import Tokenizer

            self.tokenizer = Tokenizer.for_config(self.cfg)
        return self.tokenizer


def from_params(cfg, params: dict, *, step: int | None = None, mesh=None) -> InferenceModel:
    """An :class:`InferenceModel` from a parameter pure dict (NumPy or jax arrays)."""
    abstract = nnx.eval_shape(lambda: GLM(cfg.model, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract, nnx.Param)
    target = pure_dict(state)
    params = _match_keys(params, target)
    if mesh is None:
        put = lambda x, t: jnp.asarray(np.asarray(x), dtype=t.dtype)  # noqa: E731
    else:
        from glmjax.model.glm import param_axes
        from glmjax.sharding import sharding_for

        axes = pure_dict(param_axes(state))
        put = None
        leaves = jax.tree.map(lambda x, t, ax: jax.device_put(np.asarray(x, t.dtype), sharding_for(ax, t.shape, mesh)),
                              params, target, axes)
    if put is not None:
        leaves = jax.tree.map(put, params, target)
    nnx.replace_by_pure_dict(state, leaves)
    return InferenceModel(nnx.merge(graphdef, state), cfg, step=step, mesh=mesh)


def _match_keys(params, target):
    """Give ``params`` the key types of ``target`` (int layer indices of unscanned models)."""
    if not isinstance(target, dict):
        return params
    by_str = {str(k): v for k, v in params.items()}
    missing = [k for k in target if str(k) not in by_str]
    if missing:
        raise ValueError(f"parameters lack {missing}: the checkpoint does not match its own model config")
    return {k: _match_keys(by_str[str(k)], v) for k, v in target.items()}


def load(workdir: str, step: int | None = None, *, mesh=None) -> tuple[InferenceModel, object]:
    """``(model, cfg)`` from the newest (or ``step``) checkpoint of ``workdir``; parameters only.

    ``mesh``: a ``jax.sharding.Mesh`` to shard the parameters over (logical axes as in training);
    default one device. Raises :class:`glmjax.export.reader.CheckpointReadError` with the fix when the
    workdir, the step or the checkpoint is not usable.
    """
    reader = CheckpointReader(workdir, step)
    model = from_params(reader.cfg, reader.read_tree(), step=reader.step, mesh=mesh)
    return model, reader.cfg


@functools.partial(nnx.jit)
def _forward(module, feats):
    return module(feats).astype(jnp.float32)


def logits(model: InferenceModel, tokens, *, positions=None, block_positions=None, bidirectional=None,
           segment_ids=None) -> np.ndarray:
    """Float32 NumPy logits ``[B, T, V]`` of ``tokens [B, T]`` through the full (training) forward pass.

    Defaults: causal attention, ``positions`` 0..T-1, ``block_positions`` 0. ``bidirectional``: a
    ``[B, T]`` 0/1 array (1 = Part A, seen by every token of its segment) or a ``[B]`` array of prefix
    lengths. ``segment_ids`` (0 = padding) separates packed documents; default one document per row.
    """
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
    B, T = tokens.shape
    if positions is None:
        positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    if block_positions is None:
        block_positions = np.zeros((B, T), np.int32)
    bidir = np.zeros((B, T), np.int32) if bidirectional is None else np.asarray(bidirectional, np.int32)
    if bidir.ndim == 1:
        bidir = (np.arange(T)[None, :] < bidir[:, None]).astype(np.int32)
    if segment_ids is None:
        segment_ids = np.ones((B, T), np.int32)
    feats = {"tokens": tokens, "positions": np.asarray(positions, np.int32),
             "block_positions": np.asarray(block_positions, np.int32),
             "segment_ids": np.asarray(segment_ids, np.int32), "bidirectional": bidir}
    return np.asarray(_forward(model.module, {k: jnp.asarray(v) for k, v in feats.items()}))
