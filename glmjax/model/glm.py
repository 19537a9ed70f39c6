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
from glmjax.model.moe import MoE
from glmjax.moe_config import moe_layer_count
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

    def __init__(self, cfg, rngs: nnx.Rngs, moe: bool = False):
        self.deepnorm = cfg.norm == "deepnorm"
        self.alpha = (2.0 * cfg.num_layers) ** 0.5 if self.deepnorm else 1.0
        self.moe = moe  # MoE blocks (glmjax/model/moe.py) also return their routing statistics
        stds = init_stds(cfg)
        self.attn_norm = Norm(cfg, rngs)
        self.attn = Attention(cfg, rngs, stds=stds)
        self.mlp_norm = Norm(cfg, rngs)
        self.mlp = MoE(cfg, rngs, stds=stds) if moe else GatedMLP(cfg, rngs, stds=stds)
        self.residual_axes = residual_axes(cfg)

    def __call__(self, x_BTD, feats, mesh=None):
        stats = []
        mlp = (lambda h: _keep(self.mlp(h, feats, mesh), stats)) if self.moe else self.mlp
        if self.deepnorm:
            dt = x_BTD.dtype
            h = deepnorm_residual(self.alpha, x_BTD, self.attn(x_BTD, feats, mesh))
            x_BTD = constrain(self.attn_norm(h).astype(dt), self.residual_axes)
            x_BTD = self.mlp_norm(deepnorm_residual(self.alpha, x_BTD, mlp(x_BTD))).astype(dt)
        else:
            x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), feats, mesh)
            x_BTD = constrain(x_BTD, self.residual_axes)  # sequence parallel: reduce-scatter here
            x_BTD = x_BTD + mlp(self.mlp_norm(x_BTD))
        x_BTD = constrain(x_BTD, self.residual_axes)
        return (x_BTD, stats[0]) if self.moe else x_BTD


def _keep(out_and_stats, sink: list):
    sink.append(out_and_stats[1])
    return out_and_stats[0]


class GLM(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = dtype_of(cfg.param_dtype)
        self.dtype = dtype_of(cfg.dtype)
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), std=cfg.init_std,
                           dtype=pd)
        n_moe = moe_layer_count(cfg)  # MoE: the first model.moe.first_dense_layers stay dense
        self.layers = _make_layers(cfg, rngs, cfg.num_layers - n_moe, moe=False)
        if n_moe:
            self.moe_layers = _make_layers(cfg, rngs, n_moe, moe=True)
        if cfg.get("embedding_norm", False):
            self.embed_norm = Norm(cfg, rngs)
        if cfg.get("final_norm", True):
            self.final_norm = Norm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                                 std=cfg.init_std, dtype=pd)

    def __call__(self, feats: dict, mesh=None, *, with_aux: bool = False):
        """Logits ``[B, T, vocab]``; with ``with_aux`` ``(logits, MoE routing stats)`` (see :meth:`hidden`)."""
        h = self.hidden(feats, mesh, with_aux=with_aux)
        h, aux = h if with_aux else (h, None)
        logits = constrain(dense(h, self.head()), ("batch", "length", "vocab"))
        return (logits, aux) if with_aux else logits

    def head(self) -> jax.Array:
        """The output projection ``[embed, vocab]`` in the compute dtype (tied: the embedding^T)."""
        head = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
        return head.astype(self.dtype)

    def hidden(self, feats: dict, mesh=None, *, with_aux: bool = False):
        """The final-normalised hidden states ``[B, T, embed]`` (logits = ``hidden @ head()``); with
        ``with_aux`` also the MoE layers' routing statistics stacked over layers (``{load [L, E],
        entropy [L], aux_loss [L]}``; None for a dense model)."""
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
        if self.layers is not None:
            x = _run_layers(cfg, run, self.layers, x, moe=False)
        aux = None
        if hasattr(self, "moe_layers"):
            x, aux = _run_layers(cfg, run, self.moe_layers, x, moe=True)
        x = self.final_normed(x)
        return (x, aux) if with_aux else x

    def embed_normed(self, x_BTD):
        """The embeddings after ``model.embedding_norm`` (identity when off)."""
        if self.cfg.get("embedding_norm", False):
            x_BTD = self.embed_norm(x_BTD)
        return constrain(x_BTD, ("batch", "length", "act_embed"))

    def final_normed(self, x_BTD):
        """The last layer's output after ``model.final_norm`` (identity when off)."""
        return self.final_norm(x_BTD) if self.cfg.get("final_norm", True) else x_BTD


def _make_layers(cfg, rngs, n: int, *, moe: bool):
    """``n`` blocks: stacked by ``nnx.vmap`` when scanned, else an ``nnx.List``; None when ``n == 0``."""
    if n == 0:
        return None
    if cfg.scan_layers:
        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs):
            return Block(cfg, rngs, moe)

        return make_layers(rngs)
    return nnx.List([Block(cfg, rngs, moe) for _ in range(n)])


def _run_layers(cfg, run, layers, x, *, moe: bool):
    """Run a stack of blocks; MoE stacks return ``(x, stats stacked over layers)``."""
    if cfg.scan_layers:
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0) if moe else nnx.Carry)
        def scan_fn(block, x):
            return run(block, x)

        return scan_fn(layers, x)
    stats = []
    for block in layers:
        x = run(block, x)
        if moe:
            x, s = x
            stats.append(s)
    return (x, jax.tree.map(lambda *a: jnp.stack(a), *stats)) if moe else x


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
