"""Training the tiny MoE: sharded layouts with expert parallelism equal one device; the aux-loss-free
correction bias moves; the balance loss; preset sizes."""
from pathlib import Path

import jax
import numpy as np
import pytest

from glmjax.config import load_config, validate
from glmjax.scaling.flops import active_params, flops_per_token, param_count
from glmjax.sharding import batch_sharding, make_mesh
from glmjax.train.state import TrainState, init_state, model_spec
from glmjax.train.step import make_train_step
from helpers import random_glm_features

ROOT = Path(__file__).resolve().parents[1]
TINY_MOE = str(ROOT / "configs" / "tiny_moe.py")


def tiny_moe(*overrides):
    return load_config(TINY_MOE, ["--config.seq_len=16", "--config.batch_size=8", "--config.model.num_layers=3",
                                  "--config.model.vocab_size=256", "--config.optimizer.warmup_steps=2",
                                  "--config.model.moe.bias_update_rate=1e-2", "--config.optimizer.schedule=constant",
                                  *overrides])


def bias_of(state):
    return np.asarray(state.params["moe_layers"]["mlp"]["router"]["bias"])


def to_global(batch, sharding):
    def one(x):
        idx = sharding.addressable_devices_indices_map(x.shape).values()
        lo, hi = min(i[0].start or 0 for i in idx), max(i[0].stop or x.shape[0] for i in idx)
        return jax.make_array_from_process_local_data(sharding, x[lo:hi], x.shape)
    return {k: one(v) for k, v in batch.items()}


def setup(cfg, devices, params=None):
    """(spec, state, train step, batch sharding) on ``devices``; ``params`` (host arrays) replace the
    initial parameters, so every layout starts from bitwise the same model without another init compile."""
    validate(cfg, len(devices))
    mesh = make_mesh(cfg, devices)
    spec = model_spec(cfg, mesh)
    if params is None:
        state = init_state(cfg, spec)
    else:
        placed = jax.device_put(params, spec.shardings.params)
        state = TrainState(step=jax.device_put(np.int32(0), spec.shardings.step), params=placed,
                           opt_state=jax.jit(spec.tx.init, out_shardings=spec.shardings.opt_state)(placed))
    return spec, state, make_train_step(cfg, spec, mesh), batch_sharding(mesh), mesh


def train_from(state, step_fn, sh, batches, steps, on_step=None):
    """``steps`` train steps; ``on_step(step, state, batches)`` after each (may save a checkpoint)."""
    history = []
    for _ in range(steps):
        state, m = step_fn(state, to_global(next(batches), sh))
        history.append({**{k: float(v) for k, v in jax.device_get(m).items()}, "bias": bias_of(state)})
        if on_step is not None:
            on_step(len(history), state, batches)
    return history


# Adam's eps: with eps -> 0 an element whose gradient is at float32 noise level (|g| ~ 1e-6 max|g|, where
# the layouts' summation orders differ in sign) still moves by +-lr, so the layouts' parameters differ by
# ~lr after one step; a near-tie in some token's top-k then flips (measured with eps=1e-8: equal to 2e-5
# for 6 steps, then one token changes expert, the load and the correction bias differ and the losses
# drift to 1.3e-4). With eps=1e-4 the update is Lipschitz in the gradient, |d update| <= lr |d g| / eps,
# so parameter differences stay ~lr * 1e-2 * (float32 noise) and no top-k decision is near enough to flip.
PARALLEL = ("--config.optimizer.eps=1e-4",)
GRAD_RTOL = 1e-5  # of each leaf's max |g|: float32 sums over B*T*D = 16384 terms reassociated across
# devices, error ~ sqrt(16384) * 2^-24 = 8e-6 relative (measured <= 2e-6)


def first_grads(cfg, spec, state, mesh, sh, aux_loss_weight=0.0):
    """(CE loss sum, grads, routing stats) of the first batch at ``state``'s parameters."""
    from glmjax.sharding import activation_mesh
    from glmjax.train import moe_step

    def f(params, batch):
        with activation_mesh(mesh):
            s, _, g, stats = moe_step.accumulated_grads(params, batch, spec.graphdef, mesh, 1, aux_loss_weight)
        return s, g, stats

    return jax.device_get(jax.jit(f)(state.params, to_global(next(Batches(cfg, 0)), sh)))


@pytest.fixture(scope="module")
def one_device():
    cfg = tiny_moe("--config.mesh.data=1", *PARALLEL)
    spec, state, step_fn, sh, mesh = setup(cfg, jax.devices()[:1])
    params = jax.device_get(state.params)
    grads = first_grads(cfg, spec, state, mesh, sh)
    return train_from(state, step_fn, sh, Batches(cfg), 10), grads, params, (cfg, spec, mesh, sh)


@pytest.mark.parametrize("layout", [dict(expert=4, data=2), dict(expert=2, fsdp=2, tensor=2)],
                         ids=["e4d2", "e2f2t2"])
