"""The GLM model: one class for GLM-130B style (DeepNorm post-LN, GeGLU, 2D rotary, MHA) and
GLM-4 style (RMSNorm pre-norm, SwiGLU, GQA, partial rotary), configured by ``cfg.model``.

Input is a dict of model features ``[batch, length]`` (DESIGN.md §4): ``tokens``, ``positions`` and
optionally ``block_positions``, ``segment_ids``, ``bidirectional``. Output: logits ``[B, T, vocab]``.
Layers are created with ``nnx.vmap`` and run with ``nnx.scan`` (``model.scan_layers``) so compile
time does not grow with depth; ``model.remat`` picks the rematerialisation policy.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from glmjax.model.attention import Attention
from glmjax.model.layers import GatedMLP, Norm, dense, dtype_of, init_stds, param
from glmjax.sharding import constrain, residual_axes

REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def deepnorm_residual(alpha: float, x, f):
    """DeepNorm's ``alpha * x + f`` summed in float32 (the LayerNorm after it is float32 anyway):
    in bf16 the rounding of ``alpha * x`` (alpha ~ 12 at 70 layers, ulp 1/16 at |alpha x| ~ 12) is
    12-35% (RMS) of a sublayer output of std 0.3-0.1. XLA fuses the casts into the LayerNorm."""
    return alpha * x.astype(jnp.float32) + f.astype(jnp.float32)


class Block(nnx.Module):
    """One transformer layer. DeepNorm: ``x = LN(alpha*x + f(x))``; pre-norm: ``x = x + f(RMS(x))``."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        self.deepnorm = cfg.norm == "deepnorm"
        self.alpha = (2.0 * cfg.num_layers) ** 0.5 if self.deepnorm else 1.0
        stds = init_stds(cfg)
        self.attn_norm = Norm(cfg, rngs)
        self.attn = Attention(cfg, rngs, stds=stds)
        self.mlp_norm = Norm(cfg, rngs)
        self.mlp = GatedMLP(cfg, rngs, stds=stds)
        self.residual_axes = residual_axes(cfg)

    def __call__(self, x_BTD, feats, mesh=None):
        if self.deepnorm:
            dt = x_BTD.dtype
            h = deepnorm_residual(self.alpha, x_BTD, self.attn(x_BTD, feats, mesh))
            x_BTD = constrain(self.attn_norm(h).astype(dt), self.residual_axes)
            x_BTD = self.mlp_norm(deepnorm_residual(self.alpha, x_BTD, self.mlp(x_BTD))).astype(dt)
        else:
            x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), feats, mesh)
            x_BTD = constrain(x_BTD, self.residual_axes)  # sequence parallel: reduce-scatter here
            x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD))
        return constrain(x_BTD, self.residual_axes)


class GLM(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = dtype_of(cfg.param_dtype)
        self.dtype = dtype_of(cfg.dtype)
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), std=cfg.init_std,
                           dtype=pd)
        if cfg.scan_layers:
            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make_layers(rngs):
                return Block(cfg, rngs)

            self.layers = make_layers(rngs)
        else:
            self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        if cfg.get("embedding_norm", False):
            self.embed_norm = Norm(cfg, rngs)
        if cfg.get("final_norm", True):
            self.final_norm = Norm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                                 std=cfg.init_std, dtype=pd)

    def __call__(self, feats: dict, mesh=None) -> jax.Array:
        logits = dense(self.hidden(feats, mesh), self.head())
        return constrain(logits, ("batch", "length", "vocab"))

    def head(self) -> jax.Array:
        """The output projection ``[embed, vocab]`` in the compute dtype (tied: the embedding^T)."""
        head = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
        return head.astype(self.dtype)

    def hidden(self, feats: dict, mesh=None) -> jax.Array:
        """The final-normalised hidden states ``[B, T, embed]`` (logits = ``hidden @ head()``)."""
        cfg = self.cfg
        # gather from a table sharded over vocab only: the lookup is local + one all-reduce
        table = constrain(self.embed[...], ("vocab", None))
        x = jnp.take(table, feats["tokens"], axis=0).astype(self.dtype)
        if cfg.embedding_grad_shrink < 1.0:
            a = cfg.embedding_grad_shrink
            x = a * x + (1.0 - a) * jax.lax.stop_gradient(x)
        x = self.embed_normed(x)
        x = constrain(x, residual_axes(cfg))

        def run(block, x):
            return block(x, feats, mesh)

        if cfg.remat != "none":
            run = nnx.remat(run, policy=REMAT[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
            def scan_fn(block, x):
                return run(block, x)

            x = scan_fn(self.layers, x)
        else:
            for block in self.layers:
                x = run(block, x)
        return self.final_normed(x)

    def embed_normed(self, x_BTD):
        """The embeddings after ``model.embedding_norm`` (identity when off)."""
        if self.cfg.get("embedding_norm", False):
            x_BTD = self.embed_norm(x_BTD)
        return constrain(x_BTD, ("batch", "length", "act_embed"))

    def final_normed(self, x_BTD):
        """The last layer's output after ``model.final_norm`` (identity when off)."""
        return self.final_norm(x_BTD) if self.cfg.get("final_norm", True) else x_BTD


def param_axes(state) -> dict:
    """Logical axes per parameter (``layers`` prepended for the stacked, scanned layers)."""
    def axes_of(v):
        axes = tuple(v.get_metadata().get("axes", ()))
        ndim = len(v.shape) if hasattr(v, "shape") else len(v[...].shape)
        return ("layers",) * (ndim - len(axes)) + axes

    return jax.tree.map(axes_of, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def count_params(state) -> int:
    return int(sum(x.size for x in jax.tree.leaves(state)))


def pure_dict(state) -> dict:
    """Nested dict of plain values from an ``nnx.State`` (works across Flax versions)."""
    fn = getattr(nnx, "to_pure_dict", None)
    return fn(state) if fn is not None else state.to_pure_dict()
