"""Shared plumbing of the export / import / generate command-line tools: quiet logging, clean errors."""
from __future__ import annotations

import logging
import os
import sys


def quiet(level: str = "INFO") -> None:
    """glmjax messages at ``level``; JAX / absl / TensorFlow / transformers chatter only at DEBUG."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if level == "DEBUG" else "3")
    logging.basicConfig(level=logging.WARNING if level != "DEBUG" else logging.DEBUG, format="%(message)s")
    logging.getLogger("glmjax").setLevel(getattr(logging, level))
    if level != "DEBUG":
        for name in ("absl", "jax", "orbax", "transformers", "tensorflow"):
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            from absl import logging as absl_logging

            absl_logging.set_verbosity(absl_logging.ERROR)
        except ImportError:
            pass


def run(main, argv=None) -> int:
    """Call ``main(argv)``; a user error (ValueError and friends) prints one message and exits 2."""
    from glmjax.config import ConfigError

    try:
        return int(main(argv) or 0)
    except (ValueError, ConfigError, FileNotFoundError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def add_log_level(parser) -> None:
    parser.add_argument("--log_level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="glmjax messages at this level; DEBUG also shows library chatter")