def test_expert_parallel_training_equals_one_device(one_device, layout):
    """8 fake devices == 1 device from the same initial model: the same routing at every step (bitwise
    loads at the start, bitwise bias and imbalance every step), the first step's gradients within float32
    summation error, the losses of 10 steps within rtol 1e-4."""
    ref, (ref_s, ref_g, ref_stats), params, _ = one_device
    cfg = tiny_moe(*[f"--config.mesh.{k}={v}" for k, v in {"data": 1, **layout}.items()], *PARALLEL)
    spec, state, step_fn, sh, mesh = setup(cfg, jax.devices()[:8], params)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1, **layout}
    # ZeRO-3 over fsdp x expert: the expert axis shards the non-expert weights too (no copy per expert device)
    V, D = cfg.model.vocab_size, cfg.model.hidden_size
    shard = state.params["embed"].addressable_shards[0].data.shape
    assert shard == (V // mesh.shape["tensor"], D // (mesh.shape["fsdp"] * mesh.shape["expert"])), shard
    s, g, stats = first_grads(cfg, spec, state, mesh, sh)
    np.testing.assert_array_equal(stats["load"], ref_stats["load"])  # identical routing decisions
    valid = int((next(Batches(cfg, 0))["segment_ids"] != 0).sum())  # every real token makes k assignments
    np.testing.assert_array_equal(np.asarray(ref_stats["load"]).sum(-1), cfg.model.moe.experts_per_token * valid)
    np.testing.assert_allclose(s, ref_s, rtol=GRAD_RTOL)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g)[0], jax.tree.leaves(ref_g)):
        scale = float(np.abs(b).max())
        if scale == 0.0:  # the router correction bias: no gradient on any layout
            assert float(np.abs(a).max()) == 0.0, jax.tree_util.keystr(path)
            continue
        np.testing.assert_allclose(a, b, rtol=0, atol=GRAD_RTOL * scale, err_msg=jax.tree_util.keystr(path))

    hist = train_from(state, step_fn, sh, Batches(cfg), 10)
    for step, (h, r) in enumerate(zip(hist, ref)):  # routing: same loads -> bitwise the same bias updates
        np.testing.assert_array_equal(h["bias"], r["bias"], err_msg=f"step {step}")
        assert h["moe_imbalance"] == r["moe_imbalance"], step
    assert np.abs(ref[-1]["bias"]).max() > 0  # the bias moved
    np.testing.assert_allclose([h["loss"] for h in hist], [r["loss"] for r in ref], rtol=1e-4)


class Batches:
    """A resumable iterator of random batches: batch i depends only on (seed, i)."""

    def __init__(self, cfg, seed=0):  # noqa: D107
        self.cfg, self.seed, self.i = cfg, seed, 0

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.i])
        self.i += 1
        return random_glm_features(rng, self.cfg.batch_size, self.cfg.seq_len, self.cfg.model.vocab_size)

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = int(state["i"])


def test_aux_loss_enters_the_gradient_only_when_weighted(one_device):
    """model.moe.aux_loss_weight adds the balance loss to the gradient, not to the logged cross-entropy."""
    _, (ref_s, ref_g, ref_stats), params, (cfg, spec, mesh, sh) = one_device
    state = setup(cfg, jax.devices()[:1], params)[1]
    s, g, stats = first_grads(cfg, spec, state, mesh, sh, aux_loss_weight=0.1)
    # the same model: the reported loss is the cross-entropy only (with the balance loss it would be ~3%
    # larger: 0.1 * ~1 per target token); float32 tolerance, the two steps compile separately
    np.testing.assert_allclose(s, ref_s, rtol=1e-6)
    np.testing.assert_allclose(stats["aux_loss"], ref_stats["aux_loss"], rtol=1e-6)
    assert np.all((0.5 < stats["aux_loss"]) & (stats["aux_loss"] < 4.0))  # sum_i f_i P_i is ~1 when balanced
    gate, ref_gate = (x["moe_layers"]["mlp"]["router"]["gate"] for x in (g, ref_g))
    assert np.abs(gate - ref_gate).max() > 1e-3 * np.abs(ref_gate).max()  # the router feels the balance loss


@pytest.mark.parametrize("path, total, active", [("glm45_air.py", 106e9, 12e9), ("glm45.py", 355e9, 32e9)])
def test_preset_parameter_counts_match_the_published(path, total, active):
    """Published totals count every weight of the model (not the multi-token-prediction layer); the
    published active counts are the transformer-block weights one token touches (embedding and output
    head excluded)."""
    m = load_config(str(ROOT / "configs" / path)).model
    n_total, _ = param_count(m)
    block_active = active_params(m) - m.hidden_size * m.vocab_size - m.hidden_size  # minus head, final norm
    assert abs(n_total / total - 1) < 0.02, n_total
    assert abs(block_active / active - 1) < 0.02, block_active
    fpt = flops_per_token(m, 4096)
    assert fpt.active_non_embedding_params == active_params(m) < fpt.non_embedding_params / 5
    assert fpt.six_n == 6 * active_params(m)


