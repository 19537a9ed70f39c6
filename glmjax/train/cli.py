"""Command line of the training run."""
from __future__ import annotations

import argparse
import logging
import sys

USAGE = """python -m glmjax.train --config=configs/tiny.py --workdir=DIR [--config.KEY=VALUE ...]

Train a GLM model. Any config key can be overridden, e.g. --config.steps=200 --config.mesh.fsdp=8
--config.model.attention_impl=pallas. Unknown keys are an error naming the closest valid key."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m glmjax.train", usage=USAGE,
                                description="Pretrain a GLM-family language model with JAX.")
    p.add_argument("--config", required=True, help="config file, e.g. configs/tiny.py")
    p.add_argument("--workdir", required=True, help="output directory: metrics.jsonl, tensorboard/, checkpoints/")
    p.add_argument("--restart", default="true", choices=["true", "false"],
                   help="true (default): resume from the latest checkpoint in --workdir; false: start over")
    p.add_argument("--log_level", default="INFO",
                   help="INFO (default): our own lines only; DEBUG: also every library's log (TensorFlow, "
                        "absl, libtpu) and tracebacks")
    p.add_argument("--multihost", action="store_true",
                   help="initialise jax.distributed by auto-detection (Cloud TPU pod, GKE, Slurm)")
    p.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0 (explicit multi-host)")
    p.add_argument("--num_processes", type=int, default=None, help="number of processes (explicit multi-host)")
    p.add_argument("--process_id", type=int, default=None, help="this process's index (explicit multi-host)")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        p.error(f"unrecognised arguments {bad}: config overrides are written --config.KEY=VALUE")
    return args, rest


def main(argv=None) -> None:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from glmjax.console import setup_logging

    try:
        setup_logging(args.log_level)
    except ValueError as e:
        sys.exit(f"error: {e}")
    from glmjax import distributed
    from glmjax.checkpoint import CheckpointError
    from glmjax.config import ConfigError, load_config
    from glmjax.train.loop import train

    try:
        cfg = load_config(args.config, overrides)  # fails fast, before devices are touched
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                               auto=args.multihost)
        result = train(cfg, args.workdir, restart=args.restart == "true")
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except (CheckpointError, FileNotFoundError, ValueError) as e:  # bad data paths, unreadable checkpoints
        logging.getLogger("glmjax.train").debug("traceback", exc_info=True)
        sys.exit(f"error: {e}\n(run with --log_level=DEBUG for the traceback)")
    if not result.get("already_done"):
        logging.getLogger("glmjax.train").info(summary_line(result))


def summary_line(result: dict) -> str:
    """One line for the end of a run: step, losses, throughput."""
    parts = [f"done: step {result['step']}"]
    for key, label, fmt in (("loss", "loss", "{:.4f}"), ("eval_loss", "eval loss", "{:.4f}"),
                            ("tokens_per_second", "tokens/s", "{:,.0f}"), ("mfu", "MFU", "{:.1%}")):
        if result.get(key) is not None:
            parts.append(f"{label} {fmt.format(result[key])}")
    return ", ".join(parts)
