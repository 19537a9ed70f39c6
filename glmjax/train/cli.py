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
    p.add_argument("--log_level", default="INFO",
                   help="INFO (default): our own lines only; DEBUG: also every library's log (TensorFlow, "
                        "absl, libtpu) and tracebacks")
    p.add_argument("--multihost", action="store_true",
                   help="initialise jax.distributed by auto-detection (Cloud TPU pod, GKE, Slurm)")
    p.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0 (explicit multi-host)")
    p.add_argument("--num_processes", type=int, default=None, help="number of processes (explicit multi-host)")
    p.add_argument("--process_id", type=int, default=None, help="this process's index (explicit multi-host)")
    p.add_argument("--preflight", action="store_true",
                   help="first compile the train step for the TPU slice and refuse (exit 3) a config that "
                        "does not fit in HBM; the slice is --preflight_topology or this TPU VM's "
                        "TPU_ACCELERATOR_TYPE (see docs/tpu_aot.md)")
    p.add_argument("--preflight_topology", default=None,
                   help="slice for --preflight, e.g. v5p-128 (default: $TPU_ACCELERATOR_TYPE)")
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
    from glmjax.cpu_defaults import apply_cpu_malloc_defaults

    apply_cpu_malloc_defaults()  # CPU-only hosts: keep XLA:CPU's step buffers mapped (before JAX starts)
    from glmjax.console import setup_logging

    try:
        setup_logging(args.log_level)
    except ValueError as e:
        sys.exit(f"error: {e}")
    from glmjax import distributed
    from glmjax.checkpoint import CheckpointError
    from glmjax.aot.topology import TopologyError
    from glmjax.config import ConfigError, load_config
    from glmjax.train.loop import train

    try:
        cfg = load_config(args.config, overrides)  # fails fast, before devices are touched
        if args.preflight:
            _preflight(cfg, args.preflight_topology)
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                               auto=args.multihost, timeout_s=args.distributed_timeout)
        result = train(cfg, args.workdir, restart=args.restart == "true")
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except TopologyError as e:
        sys.exit(f"preflight error: {e}")
    except (CheckpointError, FileNotFoundError, ValueError) as e:  # bad data paths, unreadable checkpoints
        logging.getLogger("glmjax.train").debug("traceback", exc_info=True)
        sys.exit(f"error: {e}\n(run with --log_level=DEBUG for the traceback)")
    if not result.get("already_done"):
        logging.getLogger("glmjax.train").info(summary_line(result))
    if args.preempted_exit_code and _stopped_early(result, cfg):
        sys.exit(args.preempted_exit_code)


def summary_line(result: dict) -> str:
    """One line for the end of a run: step, losses, throughput."""
    parts = [f"done: step {result['step']}"]
    for key, label, fmt in (("loss", "loss", "{:.4f}"), ("eval_loss", "eval loss", "{:.4f}"),
                            ("tokens_per_second", "tokens/s", "{:,.0f}"), ("mfu", "MFU", "{:.1%}")):
        if result.get(key) is not None:
            parts.append(f"{label} {fmt.format(result[key])}")
    return ", ".join(parts)


def _preflight(cfg, topology) -> None:
    """Compile for the slice (abstract TPU devices, the real compiler) and exit 3 if it does not fit."""
    from glmjax.aot.check import EXIT_DOES_NOT_FIT, run_check
    from glmjax.aot.topology import TopologyError

    topology = topology or os.environ.get("TPU_ACCELERATOR_TYPE")
    if not topology:
        raise TopologyError("--preflight needs the TPU slice: pass --preflight_topology=v5p-128 (or run on a "
                            "Cloud TPU VM, where TPU_ACCELERATOR_TYPE names it)")
    report = run_check(cfg, topology, search="none", eval_step=False)  # the eval step needs less
    if not report["fits"]:
        sys.stderr.write(f"preflight: this config does not fit {report['topology']}; not starting. Run "
                         f"`python tools/aot_compile.py --config=... --topology={topology}` for a suggestion.\n")
        sys.exit(EXIT_DOES_NOT_FIT)
    logging.getLogger("glmjax.train").info("preflight: fits %s with %.2f GB per chip to spare",
                                           report["topology"], report["margin_bytes"] / 1e9)


def _stopped_early(result, cfg) -> bool:
    """True when the loop left before ``cfg.steps`` (preemption): the job must be resumed."""
    return int(result["step"]) < int(cfg.steps)
