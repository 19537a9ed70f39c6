"""Benchmark of the training step: step time, tokens/s and MFU of a config on the current devices.

    python tools/bench_train.py --config=configs/tiny.py [--config.KEY=VALUE ...] \
        [--steps=30] [--warmup=3] [--out=bench.json] [--torch | --no-torch] [--dry_run]

Synthetic random batches (one causal document per row, positions 0..T-1): this measures the jitted
train step (forward, backward, AdamW update), not the data pipeline. Step time is the median over the
timed steps after the first (compiling) call and ``--warmup`` more.

MFU = model FLOPs per step (``glmjax.scaling.flops``: matmuls + causal attention, training = 3x forward,
no remat recompute) / step time / peak. Peak: the table of ``glmjax.train.metrics`` on TPU/GPU (bf16
dense); on CPU the float32 ``jnp.dot`` rate measured in this process, so there MFU is a ratio to what this
machine's BLAS delivers.

``--torch`` (default on CPU) also times the same model shape as a Hugging Face ``GlmForCausalLM`` training
step in PyTorch (float32, AdamW with the same hyperparameters, global-norm clipping, the same batch),
``torch.set_num_threads(cores)``, and reports glmjax tokens/s over PyTorch's. The timed steps of the two
alternate in chunks, so background load on a shared machine hits both alike. ``GlmForCausalLM`` is the
GLM-4 architecture (RMSNorm pre-norm, SwiGLU, 1D partial rotary); for a GLM-130B-style config
(DeepNorm, GeGLU, 2D rotary) it is timed at the same sizes and the table says that the two differ in
norm placement / activation / rotary (the FLOPs are the same up to elementwise work).

``--dry_run`` compiles nothing: parameters, FLOPs per token and the step time expected at ``--mfu`` of
``--peak_flops`` per device on ``--devices`` devices (default: one H100, 989e12 bf16 dense, 50%).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

USAGE = """python tools/bench_train.py --config=configs/tiny.py [--config.KEY=VALUE ...] [--steps=N] [--warmup=N]
       [--out=FILE.json] [--torch | --no-torch] [--dry_run [--devices=N --peak_flops=F --mfu=M]]

