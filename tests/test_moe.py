"""The MoE layer: glm4_moe routing, dropless ragged experts == dense reference (values and gradients),
expert parallelism on 8 fake devices == one device, and the config errors.

Tolerances: float32 everywhere; the paths differ only in summation order, so values agree to a few
ulps of their magnitude (rtol 2e-5, atol 2e-6 on O(0.1-1) values)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from glmjax.config import ConfigError, base_config, validate
from glmjax.model.layers import init_stds
from glmjax.model.moe import MoE, moe_dense, moe_ragged, route, update_correction_bias
from glmjax.sharding import activation_mesh, make_mesh

RTOL, ATOL = 2e-5, 2e-6


def moe_cfg(**moe):
    c = base_config()
    c.model.hidden_size, c.model.num_layers = 32, 3
    e = c.model.moe
    e.num_experts, e.experts_per_token, e.expert_mlp_dim, e.n_group, e.topk_group = 8, 2, 16, 2, 1
    for k, v in moe.items():
        e[k] = v
    return c


def silu(x):
    return jax.nn.silu(x)


def random_assignment(rng, N, K, experts):
    """Top-k ids drawn without repetition from ``experts`` only (the other experts stay empty)."""
    return np.stack([rng.choice(experts, K, replace=False) for _ in range(N)]).astype(np.int32)


def test_router_equals_transformers_glm4_moe_router():
    from transformers import Glm4MoeConfig
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

    rng = np.random.default_rng(0)
    for norm, scale, groups, topk_group, k in [(True, 2.5, 4, 2, 3), (False, 1.0, 1, 1, 2), (True, 1.0, 2, 1, 4)]:
        E, D, N = 16, 24, 64
        hf = Glm4MoeTopkRouter(Glm4MoeConfig(hidden_size=D, n_routed_experts=E, num_experts_per_tok=k,
                                             n_group=groups, topk_group=topk_group, norm_topk_prob=norm,
                                             routed_scaling_factor=scale))
        gate = rng.standard_normal((E, D)).astype(np.float32) * 0.3
        bias = rng.standard_normal(E).astype(np.float32) * 0.5  # large: the choice differs from top-k scores
        hf.weight.data = torch.from_numpy(gate)
        hf.e_score_correction_bias.data = torch.from_numpy(bias)
        x = rng.standard_normal((N, D)).astype(np.float32)
        _, tw, ti = hf(torch.from_numpy(x))
        w, idx, scores = route(jnp.asarray(x), jnp.asarray(gate.T), jnp.asarray(bias), top_k=k, n_group=groups,
                               topk_group=topk_group, norm_topk_prob=norm, scaling=scale)
        # same expert sets per token (order within top-k is unspecified: sort both)
        order_hf, order = np.argsort(ti.numpy(), 1), np.argsort(np.asarray(idx), 1)
        np.testing.assert_array_equal(np.take_along_axis(ti.numpy(), order_hf, 1),
                                      np.take_along_axis(np.asarray(idx), order, 1))
        np.testing.assert_allclose(np.take_along_axis(np.asarray(w), order, 1),
                                   np.take_along_axis(tw.detach().numpy(), order_hf, 1), rtol=1e-5, atol=1e-6)
        # the bias changed some choices (so 'choice only' is really tested) but not the weights' source
        plain = np.argsort(-np.asarray(scores), 1)[:, :k]
        assert (np.sort(plain, 1) != np.sort(np.asarray(idx), 1)).any()


def test_router_bias_has_no_gradient_and_gate_has():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((32, 8)), jnp.float32)
    gate = jnp.asarray(rng.standard_normal((8, 8)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(8), jnp.float32)

    def f(g, b):
        w, _, _ = route(x, g, b, top_k=2, n_group=2, topk_group=1, norm_topk_prob=True, scaling=1.0)
        return jnp.sum(w * jnp.arange(2.0))

    dg, db = jax.grad(f, argnums=(0, 1))(gate, bias)
    assert float(jnp.abs(db).max()) == 0.0 and float(jnp.abs(dg).max()) > 1e-3


@pytest.mark.parametrize("K", [1, 3])
def test_ragged_equals_dense_reference_forward_and_gradients(K):
    rng = np.random.default_rng(K)
    N, D, F, E = 40, 16, 12, 8
    used = np.array([1, 2, 4, 7])  # experts 0, 3, 5, 6 receive no token
    idx = jnp.asarray(random_assignment(rng, N, K, used))
    x = jnp.asarray(rng.standard_normal((N, D)), jnp.float32)
    w = jnp.asarray(rng.uniform(0.1, 1.0, (N, K)), jnp.float32)
    wi = jnp.asarray(0.3 * rng.standard_normal((E, D, 2, F)), jnp.float32)
    wo = jnp.asarray(0.3 * rng.standard_normal((E, F, D)), jnp.float32)
    probe = jnp.asarray(rng.standard_normal((N, D)), jnp.float32)

    def loss(fn):
        return lambda x, w, wi, wo: jnp.sum(fn(x, idx, w, wi, wo, silu) * probe)

    # independent NumPy float64 loop over tokens
    x64, w64, wi64, wo64 = (np.asarray(a, np.float64) for a in (x, w, wi, wo))
    ref = np.zeros((N, D))
    for n in range(N):
        for j in range(K):
            e = int(idx[n, j])
            h = x64[n] @ wi64[e].reshape(D, 2 * F)
            g, u = h[:F], h[F:]
            ref[n] += w64[n, j] * ((g / (1 + np.exp(-g)) * u) @ wo64[e])
    out_r = moe_ragged(x, idx, w, wi, wo, silu)
    out_d = moe_dense(x, idx, w, wi, wo, silu)
    np.testing.assert_allclose(out_r, ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out_d, ref, rtol=RTOL, atol=ATOL)
    gr = jax.grad(loss(moe_ragged), argnums=(0, 1, 2, 3))(x, w, wi, wo)
    gd = jax.grad(loss(moe_dense), argnums=(0, 1, 2, 3))(x, w, wi, wo)
    for a, b, name in zip(gr, gd, ("x", "weights", "wi", "wo")):
        assert float(jnp.abs(b).max()) > 1e-3, name
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
    # empty experts get exactly zero weight gradient on both paths
    empty = np.array([0, 3, 5, 6])
    assert float(jnp.abs(gr[2][empty]).max()) == 0.0 and float(jnp.abs(gr[3][empty]).max()) == 0.0


def _moe_module(cfg, seed=0):
    model = MoE(cfg.model, nnx.Rngs(seed), stds=init_stds(cfg.model))
    graphdef, state = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(seed + 10)
    state = jax.tree.map(lambda v: jnp.asarray(0.3 * rng.standard_normal(v.shape), jnp.float32), state)
    return graphdef, state


def _layer_loss(graphdef, x, seg, probe, mesh=None):
    def f(state, x):
        out, stats = nnx.merge(graphdef, state)(x, {"segment_ids": seg}, mesh)
        return jnp.sum(out * probe), stats["load"]
    return f


@pytest.mark.parametrize("layout", [dict(expert=4, data=2), dict(expert=2, fsdp=2, tensor=2)], ids=["e4d2", "e2f2t2"])
def test_expert_parallel_equals_one_device(layout):
    """The all-to-all path on 8 fake devices == the single-device ragged path (values, gradients, load)."""
    cfg = moe_cfg(experts_per_token=3, num_shared_experts=1)
    for k, v in layout.items():
        cfg.mesh[k] = v
    cfg.mesh.data = layout.get("data", 1)
    validate(cfg, 8)
    rng = np.random.default_rng(7)
    B, T, D = 8, 6, cfg.model.hidden_size
    x = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    seg = jnp.asarray((rng.uniform(size=(B, T)) > 0.2).astype(np.int32))
    probe = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    graphdef, state = _moe_module(cfg)
    f1 = _layer_loss(graphdef, x, seg, probe)
    (v1, load1), g1 = jax.jit(jax.value_and_grad(f1, argnums=(0, 1), has_aux=True))(state, x)

    mesh = make_mesh(cfg, jax.devices()[:8])
    assert mesh.shape["expert"] == layout["expert"]
    fm = _layer_loss(graphdef, x, seg, probe, mesh)

    def run(state, x):
        with activation_mesh(mesh):
            return jax.value_and_grad(fm, argnums=(0, 1), has_aux=True)(state, x)

    xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp", "expert"))))
    (vm, loadm), gm = jax.jit(run)(state, xs)
    np.testing.assert_allclose(vm, v1, rtol=1e-5)
    np.testing.assert_array_equal(loadm, load1)
    assert int(np.asarray(load1).sum()) == 3 * int(np.asarray(seg).sum())
    for a, b in zip(jax.tree.leaves(gm), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_correction_bias_update_moves_towards_balance():
    load = jnp.asarray([[10.0, 2.0, 6.0, 6.0], [1.0, 1.0, 1.0, 5.0]])
    params = {"moe_layers": {"mlp": {"router": {"bias": jnp.zeros((2, 4)), "gate": jnp.ones((2, 3, 4))}}},
              "embed": jnp.ones(3)}
    new = update_correction_bias(params, load, 0.01)
    np.testing.assert_allclose(new["moe_layers"]["mlp"]["router"]["bias"],
                               [[-0.01, 0.01, 0.0, 0.0], [0.01, 0.01, 0.01, -0.01]])
    assert new["moe_layers"]["mlp"]["router"]["gate"] is params["moe_layers"]["mlp"]["router"]["gate"]


@pytest.mark.parametrize("overrides, devices, match", [
    ({"num_experts": 6}, 8, "not divisible by mesh.expert=4"),
    ({"experts_per_token": 9}, None, "larger than model.moe.num_experts=8"),
    ({"n_group": 3}, None, "does not divide model.moe.num_experts=8"),
    ({"topk_group": 3}, None, "larger than model.moe.n_group=2"),
    ({"n_group": 8, "topk_group": 1}, None, "leaves 1 expert per group"),
    ({"first_dense_layers": 3}, None, "at least one layer must be MoE"),
    ({"impl": "fast"}, None, "is not one of ragged, dense"),
])
def test_bad_moe_config_is_a_clear_error(overrides, devices, match):
    cfg = moe_cfg(**overrides)
    cfg.mesh.expert, cfg.mesh.data, cfg.batch_size = 4, 2, 8
    with pytest.raises(ConfigError, match=match):
        validate(cfg, devices)


def test_expert_axis_without_experts_is_an_error():
    cfg = base_config()
    cfg.mesh.expert, cfg.mesh.data, cfg.batch_size = 2, 4, 8
    with pytest.raises(ConfigError, match="no experts"):
        validate(cfg, 8)
