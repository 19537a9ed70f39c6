"""WSD schedule (analytic values) and the IsoFLOP planner (FLOPs within 1%, shape rule, clear errors)."""
import math
from pathlib import Path

import pytest

from glmjax.config import ConfigError, load_config
from glmjax.scaling.flops import flops_per_token
from glmjax.scaling.plan import config_from_dict, load_sweep, plan_sweep, write_plan
from glmjax.train.optimizer import cooldown_start, learning_rate_schedule

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_schedule_analytic(shape):
    cfg = load_config(str(ROOT / "configs" / "tiny.py"),
                      ["--config.steps=100", "--config.optimizer.warmup_steps=10", "--config.optimizer.lr=2.0",
                       "--config.optimizer.schedule=wsd", "--config.optimizer.min_lr_ratio=0.1",
                       "--config.optimizer.cooldown_fraction=0.3", f"--config.optimizer.cooldown_shape={shape}"])
    lr = learning_rate_schedule(cfg)
    assert cooldown_start(cfg) == 70
    for step in range(0, 101):
        if step < 10:
            want = 2.0 * (step + 1) / 10
        elif step < 70:
            want = 2.0
        else:
            x = (step - 70) / 30
            s = x if shape == "linear" else 1 - math.sqrt(1 - x)
            want = 2.0 + (0.2 - 2.0) * s
        assert float(lr(step)) == pytest.approx(want, rel=1e-6, abs=1e-7), step
    const = load_config(str(ROOT / "configs" / "tiny.py"),
                        ["--config.steps=70", "--config.optimizer.warmup_steps=10", "--config.optimizer.lr=2.0",
                         "--config.optimizer.schedule=constant"])
    for step in range(70):  # a wsd run equals the constant run before its cooldown, bitwise
        assert float(learning_rate_schedule(const)(step)) == float(lr(step))


def test_cpu_plan_flops_within_one_percent(tmp_path):
    sweep = load_sweep(str(ROOT / "configs" / "sweeps" / "cpu.py"))
    plan = plan_sweep(sweep)
    runs = plan["runs"]
    assert len(runs) == 12 and len({r["budget"] for r in runs}) == 3
    for r in runs:
        assert abs(r["flops"] / r["budget"] - 1) <= 0.01
        m = config_from_dict(next(j for j in plan["jobs"] if j["run"] == r["run"])["config"]).model
        assert m.hidden_size % 16 == 0 and m.num_layers == max(1, round(m.hidden_size / 32))
        assert r["flops"] == pytest.approx(r["tokens"] * flops_per_token(m, 128).train, rel=1e-12)
    write_plan(plan, str(tmp_path))
    assert (tmp_path / "plan.csv").read_text().count("\n") == 13
    assert len(list((tmp_path / "configs").glob("*.py"))) == len(plan["jobs"])


def test_budget_too_small_is_a_clear_error():
    sweep = load_sweep(str(ROOT / "configs" / "sweeps" / "cpu.py"), ["--config.budgets=(1e8,)"])
    with pytest.raises(ConfigError, match="too small for shape"):
        plan_sweep(sweep)
