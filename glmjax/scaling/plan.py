"""Planning an IsoFLOP sweep: model shapes from N, tokens from the budget, steps, batch, LR, forks.

A sweep config (``configs/sweeps/*.py``, ``get_config()``) holds ``base`` (a full run config, see
:func:`glmjax.config.base_config`), ``budgets`` (training FLOPs), ``sizes_per_budget``, the shape rule
(``shape.*``), the LR rule (``lr.*``), ``tokens_per_param`` (the guess that centres each budget's sizes),
``size_step`` and ``mode``. The rules, written down once here and in docs/scaling.md:

* **Sizes.** The ladder is every shape-rule model (widths ``head_dim, 2 head_dim, ...``) sorted by N.
  Budget C takes ``sizes_per_budget`` consecutive ladder shapes centred on the one nearest
  ``N0 = sqrt(C / (6 * tokens_per_param))`` (Chinchilla's guess); neighbouring budgets share shapes, so
  in ``forks`` mode one run serves several budgets.
* **Shape rule** (width, depth, heads from N): width ``d`` is a multiple of ``shape.head_dim``, depth
  ``L = max(1, round(d / shape.aspect))``, ``heads = d / head_dim`` (``kv_heads`` = heads),
  ``mlp_dim = round(shape.mlp_ratio * d / shape.multiple_of) * multiple_of``; the ``d`` whose exact
  parameter count is nearest the target (in log) is taken. N = the parameters that cost FLOPs:
  everything but the input embedding table (:func:`glmjax.scaling.flops.param_count`).
* **Tokens.** ``D = C / train_flops_per_token`` (:func:`glmjax.scaling.flops.flops_per_token`, the count
  MFU and the fit use), ``steps = round(D / (batch_size * seq_len))``; the run's FLOPs
  ``steps * batch * seq_len * flops_per_token`` must lie within 1% of C, else the plan is refused.
* **Batch size** is the base config's (constant: a run forked at several budgets has one batch size).
* **Learning rate** ``lr = lr.base * (N / lr.base_params) ** -lr.exponent``, at most ``lr.max``.
* **Warmup** ``min(warmup_max_steps, round(warmup_fraction * steps))`` of the smallest run of the shape.
* **Mode** ``forks``: per shape one constant-LR main run; budget j forks it at step
  ``steps_j - round(cooldown_fraction * steps_j)`` and cools down to ``steps_j`` (wsd), which equals a
  straight wsd run of ``steps_j`` steps. ``independent``: every row is its own wsd run from scratch.
"""
from __future__ import annotations

import copy
import json
import math
import os

import ml_collections

from glmjax.config import ConfigError, load_config, validate
from glmjax.checkpoint import config_to_dict
from glmjax.scaling.flops import flops_per_token, param_count

PLAN_COLUMNS = ("run", "budget", "flops", "params", "tokens", "tokens_per_param", "steps", "fork_step",
                "num_layers", "hidden_size", "num_heads", "mlp_dim", "batch_size", "lr", "warmup_steps",
                "flops_error")
MAX_FLOPS_ERROR = 0.01


def load_sweep(path: str, overrides=()) -> ml_collections.ConfigDict:
    """Load a sweep config file (``get_config()`` returning a sweep ConfigDict) with overrides."""
    sweep = load_config(path, overrides)
    for key in ("base", "budgets", "sizes_per_budget", "shape", "lr", "mode"):
        if key not in sweep:
            raise ConfigError(f"{path} is not a sweep config: it has no {key!r}; see configs/sweeps/cpu.py for "
                              f"the keys a sweep config needs")
    return sweep


