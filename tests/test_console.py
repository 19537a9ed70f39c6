"""The quiet console: library chatter (TensorFlow / absl C++ lines, SentencePiece, JAX INFO) hidden below
``--log_level=DEBUG``; our own lines, real warnings and unknown native errors always shown."""
import subprocess
import sys
import textwrap

import pytest

from glmjax.console import is_noise

# Lines a fresh run printed before (one per source), and lines that must never be hidden.
NOISE_LINES = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796216177.935907    5514 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
    "GPU will not be used.",
    "E0000 00:00:1796216184.612096    5514 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
    "Failed call to cuInit: UNKNOWN ERROR (303)",
    "W1202 12:56:24.612000  12345 tpu_initializer.cc:88] libtpu: no TPU found",
    "normalizer.cc(51) LOG(INFO) precompiled_charsmap is empty. use identity normalization.",
]
KEPT_LINES = [
    "2026-12-02 12:56:16,634 INFO glmjax.train: model: 0.95M parameters",
    "F0000 00:00:1796216184.612096    5514 hlo_instruction.cc:52] Check failed: shape mismatch",
    "E0000 00:00:1796216184.612096    5514 pjrt_client.cc:99] RESOURCE_EXHAUSTED: out of memory",
    "Traceback (most recent call last):",
    "error: --workdir=/tmp/x is an existing file",
]


@pytest.mark.parametrize("line", NOISE_LINES)
def test_library_chatter_is_noise(line):
    assert is_noise(line)


@pytest.mark.parametrize("line", KEPT_LINES)
def test_real_lines_are_kept(line):
    assert not is_noise(line)


CHILD = textwrap.dedent("""
    import logging, os, sys
    from glmjax.console import setup_logging
    setup_logging(sys.argv[1])
    for line in {noise!r} + {kept!r}:
        os.write(2, (line + "\\n").encode())          # native writes (C++ libraries) go to fd 2
    logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu'")
    logging.getLogger("absl").info("orbax chatter")
    logging.getLogger("glmjax.train").info("our line")
    logging.getLogger("glmjax.data").warning("a real warning")
    print("progress\\r", end="", file=sys.stderr, flush=True)  # tqdm-style, no newline
""")


def run_child(level):
    code = CHILD.format(noise=NOISE_LINES, kept=KEPT_LINES)
    return subprocess.run([sys.executable, "-c", code, level], capture_output=True, text=True, timeout=300)


def test_native_stderr_filtered_at_info():
    r = run_child("INFO")
    assert r.returncode == 0, r.stderr
    for line in NOISE_LINES:
        assert line not in r.stderr
    for line in KEPT_LINES:
        assert line in r.stderr
    assert "our line" in r.stderr and "a real warning" in r.stderr and "progress" in r.stderr
    assert "Unable to initialize backend" not in r.stderr and "orbax chatter" not in r.stderr


def test_debug_shows_everything():
    r = run_child("DEBUG")
    assert r.returncode == 0, r.stderr
    for line in NOISE_LINES + KEPT_LINES:
        assert line in r.stderr
    assert "Unable to initialize backend" in r.stderr and "our line" in r.stderr


def test_native_message_before_a_crash_is_not_lost():
    """The filter is a separate process: what a library prints right before abort() still arrives."""
    code = ("import os, sys\nfrom glmjax.console import setup_logging\nsetup_logging('INFO')\n"
            "os.write(2, b'F0000 00:00:1.0 1 x.cc:1] Check failed: boom\\n')\nos.abort()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "Check failed: boom" in r.stderr


def test_bad_log_level():
    from glmjax.console import setup_logging

    with pytest.raises(ValueError, match="DEBUG, INFO"):
        setup_logging("LOUD")


def test_in_process_callers_keep_their_stderr(capsys):
    """Called from a test or a notebook (stderr already redirected), nothing is swapped."""
    import sys as _sys

    from glmjax.console import filter_native_stderr

    before = _sys.stderr
    assert filter_native_stderr() is False
    assert _sys.stderr is before
    print("still captured", file=_sys.stderr)
    assert "still captured" in capsys.readouterr().err
