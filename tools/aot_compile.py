"""Compile a config's train step for a TPU slice on this (CPU) host and say whether it fits in HBM.

    python tools/aot_compile.py --config=configs/glm_1b.py --topology=v5p-128 [--config.KEY=VALUE ...]
        [--num_slices=N] [--json=OUT.json] [--search=auto|batch|none] [--max_compiles=6]
        [--find_max_batch] [--no_eval]

Uses the real XLA:TPU and Mosaic compilers from ``libtpu`` (``pip install -e '.[test]'``) against
abstract TPU devices: no TPU needed. Prints per chip parameters, optimizer state, gradients,
temporaries, the total against HBM, fits / does not fit with the margin, compile time, the
collectives of the compiled program and the model FLOPs per step. When it does not fit, compiles
candidates (chunked loss, remat=full, all-fsdp, smaller batch) and suggests the first that fits.
Exit code: 0 fits, 3 does not fit, 2 bad input (unknown topology, mesh/slice mismatch, no libtpu).
See docs/tpu_aot.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

USAGE = """python tools/aot_compile.py --config=configs/X.py --topology=v5p-128 [--config.KEY=VALUE ...]
       [--num_slices=N] [--json=OUT.json] [--search=auto|batch|none] [--max_compiles=N] [--find_max_batch]

Topologies: v4-N, v5p-N (N = TensorCores, 2 per chip), v5litepod-N / v5e-N, v6e-N (N = chips),
chip grids v5p:4x4x8 / v5e:4x8, multi-slice 2xv5p-256 or --num_slices=2.
Exit code 0: fits; 3: does not fit (the suggestion, if any, is printed and in --json); 2: bad input."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="tools/aot_compile.py", usage=USAGE, description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="config file, e.g. configs/glm_1b.py")
    p.add_argument("--topology", required=True, help="TPU slice, e.g. v5p-128, v5litepod-16, v5p:4x4x8")
    p.add_argument("--num_slices", type=int, default=1, help="slices joined over DCN (default 1)")
    p.add_argument("--json", default=None, help="write the report as JSON to this file")
    p.add_argument("--search", default="auto", choices=["auto", "batch", "none"],
                   help="when it does not fit: auto (chunked loss, remat, fsdp, then batch), batch (only "
                        "halve the batch), none")
    p.add_argument("--fill", type=float, default=0.9,
                   help="--search=batch starts at the batch predicted to use this fraction of HBM (default 0.9)")
    p.add_argument("--max_compiles", type=int, default=6, help="cap on candidate compiles of the search")
    p.add_argument("--find_max_batch", action="store_true", help="when it fits, double batch_size to find the "
                                                                  "largest that fits")
    p.add_argument("--no_eval", action="store_true", help="compile only the train step")
    p.add_argument("--log_level", default="WARNING", help="Python logging level (DEBUG shows library chatter)")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        p.error(f"unrecognised arguments {bad}: config overrides are written --config.KEY=VALUE")
    return args, rest


def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper())
    if args.log_level.upper() != "DEBUG":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        logging.getLogger("absl").setLevel(logging.ERROR)
    from glmjax.aot.check import EXIT_DOES_NOT_FIT, EXIT_FITS, run_check
    from glmjax.aot.topology import TopologyError
    from glmjax.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, overrides)
        report = run_check(cfg, args.topology, num_slices=args.num_slices, search=args.search,
                           max_compiles=args.max_compiles, find_max_batch=args.find_max_batch,
                           eval_step=not args.no_eval, fill=args.fill)
    except (ConfigError, TopologyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return EXIT_FITS if report["fits"] else EXIT_DOES_NOT_FIT


if __name__ == "__main__":
    sys.exit(main())
