"""A cooldown fork of a constant-LR run (checkpoint.init_from) equals a straight wsd run, bitwise on CPU.

Three runs of a tiny causal model through :func:`glmjax.train.loop.train` with the real data pipeline:
a straight wsd run of 12 steps (cooldown over the last 6), a constant run of 6 steps, and a wsd run of
12 steps forked from step 6 of the constant run. The fork's learning rates are the closed form; its
losses, eval loss and final parameters equal the straight run's bit for bit.
"""
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from glmjax.config import load_config
from glmjax.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
STEPS, FORK, PEAK, WARMUP = 12, 6, 1e-2, 2


def config(schedule, steps, **ckpt):
    cfg = load_config(str(ROOT / "configs" / "tiny.py"), [
        f"--config.steps={steps}", "--config.batch_size=8", "--config.seq_len=32", "--config.log_every=1",
        f"--config.eval_every={STEPS if schedule == 'wsd' else 0}", "--config.eval_steps=2",
        "--config.model.num_layers=1", "--config.model.hidden_size=32", "--config.model.num_heads=2",
        "--config.model.num_kv_heads=2", "--config.model.head_dim=16", "--config.model.mlp_dim=64",
        "--config.model.vocab_size=512", "--config.model.norm=rmsnorm_pre", "--config.model.mlp=swiglu",
        "--config.model.rope_2d=false", "--config.objective.causal=1.0", "--config.objective.mask=0.0",
        "--config.objective.gmask=0.0", f"--config.optimizer.lr={PEAK}", f"--config.optimizer.warmup_steps={WARMUP}",
        f"--config.optimizer.schedule={schedule}", "--config.optimizer.cooldown_fraction=0.5",
        "--config.optimizer.cooldown_shape=1-sqrt", "--config.optimizer.min_lr_ratio=0.0",
        "--config.checkpoint.every=3", "--config.checkpoint.keep=5"])
    for k, v in ckpt.items():
        cfg.checkpoint[k] = v
    return cfg


def metrics(workdir):
    return {r["step"]: r for r in map(json.loads, (Path(workdir) / "metrics.jsonl").read_text().splitlines())}


def closed_form_lr(update):
    """The wsd learning rate of update ``update`` (0-based) of the 12-step run."""
    if update < WARMUP:
        return PEAK * (update + 1) / WARMUP
    if update < FORK:
        return PEAK
    x = (update - FORK) / (STEPS - FORK)
    return PEAK + (0.0 - PEAK) * (1 - math.sqrt(1 - x))


def test_cooldown_fork_equals_straight_wsd_run_bitwise(tmp_path):
    straight = train(config("wsd", STEPS), str(tmp_path / "straight"))
    main = train(config("constant", FORK), str(tmp_path / "main"))
    assert main["step"] == FORK
    fork_cfg = config("wsd", STEPS, init_from=str(tmp_path / "main"), init_step=FORK)
    fork = train(fork_cfg, str(tmp_path / "fork"))
    assert fork["step"] == STEPS
    assert (tmp_path / "fork" / "checkpoints" / str(FORK)).is_dir()  # the copied starting point

    s, m, f = metrics(tmp_path / "straight"), metrics(tmp_path / "main"), metrics(tmp_path / "fork")
    assert sorted(f) == list(range(FORK + 1, STEPS + 1))  # the fork logs its own steps only
    for step in range(1, FORK + 1):  # constant == wsd before the cooldown, bitwise
        assert m[step]["learning_rate"] == s[step]["learning_rate"] == pytest.approx(closed_form_lr(step - 1),
                                                                                     rel=1e-6)
        assert m[step]["loss"] == s[step]["loss"], step
    for step in range(FORK + 1, STEPS + 1):  # the logged rate at step s is the one update s used
        assert f[step]["learning_rate"] == pytest.approx(closed_form_lr(step - 1), rel=1e-6, abs=1e-9), step
        assert f[step]["learning_rate"] == s[step]["learning_rate"]
        assert f[step]["loss"] == s[step]["loss"], (step, f[step]["loss"], s[step]["loss"])
    assert f[STEPS]["learning_rate"] < s[FORK]["learning_rate"]  # it did cool down
    assert f[STEPS]["eval_loss"] == s[STEPS]["eval_loss"]
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(fork["state"].params)),
                    jax.tree_util.tree_leaves(jax.device_get(straight["state"].params))):
        np.testing.assert_array_equal(a, b)
    again = train(fork_cfg, str(tmp_path / "fork"))  # rerun: its own checkpoints win over init_from
    assert again.get("already_done") and again["step"] == STEPS
