"""Self-attention of the GLM block and the dispatch to the attention kernels (``model.attention_impl``)."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from glmjax.model.cpu_attention import attention_cpu
from glmjax.model.layers import Norm, dense, dtype_of, param
from glmjax.model.rope import apply_rope
from glmjax.sharding import batch_axes, constrain, current_mesh


def repeat_kv_to_tensor(k_BSKD, v_BSKD, num_heads: int, mesh):
    """Repeat kv heads up to the mesh's ``tensor`` size when they do not divide it (GLM-4-9B: 2 kv heads,
    tensor 8), so k / v shard by head like q instead of replicating the head axis (which all-gathers q
    and has every tensor rank compute every head). Each kv head is repeated in place, so query head
    ``h`` still reads the copy of its own kv head ``h // (num_heads / K)``."""
    t = mesh.shape.get("tensor", 1) if mesh is not None else 1
    K = k_BSKD.shape[2]
    if t <= 1 or K % t == 0 or t % K or num_heads % t:
        return k_BSKD, v_BSKD
    r = t // K
    return jnp.repeat(k_BSKD, r, axis=2), jnp.repeat(v_BSKD, r, axis=2)


def attend(q_BTHD, k_BSKD, v_BSKD, segment_ids_BT, bidirectional_BT, *, impl: str, mesh=None):
    """GLM-masked attention (DESIGN.md §3); ``impl`` is ``model.attention_impl``.

    ``xla``: plain jnp, partitioned by XLA. ``pallas``: the Mosaic kernel on TPU, the Triton kernel on
    GPU, the TPU kernel in interpret mode on CPU (slow; for tests). ``cudnn``: cuDNN, with the packed
    GLM mask as a dense bias (cuDNN cannot express it natively). ``auto``: by platform (CPU -> xla).
    Kernels run under ``shard_map`` over the mesh's batch ('data', 'fsdp') and head ('tensor') axes.
    """
    platform = pallas_kernels.target_platform()
    interpret = False
    if impl == "pallas":
        kernel = {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(platform, "pallas_tpu")
        interpret = platform not in ("tpu", "gpu")
    elif impl == "cudnn":
        masked = segment_ids_BT is not None or bidirectional_BT is not None
        kernel = "cudnn_dense" if masked else "cudnn"
    else:
        kernel = pallas_kernels.resolve_implementation(impl)
    args = (q_BTHD, k_BSKD, v_BSKD, segment_ids_BT, bidirectional_BT)
    if kernel == "xla":
        if platform == "cpu":  # same values, a cheaper backward on XLA:CPU (glmjax/model/cpu_attention.py)
            return attention_cpu(*args, causal=True)
        return pallas_kernels.flash_attention(*args, causal=True, implementation="xla")
    extra = {} if mesh is None else {"batch_axes": batch_axes(mesh)}
    return pallas_kernels.sharded_flash_attention(*args, mesh=mesh, causal=True, implementation=kernel,
                                                  interpret=interpret, **extra)


class Attention(nnx.Module):
    """MHA / GQA with optional qkv bias, output bias (``model.attn_out_bias``) and qk-norm (``model.qk_norm``);
    rotary (1D or 2D) on q, k."""

    def __init__(self, cfg, rngs: nnx.Rngs, *, stds: dict):
        pd = dtype_of(cfg.param_dtype)
        D, H, K, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.dtype = dtype_of(cfg.dtype)
        self.wq = param(rngs, (D, H, hd), ("embed", "heads", "head_dim"), std=stds["wq"], dtype=pd)
        self.wk = param(rngs, (D, K, hd), ("embed", "kv_heads", "head_dim"), std=stds["wk"], dtype=pd)
        self.wv = param(rngs, (D, K, hd), ("embed", "kv_heads", "head_dim"), std=stds["wv"], dtype=pd)
        self.wo = param(rngs, (H, hd, D), ("heads", "head_dim", "embed"), std=stds["wo"], dtype=pd)
        if cfg.qkv_bias:
            self.bq = param(rngs, (H, hd), ("heads", "head_dim"), std=0, dtype=pd)
            self.bk = param(rngs, (K, hd), ("kv_heads", "head_dim"), std=0, dtype=pd)
            self.bv = param(rngs, (K, hd), ("kv_heads", "head_dim"), std=0, dtype=pd)
        self.out_bias = bool(cfg.get("attn_out_bias", False))
        if self.out_bias:
            self.bo = param(rngs, (D,), ("norm",), std=0, dtype=pd)
        self.qk_norm = bool(cfg.get("qk_norm", False))
        if self.qk_norm:  # RMSNorm over head_dim of every q / k head, before rotary (GLM-4.5)
            self.q_norm = Norm(cfg, rngs, dim=hd, rms=True)
            self.k_norm = Norm(cfg, rngs, dim=hd, rms=True)

    def qkv(self, x_BTD, pos_BT, block_pos_BT):
        """Projected q, k, v with rotary applied to q and k (shared with the KV-cache decode path)."""
        cfg, dt = self.cfg, self.dtype
        q = dense(x_BTD, self.wq[...].astype(dt))
        k = dense(x_BTD, self.wk[...].astype(dt))
        v = dense(x_BTD, self.wv[...].astype(dt))
        if cfg.qkv_bias:
            q, k, v = q + self.bq[...].astype(dt), k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        rope = dict(theta=cfg.rope_theta, rope_2d=cfg.rope_2d, style=cfg.rope_style,
                    partial_rotary_factor=cfg.partial_rotary_factor)
        return apply_rope(q, pos_BT, block_pos_BT, **rope), apply_rope(k, pos_BT, block_pos_BT, **rope), v

    def output(self, out_BTHD):
        """The output projection (and bias) of the attention result ``[B, T, H, hd]``."""
        out = dense(out_BTHD, self.wo[...].astype(self.dtype), 2)
        return out + self.bo[...].astype(self.dtype) if self.out_bias else out

    def __call__(self, x_BTD, feats, mesh=None):
        cfg = self.cfg
        q, k, v = self.qkv(x_BTD, feats["positions"], feats.get("block_positions"))
        k, v = repeat_kv_to_tensor(k, v, cfg.num_heads, mesh if mesh is not None else current_mesh())
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        out = attend(q, k, v, feats.get("segment_ids"), feats.get("bidirectional"),
                     impl=cfg.attention_impl, mesh=mesh)
        out = constrain(out, ("batch", "length", "heads", "head_dim"))
        return self.output(out)
