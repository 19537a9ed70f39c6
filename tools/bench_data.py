"""Benchmark the input pipeline against what the train step consumes at the same config.

    python tools/bench_data.py --config=configs/tiny.py
    python tools/bench_data.py --config=configs/tiny.py --num_batches=400 --train_steps=60 --config.batch_size=32

1. Pipeline alone: tokens/s of ``make_pipeline(cfg, "train")`` (after ``--warmup`` batches), in total
   and per host core (``os.cpu_count()``), counting every position (``rows x seq_len``) and the
   non-padding ones.
2. Training: ``--train_steps`` steps of the real loop (``glmjax.train.loop.train``) fed by the same
   pipeline, timing every ``next()``: the tokens/s the step consumes, and the time the loop spent
   waiting for input as a fraction of step time (the first two steps, compilation, are left out).
Prints a JSON summary and a Markdown table row for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from glmjax.data.cli import parse_config_args


class _TimedIterator:
    """Wraps a pipeline, recording when each ``next()`` started and how long it blocked."""

    def __init__(self, pipe):
        self.pipe, self.starts, self.waits = pipe, [], []

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        batch = next(self.pipe)
        self.starts.append(t0)
        self.waits.append(time.perf_counter() - t0)
        return batch

    def get_state(self):
        return self.pipe.get_state()

    def set_state(self, state, others=()):
        self.pipe.set_state(state, others)

    def close(self):
        self.pipe.close()


def bench_pipeline(cfg, num_batches: int, warmup: int) -> dict:
    """Tokens/s of the train pipeline alone."""
    from glmjax.data.pipeline import make_pipeline

    t_build = time.perf_counter()
    pipe = make_pipeline(cfg, "train", process_index=0, process_count=1)
    for _ in range(warmup):
        next(pipe)
    first = time.perf_counter() - t_build
    real, t0 = 0, time.perf_counter()
    for i in range(num_batches):
        real += int((next(pipe)["segment_ids"] > 0).sum())
        if i % 20 == 0:
            print(f"\rpipeline: batch {i + 1}/{num_batches}", end="", file=sys.stderr, flush=True)
    dt = time.perf_counter() - t0
    pipe.close()
    print(file=sys.stderr)
    tokens = num_batches * cfg.batch_size * cfg.seq_len
    cores = os.cpu_count() or 1
    return dict(pipeline_startup_s=round(first, 2), pipeline_tokens_per_s=round(tokens / dt),
                pipeline_tokens_per_s_per_core=round(tokens / dt / cores), host_cores=cores,
                fill=round(real / tokens, 4))


def bench_training(cfg, steps: int) -> dict:
    """Tokens/s the train step consumes and the fraction of step time spent waiting for input."""
    from glmjax.data.pipeline import make_pipeline, to_global
    from glmjax.train.loop import train

    cfg = cfg.copy_and_resolve_references()
    cfg.steps, cfg.eval_every, cfg.log_every = steps, 0, max(1, steps // 5)
    cfg.checkpoint.every = 0
    timed = _TimedIterator(make_pipeline(cfg, "train"))
    with tempfile.TemporaryDirectory() as workdir:
        train(cfg, workdir, restart=False,
              pipelines=(timed, lambda: make_pipeline(cfg, "validation"), to_global))
    starts, waits = timed.starts[2:], timed.waits[2:]
    span = starts[-1] - starts[0]  # steps 3..N: compile and warm-up excluded
    step_s = span / (len(starts) - 1)
    return dict(train_steps=steps, step_s=round(step_s, 4),
                train_tokens_per_s=round(cfg.batch_size * cfg.seq_len / step_s),
                wait_fraction=round(sum(waits[:-1]) / span, 5), max_wait_s=round(max(waits[:-1]), 4),
                first_batch_wait_s=round(timed.waits[0], 2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config file, e.g. configs/tiny.py")
    p.add_argument("--num_batches", type=int, default=300, help="batches timed in the pipeline-only run")
    p.add_argument("--warmup", type=int, default=20, help="batches before the pipeline clock starts")
    p.add_argument("--train_steps", type=int, default=60, help="steps of the real training loop (0 = skip)")
    args, cfg = parse_config_args(p, argv)
    res = dict(config=args.config, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
               objective={k: cfg.objective[k] for k in ("causal", "mask", "smask", "gmask")})
    res.update(bench_pipeline(cfg, args.num_batches, args.warmup))
    if args.train_steps:
        res.update(bench_training(cfg, args.train_steps))
        res["pipeline_over_step"] = round(res["pipeline_tokens_per_s"] / res["train_tokens_per_s"], 1)
    print(json.dumps(res, indent=1))
    row = [args.config, f"{cfg.batch_size}x{cfg.seq_len}", f"{res['pipeline_tokens_per_s']:,}",
           f"{res['pipeline_tokens_per_s_per_core']:,}", f"{res.get('train_tokens_per_s', 0):,}",
           f"{res.get('pipeline_over_step', '-')}x", f"{100 * res.get('wait_fraction', 0):.2f}%", f"{res['fill']:.1%}"]
    print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