def shape_for(sweep, d: int) -> ml_collections.ConfigDict:
    """The model config of width ``d`` under the sweep's shape rule."""
    s = sweep.shape
    m = copy.deepcopy(sweep.base.model)
    m.hidden_size = int(d)
    m.num_layers = max(1, int(round(d / s.aspect)))
    m.head_dim = int(s.head_dim)
    m.num_heads = m.num_kv_heads = int(d // s.head_dim)
    m.mlp_dim = max(int(s.multiple_of), int(round(s.mlp_ratio * d / s.multiple_of)) * int(s.multiple_of))
    return m


def params_of(m) -> int:
    """N of the fits: every parameter except the input embedding table (those that cost FLOPs)."""
    return param_count(m)[1]


def nearest_shape(sweep, target: float):
    """The shape-rule model whose N is nearest ``target`` (log distance)."""
    hd = int(sweep.shape.head_dim)
    best = None
    for k in range(1, int(sweep.shape.max_width) // hd + 1):
        m = shape_for(sweep, k * hd)
        err = abs(math.log(params_of(m) / target))
        if best is None or err < best[0]:
            best = (err, m)
    return best[1]


def learning_rate(sweep, n: float) -> float:
    r = sweep.lr
    return float(min(r.max, r.base * (n / r.base_params) ** (-r.exponent)))


def ladder(sweep) -> list:
    """Every shape-rule model (widths ``head_dim, 2*head_dim, ... max_width``), sorted by N."""
    hd = int(sweep.shape.head_dim)
    return sorted((shape_for(sweep, k * hd) for k in range(1, int(sweep.shape.max_width) // hd + 1)), key=params_of)


def _budget_shapes(sweep, budget: float) -> list:
    """``sizes_per_budget`` consecutive ladder shapes centred on the one nearest sqrt(C / (6 * tokens_per_param))."""
    shapes, k = ladder(sweep), int(sweep.sizes_per_budget)
    centre = math.sqrt(budget / (6.0 * float(sweep.tokens_per_param)))
    i = min(range(len(shapes)), key=lambda j: abs(math.log(params_of(shapes[j]) / centre)))
    lo = max(0, min(len(shapes) - k, i - (k - 1) // 2))
    return shapes[lo:lo + k]


def plan_sweep(sweep) -> dict:
    """The plan: a dict with ``runs`` (rows of the IsoFLOP grid) and ``jobs`` (training processes)."""
    base = sweep.base
    if sweep.mode not in ("forks", "independent"):
        raise ConfigError(f"mode={sweep.mode!r} is not one of forks, independent: pick one in the sweep config")
    budgets = [float(c) for c in sweep.budgets]
    if not budgets or any(not c > 0 for c in budgets):
        raise ConfigError(f"budgets={tuple(sweep.budgets)} must be positive FLOP counts, e.g. (1e12, 3e12)")
    if int(sweep.sizes_per_budget) < 3:
        raise ConfigError(f"sizes_per_budget={sweep.sizes_per_budget}: a parabola per budget needs >= 3 sizes")
    tokens_per_step = int(base.batch_size) * int(base.seq_len)
    min_steps = int(sweep.min_steps)
    shapes, runs = {}, []
    for budget in sorted(budgets):
        for m in _budget_shapes(sweep, budget):
            key = f"d{m.hidden_size}"
            shapes.setdefault(key, m)
            fpt = flops_per_token(m, int(base.seq_len)).train
            steps = int(round(budget / fpt / tokens_per_step))
            if steps < min_steps:
                raise ConfigError(
                    f"budget {budget:.3g} FLOPs is too small for shape {key} (N={params_of(m):,}): it buys "
                    f"{budget / fpt:,.0f} tokens = {steps} steps of {tokens_per_step} tokens, fewer than "
                    f"min_steps={min_steps} (the FLOPs could not be held within 1% and warmup would not fit). "
                    f"Fix: raise the smallest budget to >= {min_steps * tokens_per_step * fpt:.3g}, or lower "
                    f"base.batch_size / base.seq_len / shape sizes")
            flops = steps * tokens_per_step * fpt
            runs.append(dict(run=f"C{budget:.2e}_{key}".replace("+", ""), budget=budget, flops=flops,
                             params=params_of(m), tokens=steps * tokens_per_step,
                             tokens_per_param=steps * tokens_per_step / params_of(m), steps=steps, shape=key,
                             num_layers=m.num_layers, hidden_size=m.hidden_size, num_heads=m.num_heads,
                             mlp_dim=m.mlp_dim, batch_size=int(base.batch_size), lr=learning_rate(sweep, params_of(m)),
                             flops_error=flops / budget - 1.0))
    for r in runs:
        if abs(r["flops_error"]) > MAX_FLOPS_ERROR:  # cannot happen with min_steps >= 50; kept as the contract
            raise ConfigError(f"run {r['run']}: FLOPs {r['flops']:.4g} are {r['flops_error']:+.2%} off the budget")
    frac = float(base.optimizer.cooldown_fraction)
    for key in shapes:
        mine = [r for r in runs if r["shape"] == key]
        warmup = min(int(sweep.warmup_max_steps), int(round(sweep.warmup_fraction * min(r["steps"] for r in mine))))
        for r in mine:
            r["warmup_steps"] = warmup
            r["fork_step"] = r["steps"] - int(round(frac * r["steps"])) if sweep.mode == "forks" else 0
    return {"sweep": config_to_dict(sweep), "mode": str(sweep.mode), "runs": runs,
            "jobs": _jobs(sweep, shapes, runs)}


def _run_config(sweep, model, *, steps, lr, warmup, schedule, eval_every, init_from="", init_step=-1):
    c = copy.deepcopy(sweep.base)
    c.model = model
    c.steps = int(steps)
    c.optimizer.lr = float(lr)
    c.optimizer.warmup_steps = int(warmup)
    c.optimizer.schedule = schedule
    c.eval_every = int(eval_every)
    c.checkpoint.every = max(1, int(steps) // int(sweep.checkpoints_per_run))
    c.checkpoint.init_from = init_from
    c.checkpoint.init_step = int(init_step)
    return c


def _jobs(sweep, shapes, runs) -> list[dict]:
    """Training processes in dependency order. Workdirs are relative to the plan directory."""
    jobs = []
    for key, m in shapes.items():
        mine = sorted((r for r in runs if r["shape"] == key), key=lambda r: r["steps"])
        lr, warmup = mine[0]["lr"], mine[0]["warmup_steps"]
        if sweep.mode == "independent":
            for r in mine:
                cfg = _run_config(sweep, m, steps=r["steps"], lr=lr, warmup=warmup, schedule="wsd",
                                  eval_every=r["steps"])
                jobs.append(dict(name=r["run"], workdir=f"runs/{r['run']}", run=r["run"], steps=r["steps"],
                                 after=[], fork_from=None, config=config_to_dict(cfg)))
            continue
        main_dir, previous = f"runs/{key}_main", None
        for r in mine:
            seg = f"{key}_main@{r['fork_step']}"
            if previous is None or r["fork_step"] > previous["steps"]:
                cfg = _run_config(sweep, m, steps=r["fork_step"], lr=lr, warmup=warmup, schedule="constant",
                                  eval_every=0)
                seg_job = dict(name=seg, workdir=main_dir, run=None, steps=r["fork_step"],
                               after=[previous["name"]] if previous else [], fork_from=None,
                               config=config_to_dict(cfg))
                jobs.append(seg_job)
                previous = seg_job
            cfg = _run_config(sweep, m, steps=r["steps"], lr=lr, warmup=warmup, schedule="wsd",
                              eval_every=r["steps"], init_from=main_dir, init_step=r["fork_step"])
            jobs.append(dict(name=r["run"], workdir=f"runs/{r['run']}", run=r["run"], steps=r["steps"],
                             after=[previous["name"]], fork_from=[main_dir, r["fork_step"]],
                             config=config_to_dict(cfg)))
    return jobs


CONFIG_TEMPLATE = '''"""Run {name} of a glmjax sweep plan (written by tools/sweep.py plan). By hand, from the plan directory:

    python -m glmjax.train --config={config} --workdir={workdir}
{extra}"""
import json

from glmjax.scaling.plan import config_from_dict

CONFIG = json.loads({text!r})


def get_config():
    return config_from_dict(CONFIG)
'''


def config_from_dict(d: dict) -> ml_collections.ConfigDict:
    """A run config from its JSON form (the base config updated with every saved key)."""
    from glmjax.config import base_config

    cfg = base_config()

    def update(node, values, prefix=""):
        for k, v in values.items():
            if isinstance(v, dict):
                update(node[k], v, prefix + k + ".")
            else:
                node[k] = tuple(v) if isinstance(v, list) else v

    update(cfg, d)
    return cfg


def write_plan(plan: dict, out: str) -> None:
    """Write ``plan.json``, ``plan.csv`` and one config file per job under ``out/configs/``."""
    os.makedirs(os.path.join(out, "configs"), exist_ok=True)
    for job in plan["jobs"]:
        cfg = config_from_dict(job["config"])
        validate(cfg)
        job["config_file"] = f"configs/{job['name'].replace('@', '_at')}.py"
        extra = ""
        if job["fork_from"]:
            extra = (f"\nA cooldown fork: it starts from step {job['fork_from'][1]} of {job['fork_from'][0]} "
                     f"(run that job first).\n")
        with open(os.path.join(out, job["config_file"]), "w") as f:
            f.write(CONFIG_TEMPLATE.format(name=job["name"], config=job["config_file"], workdir=job["workdir"],
                                           extra=extra, text=json.dumps(job["config"], sort_keys=True)))
    with open(os.path.join(out, "plan.json"), "w") as f:
        json.dump(plan, f, indent=1)
    with open(os.path.join(out, "plan.csv"), "w") as f:
        f.write(",".join(PLAN_COLUMNS) + "\n")
        for r in plan["runs"]:
            f.write(",".join(_fmt(r[c]) for c in PLAN_COLUMNS) + "\n")


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def read_plan(directory: str) -> dict:
    path = os.path.join(directory, "plan.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: write the plan first with "
                                f"python tools/sweep.py plan --config=configs/sweeps/NAME.py --out={directory}")
    with open(path) as f:
        return json.load(f)
