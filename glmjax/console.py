"""A quiet console: our own lines (progress bar, run summary, real warnings); library chatter hidden.

:func:`setup_logging` is what every command calls first. Below ``--log_level=DEBUG`` it

- logs ``glmjax.*`` at the chosen level and every other Python logger (jax, absl, orbax, tensorflow) at
  WARNING;
- sets ``TF_CPP_MIN_LOG_LEVEL=3`` so TensorFlow's C++ logging (seqio's input pipeline runs on
  tf.data) stays quiet once it is initialised;
- routes the *native* stderr (file descriptor 2, where C++ libraries write: TensorFlow's CUDA probes
  on a machine without a GPU, SentencePiece inside tf.text, libtpu) through a small filter process that
  drops INFO / WARNING lines in the absl/glog format and the known harmless CUDA-probe errors, and
  passes every other line through. Python's own ``sys.stderr`` (logging, tqdm) bypasses the filter. The
  filter is a separate process, so a native crash message written just before an abort still reaches
  the terminal.

With ``--log_level=DEBUG`` nothing is filtered.
"""
from __future__ import annotations

import atexit
import logging
import os
import re
import subprocess
import sys

# Lines of native libraries that say nothing a user must act on.
NOISE = (
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"[IW]\d{4} [\d:.]+\s+\d+ \S+:\d+\] ",  # absl / glog INFO and WARNING
    r"E\d{4} [\d:.]+\s+\d+ \S+:\d+\] .*(cuInit|CUDA|cuda|TPU platform)",  # no-GPU probes
    r"\S+\.cc\(\d+\) LOG\(INFO\) ",  # SentencePiece's own logging (inside tf.text)
)
NOISE_RE = re.compile("|".join(f"(?:{p})" for p in NOISE))

_FILTER = r"""
import os, re, sys
noise = re.compile(sys.argv[1])
out = sys.stdout.buffer
for raw in sys.stdin.buffer:
    if not noise.match(raw.decode("utf-8", "replace")):
        out.write(raw)
        out.flush()
"""

_state: dict = {}
OUR_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def is_noise(line: str) -> bool:
    """True for a native library line the quiet console drops."""
    return bool(NOISE_RE.match(line))


def setup_logging(level: str = "INFO", fmt: str = OUR_FORMAT) -> None:
    """Configure logging for a command. ``level`` is a logging level name (``DEBUG`` shows everything)."""
    name = str(level).upper()
    numeric = logging.getLevelName(name)
    if not isinstance(numeric, int):
        raise ValueError(f"--log_level={level!r} is not a logging level; use DEBUG, INFO, WARNING or ERROR")
    debug = numeric <= logging.DEBUG
    if not debug:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
        filter_native_stderr()
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format=fmt, stream=sys.stderr,
                        force=True)
    logging.getLogger("glmjax").setLevel(numeric)
    if not debug:
        for lib in ("absl", "jax", "orbax", "tensorflow", "etils"):
            logging.getLogger(lib).setLevel(logging.WARNING)


def filter_native_stderr() -> bool:
    """Send file descriptor 2 through the noise filter; Python's ``sys.stderr`` keeps the terminal.

    Idempotent; returns False (and does nothing) where stderr has no file descriptor.
    """
    if _state.get("proc") is not None:
        return True
    try:
        # Only for a command's own console: when stderr was redirected in-process (pytest's capture, a
        # caller's StringIO), fd 2 is not the user's terminal and is left alone.
        if sys.stderr is not sys.__stderr__ or sys.stderr.fileno() != 2:
            return False
        sys.stderr.flush()
        original = os.dup(2)
    except (OSError, ValueError, AttributeError):
        return False
    proc = subprocess.Popen([sys.executable, "-u", "-c", _FILTER, NOISE_RE.pattern], stdin=subprocess.PIPE,
                            stdout=original, stderr=original, close_fds=True)
    # Python-level writes go straight to the original stream (tqdm's carriage returns stay unbuffered).
    sys.stderr = os.fdopen(os.dup(original), "w", buffering=1, encoding="utf-8", errors="replace")
    os.dup2(proc.stdin.fileno(), 2)
    _state.update(proc=proc, original=original)
    atexit.register(_close_filter)
    return True


def _close_filter() -> None:
    proc = _state.pop("proc", None)
    if proc is None:
        return
    try:
        sys.stderr.flush()
        os.dup2(_state.pop("original"), 2)  # the filter's stdin is now only held by proc.stdin
        proc.stdin.close()
        proc.wait(timeout=5)
    except Exception:  # at interpreter exit: never fail the command for its console
        pass
