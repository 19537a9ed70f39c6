"""Sequence parallelism, GQA kept sharded by head, and the float32 DeepNorm residual add.

- ``model.sequence_parallel`` on vs off: the same loss and gradients on 8 fake devices, and fewer
  per-device temporaries (XLA's ``memory_analysis`` of the compiled gradient program).
- ``num_kv_heads < mesh.tensor``: kv heads are repeated up to the tensor size, the result equals
  one device, and q / k / v enter the attention kernel split by head (checked in the lowered program).
- DeepNorm at 70 layers (alpha ~ 11.8) in bf16: the residual add in float32 leaves the block output
  within bf16 rounding of a float64 reference; the old bf16 add is ~2.6x that.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glmjax.config import base_config
import glmjax.model.attention as attention_mod
from glmjax.model.glm import GLM, Block
from glmjax.sharding import activation_mesh, batch_sharding, make_mesh, sharding_for
from glmjax.train.state import abstract_params
from glmjax.train.step import loss_sums
from helpers import random_glm_features, random_params, small_model_cfg


def model_cfg(**kw):
    return small_model_cfg(**{**dict(hidden_size=64, num_heads=8, mlp_dim=96, vocab_size=128), **kw})


def mesh_of(data, tensor):
    cfg = base_config()
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = data, 1, tensor
    return make_mesh(cfg, jax.devices()[: data * tensor])


def random_params_of(m, seed):
    return random_params(GLM(m, nnx.Rngs(seed)), seed, std=0.2)


def grad_fn(m, mesh):
    """jitted (loss, grads) of the model on ``mesh``, parameters placed by the rules table."""
    graphdef, abs_params, axes = abstract_params(m)
    psh = jax.tree.map(lambda x, ax: sharding_for(ax, x.shape, mesh), abs_params, axes)

    def f(params, batch):
        with activation_mesh(mesh):
            (s, w), g = jax.value_and_grad(lambda p: loss_sums(p, batch, graphdef, mesh), has_aux=True)(params)
        return s / w, g

    return jax.jit(f, in_shardings=(psh, batch_sharding(mesh))), psh


def batch_of(rng, B, T, vocab):
    b = random_glm_features(rng, B, T, vocab)
    return {k: jnp.asarray(v) for k, v in b.items()}


def test_sequence_parallel_same_loss_and_grads():
    mesh = mesh_of(2, 4)
    batch = batch_of(np.random.default_rng(1), 4, 32, 128)
    out = {}
    for sp in (False, True):
        m = model_cfg(sequence_parallel=sp, num_kv_heads=4)
        f, _ = grad_fn(m, mesh)
        out[sp] = jax.device_get(f(random_params_of(m, 0), batch))
    l0, g0 = out[False]
    l1, g1 = out[True]
    # float32 sums in another order (reduce-scatter vs all-reduce): ~1e-6 relative
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max())  # float32 cancellation
    assert np.abs(np.asarray(l0)) > 0.1 and max(np.abs(a).max() for a in jax.tree.leaves(g0)) > 1e-3


def test_sequence_parallel_cuts_per_device_temporaries():
    """A mid-size config on (data 1, tensor 8), remat of whole layers, CPU compiler's
    ``memory_analysis``: the per-layer residual saved for the backward pass (the scan carry,
    ``[B, T, D]`` float32 per layer) is split 8 ways along length with sequence parallelism, so the
    temporaries fall by at least 7/8 of ``layers * B * T * D * 4`` bytes (29.4 MB here). Measured
    (jax 0.10, XLA:CPU): 124.6 MB off, 78.9 MB on."""
    mesh = mesh_of(1, 8)
    L, B, T, D = 8, 2, 1024, 512
    temps = {}
    for sp in (False, True):
        m = model_cfg(sequence_parallel=sp, num_layers=L, hidden_size=D, num_heads=8, num_kv_heads=8,
                      head_dim=64, mlp_dim=1024, vocab_size=1024, remat="full")
        f, psh = grad_fn(m, mesh)
        _, abs_params, _ = abstract_params(m)
        params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abs_params, psh)
        feats = {k: jax.ShapeDtypeStruct((B, T), jnp.int32) for k in
                 ("tokens", "targets", "segment_ids", "positions", "block_positions", "bidirectional")}
        feats["loss_weights"] = jax.ShapeDtypeStruct((B, T), jnp.float32)
        temps[sp] = f.lower(params, feats).compile().memory_analysis().temp_size_in_bytes
    saved_carry = L * B * T * D * 4
    assert temps[False] - temps[True] >= 7 / 8 * saved_carry, (temps, saved_carry)


def _attention_operand_shardings(text):
    """in_shardings of the rank-4 operands of every shard_map (``sdy.manual_computation``)."""
    out = []
    for ins in re.findall(r"sdy\.manual_computation\(.*?in_shardings=\[(.*?)\] out_shardings", text):
        out += [s for s in re.findall(r"<@mesh, \[(.*?)\]>", ins) if s.count("{") == 4]
    return out


def test_gqa_fewer_kv_heads_than_tensor_stays_sharded(monkeypatch):
    """2 kv heads, tensor 4 (the GLM-4-9B case, 2 kv heads over tensor 8): kv heads are repeated to 4,
    the Pallas kernel (interpret mode, under shard_map) gets q / k / v split by head over ``tensor``,
    and loss / gradients equal one device (plain XLA attention, unrepeated kv heads). Without the repetition the head axis is replicated (the
    check below sees it), i.e. q is all-gathered and every tensor rank computes every head."""
    m = model_cfg(num_kv_heads=2, attention_impl="pallas", num_layers=1)
    params = random_params_of(m, 3)
    batch = batch_of(np.random.default_rng(4), 2, 32, 128)
    f1, _ = grad_fn(model_cfg(num_kv_heads=2, attention_impl="xla", num_layers=1), mesh_of(1, 1))
    l1, g1 = jax.device_get(f1(params, batch))
    f8, _ = grad_fn(m, mesh_of(2, 4))
    l8, g8 = jax.device_get(f8(params, batch))
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max())  # float32 cancellation
    assert np.abs(np.asarray(l1)) > 0.1 and max(np.abs(a).max() for a in jax.tree.leaves(g1)) > 1e-3

    by_head = '{"data"}, {}, {"tensor"}, {}'  # [batch, length, heads, head_dim]
    ops = _attention_operand_shardings(f8.lower(params, batch).as_text())
    # forward q, k, v (and the backward's) split by head; no rank-4 operand left replicated over
    # tensor (the kernel residuals are stacked per device: tensor on dim 0)
    assert ops.count(by_head) >= 3 and all('"tensor"' in s for s in ops), ops
    # the check has teeth: without the repetition the heads are replicated
    monkeypatch.setattr(attention_mod, "repeat_kv_to_tensor", lambda k, v, *a: (k, v))
    f8_old, _ = grad_fn(m, mesh_of(2, 4))
    ops_old = _attention_operand_shardings(f8_old.lower(params, batch).as_text())
    assert ops_old and by_head not in ops_old, ops_old


class _Fixed:
    """A stand-in sublayer returning a fixed tensor (isolates the residual add)."""

    def __init__(self, f):
        self.f = f

    def __call__(self, x, *args):
        return self.f.astype(x.dtype)


def _layer_norm(h):
    h = h - h.mean(-1, keepdims=True)
    return h / np.sqrt((h * h).mean(-1, keepdims=True) + 1e-5)


def test_deepnorm_bf16_residual_add_is_float32():
    """70 layers (alpha = 140^0.5 ~ 11.8), bf16 residual stream of unit scale, sublayer outputs of std
    0.3 and 0.1 (the issue's cases). Reference in float64: ``x1 = bf16(LN(a x + f1))``,
    ``out = LN(a x1 + f2)`` (the stream between sublayers is bf16 by design). The float32 add leaves
    only the final bf16 rounding: error / rms(bf16(ref) - ref) = 1.000 measured (bound 1.05: float32
    arithmetic only flips rare rounding ties). The old bf16 add (``a*x + f`` rounded twice in bf16,
    ulp 1/16 at |a x| ~ 12) measured 2.57x, i.e. 17% / 51% of f2's contribution to the output."""
    m = model_cfg(num_layers=70, norm="deepnorm", mlp="geglu", num_kv_heads=8, dtype="bfloat16")
    blk = Block(m, nnx.Rngs(0))
    a = blk.alpha
    assert abs(a - 140 ** 0.5) < 1e-9 and m.norm_eps == 1e-5
    rng = np.random.default_rng(5)
    B, T, D = 4, 256, 64
    x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.bfloat16)
    as64 = lambda t: np.asarray(jnp.asarray(t).astype(jnp.float32), np.float64)
    bf16 = lambda t: as64(jnp.asarray(t, jnp.bfloat16))
    for std in (0.3, 0.1):
        f1, f2 = (jnp.asarray(std * rng.normal(size=(B, T, D)), jnp.bfloat16) for _ in range(2))
        blk.attn, blk.mlp = _Fixed(f1), _Fixed(f2)
        got = as64(blk(x, {}))
        ref = _layer_norm(a * bf16(_layer_norm(a * as64(x) + as64(f1))) + as64(f2))
        x1_old = blk.attn_norm(a * x + f1)  # the old formula: bf16 adds, bf16 LayerNorm output
        old = as64(blk.mlp_norm(a * x1_old + f2))
        rounding = np.sqrt(np.mean((bf16(ref) - ref) ** 2))
        err, err_old = (np.sqrt(np.mean((y - ref) ** 2)) / rounding for y in (got, old))
        assert err < 1.05, (std, err)
        assert err_old > 2.0, (std, err_old)
