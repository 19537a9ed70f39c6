"""Sharded training: the same losses on 1 device and on 8 fake devices in several layouts;
gradient accumulation equals the full batch; the learning-rate schedule."""
from pathlib import Path

import jax
import numpy as np
import pytest

from glmjax.config import load_config, validate
from glmjax.sharding import batch_sharding, make_mesh
from glmjax.train.optimizer import learning_rate_schedule
from glmjax.train.state import init_state, model_spec
from glmjax.train.step import make_train_step
from helpers import random_glm_features

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")


def run_losses(cfg, devices, steps, seed=0):
    validate(cfg, len(devices))
    mesh = make_mesh(cfg, devices)
    spec = model_spec(cfg, mesh)
    state = init_state(cfg, spec)
    step_fn = make_train_step(cfg, spec, mesh)
    sh = batch_sharding(mesh)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        b = random_glm_features(rng, cfg.batch_size, cfg.seq_len, cfg.model.vocab_size)
        state, m = step_fn(state, {k: local_rows_to_global(v, sh) for k, v in b.items()})
        losses.append(float(m["loss"]))
    return np.array(losses), state


def local_rows_to_global(global_np, sharding):
    """Each process feeds only the rows its devices own (all rows with one process)."""
    idx = sharding.addressable_devices_indices_map(global_np.shape).values()
    lo, hi = min(i[0].start or 0 for i in idx), max(i[0].stop or global_np.shape[0] for i in idx)
    return jax.make_array_from_process_local_data(sharding, global_np[lo:hi], global_np.shape)


def tiny(*overrides):
    return load_config(TINY, ["--config.seq_len=32", "--config.batch_size=8", "--config.optimizer.warmup_steps=5",
                              "--config.model.num_kv_heads=2", *overrides])


@pytest.fixture(scope="module")
def single_device_losses():
    return run_losses(tiny("--config.mesh.data=1"), jax.devices()[:1], 20)[0]


@pytest.mark.parametrize("layout", [(8, 1, 1), (1, 8, 1), (2, 2, 2)], ids=["data8", "fsdp8", "d2f2t2"])
def test_sharded_losses_match_single_device(single_device_losses, layout):
    assert jax.device_count() == 8
    overrides = [f"--config.mesh.{name}={size}" for name, size in zip(("data", "fsdp", "tensor"), layout)]
    losses, _ = run_losses(tiny(*overrides), jax.devices(), 20)
    rel = np.abs(losses - single_device_losses) / np.abs(single_device_losses)
    assert rel.max() < 1e-4, (layout, rel)
    assert single_device_losses[-1] < single_device_losses[0]  # it is learning the random batches


def test_gradient_accumulation_equals_full_batch():
    full, s1 = run_losses(tiny("--config.mesh.data=1"), jax.devices()[:1], 4, seed=3)
    acc, s2 = run_losses(tiny("--config.mesh.data=1", "--config.optimizer.grad_accum_steps=4"),
                         jax.devices()[:1], 4, seed=3)
    np.testing.assert_allclose(acc, full, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)


def test_learning_rate_schedule_analytic():
    cfg = tiny("--config.steps=110", "--config.optimizer.warmup_steps=10", "--config.optimizer.lr=1.0",
               "--config.optimizer.min_lr_ratio=0.1")
    lr = learning_rate_schedule(cfg)
    assert float(lr(0)) == pytest.approx(0.1)
    assert float(lr(9)) == pytest.approx(1.0)
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)  # cosine midpoint
    assert float(lr(110)) == pytest.approx(0.1, rel=1e-5)
    cfg.optimizer.schedule = "linear"
    assert float(learning_rate_schedule(cfg)(60)) == pytest.approx(0.55, rel=1e-5)
