"""The model through ``model.attention_impl=pallas`` (TPU kernel, interpret mode on CPU) matches ``xla``:
one training step of the tiny config, on one device and on a (data, fsdp, tensor) = (2, 2, 2) mesh
where the kernel runs under ``shard_map``. Compared: the step's loss and gradient norm, and every
parameter gradient; tolerance relative 1e-5 (float32 model; gradients relative to each tensor's max)."""
from pathlib import Path

import jax
import numpy as np
import pytest

from glmjax.config import load_config, validate
from glmjax.sharding import activation_mesh, batch_sharding, make_mesh
from glmjax.train.state import init_state, model_spec
from glmjax.train.step import loss_sums, make_train_step
from helpers import random_glm_features

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")


def one_step(impl, layout):
    cfg = load_config(TINY, ["--config.seq_len=80", "--config.batch_size=4", "--config.model.num_layers=1",
                             "--config.model.num_kv_heads=2", f"--config.model.attention_impl={impl}",
                             *[f"--config.mesh.{n}={s}" for n, s in zip(("data", "fsdp", "tensor"), layout)]])
    devices = jax.devices()[:int(np.prod(layout))]
    validate(cfg, len(devices))
    mesh = make_mesh(cfg, devices)
    spec = model_spec(cfg, mesh)
    state = init_state(cfg, spec)
    batch = random_glm_features(np.random.default_rng(0), cfg.batch_size, cfg.seq_len, cfg.model.vocab_size)
    batch = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in batch.items()}

    @jax.jit
    def grads_of(params, batch):
        with activation_mesh(mesh):
            return jax.grad(lambda p: loss_sums(p, batch, spec.graphdef, mesh)[0])(params)

    grads = [np.asarray(g) for g in jax.tree.leaves(grads_of(state.params, batch))]
    _, metrics = make_train_step(cfg, spec, mesh)(state, batch)
    return float(metrics["loss"]), float(metrics["grad_norm"]), grads


@pytest.mark.parametrize("layout", [(1, 1, 1), (2, 2, 2)], ids=["1dev", "d2f2t2"])
def test_pallas_train_step_matches_xla(layout):
    loss_x, norm_x, grads_x = one_step("xla", layout)
    loss_p, norm_p, grads_p = one_step("pallas", layout)
    assert abs(loss_p - loss_x) <= 1e-5 * abs(loss_x)
    assert abs(norm_p - norm_x) <= 1e-5 * abs(norm_x)
    assert len(grads_p) == len(grads_x)
    for a, b in zip(grads_p, grads_x):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(np.abs(b).max(), 1e-12))
