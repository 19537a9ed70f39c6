"""Shared command-line handling of the data tools: ``--config=FILE`` plus ``--config.KEY=VALUE`` overrides."""
from __future__ import annotations

import argparse
import logging
import os


def parse_config_args(parser: argparse.ArgumentParser, argv=None):
    """Parses ``argv`` with ``parser`` (which must define ``--config``); returns (args, loaded config)."""
    args, overrides = parser.parse_known_args(argv)
    bad = [a for a in overrides if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognised arguments {bad}: config overrides are written --config.KEY=VALUE")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from glmjax.config import load_config

    return args, load_config(args.config, overrides)