BALANCE = ("--config.mesh.data=1", "--config.model.num_layers=2", "--config.seq_len=32", "--config.batch_size=16",
           "--config.optimizer.lr=1e-3", "--config.checkpoint.async_save=false")


class SkewedPermutation(Batches):
    """A learnable task whose token mix loads some experts more: inputs drawn from Zipf(0.7) over the
    vocabulary (the most frequent token is 6.8% of all), target = a fixed permutation of the input token.
    The model must keep token identity in its hidden states, so tokens stay distinguishable to the router
    and a bias can move some of them. (On uniformly random targets the model learns only the unigram, its
    hidden states become the same for every token and every token picks the same experts whatever the
    bias: there the bias cannot balance identical tokens, it only slows the collapse.)"""

    def __next__(self):
        b = super().__next__()
        V = self.cfg.model.vocab_size
        rng = np.random.default_rng([self.seed, self.i, 7])
        p = 1.0 / np.arange(1, V) ** 0.7
        tokens = rng.choice(np.arange(1, V), size=b["tokens"].shape, p=p / p.sum()).astype(np.int32)
        used = b["segment_ids"] != 0
        b["tokens"] = np.where(used, tokens, 0)
        b["targets"] = np.where(used, (tokens * 7 + 3) % (V - 1) + 1, 0).astype(np.int32)
        return b


def test_bias_updates_balance_the_experts_and_the_bias_resumes_exactly_from_a_checkpoint(tmp_path):
    """200 steps of the tiny MoE (1 dense + 1 MoE layer, 8 experts, top 2 of 1 of 2 groups) on batches of
    512 tokens of :class:`SkewedPermutation`, from the same initial model, with and without the correction
    bias (``bias_update_rate=1e-2`` / 0). With it the imbalance (max load / mean load) falls from the
    first 10 steps to the last 50 and ends below the run without it (measured, seeds 0 / 1: 1.66 -> 1.26 vs
    1.46, and 1.77 -> 1.22 vs 1.57; both runs learn the task, loss 5.56 -> 0.006). The run is checkpointed
    at step 100 and resumed: the restored bias and the next 20 steps are bitwise the uninterrupted run's."""
    from glmjax.checkpoint import Checkpointer

    cfg = tiny_moe(*BALANCE, "--config.model.moe.bias_update_rate=1e-2")
    spec, state, step_fn, sh, _ = setup(cfg, jax.devices()[:1])
    params = jax.device_get(state.params)
    ckpt = Checkpointer(str(tmp_path), cfg)

    def save_at_100(step, state, batches):
        if step == 100:
            ckpt.save(step, state, batches.get_state(), force=True)

    on = train_from(state, step_fn, sh, SkewedPermutation(cfg), 200, on_step=save_at_100)
    off_cfg = tiny_moe(*BALANCE, "--config.model.moe.bias_update_rate=0")
    _, off_state, off_step, off_sh, _ = setup(off_cfg, jax.devices()[:1], params)
    off = train_from(off_state, off_step, off_sh, SkewedPermutation(off_cfg), 200)
    imb_off, imb_on = (np.array([h["moe_imbalance"] for h in hist]) for hist in (off, on))
    early_on, late_off, late_on = imb_on[:10].mean(), imb_off[-50:].mean(), imb_on[-50:].mean()
    print(f"imbalance, first 10 steps / last 50: no bias updates {imb_off[:10].mean():.2f} / {late_off:.2f}, "
          f"bias updates {early_on:.2f} / {late_on:.2f}")
    assert np.all(off[-1]["bias"] == 0) and np.abs(on[-1]["bias"]).max() > 0.02
    assert on[-1]["loss"] < 0.1 * on[0]["loss"] and off[-1]["loss"] < 0.1 * off[0]["loss"]  # the task is learnt
    assert late_on < 0.85 * early_on  # falls: measured 0.76 / 0.69 of the start (seeds 0 / 1)
    assert late_on < 0.93 * late_off  # and ends lower than without the bias: measured 0.86 / 0.78

    restored, data_state, step = ckpt.restore(spec.abstract_state)
    ckpt.close()
    assert step == 100
    np.testing.assert_array_equal(bias_of(restored), on[99]["bias"])
    batches = SkewedPermutation(cfg)
    batches.set_state(data_state)
    resumed = train_from(restored, step_fn, sh, batches, 20)
    for h, r in zip(resumed, on[100:120]):
        np.testing.assert_array_equal(h["bias"], r["bias"])
        assert h["loss"] == r["loss"] and h["moe_imbalance"] == r["moe_imbalance"]
