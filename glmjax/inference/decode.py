"""The decode path with a KV cache: the model's own layers and parameters, attention over a cache.

One jitted function :func:`cached_forward` runs a chunk of tokens (the whole prompt at prefill, one
token per row afterwards) through every layer: the block's norms and MLP are the model's modules
(``block.attn_norm``, ``block.mlp``, ...); attention projects q/k/v with the block's weights, rotates
them with the model's rotary (1D or 2D), writes k/v into the cache at each row's own slots and attends
over the cache. Key slot ``j`` is visible to a query at slot ``i`` of row ``b`` iff it holds a token
(``valid[b, j]``) and ``j <= i`` or ``j < prefix[b]`` (the bidirectional Part A) — the GLM mask of
the training forward (DESIGN.md §3) restricted to one segment per row.

Cache layout: ``k``, ``v`` ``[layers, batch, slots, kv_heads, head_dim]`` in the compute dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from glmjax.model.glm import deepnorm_residual
from glmjax.model.layers import dense
from glmjax.moe_config import moe_layer_count


def init_cache(model_cfg, batch: int, slots: int) -> dict:
    from glmjax.model.layers import dtype_of

    shape = (int(model_cfg.num_layers), batch, slots, int(model_cfg.num_kv_heads), int(model_cfg.head_dim))
    dt = dtype_of(model_cfg.dtype)
    return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}


def _write(cache_BSKD, new_BCKD, start_B):
    return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (s, 0, 0)))(
        cache_BSKD, new_BCKD, start_B)


def _cached_attention(attn, x_BCD, pos_BC, bpos_BC, k_cache, v_cache, start_B, valid_BS, prefix_B):
    dt = attn.dtype
    q, k, v = attn.qkv(x_BCD, pos_BC, bpos_BC)
    k_cache, v_cache = _write(k_cache, k, start_B), _write(v_cache, v, start_B)
    B, C, H, D = q.shape
    K, S = k_cache.shape[2], k_cache.shape[1]
    q_BCKGD = q.reshape(B, C, K, H // K, D)
    s = jnp.einsum("bckgd,bskd->bkgcs", q_BCKGD, k_cache, preferred_element_type=jnp.float32) * D ** -0.5
    qslot_BC = start_B[:, None] + jnp.arange(C)[None, :]
    kslot = jnp.arange(S)
    visible_BCS = valid_BS[:, None, :] & ((kslot[None, None, :] <= qslot_BC[:, :, None])
                                         | (kslot[None, None, :] < prefix_B[:, None, None]))
    s = jnp.where(visible_BCS[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(visible_BCS[:, None, None], p, 0.0)  # a query seeing nothing (padding) gives 0, not NaN
    out = jnp.einsum("bkgcs,bskd->bckgd", p.astype(v_cache.dtype), v_cache, preferred_element_type=jnp.float32)
    out = out.reshape(B, C, H, D).astype(dt)
    return attn.output(out), k_cache, v_cache


def _block(block, x, pos, bpos, k_cache, v_cache, start, valid, prefix):
    if block.deepnorm:
        a, k_cache, v_cache = _cached_attention(block.attn, x, pos, bpos, k_cache, v_cache, start, valid, prefix)
        dt = x.dtype
        x = block.attn_norm(deepnorm_residual(block.alpha, x, a)).astype(dt)
        x = block.mlp_norm(deepnorm_residual(block.alpha, x, _mlp(block, x))).astype(dt)
    else:
        a, k_cache, v_cache = _cached_attention(block.attn, block.attn_norm(x), pos, bpos, k_cache, v_cache,
                                                start, valid, prefix)
        x = x + a
        x = x + _mlp(block, block.mlp_norm(x))
    return x, k_cache, v_cache


def _mlp(block, x_BCD):
    """The block's MLP; an MoE block (glmjax/model/moe.py) routes the chunk's tokens, its stats unused."""
    return block.mlp(x_BCD, {})[0] if block.moe else block.mlp(x_BCD)


def jitted_steps(model) -> tuple:
    """``(state, cached_step, full_step)`` of an InferenceModel, built once and kept on it: jitted functions
    of the split module's state (the graph is closed over, so no per-token graph traversal).
    ``cached_step(state, cache, *args)`` is :func:`forward_with_cache`; ``full_step(state, feats, take_B)``
    the training forward's logits at ``take_B``."""
    steps = getattr(model, "_jitted_steps", None)
    if steps is None:
        graphdef, state = nnx.split(model.module)

        def full(state, feats, take_B):
            logits = nnx.merge(graphdef, state)(feats)
            return jnp.take_along_axis(logits, take_B[:, None, None], axis=1)[:, 0].astype(jnp.float32)

        steps = (state, jax.jit(lambda st, cache, *a: forward_with_cache(nnx.merge(graphdef, st), cache, *a),
                                donate_argnums=(1,)), jax.jit(full))
        model._jitted_steps = steps
    return steps


def forward_with_cache(module, cache, tokens_BC, pos_BC, bpos_BC, start_B, valid_BS, prefix_B, take_B):
    """Run ``tokens_BC`` (written at slots ``start_B + 0..C-1``) through the model with the cache.

    ``valid_BS`` must already mark the chunk's slots. Returns ``(logits_BV, cache)``: float32 logits
    of the token at chunk index ``take_B`` of each row, and the updated (donated) cache.
    """
    cfg = module.cfg
    x = module.embed_normed(jnp.take(module.embed[...], tokens_BC, axis=0).astype(module.dtype))
    args = (pos_BC, bpos_BC)
    rest = (start_B, valid_BS, prefix_B)
    n_dense = int(cfg.num_layers) - moe_layer_count(cfg)  # MoE: dense blocks first, then the MoE ones
    ks, vs = [], []
    for stack, lo, hi in ((module.layers, 0, n_dense), (getattr(module, "moe_layers", None), n_dense, None)):
        if stack is None or lo == hi:
            continue
        x, k, v = _run_stack(cfg, stack, x, cache["k"][lo:hi], cache["v"][lo:hi], args, rest)
        ks.append(k)
        vs.append(v)
    ks, vs = (ks[0], vs[0]) if len(ks) == 1 else (jnp.concatenate(ks), jnp.concatenate(vs))
    x = jnp.take_along_axis(x, take_B[:, None, None], axis=1)  # [B, 1, D]: only the rows' last tokens
    x = module.final_normed(x)
    head = module.embed[...].T if cfg.tie_embeddings else module.lm_head[...]
    logits = dense(x, head.astype(module.dtype))[:, 0].astype(jnp.float32)
    return logits, {"k": ks, "v": vs}


def _run_stack(cfg, layers, x, k_cache, v_cache, args, rest):
    """One stack of blocks (scanned or listed) over its slice of the cache."""
    if cfg.scan_layers:
        graphdef, state = nnx.split(layers)

        def body(x, layer):
            st, kc, vc = layer
            x, kc, vc = _block(nnx.merge(graphdef, st), x, *args, kc, vc, *rest)
            return x, (kc, vc)

        x, (ks, vs) = jax.lax.scan(body, x, (state, k_cache, v_cache))
        return x, ks, vs
    ks, vs = [], []
    for i, block in enumerate(layers):
        x, kc, vc = _block(block, x, *args, k_cache[i], v_cache[i], *rest)
        ks.append(kc)
        vs.append(vc)
    return x, jnp.stack(ks), jnp.stack(vs)
