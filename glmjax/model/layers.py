"""Building blocks of the GLM model: parameters with logical axis names, norms, gated MLP."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from glmjax.sharding import constrain
from pallas_kernels import target_platform


def dtype_of(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def param(rngs: nnx.Rngs, shape, axes, *, std: float | None, dtype) -> nnx.Param:
    """A parameter initialised N(0, std) (``std=None``: ones, ``std=0``: zeros) tagged with logical axes."""
    if std is None:
        value = jnp.ones(shape, dtype)
    elif std == 0:
        value = jnp.zeros(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, axes=tuple(axes))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense_cpu(x, w, n):
    k = math.prod(w.shape[:n])
    return (x.reshape(-1, k) @ w.reshape(k, -1)).reshape(*x.shape[:x.ndim - n], *w.shape[n:])


def _dense_cpu_fwd(x, w, n):
    return _dense_cpu(x, w, n), (x, w)


def _dense_cpu_bwd(n, res, g):
    x, w = res
    k = math.prod(w.shape[:n])
    x_NK = x.reshape(-1, k)
    g_NM = g.reshape(x_NK.shape[0], -1)
    # The barrier keeps x^T materialised ([K, tokens], small): the weight gradient is then a plain
    # row-major dot. Left to itself XLA:CPU transposes the [tokens, M] output gradient instead and runs
    # a transposed-operand dot, up to ~3x slower than the forward one (39 ms of a ~300 ms tiny step for
    # the lm head alone).
    xt_KN = jax.lax.optimization_barrier(x_NK.T)
    dw = (xt_KN @ g_NM).reshape(w.shape).astype(w.dtype)
    dx = (g_NM @ w.reshape(k, -1).T).reshape(x.shape).astype(x.dtype)
    return dx, dw


_dense_cpu.defvjp(_dense_cpu_fwd, _dense_cpu_bwd)


def dense(x, w, n: int = 1):
    """Contract the last ``n`` dims of ``x`` with the first ``n`` of ``w`` (``einsum("btd,dv->btv")``,
    ``"bthk,hkd->btd"`` with ``n=2``, ...): every weight matmul of the model. On CPU with a hand-written
    backward (see ``_dense_cpu_bwd``) that makes the tiny CPU train step ~15% faster. Same values and
    gradients."""
    if target_platform() == "cpu":
        return _dense_cpu(x, w, n)
    return jnp.tensordot(x, w, axes=n)


class Norm(nnx.Module):
    """LayerNorm (scale + bias, for DeepNorm) or RMSNorm (scale), computed in float32."""

    def __init__(self, cfg, rngs: nnx.Rngs, *, dim: int | None = None, rms: bool | None = None):
        """``dim`` (default hidden_size) and ``rms`` (default: ``model.norm``) for other uses (qk-norm)."""
        pd = dtype_of(cfg.param_dtype)
        self.rms = cfg.norm == "rmsnorm_pre" if rms is None else rms
        self.eps = cfg.norm_eps
        self.scale = param(rngs, (dim or cfg.hidden_size,), ("norm",), std=None, dtype=pd)
        if not self.rms:
            self.bias = param(rngs, (cfg.hidden_size,), ("norm",), std=0, dtype=pd)

    def __call__(self, x_BTD):
        x = x_BTD.astype(jnp.float32)
        if self.rms:
            y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
            y = y * self.scale[...].astype(jnp.float32)
        else:
            mean = jnp.mean(x, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
            y = (x - mean) * jax.lax.rsqrt(var + self.eps)
            y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x_BTD.dtype)


def xavier_std(fan_in: int, fan_out: int, gain: float = 1.0) -> float:
    """The std of Xavier (Glorot) normal init: ``gain * sqrt(2 / (fan_in + fan_out))``."""
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


def init_stds(cfg) -> dict:
    """Init std of each weight matrix for ``model.init`` (DeepNorm's beta = (2N)^-0.5 when ``model.norm``
    is deepnorm, else 1). ``normal``: N(0, init_std), beta on v, attention output and MLP output.
    ``deepnorm`` (DeepNet paper, GLM-130B): Xavier normal per projection (q, k, v, o; each MLP half on its
    own, ``[D, F]``), gain beta on v, o, and both MLP matrices, gain 1 on q and k."""
    D, H, K, hd, F, s = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.init_std
    beta = (2.0 * cfg.num_layers) ** -0.5 if cfg.norm == "deepnorm" else 1.0
    if cfg.get("init", "normal") == "deepnorm":
        return dict(wq=xavier_std(D, H * hd), wk=xavier_std(D, K * hd), wv=xavier_std(D, K * hd, beta),
                    wo=xavier_std(H * hd, D, beta), mlp_wi=xavier_std(D, F, beta), mlp_wo=xavier_std(F, D, beta))
    return dict(wq=s, wk=s, wv=s * beta, wo=s * beta, mlp_wi=s, mlp_wo=s * beta)


def gelu_fn(kind: str):
    return lambda x: jax.nn.gelu(x, approximate=kind == "tanh")


def activation(cfg):
    """The activation of ``model.mlp``: SiLU (swiglu) or GELU of ``model.gelu`` (geglu, gelu)."""
    return jax.nn.silu if cfg.mlp == "swiglu" else gelu_fn(cfg.get("gelu", "erf"))


class GatedMLP(nnx.Module):
    """The MLP (``model.mlp``). GeGLU / SwiGLU with a fused input projection ``wi: [embed, 2, mlp]``:
    ``act(h[gate]) * h[value]`` with gate index 0, value 1 (``glu_order=gate_first``) or the reverse
    (``value_first``). ``gelu``: the plain MLP ``wo(gelu(wi x))`` with ``wi: [embed, mlp]``. Optional
    biases ``bi`` (shaped like wi's output) and ``bo [embed]`` (``model.mlp_bias``). ``mlp_dim`` overrides
    ``model.mlp_dim`` (the MoE shared experts)."""

    def __init__(self, cfg, rngs: nnx.Rngs, *, stds: dict, mlp_dim: int | None = None):
        pd = dtype_of(cfg.param_dtype)
        self.dtype = dtype_of(cfg.dtype)
        self.gated = cfg.mlp != "gelu"
        self.act = activation(cfg)
        self.gate = 1 if cfg.get("glu_order", "gate_first") == "value_first" else 0
        self.bias = bool(cfg.get("mlp_bias", False))
        D, F = cfg.hidden_size, mlp_dim or cfg.mlp_dim
        shape, axes = ((D, 2, F), ("embed", "gate_up", "mlp")) if self.gated else ((D, F), ("embed", "mlp"))
        self.wi = param(rngs, shape, axes, std=stds["mlp_wi"], dtype=pd)
        self.wo = param(rngs, (F, D), ("mlp", "embed"), std=stds["mlp_wo"], dtype=pd)
        if self.bias:
            self.bi = param(rngs, shape[1:], axes[1:], std=0, dtype=pd)
            self.bo = param(rngs, (D,), ("norm",), std=0, dtype=pd)

    def __call__(self, x_BTD):
        h = dense(x_BTD, self.wi[...].astype(self.dtype))
        if self.bias:
            h = h + self.bi[...].astype(self.dtype)
        if self.gated:
            h_BTF = self.act(h[:, :, self.gate]) * h[:, :, 1 - self.gate]
        else:
            h_BTF = self.act(h)
        h_BTF = constrain(h_BTF, ("batch", "length", "mlp"))
        out = dense(h_BTF, self.wo[...].astype(self.dtype))
        if self.bias:
            out = out + self.bo[...].astype(self.dtype)
        return out
