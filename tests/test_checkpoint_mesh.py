"""The tiny GLM saved on ``data=8`` restores onto ``fsdp=4, tensor=2`` and onto 1 device (8 fake devices):
equal parameters and optimizer state, and the next training step gives the same loss (relative 1e-5)."""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from glmjax.checkpoint import Checkpointer
from glmjax.config import load_config, validate
from glmjax.sharding import batch_sharding, make_mesh
from glmjax.train.state import init_state, model_spec
from glmjax.train.step import make_train_step
from helpers import random_glm_features

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")


def tiny(data=1, fsdp=1, tensor=1):
    return load_config(TINY, ["--config.seq_len=32", "--config.batch_size=8", "--config.optimizer.warmup_steps=2",
                              f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}",
                              f"--config.mesh.tensor={tensor}", "--config.checkpoint.every=2"])


def setup(cfg, devices):
    validate(cfg, len(devices))
    mesh = make_mesh(cfg, devices)
    spec = model_spec(cfg, mesh)
    return mesh, spec, make_train_step(cfg, spec, mesh)


def global_batch(cfg, mesh, seed):
    b = random_glm_features(np.random.default_rng(seed), cfg.batch_size, cfg.seq_len, cfg.model.vocab_size)
    return {k: jax.device_put(v, batch_sharding(mesh)) for k, v in b.items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two steps on data=8, saved; plus the loss of the third step on that layout."""
    workdir = tmp_path_factory.mktemp("mesh")
    cfg = tiny(data=8)
    mesh, spec, step_fn = setup(cfg, jax.devices())
    state = init_state(cfg, spec)
    ckpt = Checkpointer(str(workdir), cfg)
    for s in (1, 2):
        state, _ = step_fn(state, global_batch(cfg, mesh, s))
    ckpt.save(2, state, {"position": 2})
    ckpt.close()
    host = jax.device_get(state)
    _, m = step_fn(state, global_batch(cfg, mesh, 3))
    return workdir, host, float(m["loss"])


@pytest.mark.parametrize("layout,n", [((1, 4, 2), 8), ((1, 1, 1), 1)], ids=["fsdp4_tensor2", "one_device"])
def test_restore_into_another_mesh(saved, layout, n):
    workdir, want_state, want_loss = saved
    cfg = tiny(*layout)
    mesh, spec, step_fn = setup(cfg, jax.devices()[:n])
    ckpt = Checkpointer(str(workdir), cfg)
    state, data_state, step = ckpt.restore(spec.abstract_state)
    ckpt.close()
    assert step == 2 and data_state == {"position": 2}
    for got, want, target in zip(jax.tree.leaves(state), jax.tree.leaves(want_state),
                                 jax.tree.leaves(spec.abstract_state)):
        assert got.sharding == target.sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    if layout == (1, 4, 2):  # really split: some parameter is sharded over both axes' devices
        assert any(len({d.id for d in x.sharding.device_set}) == 8 and not x.sharding.is_fully_replicated
                   for x in jax.tree.leaves(state.params))
    _, m = step_fn(state, global_batch(cfg, mesh, 3))
    np.testing.assert_allclose(float(m["loss"]), want_loss, rtol=1e-5)