Time the glmjax train step of a config (median step time, tokens/s, MFU) and, with --torch, the same
shape as a Hugging Face GlmForCausalLM training step in PyTorch. Any config key can be overridden as
in the train CLI, e.g. --config.model.norm=rmsnorm_pre --config.batch_size=8."""

H100_BF16_PEAK = 989e12


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python tools/bench_train.py", usage=USAGE,
                                description="Benchmark the glmjax training step (and PyTorch's for the same shape).")
    p.add_argument("--config", required=True, help="config file, e.g. configs/tiny.py")
    p.add_argument("--steps", type=int, default=30, help="timed steps per framework (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the compiling call (default 3)")
    p.add_argument("--chunk", type=int, default=5,
                   help="with --torch: timed steps run in alternating chunks of this many (default 5)")
    p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=None,
                   help="also time Hugging Face GlmForCausalLM in PyTorch (default: on for CPU, off otherwise)")
    p.add_argument("--torch_attn", default="sdpa", choices=["sdpa", "eager"],
                   help="PyTorch attention implementation (default sdpa, PyTorch's fastest on CPU)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch.set_num_threads (default: the cores this process may run on, "
                        f"{len(os.sched_getaffinity(0))} here; pin both frameworks to one core with "
                        "`taskset -c 0 python tools/bench_train.py ... --threads=1`)")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    p.add_argument("--dry_run", action="store_true",
                   help="no compile, no run: parameters, FLOPs/token, expected step time at --mfu")
    p.add_argument("--devices", type=int, default=1, help="--dry_run: number of accelerators (default 1)")
    p.add_argument("--peak_flops", type=float, default=H100_BF16_PEAK,
                   help="--dry_run: peak FLOP/s per device (default 989e12, H100 bf16 dense)")
    p.add_argument("--mfu", type=float, default=0.5, help="--dry_run: assumed MFU (default 0.5)")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        p.error(f"unrecognised arguments {bad}: config overrides are written --config.KEY=VALUE")
    if args.steps < 1 or args.warmup < 0 or args.chunk < 1:
        p.error("--steps and --chunk must be >= 1 and --warmup >= 0")
    return args, rest


# ----------------------------------------------------------------------------- helpers

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def causal_batch(rng, batch: int, length: int, vocab: int) -> dict:
    """One full-length causal document per row (the shape Hugging Face's causal LM computes)."""
    import numpy as np

    tokens = rng.integers(1, vocab, (batch, length + 1)).astype(np.int32)
    pos = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy()
    zeros = np.zeros((batch, length), np.int32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_weights": np.ones((batch, length), np.float32),
            "segment_ids": np.ones((batch, length), np.int32), "positions": pos, "block_positions": zeros,
            "bidirectional": zeros.copy()}


def hf_name(m) -> str:
    """The transformers class timed for model config ``m``."""
    from glmjax.moe_config import moe_layer_count

    return "Glm4MoeForCausalLM" if moe_layer_count(m) else "GlmForCausalLM"


def architecture_note(m) -> str:
    if hf_name(m) == "Glm4MoeForCausalLM":
        return "same architecture (GLM-4.5 MoE: Glm4MoeForCausalLM, sigmoid router, routed + shared experts)"
    if m.norm == "rmsnorm_pre" and m.mlp == "swiglu" and not m.rope_2d:
        return "same architecture (GLM-4 style: RMSNorm pre-norm, SwiGLU, 1D partial rotary)"
    return (f"same sizes, architecture differs only in norm placement/activation/rotary: glmjax "
            f"{m.norm}/{m.mlp}/rope_2d={m.rope_2d}, HF GlmForCausalLM rmsnorm_pre/swiglu/1D rotary")


class Timer:
    """Step times of one framework: ``first`` (the compiling call), wall and process-CPU time per step."""

    def __init__(self):
        self.first = None
        self.times = []
        self.cpu_times = []

    def time(self, fn):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        self.times.append(time.perf_counter() - t)
        self.cpu_times.append(time.process_time() - c)
        return out

    def summary(self, tokens_per_step: int, flops_per_step: float, peak_total: float) -> dict:
        med = statistics.median(self.times)
        return {"first_call_s": self.first, "step_time_s": med, "step_time_min_s": min(self.times),
                "step_time_max_s": max(self.times), "cpu_time_per_step_s": statistics.median(self.cpu_times),
                "timed_steps": len(self.times), "tokens_per_second": tokens_per_step / med,
                "mfu": flops_per_step / med / peak_total}


# ----------------------------------------------------------------------------- glmjax

def glmjax_runner(cfg):
    """(run_one_step, devices) for the glmjax train step; ``run_one_step()`` blocks until done."""
    import jax
    import numpy as np

    from glmjax.config import validate
    from glmjax.sharding import batch_sharding, make_mesh
    from glmjax.train.state import init_state, model_spec
    from glmjax.train.step import make_train_step

    devices = jax.devices()
    validate(cfg, len(devices))
    mesh = make_mesh(cfg, devices)
    spec = model_spec(cfg, mesh)
    holder = {"state": init_state(cfg, spec)}
    step_fn = make_train_step(cfg, spec, mesh)
    sh = batch_sharding(mesh)
    rng = np.random.default_rng(cfg.seed)
    # a few distinct batches, put on device up front: the step is timed, not host->device copies
    batches = [{k: jax.device_put(v, sh) for k, v in causal_batch(rng, cfg.batch_size, cfg.seq_len,
                                                                   cfg.model.vocab_size).items()}
               for _ in range(4)]
    count = [0]

    def run():
        b = batches[count[0] % len(batches)]
        count[0] += 1
        holder["state"], metrics = step_fn(holder["state"], b)
        jax.block_until_ready((holder["state"], metrics))
        return float(metrics["loss"])

    return run, devices


# ----------------------------------------------------------------------------- PyTorch

def torch_runner(cfg, threads: int, attn: str):
    """``run_one_step()`` for Hugging Face GlmForCausalLM (float32, AdamW) on the same shape."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import GlmConfig, GlmForCausalLM, Glm4MoeConfig, Glm4MoeForCausalLM

    from glmjax.export.hf_mapping import hf_config
    from glmjax.export.hf_moe_mapping import hf_moe_config

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    m, o = cfg.model, cfg.optimizer
    moe = hf_name(m) == "Glm4MoeForCausalLM"  # a GLM-4.5-style MoE config: transformers' glm4_moe
    config_cls, model_cls, kwargs = ((Glm4MoeConfig, Glm4MoeForCausalLM, hf_moe_config) if moe
                                     else (GlmConfig, GlmForCausalLM, hf_config))
    hf_cfg = config_cls(**kwargs(m, max_position_embeddings=max(cfg.seq_len, 128)))
    hf_cfg._attn_implementation = attn
    model = model_cls(hf_cfg).float().train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, foreach=True)
    rng = np.random.default_rng(cfg.seed)
    batches = []
    for _ in range(4):
        b = causal_batch(rng, cfg.batch_size, cfg.seq_len, m.vocab_size)
        batches.append({k: torch.from_numpy(b[k]).long() for k in ("tokens", "targets", "positions")})
    count = [0]

    def run():
        b = batches[count[0] % len(batches)]
        count[0] += 1
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=b["tokens"], position_ids=b["positions"], use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), b["targets"].reshape(-1))
        loss.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        return float(loss.detach())

    return run, {"torch": torch.__version__, "attn_implementation": attn, "threads": threads,
                 "dtype": "float32"}


# ----------------------------------------------------------------------------- main

def dry_run(cfg, args, config_path: str) -> dict:
    from glmjax.scaling.flops import flops_per_token
    from glmjax.train.state import abstract_params

    m = cfg.model
    fpt = flops_per_token(m, cfg.seq_len)
    _, abs_params, _ = abstract_params(m)
    import jax

    counted = int(sum(x.size for x in jax.tree.leaves(abs_params)))
    tokens = cfg.batch_size * cfg.seq_len
    flops_step = fpt.train * tokens
    step_s = flops_step / (args.peak_flops * args.devices * args.mfu)
    return {"config": config_path, "mode": "dry_run", "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
            "tokens_per_step": tokens, "params": counted, "params_analytic": fpt.params,
            "non_embedding_params": fpt.non_embedding_params, "flops_per_token_train": fpt.train,
            "flops_per_token_6n": fpt.six_n, "flops_per_step": flops_step, "devices": args.devices,
            "peak_flops_per_device": args.peak_flops, "assumed_mfu": args.mfu,
            "expected_step_time_s": step_s, "expected_tokens_per_second": tokens / step_s,
            "dtype": m.dtype, "remat": m.remat}


def print_dry_run(r: dict) -> None:
    print(f"\n{r['config']} (dry run: nothing compiled)")
    rows = [("parameters", f"{r['params']:,} ({r['non_embedding_params']:,} non-embedding)"),
            ("batch x seq_len", f"{r['batch_size']} x {r['seq_len']} = {r['tokens_per_step']:,} tokens/step"),
            ("train FLOPs/token", f"{r['flops_per_token_train']:.4g} (6N = {r['flops_per_token_6n']:.4g})"),
            ("FLOPs/step", f"{r['flops_per_step']:.4g}"),
            ("assumed", f"{r['assumed_mfu']:.0%} MFU of {r['peak_flops_per_device']:.4g} FLOP/s x "
                        f"{r['devices']} device(s)"),
            ("expected step time", f"{r['expected_step_time_s']:.3f} s"),
            ("expected tokens/s", f"{r['expected_tokens_per_second']:,.0f}")]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")


def measure(cfg, args, config_path: str) -> dict:
    import jax

    from glmjax.scaling.flops import flops_per_token
    from glmjax.train.metrics import measured_matmul_flops, peak_flops_per_device

    load_before = os.getloadavg()
    run_jax, devices = glmjax_runner(cfg)
    on_cpu = devices[0].platform == "cpu"
    use_torch = on_cpu if args.torch is None else args.torch
    t0 = time.perf_counter()
    run_jax()
    jt = Timer()
    jt.first = time.perf_counter() - t0
    for _ in range(args.warmup):
        run_jax()
    torch_info, run_torch, tt = None, None, None
    if use_torch:
        run_torch, torch_info = torch_runner(cfg, args.threads, args.torch_attn)
        tt = Timer()
        t0 = time.perf_counter()
        run_torch()
        tt.first = time.perf_counter() - t0
        for _ in range(args.warmup):
            run_torch()
    peak, peak_src = peak_flops_per_device()
    losses = {}
    done = 0
    while done < args.steps:  # alternate chunks so that background load hits both alike
        n = min(args.chunk, args.steps - done)
        for timer, fn, name in ((jt, run_jax, "glmjax"), (tt, run_torch, "torch")):
            if fn is None:
                continue
            for _ in range(n):
                losses[name] = timer.time(fn)
        done += n
    if on_cpu:  # the measured rate is noisy on a shared machine: keep the better of two measurements
        peak = max(peak, measured_matmul_flops(repeats=20))
    tokens = cfg.batch_size * cfg.seq_len
    fpt = flops_per_token(cfg.model, cfg.seq_len)
    flops_step = fpt.train * tokens
    peak_total = peak * len(devices)
    m = cfg.model
    result = {
        "config": config_path, "mode": "measured",
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
                    "platform": devices[0].platform,
                    "device_kind": devices[0].device_kind, "devices": len(devices),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "jax": jax.__version__, "python": platform.python_version()},
        "model": {k: m[k] for k in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                                    "mlp_dim", "vocab_size", "norm", "mlp", "rope_2d", "qkv_bias", "dtype",
                                    "remat", "scan_layers", "attention_impl")},
        "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "tokens_per_step": tokens,
        "params": fpt.params, "flops_per_token_train": fpt.train, "flops_per_step": flops_step,
        "peak_flops_per_device": peak, "peak_source": peak_src,
        "warmup": args.warmup, "steps": args.steps,
        "glmjax": {**jt.summary(tokens, flops_step, peak_total), "last_loss": losses.get("glmjax")},
    }
    if tt is not None:
        result["torch"] = {**tt.summary(tokens, flops_step, peak * 1), **torch_info,
                           "last_loss": losses.get("torch"), "architecture": architecture_note(m),
                           "hf_class": hf_name(m)}
        result["ratio_tokens_per_second"] = (result["glmjax"]["tokens_per_second"]
                                             / result["torch"]["tokens_per_second"])
        result["ratio_cpu_time_per_step"] = (result["torch"]["cpu_time_per_step_s"]
                                             / result["glmjax"]["cpu_time_per_step_s"])
    return result


def print_table(r: dict) -> None:
    m = r["model"]
    print(f"\n{r['config']}: {m['num_layers']} layers, hidden {m['hidden_size']}, heads {m['num_heads']}/"
          f"{m['num_kv_heads']} kv, head_dim {m['head_dim']}, mlp {m['mlp_dim']}, vocab {m['vocab_size']}, "
          f"{m['norm']}/{m['mlp']}/rope_2d={m['rope_2d']}, {m['dtype']}; batch {r['batch_size']} x seq "
          f"{r['seq_len']}; {r['params']:,} params")
    mc = r["machine"]
    print(f"machine: {mc['devices']} x {mc['device_kind']} ({mc['cpu']}, {mc['cores_usable']} of {mc['cores']} "
          f"cores); peak "
          f"{r['peak_flops_per_device']:.3g} FLOP/s per device ({r['peak_source']}); "
          f"load avg {mc['loadavg_before'][0]:.1f} -> {mc['loadavg_after'][0]:.1f}; glibc malloc CPU defaults "
          f"{'on' if r.get('cpu_malloc_defaults') else 'off'} (glmjax/cpu_defaults.py)")
    head = (f"| {'framework':<34} | {'first call s':>12} | {'step ms (median)':>16} | {'CPU ms/step':>11} | "
            f"{'tokens/s':>10} | {'MFU':>6} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    rows = [("glmjax (JAX/XLA)", r["glmjax"])]
    if "torch" in r:
        rows.append((f"PyTorch HF {r['torch'].get('hf_class', 'GlmForCausalLM')} "
                     f"({r['torch']['attn_implementation']})", r["torch"]))
    for name, x in rows:
        print(f"| {name:<34} | {x['first_call_s']:>12.2f} | {1e3 * x['step_time_s']:>16.2f} | "
              f"{1e3 * x['cpu_time_per_step_s']:>11.1f} | {x['tokens_per_second']:>10,.0f} | {x['mfu']:>6.1%} |")
    if "torch" in r:
        print(f"glmjax / PyTorch tokens/s: {r['ratio_tokens_per_second']:.2f}x; PyTorch / glmjax CPU time per "
              f"step: {r['ratio_cpu_time_per_step']:.2f}x (PyTorch: {r['torch']['threads']} threads, "
              f"{r['torch']['architecture']})")


def main(argv=None) -> None:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from glmjax.cpu_defaults import apply_cpu_malloc_defaults

    malloc_tuned = apply_cpu_malloc_defaults()  # as python -m glmjax.train does (before JAX starts)
    from glmjax.config import ConfigError, load_config, validate

    try:
        cfg = load_config(args.config, overrides)
        validate(cfg)
        if args.dry_run:
            result = dry_run(cfg, args, args.config)
            print_dry_run(result)
        else:
            result = measure(cfg, args, args.config)
            result["cpu_malloc_defaults"] = malloc_tuned
            print_table(result)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    result["cpu_malloc_defaults"] = malloc_tuned
    result["command"] = " ".join(["python", "tools/bench_train.py", *(sys.argv[1:] if argv is None else argv)])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
