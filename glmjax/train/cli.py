"""Command line of the training run."""
from __future__ import annotations

import argparse
import logging
import os
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
    p.add_argument("--log_level", default="INFO", help="Python logging level (default INFO)")
    p.add_argument("--multihost", action="store_true",
                   help="initialise jax.distributed by auto-detection (Cloud TPU pod, GKE, Slurm)")
    p.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0 (explicit multi-host)")
    p.add_argument("--num_processes", type=int, default=None, help="number of processes (explicit multi-host)")
    p.add_argument("--process_id", type=int, default=None, help="this process's index (explicit multi-host)")
    p.add_argument("--distributed_timeout", type=float, default=300,
                   help="seconds to wait for every process to join jax.distributed (default 300, JAX's default); "
                        "then exit with a message naming the coordinator address. Raise it for large pods")
    p.add_argument("--preempted_exit_code", type=int, default=0,
                   help="exit status when the run stopped before config.steps because of SIGTERM / a preemption "
                        "notice (its checkpoint is saved). Default 0; the launchers in launch/ pass 75 so that "
                        "they (or Slurm) restart the job")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        p.error(f"unrecognised arguments {bad}: config overrides are written --config.KEY=VALUE")
    return args, rest


def main(argv=None) -> None:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.log_level.upper() == "INFO":
        logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save INFO chatter  # seqio's TensorFlow: keep the console readable
    from glmjax import distributed
    from glmjax.checkpoint import CheckpointError
    from glmjax.config import ConfigError, load_config
    from glmjax.train.loop import train

    try:
        cfg = load_config(args.config, overrides)  # fails fast, before devices are touched
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                               auto=args.multihost, timeout_s=args.distributed_timeout)
        result = train(cfg, args.workdir, restart=args.restart == "true")
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except (CheckpointError, FileNotFoundError, ValueError) as e:  # bad data paths, unreadable checkpoints
        logging.getLogger("glmjax.train").debug("traceback", exc_info=True)
        sys.exit(f"error: {e}\n(run with --log_level=DEBUG for the traceback)")
    final = {k: v for k, v in result.items() if k != "state"}
    logging.getLogger("glmjax.train").info("done: %s", final)
    if args.preempted_exit_code and _stopped_early(result, cfg):
        sys.exit(args.preempted_exit_code)


def _stopped_early(result, cfg) -> bool:
    """True when the loop left before ``cfg.steps`` (preemption): the job must be resumed."""
    import jax

    return int(jax.device_get(result["state"].step)) < int(cfg.steps)
