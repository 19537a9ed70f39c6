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
from glmjax.train.step import accumulated_grads, make_eval_step, make_train_step
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


# Accumulated vs full-batch gradients differ only in float32 summation order: over the n = B*T = 256
# token contributions each summation is exact to ~n*eps32 ~ 3e-5 of the sum of magnitudes; 1e-4 in
# norm per parameter leaf leaves room for cancellation. A real accumulation bug (a micro-batch counted
# twice, a per-micro-batch normaliser) moves the gradient by percents: test_accumulation_bugs_are_caught.
GRAD_TOL = 1e-4


def grad_setup(accum_cfg=None):
    cfg = tiny("--config.mesh.data=1", "--config.optimizer.grad_clip=0")
    validate(cfg, 1)
    mesh = make_mesh(cfg, jax.devices()[:1])
    spec = model_spec(cfg, mesh)
    batch = random_glm_features(np.random.default_rng(3), cfg.batch_size, cfg.seq_len, cfg.model.vocab_size)
    return cfg, mesh, spec, batch


_GRAD_FNS = {}


def mean_grads(spec, mesh, params, batch, accum):
    """Gradient of the global mean token loss (float64 copies) through the production accumulation."""
    key = (id(spec), accum)
    if key not in _GRAD_FNS:
        _GRAD_FNS[key] = (spec, jax.jit(lambda p, b: accumulated_grads(p, b, spec.graphdef, mesh, accum)))
    s, w, g = _GRAD_FNS[key][1](params, batch)
    return float(s) / float(w), [np.asarray(x, np.float64) / float(w) for x in jax.tree.leaves(g)]


def grad_mismatch(got, want):
    """Largest per-leaf ||got - want|| / ||want||."""
    return max(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30) for a, b in zip(got, want))


def test_accumulated_gradient_equals_full_batch_gradient():
    cfg, mesh, spec, batch = grad_setup()
    params = init_state(cfg, spec).params
    loss_full, g_full = mean_grads(spec, mesh, params, batch, 1)
    loss_acc, g_acc = mean_grads(spec, mesh, params, batch, 4)
    assert abs(loss_acc - loss_full) <= 1e-6 * loss_full
    assert grad_mismatch(g_acc, g_full) < GRAD_TOL, grad_mismatch(g_acc, g_full)
    assert min(np.linalg.norm(g) for g in g_full) > 0  # every leaf has a real gradient to compare


def test_accumulation_bugs_are_caught():
    """The comparison above fails for the classic accumulation bugs, by a wide margin."""
    cfg, mesh, spec, batch = grad_setup()
    params = init_state(cfg, spec).params
    _, g_full = mean_grads(spec, mesh, params, batch, 1)
    B, accum = cfg.batch_size, 4  # micro-batch m holds rows m, m + 4
    # (a) micro-batch 0 counted twice: a fifth micro-batch that repeats it (weights counted twice too)
    order = [0, 1, 2, 3, 0, 4, 5, 6, 7, 4]  # with accum=5, micro-batch m = rows m, m + 5 of this
    doubled = {k: v[order] for k, v in batch.items()}
    _, g_doubled = mean_grads(spec, mesh, params, doubled, 5)
    # (b) each micro-batch normalised by its own weight, then averaged
    per_micro = []
    for m in range(accum):
        _, g = mean_grads(spec, mesh, params, {k: v[m::accum] for k, v in batch.items()}, 1)
        per_micro.append(g)
    g_mean_of_means = [np.mean(parts, axis=0) for parts in zip(*per_micro)]
    assert B == 8
    for name, bad in (("counted twice", g_doubled), ("mean of micro-batch means", g_mean_of_means)):
        assert grad_mismatch(bad, g_full) > 100 * GRAD_TOL, (name, grad_mismatch(bad, g_full))


def test_accumulation_one_update_within_adams_step_bound():
    """One AdamW update from the same state with accum 1 and 4. Adam's first step moves each weight by
    lr * g/(|g| + eps) (+ decay, equal on both sides): a gradient difference dg changes it by at most
    lr * min(2, |dg|/eps), plus float32 rounding of the update (a few ulp)."""
    cfg, mesh, spec, batch = grad_setup()
    params0 = init_state(cfg, spec).params
    _, g1 = mean_grads(spec, mesh, params0, batch, 1)
    _, g4 = mean_grads(spec, mesh, params0, batch, 4)
    after = []
    for accum in (1, 4):
        c = cfg.copy_and_resolve_references()
        c.optimizer.grad_accum_steps = accum
        state = init_state(c, spec)
        step_fn = make_train_step(c, spec, mesh)
        state, m = step_fn(state, {k: jax.numpy.asarray(v) for k, v in batch.items()})
        after.append([np.asarray(x, np.float64) for x in jax.tree.leaves(state.params)])
    lr, eps = float(m["learning_rate"]), float(cfg.optimizer.eps)
    moved = False
    for p1, p4, a, b, p0 in zip(*after, g1, g4, jax.tree.leaves(params0)):
        bound = lr * (np.minimum(2.0, np.abs(a - b) / eps) + 1e-6) + 4 * np.spacing(np.abs(np.asarray(p0, np.float32)))
        assert np.all(np.abs(p1 - p4) <= bound)
        moved |= bool(np.any(np.abs(p1 - np.asarray(p0)) > 0.5 * lr))
    assert moved  # the update really happened


def test_accumulated_training_losses_match():
    full, _ = run_losses(tiny("--config.mesh.data=1"), jax.devices()[:1], 4, seed=3)
    acc, _ = run_losses(tiny("--config.mesh.data=1", "--config.optimizer.grad_accum_steps=4"),
                        jax.devices()[:1], 4, seed=3)
    np.testing.assert_allclose(acc, full, rtol=1e-5)  # mean losses: insensitive to single weights


def test_eval_step_over_micro_batches_equals_the_whole_batch():
    """With optimizer.grad_accum_steps the eval step runs the same micro-batches as training (so it needs
    no more memory than a train step): its sums equal the one-shot evaluation on 2 devices x 4 micro-
    batches (loss: float32 sums over 256 tokens regrouped, ~n*eps32 = 2e-5 relative at worst)."""
    sums = {}
    for accum in (1, 4):
        cfg = tiny("--config.mesh.data=2", f"--config.optimizer.grad_accum_steps={accum}")
        validate(cfg, 2)
        mesh = make_mesh(cfg, jax.devices()[:2])
        spec = model_spec(cfg, mesh)
        params = init_state(cfg, spec).params  # the same seed: the same model for both
        batch = random_glm_features(np.random.default_rng(5), cfg.batch_size, cfg.seq_len, cfg.model.vocab_size)
        sh = batch_sharding(mesh)
        sums[accum] = [float(x) for x in make_eval_step(cfg, spec, mesh)(
            params, {k: local_rows_to_global(v, sh) for k, v in batch.items()})]
        assert sums[accum][1] == float(batch["loss_weights"].sum()) > 0
    assert sums[4][0] == pytest.approx(sums[1][0], rel=2e-5)
    assert sums[1][0] / sums[1][1] > 1.0  # a real loss, not a zero sum


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
