"""The README's main job: `python -m glmjax.train --config=configs/tiny.py --workdir=DIR` on the embedded
corpus, one CPU device, in a subprocess exactly as a user runs it."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, like a laptop
    return subprocess.run([sys.executable, "-m", "glmjax.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_help_lists_flags():
    r = run_cli("--help", timeout=120)
    assert r.returncode == 0
    for flag in ("--config", "--workdir", "--restart", "--config.KEY=VALUE"):
        assert flag in r.stdout


def test_tiny_config_trains_and_eval_loss_falls(tmp_path):
    workdir = os.path.relpath(tmp_path, REPO)  # a relative --workdir, as in the README
    r = run_cli("--config=configs/tiny.py", f"--workdir={workdir}", "--config.steps=200",
                "--config.eval_every=100", "--config.log_every=20")
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = {rec["step"]: rec["eval_loss"] for rec in records if "eval_loss" in rec}
    assert set(evals) == {0, 100, 200}
    assert evals[200] < evals[0] - 1.5, evals  # from ~ln(vocab)=7.6 to well below
    train = [rec for rec in records if "loss" in rec]
    assert [rec["step"] for rec in train] == list(range(20, 201, 20))
    for rec in train:
        for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "mfu"):
            assert isinstance(rec[key], float) and rec[key] == rec[key], (key, rec)
        assert rec["tokens_per_second"] > 0 and rec["mfu"] > 0  # CPU MFU is a ratio to a measured matmul rate
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert_quiet_console(r.stderr)
    assert "done: step 200, loss " in r.stderr and "eval loss " in r.stderr

    # Running the finished run again says so and how to go on, instead of an empty summary.
    again = run_cli("--config=configs/tiny.py", f"--workdir={workdir}", "--config.steps=200",
                    "--config.eval_every=100", "--config.log_every=20")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already at step 200 of 200" in again.stderr
    assert "--config.steps=400" in again.stderr and "--restart=false" in again.stderr
    assert "done: {}" not in again.stderr


OUR_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING|ERROR) glmjax[.\w]*: ")


def assert_quiet_console(stderr: str):
    """Only our own lines: glmjax log lines and the progress bar; no TensorFlow / absl / JAX chatter."""
    for line in stderr.replace("\r", "\n").splitlines():
        if line.strip():
            assert OUR_LINE.match(line) or line.startswith("train:"), f"not our line: {line!r}"
    for word in ("cuda", "absl", "normalizer.cc", "libtpu", "E0000", "empty file"):
        assert word not in stderr, word
